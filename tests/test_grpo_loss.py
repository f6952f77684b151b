"""GRPO loss: fused path and reference against per-token formulas written out here, plus gradcheck and errors.

The direct formulas use full logits -> log_softmax in fp64 and Python loops over sequences and tokens, so they
share no code with kernels/grpo_loss.py.
"""

import functools
import importlib
import math

import pytest
import torch

from kernels import _onepass, fused_logprobs_ref
from kernels._testing import assert_close
from kernels.grpo_loss import AGGS, KL_ESTIMATORS, grpo_loss, grpo_loss_ref

H, V = 24, 13
# Log-ratios logp - old on a grid that avoids the clip bounds log(0.8) = -0.223 and log(1.28) = 0.247 (a kink
# under fp32 rounding would flip the branch): some tokens clipped low, some high, some past the dual clip c = 3.
LOG_RATIOS = [-1.0, -0.5, -0.1, 0.05, 0.15, 0.4, 1.3]
REF_GAPS = [-1.0, -0.2, 0.3, 3.0]  # ref - logp; 3.0 pushes k3 past low_var_kl's clamp at 10


def _naive_logp(hidden, weight, targets, temperature=1.0):
    logits = hidden.double() @ weight.double().T / temperature
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)


def _direct(hidden, weight, targets, adv, old, mask, lens, ref, *, clip_low=0.2, clip_high=0.28, dual_clip=None,
            kl_coef=0.0, kl_estimator="k3", temperature=1.0, agg="token-mean"):
    """Per-token and per-sequence formulas, one scalar at a time (differentiable through the log_softmax)."""
    logp = _naive_logp(hidden, weight, targets, temperature)
    seqs, start = [], 0
    for length in lens:
        losses = []
        for n in range(start, start + length):
            if not mask[n]:
                continue
            a, r = adv[n].item(), torch.exp(logp[n] - old[n])
            pg = max(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
            if dual_clip is not None and a < 0:
                pg = min(pg, torch.tensor(-a * dual_clip, dtype=torch.float64))
            if kl_coef > 0:
                d = ref[n] - logp[n]
                kl = {"k1": -d, "k2": 0.5 * d**2, "k3": torch.exp(d) - d - 1,
                      "low_var_kl": torch.clamp(torch.exp(d) - d - 1, -10, 10)}[kl_estimator]
                pg = pg + kl_coef * kl
            losses.append(pg)
        seqs.append(losses)
        start += length
    every = [x for s in seqs for x in s]
    zero = logp.sum() * 0
    if agg == "token-mean":
        return sum(every, zero) / max(len(every), 1)
    if agg == "seq-mean-token-mean":
        nonempty = [sum(s, zero) / len(s) for s in seqs if s]
        return sum(nonempty, zero) / max(len(nonempty), 1)
    if agg == "seq-mean-token-sum":
        return sum(every, zero) / len(seqs)
    return sum(every, zero) / (len(seqs) * max(lens))  # Dr. GRPO: B x longest sequence


def _make(lens, *, dtype=torch.float64, all_masked_seq=None, temperature=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    hidden = torch.randn(n, H, dtype=dtype, generator=g)
    weight = torch.randn(V, H, dtype=dtype, generator=g) * 0.5
    targets = torch.randint(0, V, (n,), generator=g)
    logp = _naive_logp(hidden, weight, targets, temperature)
    idx = torch.arange(n)
    old = (logp - torch.tensor(LOG_RATIOS, dtype=torch.float64)[idx % len(LOG_RATIOS)]).to(dtype)
    ref = (logp + torch.tensor(REF_GAPS, dtype=torch.float64)[idx % len(REF_GAPS)]).to(dtype)
    adv = torch.randn(n, dtype=dtype, generator=g)
    mask = torch.rand(n, generator=g) > 0.25
    mask[0] = True
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    if all_masked_seq is not None:
        mask[cu[all_masked_seq]: cu[all_masked_seq + 1]] = False
    return dict(hidden=hidden.requires_grad_(), weight=weight.requires_grad_(), targets=targets, advantages=adv,
                old_logprobs=old, mask=mask, cu_seqlens=cu, ref_logprobs=ref)


def _run(fn, x, **kw):
    loss, metrics = fn(x["hidden"], x["weight"], x["targets"], x["advantages"], x["old_logprobs"], x["mask"],
                       cu_seqlens=x["cu_seqlens"], ref_logprobs=x["ref_logprobs"], **kw)
    gh, gw = torch.autograd.grad(loss, (x["hidden"], x["weight"]))
    return loss, metrics, gh, gw


def _direct_run(x, lens, **kw):
    loss = _direct(x["hidden"], x["weight"], x["targets"], x["advantages"], x["old_logprobs"], x["mask"], lens,
                   x["ref_logprobs"], **kw)
    return (loss, *torch.autograd.grad(loss, (x["hidden"], x["weight"]), allow_unused=True))


# impl="onepass" in chunks of 3 tokens (fp64: 12 bytes per logit across its two buffers), so chunks cut sequences.
ONEPASS = functools.partial(grpo_loss, impl="onepass")


@pytest.fixture(autouse=True)
def small_onepass_chunks(monkeypatch):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 3 * V * 8)


SHAPES = [([1], None), ([5], None), ([4, 7, 3], 1), ([6, 1, 9], None)]


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("lens,all_masked", SHAPES)
@pytest.mark.parametrize("fn", [grpo_loss, ONEPASS, grpo_loss_ref], ids=["fused", "onepass", "ref"])
def test_aggregations_match_direct_formula(fn, agg, lens, all_masked):
    x = _make(lens, all_masked_seq=all_masked)
    loss, _, gh, gw = _run(fn, x, agg=agg)
    d_loss, d_gh, d_gw = _direct_run(x, lens, agg=agg)
    assert_close(loss, d_loss, atol=1e-10, rtol=1e-10, name="loss")  # fp64 throughout: summation order only
    assert_close(gh, d_gh, atol=1e-10, rtol=1e-9, name="grad_hidden")
    assert_close(gw, d_gw, atol=1e-10, rtol=1e-9, name="grad_weight")
    assert gh.abs().max() > 0  # the grid leaves unclipped tokens, so the gradient is not trivially zero


@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("fn", [grpo_loss, ONEPASS, grpo_loss_ref], ids=["fused", "onepass", "ref"])
def test_kl_estimators_match_direct_formula(fn, kl_estimator):
    lens = [5, 8]
    x = _make(lens)
    kw = dict(kl_coef=0.3, kl_estimator=kl_estimator, agg="seq-mean-token-mean")
    loss, metrics, gh, gw = _run(fn, x, **kw)
    d_loss, d_gh, d_gw = _direct_run(x, lens, **kw)
    assert_close(loss, d_loss, atol=1e-10, rtol=1e-10, name="loss")
    assert_close(gh, d_gh, atol=1e-10, rtol=1e-9, name="grad_hidden")
    assert_close(gw, d_gw, atol=1e-10, rtol=1e-9, name="grad_weight")
    assert "kl_mean" in metrics and "kl_loss" in metrics


@pytest.mark.parametrize("fn", [grpo_loss, ONEPASS, grpo_loss_ref], ids=["fused", "onepass", "ref"])
@pytest.mark.parametrize("clip_low,clip_high,dual_clip", [(0.2, 0.28, 3.0), (0.1, 0.5, None), (0.3, 0.0, 1.5)])
def test_clip_higher_and_dual_clip_match_direct_formula(fn, clip_low, clip_high, dual_clip):
    lens = [9, 5]
    x = _make(lens, seed=1)
    x["advantages"] = torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5, -0.3, 0.7] * 2, dtype=torch.float64)
    kw = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, temperature=0.7)
    x["old_logprobs"] = x["old_logprobs"] + _naive_logp(x["hidden"], x["weight"], x["targets"], 0.7).detach() \
        - _naive_logp(x["hidden"], x["weight"], x["targets"]).detach()  # keep the log-ratio grid at T = 0.7
    loss, metrics, gh, gw = _run(fn, x, **kw)
    d_loss, d_gh, d_gw = _direct_run(x, lens, **kw)
    assert_close(loss, d_loss, atol=1e-10, rtol=1e-10, name="loss")
    assert_close(gh, d_gh, atol=1e-10, rtol=1e-9, name="grad_hidden")
    assert_close(gw, d_gw, atol=1e-10, rtol=1e-9, name="grad_weight")
    # clip fraction: tokens whose log-ratio grid value lies outside [log(1 - low), log(1 + high)] and whose
    # advantage sign makes the clipped branch win
    lr = torch.tensor(LOG_RATIOS * 2, dtype=torch.float64)
    a, m = x["advantages"], x["mask"]
    expect = ((lr > math.log1p(clip_high)) & (a > 0)) | ((lr < math.log1p(-clip_low)) & (a < 0))
    assert_close(metrics["clip_frac"], expect[m].double().mean(), atol=1e-12, name="clip_frac")
    if dual_clip is not None:
        dual = (a < 0) & (lr.exp() > dual_clip)
        assert_close(metrics["clip_frac_dual"], dual[m].double().mean(), atol=1e-12, name="clip_frac_dual")


