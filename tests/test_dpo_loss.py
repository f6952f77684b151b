"""DPO + SFT loss: fused path and reference against formulas written out here, plus gradcheck and errors.

The direct formulas use full logits -> log_softmax in fp64 and Python loops over sequences and pairs, so they
share no code with kernels/dpo_loss.py.
"""

import functools
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from kernels import _onepass
from kernels._testing import assert_close
from kernels.dpo_loss import dpo_loss, dpo_loss_ref

H, V = 24, 13


def _naive_logp(hidden, weight, targets, temperature=1.0):
    logits = hidden.double() @ weight.double().T / temperature
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


def _direct(x, lens, *, beta=0.1, sft_weight=1.0, sft_norm="token-mean", label_smoothing=0.0, temperature=1.0):
    """(loss, dpo, sft, per-pair chosen rewards, rejected rewards), one sequence and one pair at a time."""
    logp = _naive_logp(x["hidden"], x["weight"], x["targets"], temperature)
    seq_lp, seq_cnt, start = [], [], 0
    for length in lens:
        toks = [logp[n] for n in range(start, start + length) if x["mask"][n]]
        seq_lp.append(sum(toks, logp.sum() * 0))
        seq_cnt.append(len(toks))
        start += length
    chosen = [i for i, c in enumerate(x["is_chosen"].tolist()) if c]
    rejected = [i for i, c in enumerate(x["is_chosen"].tolist()) if not c]
    dpo, rc, rr = 0, [], []
    for k, (c, r) in enumerate(zip(chosen, rejected, strict=True)):
        margin = (seq_lp[c] - x["ref_chosen_logps"][k]) - (seq_lp[r] - x["ref_rejected_logps"][k])
        dpo = dpo - (1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
        rc.append(beta * (seq_lp[c] - x["ref_chosen_logps"][k]).item())
        rr.append(beta * (seq_lp[r] - x["ref_rejected_logps"][k]).item())
    dpo = dpo / len(chosen)
    if sft_norm == "token-mean":
        sft = -sum(seq_lp[c] for c in chosen) / max(sum(seq_cnt[c] for c in chosen), 1)
    else:
        means = [-seq_lp[c] / seq_cnt[c] for c in chosen if seq_cnt[c] > 0]
        sft = sum(means) / max(len(means), 1)
    return dpo + sft_weight * sft, dpo, sft, rc, rr


def _make(lens, is_chosen, *, dtype=torch.float64, empty_seq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    num_pairs = sum(is_chosen)
    x = dict(hidden=torch.randn(n, H, dtype=dtype, generator=g).requires_grad_(),
             weight=(torch.randn(V, H, dtype=dtype, generator=g) * 0.5).requires_grad_(),
             targets=torch.randint(0, V, (n,), generator=g), mask=torch.rand(n, generator=g) > 0.3,
             cu_seqlens=torch.tensor([0] + lens).cumsum(0).to(torch.int32), is_chosen=torch.tensor(is_chosen),
             ref_chosen_logps=(-3 * n / len(lens) + torch.randn(num_pairs, generator=g)).to(dtype),
             ref_rejected_logps=(-3 * n / len(lens) + torch.randn(num_pairs, generator=g)).to(dtype))
    if empty_seq is not None:
        cu = x["cu_seqlens"]
        x["mask"][cu[empty_seq]: cu[empty_seq + 1]] = False
    return x


def _run(fn, x, **kw):
    loss, metrics = fn(x["hidden"], x["weight"], x["targets"], x["mask"], x["cu_seqlens"], x["is_chosen"],
                       x["ref_chosen_logps"], x["ref_rejected_logps"], **kw)
    return (loss, metrics, *torch.autograd.grad(loss, (x["hidden"], x["weight"])))


# impl="onepass" with room for 20 tokens a chunk: the pairs of CASES go one or two to a chunk.
ONEPASS = functools.partial(dpo_loss, impl="onepass")


@pytest.fixture(autouse=True)
def small_onepass_chunks(monkeypatch):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 20 * V * 8)


# (lens, is_chosen, sequence with no response tokens): one pair, interleaved pairs, chosen-first blocks, N = 2
CASES = [([4, 6], [True, False], None), ([5, 3, 7, 2, 4, 6], [False, True, True, False, True, False], 2),
         ([1, 1], [False, True], None), ([3, 8, 2, 5], [True, True, False, False], 1)]


@pytest.mark.parametrize("fn", [dpo_loss, ONEPASS, dpo_loss_ref], ids=["fused", "onepass", "ref"])
@pytest.mark.parametrize("lens,is_chosen,empty", CASES)
@pytest.mark.parametrize("sft_norm", ["token-mean", "seq-mean"])
@pytest.mark.parametrize("label_smoothing,sft_weight", [(0.0, 1.0), (0.2, 0.5), (0.1, 0.0)])
def test_matches_direct_formula(fn, lens, is_chosen, empty, sft_norm, label_smoothing, sft_weight):
    x = _make(lens, is_chosen, empty_seq=empty)
    kw = dict(beta=0.5, sft_weight=sft_weight, sft_norm=sft_norm, label_smoothing=label_smoothing, temperature=0.8)
    loss, metrics, gh, gw = _run(fn, x, **kw)
    d_loss, d_dpo, d_sft, rc, rr = _direct(x, lens, **kw)
    d_gh, d_gw = torch.autograd.grad(d_loss, (x["hidden"], x["weight"]))
    assert_close(loss, d_loss, atol=1e-10, rtol=1e-10, name="loss")  # fp64 throughout: summation order only
    assert_close(gh, d_gh, atol=1e-10, rtol=1e-9, name="grad_hidden")
    assert_close(gw, d_gw, atol=1e-10, rtol=1e-9, name="grad_weight")
    rc, rr = torch.tensor(rc, dtype=torch.float64), torch.tensor(rr, dtype=torch.float64)
    expect = {"dpo_loss": d_dpo, "sft_loss": d_sft, "rewards_chosen": rc.mean(), "rewards_rejected": rr.mean(),
              "reward_margin": (rc - rr).mean(), "reward_accuracy": (rc > rr).double().mean(),
              "logps_chosen": (rc / 0.5 + x["ref_chosen_logps"]).mean(),
              "logps_rejected": (rr / 0.5 + x["ref_rejected_logps"]).mean()}
    assert metrics.keys() == expect.keys()
    for k, v in expect.items():
        assert_close(metrics[k], torch.as_tensor(v).detach(), atol=1e-10, rtol=1e-10, name=k)
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sft_norm", ["token-mean", "seq-mean"])
def test_fused_matches_reference(dtype, sft_norm):
    x = _make([5, 3, 7, 2, 4, 6], [False, True, True, False, True, False], dtype=dtype, empty_seq=1, seed=1)
    x["mask"] = x["mask"].to(dtype) * torch.rand(x["mask"].shape[0]).to(dtype)  # float token weights
    kw = dict(beta=0.2, sft_norm=sft_norm, label_smoothing=0.1)
    loss, metrics, gh, gw = _run(dpo_loss, x, **kw)
    r_loss, r_metrics, r_gh, r_gw = _run(dpo_loss_ref, x, **kw)
    # fp32: same fp32 log-probs on both paths. bf16: the grads are rounded to bf16 (2^-8 relative).
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(loss, r_loss, atol=tol, rtol=tol, name="loss")
    assert_close(gh.float(), r_gh.float(), atol=tol, rtol=tol, name="grad_hidden")
    assert_close(gw.float(), r_gw.float(), atol=tol, rtol=tol, name="grad_weight")
    assert gh.dtype == dtype and gw.dtype == dtype
    for k in metrics:
        assert_close(metrics[k], r_metrics[k], atol=tol, rtol=tol, name=k)


def test_gradcheck_reference_fp64():
    x = _make([3, 2, 2, 3], [True, False, False, True])
    rest = [x[k] for k in ("targets", "mask", "cu_seqlens", "is_chosen", "ref_chosen_logps", "ref_rejected_logps")]

    def f(hidden, weight):
        return dpo_loss_ref(hidden, weight, *rest, beta=0.3, label_smoothing=0.1, sft_norm="seq-mean")[0]

    assert torch.autograd.gradcheck(f, (x["hidden"], x["weight"]))


def test_label_smoothing_half_gives_constant_dpo():
    # ls = 0.5: -0.5 * (logsigmoid(z) + logsigmoid(-z)) is minimised at z = 0 with value log 2
    x = _make([4, 6], [True, False])
    x["ref_chosen_logps"] = x["ref_rejected_logps"] = torch.zeros(1, dtype=torch.float64)
    loss, metrics, _, _ = _run(dpo_loss, x, label_smoothing=0.5, sft_weight=0.0, beta=1e-9)
    assert_close(metrics["dpo_loss"], torch.tensor(math.log(2), dtype=torch.float64), atol=1e-8, name="dpo")


def test_grad_output_scaling_frozen_head_and_no_grad(monkeypatch):
    x = _make([4, 6, 3, 5], [True, False, True, False])
    args = [x[k] for k in ("targets", "mask", "cu_seqlens", "is_chosen", "ref_chosen_logps", "ref_rejected_logps")]
    loss, _ = dpo_loss(x["hidden"], x["weight"], *args)
    (-2.0 * loss).backward()
    r_loss, _ = dpo_loss_ref(x["hidden"], x["weight"], *args)
    r_gh, r_gw = torch.autograd.grad(-2.0 * r_loss, (x["hidden"], x["weight"]))
    assert_close(x["hidden"].grad, r_gh, atol=1e-12, rtol=1e-10, name="grad_hidden x-2")
    assert_close(x["weight"].grad, r_gw, atol=1e-12, rtol=1e-10, name="grad_weight x-2")
    h = x["hidden"].detach().requires_grad_()
    dpo_loss(h, x["weight"].detach(), *args)[0].backward()
    assert_close(h.grad, r_gh / -2.0, atol=1e-12, rtol=1e-10, name="grad_hidden, frozen weight")

    def no_bwd(*args, **kwargs):
        raise AssertionError("logprobs_bwd ran under no_grad")

    # dpo_loss reaches logprobs_bwd through kernels.fused_logprobs.grads_in_forward
    monkeypatch.setattr(importlib.import_module("kernels.fused_logprobs"), "logprobs_bwd", no_bwd)
    with torch.no_grad():
        loss, _ = dpo_loss(x["hidden"], x["weight"], *args)
    assert_close(loss, r_loss.detach(), atol=1e-12, name="no_grad loss")


def _bad(**over):
    x = _make([3, 4, 2, 5], [True, False, True, False])
    x.update(over)
    kw = {k: x.pop(k) for k in list(x) if k in ("beta", "sft_weight", "sft_norm", "label_smoothing", "temperature")}
    return dpo_loss(x["hidden"], x["weight"], x["targets"], x["mask"], x["cu_seqlens"], x["is_chosen"],
                    x["ref_chosen_logps"], x["ref_rejected_logps"], **kw)


@pytest.mark.parametrize("over,match", [
    (dict(is_chosen=torch.tensor([True, True, True, False])), "is_chosen"),
    (dict(is_chosen=torch.tensor([1, 0, 1, 0])), "is_chosen"),
    (dict(is_chosen=torch.tensor([True, False])), "is_chosen"),
    (dict(ref_chosen_logps=torch.zeros(3, dtype=torch.float64)), "ref_chosen_logps"),
    (dict(ref_rejected_logps=torch.zeros(2, dtype=torch.long)), "ref_rejected_logps"),
    (dict(mask=torch.ones(13, dtype=torch.bool)), "mask"),
    (dict(cu_seqlens=torch.tensor([0, 3, 7, 9, 15], dtype=torch.int32)), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 3, 2, 9, 14], dtype=torch.int32)), "cu_seqlens"),
    (dict(hidden=torch.zeros(14, H, dtype=torch.float32)), "weight"),
    (dict(sft_norm="sum"), "sft_norm"),
    (dict(beta=0.0), "beta"),
    (dict(sft_weight=-1.0), "sft_weight"),
    (dict(label_smoothing=0.7), "label_smoothing"),
    (dict(temperature=-1.0), "temperature"),
])
def test_bad_inputs_name_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)
