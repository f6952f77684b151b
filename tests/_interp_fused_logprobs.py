"""Triton log-prob kernels against the torch reference: values and every gradient.

Not collected by a plain `pytest` (no test_ prefix): tests/test_fused_logprobs_triton.py runs it in a fresh process
with TRITON_INTERPRET=1 (CPU tensors), because triton.language builds its own jitted helpers (tl.sum, tl.max) in
interpreter mode only if the variable is set before triton is first imported. On a GPU machine run it directly,
`python -m pytest tests/_interp_fused_logprobs.py`, to test the compiled kernels on CUDA tensors.
"""

import os

import pytest
import torch

from kernels import fused_logprobs, fused_logprobs_ref, logprobs_bwd, logprobs_fwd
from kernels._testing import assert_close, assert_rel_close

# (N, V, H, temperature): 1, primes, non-powers of two, N not a multiple of BLOCK_N, V of one and many splits.
CASES = [(1, 13, 16, 1.0), (7, 257, 24, 0.7), (33, 1000, 96, 1.0), (130, 257, 24, 0.7), (33, 13, 96, 0.7),
         (130, 1000, 16, 1.0), (64, 64, 32, 1.0)]


DEVICE = "cpu"


@pytest.fixture(autouse=True)
def _device():
    """CPU tensors under the interpreter, else CUDA tensors (compiled kernels); skip when neither is possible."""
    global DEVICE
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        DEVICE = "cpu"
    elif torch.cuda.is_available():
        DEVICE = "cuda"
    else:
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device")
    with torch.device(DEVICE):
        yield


