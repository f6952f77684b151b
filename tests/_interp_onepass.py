"""Triton kernels of kernels/_onepass.py in Triton's CPU interpreter; run by tests/test_onepass.py in a subprocess
with TRITON_INTERPRET=1 (see tests/test_fused_logprobs_triton.py for why a subprocess)."""

import os

import pytest
import torch

from kernels import _onepass, fused_logprobs, fused_logprobs_ref
from kernels._testing import assert_close, tolerance
from kernels.dpo_loss import dpo_loss, dpo_loss_ref
from kernels.grpo_loss import grpo_loss, grpo_loss_ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="run by tests/test_onepass.py")


@pytest.mark.parametrize("c,v", [(1, 13), (7, 257), (33, 1000), (5, 64)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_kernels_match_reference(c, v, out_dtype):
    g = torch.Generator().manual_seed(c * v)
    z = torch.randn(c, v, generator=g) * 6  # large logits: the online max matters
    z[0, v // 2] = 40.0
    targets = torch.randint(0, v, (c,), generator=g)
    targets[-1] = v - 1  # the last column, in the last (partial) tile
    grad = torch.randn(c, generator=g)
    grad[0] = 0.0  # an ignored row: no gradient at all
    inv_temp = 1 / 0.7
    for ent in (False, True):
        lse, zt, e = _onepass._row_stats(z, targets, inv_temp, ent, interpret=True)
        r_lse, r_zt, r_e = _onepass.row_stats_ref(z, targets, inv_temp, ent)
        assert_close(lse, r_lse, atol=1e-5, rtol=1e-6, name="lse")
        assert_close(zt, r_zt, atol=1e-6, rtol=1e-6, name="target logit")
        if ent:
            assert_close(e, r_e, atol=1e-5, rtol=1e-5, name="entropy")
    # a row buffer wider than V (as the chunk buffers are): strides, not shapes, locate the rows
    wide = torch.zeros(c, v + 3)
    wide[:, :v] = z
    d, r_d = torch.full((c, v + 5), 7.0, dtype=out_dtype), torch.empty(c, v, dtype=out_dtype)
    _onepass._dlogits(wide[:, :v], targets, r_lse, grad, inv_temp, d[:, :v], interpret=True)
    _onepass.dlogits_ref(z, targets, r_lse, grad, inv_temp, r_d)
    assert_close(d[:, :v], r_d, atol=1e-6 if out_dtype == torch.float32 else 1e-3, rtol=1e-2, name="dlogits")
    assert (d[:, v:] == 7.0).all(), "dlogits wrote past V"
    assert (d[0, :v] == 0).all()
    # with an entropy gradient: ge * d entropy / d z on top
    ge = torch.randn(c, generator=g)
    ge[0] = 0.0
    c_row = r_lse - r_e
    _onepass._dlogits(wide[:, :v], targets, r_lse, grad, inv_temp, d[:, :v], interpret=True, ge_C=ge, c_C=c_row)
    _onepass.dlogits_ref(z, targets, r_lse, grad, inv_temp, r_d, ge, c_row)
    assert_close(d[:, :v], r_d, atol=1e-6 if out_dtype == torch.float32 else 1e-3, rtol=1e-2, name="dlogits ent")


def _grpo_inputs(lens, v, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lens)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[min(3, n - 1)] = -100 if n > 1 else targets[0]  # an ignored token (not the only one)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return dict(hidden=hidden.to(dtype).requires_grad_(), weight=weight.to(dtype).requires_grad_(), targets=targets,
                advantages=torch.randn(n, generator=g), old_logprobs=logp + 0.3 * torch.randn(n, generator=g),
                mask=(torch.rand(n, generator=g) > 0.2) & (targets != -100),
                cu_seqlens=torch.tensor([0, *lens]).cumsum(0), ref_logprobs=logp + 0.5 * torch.randn(n, generator=g))


def _grpo(fn, x, **kw):
    loss, m = fn(x["hidden"], x["weight"], x["targets"], x["advantages"], x["old_logprobs"], x["mask"],
                 cu_seqlens=x["cu_seqlens"], ref_logprobs=x["ref_logprobs"], kl_coef=0.1, temperature=0.8,
                 agg="seq-mean-token-mean", return_entropy=True, **kw)
    return (loss, m["entropy_mean"], *torch.autograd.grad(loss, (x["hidden"], x["weight"])))


@pytest.mark.parametrize("lens,v,h,chunk", [([5, 9, 3], 257, 24, 7), ([40, 90], 1000, 16, 33), ([1], 13, 96, 1)])
def test_grpo_onepass_fp32(monkeypatch, lens, v, h, chunk):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", chunk * v * 8)
    x = _grpo_inputs(lens, v, h, torch.float32)
    got = _grpo(grpo_loss, x, impl="onepass")
    want = _grpo(grpo_loss_ref, x)
    for name, a, b in zip(("loss", "entropy", "grad_hidden", "grad_weight"), got, want, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grpo_onepass_low_precision_within_twice_the_references_error(monkeypatch, dtype):
    """STYLE section 8: ours in bf16/fp16 vs the fp32 reference, allowing twice the low-precision reference's own
    error. Four chunks, so the weight gradient is accumulated in the low dtype four times."""
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 32 * 1000 * 6)
    xlo = _grpo_inputs([50, 78], 1000, 64, dtype, seed=1)
    # the fp32 reference sees the same (rounded) inputs, so the errors measured are the computation's alone
    x32 = {k: (t.detach().float().requires_grad_() if k in ("hidden", "weight") else t) for k, t in xlo.items()}
    ours = _grpo(grpo_loss, xlo, impl="onepass")
    ref_lo = _grpo(grpo_loss_ref, xlo)
    ref32 = _grpo(grpo_loss_ref, x32)
    for name, a, b, c in zip(("loss", "entropy", "grad_hidden", "grad_weight"), ours, ref_lo, ref32, strict=True):
        err, allowed = (a.double() - c.double()).abs().max().item(), tolerance(a, b, c, 1e-6)
        print(f"{dtype} {name}: ours {err:.2e}, allowed {allowed:.2e} (reference's own {(allowed - 1e-6) / 2:.2e})")
        assert_close(a.float(), c, atol=allowed, name=f"{name} {dtype}")


def _dpo_inputs(lens, is_chosen, v, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, pairs = sum(lens), sum(is_chosen)
    return dict(hidden=torch.randn(n, h, generator=g).requires_grad_(),
                weight=(torch.randn(v, h, generator=g) * 0.5).requires_grad_(),
                targets=torch.randint(0, v, (n,), generator=g), mask=torch.rand(n, generator=g) > 0.3,
                cu_seqlens=torch.tensor([0, *lens]).cumsum(0), is_chosen=torch.tensor(is_chosen),
                ref_chosen_logps=-20 + torch.randn(pairs, generator=g),
                ref_rejected_logps=-20 + torch.randn(pairs, generator=g))


def _dpo(fn, x, **kw):
    loss, m = fn(x["hidden"], x["weight"], x["targets"], x["mask"], x["cu_seqlens"], x["is_chosen"],
                 x["ref_chosen_logps"], x["ref_rejected_logps"], beta=0.5, temperature=0.9, **kw)
    return (loss, m["reward_margin"], *torch.autograd.grad(loss, (x["hidden"], x["weight"])))


def test_dpo_onepass_fp32(monkeypatch):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 30 * 257 * 8)  # 30 tokens: one or two pairs a chunk
    x = _dpo_inputs([5, 9, 7, 2, 11, 6], [False, True, True, False, True, False], 257, 24)
    got, want = _dpo(dpo_loss, x, impl="onepass"), _dpo(dpo_loss_ref, x)
    for name, a, b in zip(("loss", "reward_margin", "grad_hidden", "grad_weight"), got, want, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_logprobs_onepass(monkeypatch, dtype):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 9 * 257 * 8)  # several chunks
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 24, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(257, 24, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, 257, (40,), generator=g)
    targets[7] = -100
    up, up_e = torch.randn(40, generator=g), torch.randn(40, generator=g)
    outs = []
    for fn, kw in ((fused_logprobs, dict(impl="onepass")), (fused_logprobs_ref, {})):
        h, w = (hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()) if not kw else \
            (hidden, weight)
        logp, ent = fn(h, w, targets, temperature=0.9, return_entropy=True, **kw)
        outs.append((logp, *torch.autograd.grad((logp * up + ent * up_e).sum(), (h, w))))
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: dlogits rounded to fp16 before the matmuls
    for name, a, b in zip(("logp", "grad_hidden", "grad_weight"), *outs, strict=True):
        assert_close(a.float(), b, atol=tol, rtol=tol, name=f"{name} {dtype}")
