"""The verl adapter (kernels/integrations/verl.py): verl 0.9's FSDP actor log-prob/entropy function with and without
it, on a tiny random Qwen2, fp32, CPU.

verl's actor step (`FSDPEngineWithLMHead.forward_step`) needs a CUDA/NPU platform, so the tests call the three
things it does, unchanged: `prepare_model_inputs`, the model, `prepare_model_outputs`. verl is not in the `dev`
extra (its metadata pins transformers<5.11, and its hydra/omegaconf need antlr4 4.9 where math-verify needs 4.13):
`make test-verl` runs this file in its own venv. `test_head_matches_logits_contract` needs no verl and runs here.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from kernels._testing import assert_rel_close
from kernels.integrations.verl import install_head
from tests.tiny_lm import build_tiny_qwen2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


def _close(ours, theirs, kind, name):
    """fp32 on both paths: the kernels' fixed fp32 tolerances relative to the largest reference value."""
    assert_rel_close(ours, theirs, torch.float32, kind, name=name)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_head_matches_logits_contract(model_dir):
    """verl's fused-mode call (packed row, rolled next tokens, temperature) against log_softmax of the model's own
    logits; gradients too. Needs no verl."""
    theirs = AutoModelForCausalLM.from_pretrained(model_dir)
    ours = copy.deepcopy(theirs)
    undo = install_head(ours)
    input_ids = torch.randint(3, 32, (1, 17))
    position_ids = torch.cat([torch.arange(n) for n in (5, 9, 3)])[None]
    rolled = torch.roll(input_ids, -1, -1)
    w = torch.randn(1, 17)
    out = ours(input_ids=input_ids, position_ids=position_ids, temperature=0.7, return_dict=True, shift_labels=rolled)
    ((out.log_probs * w).sum() + (out.entropy * w).sum()).backward()
    # use_cache=False as verl passes it: transformers then keeps the packed samples apart (position_ids restart)
    logits = theirs(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    logp_all = torch.log_softmax(logits / 0.7, dim=-1)
    logp = logp_all.gather(-1, rolled[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ((logp * w).sum() + (entropy * w).sum()).backward()
    _close(out.log_probs, logp, "value", "log_probs")
    _close(out.entropy, entropy, "value", "entropy")
    g1, g2 = _grads(ours), _grads(theirs)
    assert g1.keys() == g2.keys()
    for name in g1:
        _close(g1[name], g2[name], "grad", name)
    with pytest.raises(ValueError, match="per-sample temperature"):
        ours(input_ids=input_ids, temperature=torch.full((1,), 0.7), shift_labels=rolled)
    # a plain call still returns logits, and undo removes the wrap
    assert ours(input_ids=input_ids).logits.shape == (1, 17, 32)
    undo()
    assert "forward" not in ours.__dict__


# ------------------------------------------------------------------------------------------- verl's own path
def _engine(model):
    """An FSDPEngineWithLMHead around a plain (unsharded) model, with the attributes its log-prob path reads."""
    from verl.utils import torch_functional as verl_F
    from verl.workers.config import FSDPEngineConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = object.__new__(FSDPEngineWithLMHead)  # __init__ builds FSDP on a device mesh; not needed here
    engine.module, engine.engine_config = model, FSDPEngineConfig()
    engine.pad_to_length, engine.use_ulysses_sp, engine._autocast_dtype = False, False, torch.float32
    engine.compute_entropy_from_logits = verl_F.entropy_from_logits
    return engine


LENS = (5, 9, 3)


def _micro_batch(fused: bool, remove_padding: bool, seed: int = 1):
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 32, (n,), generator=g) for n in LENS]
    tensors = {"input_ids": tu.nested_tensor_from_tensor_list(ids),
               "position_ids": tu.nested_tensor_from_tensor_list([torch.arange(n) for n in LENS])}
    flags = {"temperature": 0.7, "use_remove_padding": remove_padding, "use_fused_kernels": fused,
             "calculate_entropy": True, "pad_token_id": 0}
    return tu.get_tensordict(tensors, flags)


def _actor_step(engine, micro_batch):
    """What FSDPEngineWithLMHead.forward_step does (minus device moves and autocast): returns the nested
    log_probs and entropy."""
    inputs, output_args = engine.prepare_model_inputs(micro_batch)
    raw = engine.module(**inputs, use_cache=False)
    out = engine.prepare_model_outputs(raw, output_args, micro_batch, logits_processor_func=None)
    return out["log_probs"].values(), out["entropy"].values()


@pytest.mark.parametrize("remove_padding", [True, False], ids=["packed", "padded"])
def test_verl_actor_logprobs_entropy_grads_and_steps(model_dir, remove_padding):
    pytest.importorskip("verl", reason="verl is not installed: `make test-verl` runs this file in .venv-verl")
    theirs = AutoModelForCausalLM.from_pretrained(model_dir)
    ours = copy.deepcopy(theirs)
    install_head(ours)
    # The last position of each sequence predicts past its end: verl's padded fused path rolls each padded row
    # while its logits path rolls the packed tokens, so that position differs between verl's own two paths. verl's
    # response mask never covers it; leave it out of the loss and the comparison.
    keep = torch.ones(sum(LENS), dtype=torch.bool)
    keep[torch.tensor(LENS).cumsum(0) - 1] = False
    runs = []
    for model, fused in ((ours, True), (theirs, False)):
        engine, opt = _engine(model), torch.optim.SGD(model.parameters(), lr=0.5)
        steps = []
        for step in range(2):
            logp, ent = _actor_step(engine, _micro_batch(fused, remove_padding, seed=step))
            w = torch.randn(logp.shape, generator=torch.Generator().manual_seed(step)) * keep
            loss = -(logp * w).mean() - 0.01 * ent.mean()  # a policy-gradient-like loss plus an entropy bonus
            opt.zero_grad()
            loss.backward()
            steps.append((logp.detach()[keep], ent.detach(), loss.detach(), _grads(model)))
            opt.step()
        runs.append((steps, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (s1, p1), (s2, p2) = runs
    for step in range(2):
        _close(s1[step][0], s2[step][0], "value", f"step {step} log_probs")
        _close(s1[step][1], s2[step][1], "value", f"step {step} entropy")
        _close(s1[step][2], s2[step][2], "value", f"step {step} loss")
        for name in s2[step][3]:
            _close(s1[step][3][name], s2[step][3][name], "grad", f"step {step} grad {name}")
    start = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert max((p2[n] - start[n]).abs().max().item() for n in p2) > 1e-3  # the steps moved the parameters
    for name in p1:
        _close(p1[name], p2[name], "value", f"param {name}")