def test_metrics_match_direct_formulas():
    lens = [4, 7, 3]
    x = _make(lens, all_masked_seq=2)
    _, metrics, _, _ = _run(grpo_loss, x, kl_coef=0.1, kl_estimator="k1", return_entropy=True)
    m = x["mask"]
    logp = _naive_logp(x["hidden"], x["weight"], x["targets"]).detach()
    ratio = torch.exp(logp - x["old_logprobs"])[m]
    assert_close(metrics["ratio_mean"], ratio.mean(), atol=1e-12, name="ratio_mean")
    assert_close(metrics["ratio_min"], ratio.min(), atol=1e-12, name="ratio_min")
    assert_close(metrics["ratio_max"], ratio.max(), atol=1e-12, name="ratio_max")
    assert_close(metrics["approx_kl"], (0.5 * (logp - x["old_logprobs"]) ** 2)[m].mean(), atol=1e-12, name="kl")
    assert_close(metrics["kl_mean"], (logp - x["ref_logprobs"])[m].mean(), atol=1e-12, name="kl_mean")
    p = torch.softmax(x["hidden"].detach() @ x["weight"].detach().T, -1)
    ent = -(p * p.log()).sum(-1)
    assert_close(metrics["entropy_mean"], ent[m].mean(), atol=1e-10, name="entropy_mean")
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGS)
def test_fused_matches_reference(agg, dtype):
    lens = [3, 11, 1, 6]
    x = _make(lens, dtype=dtype, all_masked_seq=2, seed=2)
    x["mask"] = x["mask"].to(dtype) * torch.rand(sum(lens)).to(dtype)  # float token weights
    kw = dict(agg=agg, kl_coef=0.05, kl_estimator="low_var_kl", dual_clip=3.0, return_entropy=True, temperature=0.9)
    loss, metrics, gh, gw = _run(grpo_loss, x, **kw)
    r_loss, r_metrics, r_gh, r_gw = _run(grpo_loss_ref, x, **kw)
    # fp32: same fp32 log-probs on both paths, the rest is summation order. bf16: the grads are rounded to bf16
    # (1 ulp = 2^-8 relative); the [N] loss math is fp32 on both paths.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(loss, r_loss, atol=tol, rtol=tol, name="loss")
    assert_close(gh.float(), r_gh.float(), atol=tol, rtol=tol, name="grad_hidden")
    assert_close(gw.float(), r_gw.float(), atol=tol, rtol=tol, name="grad_weight")
    assert gh.dtype == dtype and gw.dtype == dtype
    assert metrics.keys() == r_metrics.keys()
    for k in metrics:
        assert_close(metrics[k], r_metrics[k], atol=tol, rtol=tol, name=k)


