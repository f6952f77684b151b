"""Triton kernels of kernels/_onepass.py in Triton's CPU interpreter; run by tests/test_onepass.py in a subprocess
with TRITON_INTERPRET=1 (see tests/test_fused_logprobs_triton.py for why a subprocess)."""

import os

import pytest
import torch

from kernels import _onepass, fused_logprobs, fused_logprobs_ref
from kernels._testing import assert_close, assert_rel_close, grpo_clip_flips
from kernels.dpo_loss import dpo_loss, dpo_loss_ref
from kernels.grpo_loss import _grpo_terms_closed_form, grpo_loss, grpo_loss_ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="run by tests/test_onepass.py")


def _grpo_grad(z, targets, inv_temp, kl, dual, on_policy, gen):
    """A GRPOGrad whose old log-probs sit near the rows' log-probs, so ratios land on both sides of the clips."""
    c = z.shape[0]
    lse, zt, _ = _onepass.row_stats_ref(z, targets.clamp(min=0), inv_temp, False)
    logp = zt - lse
    adv, w = torch.randn(c, generator=gen), torch.rand(c, generator=gen)
    old = None if on_policy else logp + 0.3 * torch.randn(c, generator=gen)
    ref = logp + 0.5 * torch.randn(c, generator=gen) if kl else None
    kl_coef = 0.1 if kl else 0.0

    def torch_fn(idx, logp_n):
        lp = logp_n[idx]
        _, dpg, _, dkl, _, _ = _grpo_terms_closed_form(lp, lp if old is None else old[idx], adv[idx],
                                                       None if ref is None else ref[idx], 0.2, 0.28, dual, kl or "k3")
        return w[idx] * (dpg + kl_coef * dkl if kl else dpg)

    return _onepass.GRPOGrad(adv, old, ref, w, 0.2, 0.28, dual, kl_coef, kl or "k3", torch_fn)


MODES = ["stats", "known", "known-entropy", "callable", "grpo-k3", "grpo-k1-dual", "grpo-k2-on-policy",
         "grpo-low-var", "grpo-no-kl"]


# every mode in bf16 (the training dtype) on two awkward shapes; fp32 and fp16 on the entropy and GRPO modes
CASES = [(c, v, torch.bfloat16, m) for m in MODES for c, v in ((1, 13), (33, 1000))] + \
    [(7, 257, dt, m) for dt in (torch.float32, torch.float16) for m in ("known-entropy", "grpo-k3")]


