"""The Triton paths on a real GPU against the torch references, in fp32, bf16 and fp16 (bf16 cannot be checked
through the CPU interpreter). Skipped without CUDA; the same comparisons run on CPU through the interpreter in
tests/_interp_*.py. Tolerances: kernels/_testing.REL_TOL, fixed per dtype, against the fp32 reference on the same
rounded inputs. Run by bench/gpu_check.sh on the lent GPU."""

import pytest
import torch

from kernels import _onepass, dpo_loss, fused_logprobs, fused_logprobs_ref, fused_nll, fused_nll_ref, grpo_loss
from kernels._testing import assert_rel_close, grpo_clip_flips
from kernels.dpo_loss import dpo_loss_ref, pair_groups
from kernels.grpo_loss import grpo_loss_ref

pytestmark = pytest.mark.requires_cuda  # skipped without a CUDA device (tests/conftest.py)

SHAPES = [(1, 13, 16), (130, 1000, 96), (1000, 32000, 512), (4097, 50000, 1024)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _inputs(n, v, h, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g) * 2
    weight = torch.randn(v, h, device="cuda", generator=g) / h**0.5
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::5] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def _run(fn, hidden, weight, *args, **kw):
    """Forward value(s) and the gradients of hidden and weight for a random upstream gradient."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(h, w, *args, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    vals = [o for o in outs if isinstance(o, torch.Tensor)]
    torch.manual_seed(1)
    total = sum((o.float() * torch.randn_like(o.float())).sum() for o in vals)
    total.backward()
    return [o.detach().float() for o in vals], h.grad.float(), w.grad.float()


@pytest.mark.parametrize("n,v,h", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["recompute", "onepass"])
def test_fused_logprobs_matches_reference(n, v, h, dtype, impl, monkeypatch):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 300 * v * 4)  # onepass: 256-token chunks
    hidden, weight, targets = _inputs(n, v, h, dtype)
    kw = dict(return_entropy=True, temperature=0.9)
    out, gh, gw = _run(fused_logprobs, hidden, weight, targets, impl=impl, **kw)
    ref32, rgh32, rgw32 = _run(fused_logprobs_ref, hidden.float(), weight.float(), targets, **kw)
    for name, kind, a, r in [("logp", "value", out[0], ref32[0]), ("entropy", "value", out[1], ref32[1]),
                             ("grad_hidden", "grad", gh, rgh32), ("grad_weight", "grad", gw, rgw32)]:
        assert_rel_close(a, r, dtype, kind, name=f"{name} {impl}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["recompute", "onepass"])
def test_fused_nll_matches_reference(dtype, impl, monkeypatch):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 300 * 32000 * 4)  # onepass: 256-token chunks
    hidden, weight, targets = _inputs(1000, 32000, 512, dtype, seed=5)
    weights = torch.rand(1000, device="cuda") / 1000
    got = _run(fused_nll, hidden, weight, targets, weights, impl=impl)
    ref32 = _run(fused_nll_ref, hidden.float(), weight.float(), targets, weights)
    for name, kind, a, r in zip(("loss", "grad_hidden", "grad_weight"), ("value", "grad", "grad"),
                                (got[0][0], *got[1:]), (ref32[0][0], *ref32[1:]), strict=True):
        assert_rel_close(a, r, dtype, kind, name=f"{name} {impl}")


def _grpo_args(n, seqs, dtype):
    hidden, weight, targets = _inputs(n, 3000, 256, dtype, seed=2)
    g = torch.Generator(device="cuda").manual_seed(3)
    # old log-probs near the real ones, so ratios fall on both sides of the clip bounds
    lp32 = fused_logprobs_ref(hidden.float(), weight.float(), targets.clamp(min=0))
    old = lp32 + 0.3 * torch.randn(n, device="cuda", generator=g)
    ref = old + 0.1 * torch.randn(n, device="cuda", generator=g)
    adv = torch.randn(n, device="cuda", generator=g)
    mask = torch.rand(n, device="cuda", generator=g) > 0.2
    cu = torch.linspace(0, n, seqs + 1, device="cuda").round().int()
    return hidden, weight, targets.clamp(min=0), adv, old, mask, cu, ref


@pytest.mark.parametrize("impl", ["recompute", "onepass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_loss_matches_reference(dtype, agg, impl, monkeypatch):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 300 * 3000 * 4)  # onepass: 256-token chunks
    hidden, weight, targets, adv, old, mask, cu, ref = _grpo_args(1031, 5, dtype)
    kw = dict(cu_seqlens=cu, ref_logprobs=ref, kl_coef=0.05, agg=agg)
    with torch.no_grad():
        flips = grpo_clip_flips(fused_logprobs(hidden, weight, targets, impl=impl),
                                fused_logprobs_ref(hidden.float(), weight.float(), targets), old, adv, 0.2, 0.28)
    flips &= mask
    assert int(flips.sum()) <= max(2, int(0.005 * mask.sum())), f"{int(flips.sum())} clip-decision flips"
    _compare(lambda h, w: grpo_loss(h, w, targets, adv, old, mask, impl=impl, **kw)[0],
             lambda h, w: grpo_loss_ref(h, w, targets, adv, old, mask, **kw)[0], hidden, weight, keep_rows=~flips)


def _compare(ours, ref, hidden, weight, keep_rows=None):
    """Ours on the low-dtype inputs vs the fp32 reference on the same rounded inputs, fixed tolerances
    (kernels/_testing.REL_TOL). keep_rows: tokens to compare grad_hidden on (GRPO: those whose clip decision
    agrees); grad_weight mixes every token, so it is compared only when every row is kept."""
    got = _run(ours, hidden, weight)
    ref32 = _run(ref, hidden.float(), weight.float())
    keep = slice(None) if keep_rows is None else keep_rows
    assert_rel_close(got[0][0], ref32[0][0], hidden.dtype, "value", name="loss")
    assert_rel_close(got[1][keep], ref32[1][keep], hidden.dtype, "grad", name="grad_hidden")
    if keep_rows is None or bool(keep_rows.all()):
        assert_rel_close(got[2], ref32[2], hidden.dtype, "grad", name="grad_weight")


@pytest.mark.parametrize("impl", ["recompute", "onepass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dpo_loss_matches_reference(dtype, impl, monkeypatch):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 700 * 3000 * 4)  # onepass: chunks of 640
    hidden, weight, targets = _inputs(1100, 3000, 256, dtype, seed=4)
    targets = targets.clamp(min=0)
    mask = torch.ones(1100, dtype=torch.bool, device="cuda")
    mask[:30] = False
    cu = torch.tensor([0, 100, 300, 550, 700, 900, 1100], dtype=torch.int32, device="cuda")
    is_chosen = torch.tensor([True, True, True, False, False, False], device="cuda")
    ref_c, ref_r = -torch.rand(3, device="cuda") * 200, -torch.rand(3, device="cuda") * 200
    args = (targets, mask, cu, is_chosen, ref_c, ref_r)
    max_pair = _onepass.chunk_tokens(3000)
    assert pair_groups(cu, is_chosen.nonzero()[:, 0], (~is_chosen).nonzero()[:, 0], max_pair) is not None  # no fallback
    _compare(lambda h, w: dpo_loss(h, w, *args, beta=0.1, impl=impl)[0],
             lambda h, w: dpo_loss_ref(h, w, *args, beta=0.1)[0],
             hidden, weight)