def test_gradcheck_reference_fp64():
    x = _make([3, 2])
    args = (x["targets"], x["advantages"], x["old_logprobs"], x["mask"])

    def f(hidden, weight):
        return grpo_loss_ref(hidden, weight, *args, cu_seqlens=x["cu_seqlens"], ref_logprobs=x["ref_logprobs"],
                             kl_coef=0.2, dual_clip=3.0, agg="seq-mean-token-mean")[0]

    assert torch.autograd.gradcheck(f, (x["hidden"], x["weight"]))


def test_grad_output_scaling_partial_grads_and_no_grad(monkeypatch):
    x = _make([4, 5])
    loss, _ = grpo_loss(x["hidden"], x["weight"], x["targets"], x["advantages"], x["old_logprobs"], x["mask"])
    (3.0 * loss).backward()
    r_loss, _ = grpo_loss_ref(x["hidden"], x["weight"], x["targets"], x["advantages"], x["old_logprobs"], x["mask"])
    r_gh, r_gw = torch.autograd.grad(3.0 * r_loss, (x["hidden"], x["weight"]))
    assert_close(x["hidden"].grad, r_gh, atol=1e-12, rtol=1e-10, name="grad_hidden x3")
    assert_close(x["weight"].grad, r_gw, atol=1e-12, rtol=1e-10, name="grad_weight x3")
    # hidden only (a frozen lm_head): no weight gradient is computed
    h = x["hidden"].detach().requires_grad_()
    loss, _ = grpo_loss(h, x["weight"].detach(), x["targets"], x["advantages"], x["old_logprobs"], x["mask"])
    loss.backward()
    assert_close(h.grad, r_gh / 3, atol=1e-12, rtol=1e-10, name="grad_hidden only")
    def no_bwd(*args, **kwargs):
        raise AssertionError("logprobs_bwd ran under no_grad")

    # grads_in_forward (kernels/fused_logprobs.py) is where the losses reach logprobs_bwd
    monkeypatch.setattr(importlib.import_module("kernels.fused_logprobs"), "logprobs_bwd", no_bwd)
    with torch.no_grad():
        loss, _ = grpo_loss(x["hidden"], x["weight"], x["targets"], x["advantages"], x["old_logprobs"], x["mask"])
    assert_close(loss, r_loss.detach(), atol=1e-12, name="no_grad loss")