@pytest.mark.parametrize("c,v,d_dtype,mode", CASES)
def test_row_kernel_matches_reference(c, v, d_dtype, mode):
    """`_rows_triton` (the row kernel, dlogits written in place over a row-padded fp32 buffer) against `_rows_ref`:
    statistics, and d for each way the gradient is given (GRPO's closed form evaluated in the kernel)."""
    gen = torch.Generator().manual_seed(c * v)
    z = torch.randn(c, v, generator=gen) * 6  # large logits: the online max matters
    z[0, v // 2] = 40.0
    targets = torch.randint(0, v, (c,), generator=gen)
    targets[-1] = v - 1  # the last column, in the last (partial) tile
    if c > 2:
        targets[1] = -100  # an ignored row: logp 0, no gradient
    inv_temp = 1 / 0.7
    g_n, ge_n = torch.randn(c, generator=gen), torch.randn(c, generator=gen)
    grad = {"stats": None, "known": _onepass.Known(g_n), "known-entropy": _onepass.Known(g_n, ge_n),
            "callable": lambda idx, logp_n: g_n[idx] * logp_n[idx]}.get(mode)
    if mode.startswith("grpo"):
        kl = {"grpo-k3": "k3", "grpo-k1-dual": "k1", "grpo-k2-on-policy": "k2", "grpo-low-var": "low_var_kl"}.get(mode)
        grad = _grpo_grad(z, targets, inv_temp, kl, 3.0 if "dual" in mode else None, "on-policy" in mode, gen)
    ent = mode != "stats"
    buf = torch.full((c, v + 3), 7.0)
    buf[:, :v] = z
    z_cv = buf[:, :v]
    d_cv = z_cv if d_dtype == torch.float32 else buf.view(d_dtype)[:, :v]  # in place, as the driver does
    out = [torch.zeros(c), torch.zeros(c), torch.zeros(c) if ent else None]
    _onepass._rows_triton(z_cv, d_cv if grad else None, targets, slice(0, c), grad, *out, inv_temp, -100, True)
    ref, r_d = [torch.zeros(c), torch.zeros(c), torch.zeros(c) if ent else None], torch.zeros(c, v)
    _onepass._rows_ref(z.clone(), r_d, targets, slice(0, c), grad, *ref, inv_temp, -100)
    for name, a, b in zip(("logp", "lse", "entropy"), out, ref, strict=True):
        if a is not None:
            assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"{name} ({mode})")
    assert (buf[:, v:] == 7.0).all(), "the row kernel wrote past V"
    if grad is not None:
        assert_close(d_cv.float(), r_d, atol=1e-6 if d_dtype == torch.float32 else 1e-3, rtol=1e-2,
                     name=f"dlogits ({mode}, {d_dtype})")
        if c > 2:
            assert (d_cv[1] == 0).all(), "an ignored row got a gradient"


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
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", chunk * v * 4)
    x = _grpo_inputs(lens, v, h, torch.float32)
    got = _grpo(grpo_loss, x, impl="onepass")
    want = _grpo(grpo_loss_ref, x)
    for name, a, b in zip(("loss", "entropy", "grad_hidden", "grad_weight"), got, want, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("impl", ["recompute", "onepass"])
def test_grpo_low_precision_fixed_tolerance(monkeypatch, dtype, impl):
    """Ours on bf16/fp16 inputs vs the fp32 reference on the same rounded inputs, fixed tolerances
    (kernels/_testing.REL_TOL). Tokens whose clip decision differs between the two are counted and their gradient
    rows compared apart (kernels/_testing.grpo_clip_flips). Four one-pass chunks: dW accumulated in dtype 4 times."""
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 32 * 1000 * 4)
    xlo = _grpo_inputs([50, 78], 1000, 64, dtype, seed=1)
    x32 = {k: (t.detach().float().requires_grad_() if k in ("hidden", "weight") else t) for k, t in xlo.items()}
    ours, ref32 = _grpo(grpo_loss, xlo, impl=impl), _grpo(grpo_loss_ref, x32)
    with torch.no_grad():
        lp_ours = fused_logprobs(xlo["hidden"], xlo["weight"], xlo["targets"], temperature=0.8, impl=impl)
        lp_32 = fused_logprobs_ref(x32["hidden"], x32["weight"], x32["targets"], temperature=0.8)
    flips = grpo_clip_flips(lp_ours, lp_32, xlo["old_logprobs"], xlo["advantages"], 0.2, 0.28) & xlo["mask"]
    print(f"{impl} {dtype}: {int(flips.sum())} of {int(xlo['mask'].sum())} tokens change their clip decision")
    assert flips.sum() <= 2, "more clip-decision flips than rounding explains"
    keep = ~flips
    for name, kind, a, r in (("loss", "value", ours[0], ref32[0]), ("entropy", "value", ours[1], ref32[1]),
                             ("grad_hidden", "grad", ours[2][keep], ref32[2][keep])):
        err = assert_rel_close(a, r, dtype, kind, name=f"{name} {impl}")
        print(f"{impl} {dtype} {name}: {err:.2e}")
    if not flips.any():  # dW mixes every token: comparable only without flips
        err = assert_rel_close(ours[3], ref32[3], dtype, "grad", name=f"grad_weight {impl}")
        print(f"{impl} {dtype} grad_weight: {err:.2e}")


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
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 30 * 257 * 4)  # 30 tokens: one or two pairs a chunk
    x = _dpo_inputs([5, 9, 7, 2, 11, 6], [False, True, True, False, True, False], 257, 24)
    got, want = _dpo(dpo_loss, x, impl="onepass"), _dpo(dpo_loss_ref, x)
    for name, a, b in zip(("loss", "reward_margin", "grad_hidden", "grad_weight"), got, want, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4, name=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_logprobs_onepass(monkeypatch, dtype):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 9 * 257 * 4)  # several chunks
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
