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


def tolerance(out_lowp: torch.Tensor, ref_lowp: torch.Tensor, ref32: torch.Tensor, floor: float) -> float:
    """flash-attention's rule: allow twice the error the reference itself makes in the low dtype, plus a floor."""
    return 2 * (ref_lowp.double() - ref32.double()).abs().max().item() + floor