def test_second_backward_raises():
    x = _make([4])
    loss, _ = grpo_loss(x["hidden"], x["weight"], x["targets"], x["advantages"], x["old_logprobs"], x["mask"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def _bad(**over):
    x = _make([3, 4])
    x.update(over)
    kw = {k: x.pop(k) for k in list(x) if k not in ("hidden", "weight", "targets", "advantages", "old_logprobs",
                                                      "mask")}
    return grpo_loss(x["hidden"], x["weight"], x["targets"], x["advantages"], x["old_logprobs"], x["mask"], **kw)


@pytest.mark.parametrize("over,match", [
    (dict(advantages=torch.zeros(6, dtype=torch.float64)), "advantages"),
    (dict(old_logprobs=torch.zeros(7, dtype=torch.long)), "old_logprobs"),
    (dict(mask=torch.zeros(7, dtype=torch.long)), "mask"),
    (dict(ref_logprobs=torch.zeros(8, dtype=torch.float64)), "ref_logprobs"),
    (dict(weight=torch.zeros(V, H + 1, dtype=torch.float64)), "weight"),
    (dict(targets=torch.zeros(7)), "targets"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), "cu_seqlens"),
    (dict(cu_seqlens=torch.tensor([0.0, 7.0])), "cu_seqlens"),
    (dict(cu_seqlens=None, agg="seq-mean-token-sum"), "cu_seqlens"),
    (dict(agg="sum"), "agg"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(kl_coef=0.1, ref_logprobs=None), "ref_logprobs"),
    (dict(dual_clip=0.5), "dual_clip"),
    (dict(clip_low=1.0), "clip_low"),
    (dict(temperature=0.0), "temperature"),
    (dict(norm_len=0, agg="seq-mean-token-sum-norm"), "norm_len"),
])
def test_bad_inputs_name_the_argument(over, match):
    with pytest.raises(ValueError, match=match):
        _bad(**over)


def test_norm_len_is_the_constant_divisor():
    x = _make([4, 7])
    a, _, _, _ = _run(grpo_loss, x, agg="seq-mean-token-sum-norm", norm_len=20)
    b, _, _, _ = _run(grpo_loss, x, agg="seq-mean-token-sum")
    assert_close(a, b / 20, atol=1e-12, name="loss")


@pytest.mark.parametrize("fn", [grpo_loss, ONEPASS, grpo_loss_ref], ids=["fused", "onepass", "ref"])
def test_on_policy_old_none_equals_old_from_a_separate_pass(fn):
    """old_logprobs=None (one on-policy update per rollout): the same loss, gradients and metrics as passing the
    log-probs of a separate no-grad pass, i.e. ratio exactly 1, nothing clipped, approx_kl 0."""
    x = _make([4, 7, 3])
    with torch.no_grad():
        logp = fused_logprobs_ref(x["hidden"], x["weight"], x["targets"])
    kw = dict(cu_seqlens=x["cu_seqlens"], ref_logprobs=x["ref_logprobs"], kl_coef=0.1, agg="seq-mean-token-mean")
    args = (x["hidden"], x["weight"], x["targets"], x["advantages"])
    got_loss, got_m = fn(*args, None, x["mask"], **kw)
    want_loss, want_m = fn(*args, logp, x["mask"], **kw)
    got = torch.autograd.grad(got_loss, (x["hidden"], x["weight"]))
    want = torch.autograd.grad(want_loss, (x["hidden"], x["weight"]))
    assert_close(got_loss, want_loss, atol=1e-12, name="loss")
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, atol=1e-12, rtol=1e-10, name="grad")
    for k in want_m:
        assert_close(got_m[k], want_m[k], atol=1e-12, name=k)
    assert got_m["clip_frac"] == 0 and got_m["approx_kl"] == 0 and got_m["ratio_max"] == 1
