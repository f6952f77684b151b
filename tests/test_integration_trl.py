"""TRL 1.16's GRPO and DPO trainers with the fused adapters (kernels/integrations/trl.py) against TRL's own path:
per-token log-probs, losses, gradients and two optimizer steps on a tiny random Qwen2, fp32, CPU."""

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (it is in the `dev` extra: pip install -e '.[dev]')")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from kernels._testing import assert_rel_close  # noqa: E402
from kernels.integrations.trl import FusedDPOTrainer, FusedGRPOTrainer, install_head  # noqa: E402
from tests.tiny_lm import build_tiny_qwen2, char_tokenizer  # noqa: E402


def _close(ours, theirs, kind, name):
    """fp32 on both paths, only summation order differs: the kernels' fixed fp32 tolerances, relative to the
    largest of TRL's values (kernels/_testing.REL_TOL: 1e-5 for values, 1e-4 for gradients)."""
    assert_rel_close(ours, theirs, torch.float32, kind, name=name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


def _reward(completions, **kwargs):
    """Deterministic: vowels are good, length is bad."""
    return [sum(c.count(v) for v in "aeiou") - 0.1 * len(c) for c in completions]


def _grpo_args(tmp_path, **overrides):
    # bf16=False: TRL turns bf16 autocast on by default, also on CPU; these comparisons are in fp32.
    # optim="sgd": Adam's first step is about lr * sign(grad), which turns rounding-level differences in near-zero
    # gradients into lr-sized parameter differences; SGD keeps parameter differences at lr * gradient differences.
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                max_steps=2, num_iterations=2, learning_rate=0.5, optim="sgd", max_grad_norm=1e9, beta=0.04,
                use_bias_correction_kl=False, bf16=False,
                epsilon_high=0.28, temperature=0.9, logging_steps=1, report_to="none", save_strategy="no",
                use_cpu=True, seed=0, disable_dropout=True, dataloader_num_workers=0)
    return GRPOConfig(**{**base, **overrides})


def _grpo(cls, model_dir, tmp_path, **overrides):
    dataset = Dataset.from_dict({"prompt": ["ab", "cd", "hello", "xyz"]})
    return cls(model=str(model_dir), reward_funcs=_reward, args=_grpo_args(tmp_path, **overrides),
               train_dataset=dataset, processing_class=char_tokenizer())


class _Recorder(TrainerCallback):
    """Gradients before each optimizer step (after clipping, which max_grad_norm=1e9 disables)."""

    def __init__(self):
        self.model, self.grads = None, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})


def _train(trainer):
    """Run trainer.train(); returns (losses per compute_loss call, grads per step, final parameters, the largest
    parameter change)."""
    rec, losses = _Recorder(), []
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    rec.model = trainer.model
    trainer.add_callback(rec)
    compute_loss = trainer.compute_loss

    def recording(*args, **kwargs):
        loss = compute_loss(*args, **kwargs)
        losses.append(loss.detach().clone())
        return loss

    trainer.compute_loss = recording
    trainer.train()
    final = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return losses, rec.grads, final, max((final[n] - p).abs().max().item() for n, p in start.items())


def _assert_same_run(ours, theirs):
    (l1, g1, p1, moved), (l2, g2, p2, _) = ours, theirs
    assert len(l1) == len(l2) == 2 and len(g1) == len(g2) == 2
    _close(torch.stack(l1), torch.stack(l2), "value", "losses")
    for step in range(2):
        assert g1[step].keys() == g2[step].keys()
        for name in g1[step]:
            _close(g1[step][name], g2[step][name], "grad", f"step {step} grad {name}")
    for name in p1:
        _close(p1[name], p2[name], "value", f"param {name}")
    return moved


