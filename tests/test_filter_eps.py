"""fused_logprobs(filter_eps=...): the approximate backward that leaves out vocabulary tiles of negligible
probability. Exact at 0; otherwise the skipped tiles get no weight gradient and the error stays within the bound
the skipped |dlogits| <= threshold imply."""

import pytest
import torch

from kernels import fused_logprobs
from kernels._common import FILTER_TILE

N, H, V = 70, 32, 4 * FILTER_TILE + 37  # a ragged last tile


def _peaked(dtype=torch.float64):
    """Logits whose likely tokens (and every target) sit in the first vocabulary tile: the rest has p < 1e-6."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype) * 0.3
    weight[:100] *= 8
    targets = torch.randint(0, 100, (N,), generator=g)
    targets[3] = -100
    return hidden, weight, targets, torch.randn(N, generator=g, dtype=dtype)


def _grads(hidden, weight, targets, g, *, entropy: bool, **kw):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_logprobs(hidden, weight, targets, return_entropy=entropy, **kw)
    loss = (out[0] * g).sum() + (out[1] * g).sum() if entropy else (out * g).sum()
    loss.backward()
    return hidden.grad, weight.grad


@pytest.mark.parametrize("impl", ["recompute", "onepass"])
@pytest.mark.parametrize("entropy", [False, True])
def test_skipped_tiles_and_error_bound(impl, entropy):
    hidden, weight, targets, g = _peaked()
    exact_h, exact_w = _grads(hidden, weight, targets, g, entropy=entropy, impl=impl)
    eps = 1e-4
    approx_h, approx_w = _grads(hidden, weight, targets, g, entropy=entropy, impl=impl, filter_eps=eps)
    # Every tile but the first holds only tiny probabilities: skipped, so no weight gradient there at all...
    assert torch.all(approx_w[FILTER_TILE:] == 0)
    assert torch.all(exact_w[FILTER_TILE:] != 0)
    assert torch.equal(approx_w[:FILTER_TILE], exact_w[:FILTER_TILE])
    # ...and the hidden gradient misses at most threshold x sum over skipped rows of |w| per element.
    with torch.no_grad():
        z = hidden @ weight.T
        p = torch.softmax(z, -1)
        d = -g[:, None] * p
        if entropy:
            ent_c = (p * z).sum(-1, keepdim=True)
            d -= g[:, None] * p * (z - ent_c)
        d[targets == -100] = 0
        threshold = eps * g.abs().max()
        assert d[:, FILTER_TILE:].abs().max() <= threshold  # the premise of the bound
        bound = threshold * weight[FILTER_TILE:].abs().sum(0)
    err = (approx_h - exact_h).abs()
    assert torch.all(err <= bound[None, :] * (1 + 1e-9))
    assert err.max() > 0  # something was actually left out


def test_zero_is_exact_and_a_large_eps_stays_finite():
    hidden, weight, targets, g = _peaked()
    exact = _grads(hidden, weight, targets, g, entropy=False)
    same = _grads(hidden, weight, targets, g, entropy=False, filter_eps=0.0)
    assert all(torch.equal(a, b) for a, b in zip(exact, same, strict=True))
    # Tiles where every |dlogits| is below 0.9 x max|g| drop out; the gradient stays finite and bounded.
    h_grad, w_grad = _grads(hidden, weight, targets, g, entropy=False, filter_eps=0.9)
    assert torch.isfinite(h_grad).all() and torch.all(w_grad[FILTER_TILE:] == 0)


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), "1e-3"])
def test_bad_filter_eps_names_the_argument(bad):
    hidden, weight, targets, _ = _peaked(torch.float32)
    with pytest.raises(ValueError, match="filter_eps"):
        fused_logprobs(hidden, weight, targets, filter_eps=bad)