def _inputs(n, v, h, dtype):
    hidden = torch.randn(n, h, dtype=dtype)
    weight = (torch.randn(v, h) / h**0.5 * 3).to(dtype)  # logits of O(3): a peaked but not one-hot softmax
    targets = torch.randint(0, v, (n,))
    targets[1::4] = -100
    targets[-1] = v - 1  # the last (ragged) vocabulary tile holds a target
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, g, ge, **kw):
    """(logp, entropy, grad_hidden, grad_weight) of sum(g * logp + ge * entropy) through autograd."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    logp, ent = fn(hidden, weight, targets, return_entropy=True, **kw)
    (logp * g + ent * ge).sum().backward()
    return logp, ent, hidden.grad, weight.grad


@pytest.mark.parametrize("n,v,h,temperature", CASES)
def test_fp32_matches_reference(n, v, h, temperature):
    hidden, weight, targets = _inputs(n, v, h, torch.float32)
    g, ge = torch.randn(n), torch.randn(n)
    out = _run(fused_logprobs, hidden, weight, targets, g, ge, temperature=temperature)
    ref = _run(fused_logprobs_ref, hidden.double(), weight.double(), targets, g.double(), ge.double(),
               temperature=temperature)
    # fp32 kernel against an fp64 reference: fp32 rounding of sums over H and V (a few hundred terms).
    for name, a, b in zip(["logp", "entropy", "grad_hidden", "grad_weight"], out, ref, strict=True):
        assert a.dtype == (torch.float32 if name in ("logp", "entropy") else hidden.dtype)
        assert_close(a, b, atol=1e-4, rtol=1e-4, name=name)
    ignored = targets == -100
    assert (out[0][ignored] == 0).all() and (out[1][ignored] == 0).all() and (out[2][ignored] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,v,h", [(7, 257, 24), (130, 1000, 16)])
@pytest.mark.parametrize("impl", ["recompute", "onepass"])
def test_low_precision_within_fixed_tolerance(n, v, h, dtype, impl):
    """Ours on bf16/fp16 inputs vs the fp32 reference on the same rounded inputs (kernels/_testing.REL_TOL)."""
    hidden, weight, targets = _inputs(n, v, h, dtype)
    g, ge = torch.randn(n), torch.randn(n)
    out = _run(fused_logprobs, hidden, weight, targets, g, ge, temperature=0.9, impl=impl)
    ref32 = _run(fused_logprobs_ref, hidden.float(), weight.float(), targets, g, ge, temperature=0.9)
    for name, kind, a, r in zip(["logp", "entropy", "grad_hidden", "grad_weight"], ["value"] * 2 + ["grad"] * 2,
                                out, ref32, strict=True):
        err = assert_rel_close(a, r, dtype, kind, name=f"{name} {impl}")
        print(f"{impl} {dtype} {name}: {err:.2e}")


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("need_weight_grad", [False, True])
def test_fwd_bwd_functions_match_reference(with_entropy, need_weight_grad):
    hidden, weight, targets = _inputs(33, 257, 24, torch.float32)
    targets = targets.int()  # int32 targets take the same path
    g, ge = torch.randn(33), torch.randn(33)
    out_f = logprobs_fwd(hidden, weight, targets, temperature=1.3, ignore_index=-100, return_entropy=with_entropy)
    ref_f = logprobs_fwd(hidden.double(), weight.double(), targets, temperature=1.3, return_entropy=with_entropy,
                         _backend_override="ref")
    for name, a, b in zip(["logp", "lse", "entropy"], out_f, ref_f, strict=True):
        if b is None:
            assert a is None
        else:
            assert_close(a, b, atol=1e-4, rtol=1e-4, name=name)  # fp32 vs fp64
    kw = dict(grad_entropy=ge, entropy=out_f[2]) if with_entropy else {}
    out_b = logprobs_bwd(hidden, weight, targets, out_f[1], g, temperature=1.3, need_weight_grad=need_weight_grad,
                         **kw)
    kw = dict(grad_entropy=ge.double(), entropy=ref_f[2]) if with_entropy else {}
    ref_b = logprobs_bwd(hidden.double(), weight.double(), targets, ref_f[1], g.double(), temperature=1.3,
                         _backend_override="ref", **kw)
    assert out_b[0].dtype == torch.float32
    assert_close(out_b[0], ref_b[0], atol=1e-4, rtol=1e-4, name="grad_hidden")  # fp32 vs fp64
    if need_weight_grad:
        assert out_b[1].dtype == torch.float32
        assert_close(out_b[1], ref_b[1], atol=1e-4, rtol=1e-4, name="grad_weight")  # fp32 vs fp64
    else:
        assert out_b[1] is None


def test_logp_only_and_custom_ignore_index():
    hidden, weight, targets = _inputs(20, 100, 16, torch.float32)
    targets[targets == -100] = 7  # token 7 is now the ignored id
    hidden.requires_grad_()
    out = fused_logprobs(hidden, weight, targets, ignore_index=7)
    out.sum().backward()
    ref = fused_logprobs_ref(hidden, weight, targets, ignore_index=7)
    gh = hidden.grad.clone()
    hidden.grad = None
    ref.sum().backward()
    assert_close(out, ref, atol=1e-5, rtol=1e-5, name="logp")  # both fp32
    assert_close(gh, hidden.grad, atol=1e-5, rtol=1e-5, name="grad_hidden")  # both fp32
    assert (out[targets == 7] == 0).all() and (gh[targets == 7] == 0).all()


def test_all_ignored_and_large_logits():
    hidden = torch.full((5, 16), 30.0)
    weight = torch.randn(40, 16) * 10
    logp, ent = fused_logprobs(hidden, weight, torch.full((5,), -100), return_entropy=True)
    assert (logp == 0).all() and (ent == 0).all()
    logp, ent = fused_logprobs(hidden, weight, torch.arange(5), return_entropy=True)
    assert torch.isfinite(logp).all() and (logp <= 0).all() and torch.isfinite(ent).all()
    assert_close(logp, fused_logprobs_ref(hidden, weight, torch.arange(5)), atol=1e-3, rtol=1e-5, name="logp")


def test_triton_path_rejects_fp64():
    with pytest.raises(ValueError, match="hidden"):
        fused_logprobs(torch.randn(3, 8, dtype=torch.float64), torch.randn(10, 8, dtype=torch.float64),
                       torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("impl", ["recompute", "onepass"])
def test_filter_eps_matches_reference_with_the_same_filter(impl):
    """The approximate backward keeps the same vocabulary tiles as the torch path (probabilities far from the
    threshold), so the two agree to fp32 round-off, and the skipped tiles get exactly no weight gradient."""
    from kernels._common import FILTER_TILE
    from kernels.fused_logprobs import FusedLogprobsFunction
    n, h, v = 40, 24, 3 * FILTER_TILE + 5
    hidden, weight = torch.randn(n, h), torch.randn(v, h) * 0.3
    weight[:60] *= 8  # every likely token in the first tile: the others hold p < 1e-6
    targets = torch.randint(0, 60, (n,))
    g, ge = torch.randn(n), torch.randn(n)
    out = _run(fused_logprobs, hidden, weight, targets, g, ge, impl=impl, filter_eps=1e-4)

    def ref(hidden, weight, targets, return_entropy):
        return FusedLogprobsFunction.apply(hidden, weight, targets, 1.0, -100, return_entropy, 1024, "ref", impl,
                                           1e-4)
    ref32 = _run(ref, hidden, weight, targets, g, ge)
    assert torch.all(out[3][FILTER_TILE:] == 0) and torch.all(ref32[3][FILTER_TILE:] == 0)
    for name, kind, a, r in zip(["logp", "entropy", "grad_hidden", "grad_weight"], ["value"] * 2 + ["grad"] * 2,
                                out, ref32, strict=True):
        assert_rel_close(a, r, torch.float32, kind, name=f"{name} {impl} filtered")