# ---------------------------------------------------------------------------------------------------- head
def test_head_logprobs_entropy_and_grads_match_trl(model_dir):
    theirs = AutoModelForCausalLM.from_pretrained(model_dir)
    ours = copy.deepcopy(theirs)
    add_fused_lm_head(theirs, temperature=0.7, outputs=("log_probs", "entropy"))
    add_fused_lm_head(ours, temperature=0.7, outputs=("log_probs", "entropy"))
    undo = install_head(ours, temperature=0.7, entropy=True)
    input_ids = torch.randint(3, 32, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :6] = -100  # prompt
    w = torch.randn(3, 11)
    results = []
    for model in (ours, theirs):
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        ((out.log_probs * w).sum() + (out.entropy * w).sum()).backward()
        results.append((out.log_probs, out.entropy, {n: p.grad for n, p in model.named_parameters()}))
    (lp1, e1, g1), (lp2, e2, g2) = results
    assert (lp1[:, :5] == 0).all() and (lp1[:, 5:] < 0).all()  # scored exactly where the labels are
    _close(lp1, lp2, "value", "log_probs")
    _close(e1, e2, "value", "entropy")
    for name in g1:
        _close(g1[name], g2[name], "grad", name)
    # generation goes through the previous forward, and undo restores it
    gen = ours.generate(input_ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert torch.equal(gen, theirs.generate(input_ids[:1, :4], max_new_tokens=5, do_sample=False))
    undo()
    assert "forward" in ours.__dict__  # TRL's wrap, which was there before ours
    assert ours(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs.shape == (3, 11)


# ---------------------------------------------------------------------------------------------------- GRPO
def _grpo_inputs(trainer, seed=1):
    """A hand-made GRPO micro-batch: left-padded prompts, ragged completions (one empty), old and reference
    log-probs near the current ones so ratios land on both sides of both clips."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids, completion_ids = torch.randint(3, 32, (4, 3), generator=g), torch.randint(3, 32, (4, 6), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[2, 0] = 0
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[0, 4:] = 0
    completion_mask[3, :] = 0  # an empty completion: TRL's "grpo" still counts it in the mean
    input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention_mask, 6)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "advantages": torch.randn(4, generator=g),
            "old_per_token_logps": logps + 0.4 * torch.randn(4, 6, generator=g),
            "ref_per_token_logps": logps + 0.3 * torch.randn(4, 6, generator=g),
            "num_items_in_batch": completion_mask.sum().float()}


@pytest.mark.parametrize("loss_type,beta,delta", [("grpo", 0.04, None), ("bnpo", 0.0, None), ("dr_grpo", 0.04, None),
                                                  ("dapo", 0.04, 1.5), ("luspo", 0.0, None)])
def test_grpo_loss_and_grads_match_trl(model_dir, tmp_path, loss_type, beta, delta):
    kw = dict(loss_type=loss_type, beta=beta, delta=delta, gradient_accumulation_steps=2)
    ours, theirs = _grpo(FusedGRPOTrainer, model_dir, tmp_path, **kw), _grpo(GRPOTrainer, model_dir, tmp_path, **kw)
    inputs = _grpo_inputs(theirs)
    results = []
    for t in (ours, theirs):
        t.model.train()
        t.current_gradient_accumulation_steps = 2
        loss = t._compute_loss(t.model, inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in t.model.named_parameters() if p.grad is not None}))
    (l1, g1), (l2, g2) = results
    _close(l1, l2, "value", "loss")
    assert g1.keys() == g2.keys() and len(g1) > 0
    for name in g1:
        _close(g1[name], g2[name], "grad", name)
    m1, m2 = ours._metrics["train"], theirs._metrics["train"]
    for name in ["entropy", "clip_ratio/region_mean"] + (["kl"] if beta else []):
        assert m1[name][-1] == pytest.approx(m2[name][-1], rel=1e-4, abs=1e-6), name
    assert 0 < m2["clip_ratio/region_mean"][-1] < 1  # the batch exercises the clip


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_two_steps_match_trl(model_dir, tmp_path, loss_type):
    """Real training: generation, rewards, old/ref log-probs, two SGD steps on the same completions
    (num_iterations=2, so the second step is off-policy and clips)."""
    ours = _train(_grpo(FusedGRPOTrainer, model_dir, tmp_path / "ours", loss_type=loss_type))
    theirs = _train(_grpo(GRPOTrainer, model_dir, tmp_path / "theirs", loss_type=loss_type))
    assert _assert_same_run(ours, theirs) > 1e-3  # the steps moved the parameters


def test_grpo_refuses_unsupported_options(model_dir, tmp_path):
    with pytest.raises(ValueError) as e:
        _grpo(FusedGRPOTrainer, model_dir, tmp_path, loss_type="sapo", importance_sampling_level="sequence",
              top_entropy_quantile=0.5, delta=1.1)
    msg = str(e.value)
    assert "4 unsupported option(s)" in msg
    for option in ("loss_type='sapo'", "importance_sampling_level='sequence'", "top_entropy_quantile=0.5", "delta=1.1"):
        assert option in msg


# ----------------------------------------------------------------------------------------------------- DPO
def _dpo(cls, model_dir, tmp_path, **overrides):
    dataset = Dataset.from_dict({"prompt": ["ab", "hello", "xyz", "cd"],
                                 "chosen": ["a e i", "oua", "e", "ia ai"],
                                 "rejected": ["xz", "qrst w", "p", "kkk"]})
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=0.5, optim="sgd",
                max_grad_norm=1e9, beta=0.1, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                seed=0, dataloader_num_workers=0, bf16=False)
    args = DPOConfig(**{**base, **overrides})
    return cls(model=str(model_dir), args=args, train_dataset=dataset, processing_class=char_tokenizer())


@pytest.mark.parametrize("options", [dict(loss_type=["sigmoid"]),
                                     dict(loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.5]),
                                     dict(loss_type=["sigmoid"], precompute_ref_log_probs=True)],
                         ids=["sigmoid", "sigmoid+sft", "precomputed-ref"])
def test_dpo_two_steps_match_trl(model_dir, tmp_path, options):
    ours_trainer = _dpo(FusedDPOTrainer, model_dir, tmp_path / "ours", **options)
    ours = _train(ours_trainer)
    theirs_trainer = _dpo(DPOTrainer, model_dir, tmp_path / "theirs", **options)
    theirs = _train(theirs_trainer)
    assert _assert_same_run(ours, theirs) > 1e-3
    m1, m2 = ours_trainer._metrics["train"], theirs_trainer._metrics["train"]
    for name in ("rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert m1[name] == pytest.approx(m2[name], rel=1e-4, abs=1e-6), name


def test_dpo_refuses_unsupported_options(model_dir, tmp_path):
    with pytest.raises(ValueError) as e:
        _dpo(FusedDPOTrainer, model_dir, tmp_path, loss_type=["hinge"], ld_alpha=0.5)
    msg = str(e.value)
    assert "2 unsupported option(s)" in msg and "loss_type=['hinge']" in msg and "ld_alpha=0.5" in msg
