"""Test helpers shared by the kernel tests: a comparison that says where and by how much tensors differ."""

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 name: str = "tensor") -> None:
    """Raise AssertionError with max/mean abs diff, the mismatch count and the first bad indices."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs()) | (torch.isnan(a) != torch.isnan(e))
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatched (atol {atol:g}, rtol {rtol:g}); "
            f"max abs diff {diff.nan_to_num(float('inf')).max().item():.3e}, mean {diff.nanmean().item():.3e}; "
            f"first bad indices {idx}: actual {[a[tuple(i)].item() for i in idx]}, "
            f"expected {[e[tuple(i)].item() for i in idx]}")


# Fixed tolerances for ours on bf16/fp16/fp32 inputs against the fp32 reference on the same (rounded) inputs, as
# max|ours - ref32| / max|ref32| per output. "value": log-probs, entropies, losses, which come from fp32 statistics
# of fp32-accumulated logits (only the summation order differs). "grad": gradients, whose dlogits are rounded to
# the input dtype before the gradient matmuls (unit roundoff: bf16 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4) and whose
# one-pass weight gradient is accumulated in that dtype once per chunk. Each bound is a few roundoffs above what
# the tests measure; a real bug (a wrong term, a dropped tile) is off by orders of magnitude more.
# Measured on the CPU interpreter tests (2026-12-02): bf16 grads 2-3e-3, fp16 2.5e-4, values < 1e-6.
REL_TOL = {torch.float32: {"value": 1e-5, "grad": 1e-4}, torch.float16: {"value": 1e-5, "grad": 2e-3},
           torch.bfloat16: {"value": 1e-5, "grad": 1e-2}}


def assert_rel_close(actual: torch.Tensor, ref32: torch.Tensor, dtype: torch.dtype, kind: str, *, name: str) -> float:
    """max|actual - ref32| <= REL_TOL[dtype][kind] * max|ref32| (a 1e-12 floor for all-zero references); returns the
    measured relative error, so tests can print it."""
    scale = ref32.detach().double().abs().max().clamp(min=1e-12).item()
    err = (actual.detach().double() - ref32.detach().double()).abs().max().item() / scale
    tol = REL_TOL[dtype][kind]
    if not err <= tol:
        raise AssertionError(f"{name} ({dtype}, {kind}): relative error {err:.3e} > fixed tolerance {tol:.1e}")
    return err


def grpo_clip_flips(logp_a, logp_b, old, adv, clip_low: float, clip_high: float) -> torch.Tensor:
    """[N] bool: tokens whose clip decision (does the clipped branch of the DAPO surrogate win?) differs between two
    log-prob vectors. The surrogate is continuous but its gradient jumps at the clip bounds, so two correct
    computations that round differently can disagree on a token's gradient there: compare those tokens apart."""
    def clipped(logp):
        ratio = torch.exp((logp.double() - old.double()).clamp(-20, 20))
        return -adv.double() * ratio.clamp(1 - clip_low, 1 + clip_high) > -adv.double() * ratio
    return clipped(logp_a) != clipped(logp_b)
