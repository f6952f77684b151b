"""kernels/nll_loss.py: fused_nll against its reference (fp64, both impls, awkward shapes), bad input, and the
target range check every kernel entry point shares. The Triton row kernel path runs in tests/_interp_losses.py."""

import pytest
import torch

from kernels import _onepass, dpo_loss, fused_logprobs, fused_logprobs_ref, fused_nll, fused_nll_ref, grpo_loss
from kernels._testing import assert_close


def _inputs(n, v, h, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    if n > 2:
        targets[2] = -100
    weights = torch.rand(n, generator=g, dtype=dtype)
    return hidden, weight, targets, weights


@pytest.mark.parametrize("n,v,h", [(1, 7, 3), (13, 31, 16), (40, 257, 24)])
@pytest.mark.parametrize("impl", ["recompute", "onepass"])
def test_fused_nll_matches_reference(monkeypatch, n, v, h, impl):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 5 * v * 8)  # 5-token chunks: several per call
    hidden, weight, targets, weights = _inputs(n, v, h, seed=n)
    got = fused_nll(hidden, weight, targets, weights, temperature=0.8, impl=impl)
    got_g = torch.autograd.grad(got * 1.7, (hidden, weight))
    want = fused_nll_ref(hidden, weight, targets, weights, temperature=0.8)
    want_g = torch.autograd.grad(want * 1.7, (hidden, weight))
    assert_close(got, want, atol=1e-12, rtol=1e-10, name="loss")
    for name, a, b in zip(("grad_hidden", "grad_weight"), got_g, want_g, strict=True):
        assert_close(a, b, atol=1e-12, rtol=1e-10, name=name)
    # the spec itself: -sum w * logp with logp from the plain log-softmax
    logp = torch.log_softmax(hidden @ weight.T / 0.8, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    assert_close(want, -(weights * torch.where(targets >= 0, logp, 0.0)).sum(), atol=1e-12, name="spec")


def test_fused_nll_custom_ignore_index_and_frozen_head():
    hidden, weight, targets, weights = _inputs(9, 11, 5)
    targets[4] = 99  # the caller's ignore id (outside [0, V) on purpose)
    targets[2] = 3
    for impl in ("recompute", "onepass"):
        loss = fused_nll(hidden, weight.detach(), targets, weights, ignore_index=99, impl=impl)
        (gh,) = torch.autograd.grad(loss, (hidden,))
        assert gh[4].abs().max() == 0, "an ignored token got a gradient"
        ref = fused_nll_ref(hidden, weight.detach(), targets, weights, ignore_index=99)
        assert_close(loss, ref, atol=1e-12, name=f"loss {impl}")


@pytest.mark.parametrize("bad,match", [("weights_shape", "weights"), ("weights_int", "weights"), ("impl", "impl")])
def test_fused_nll_bad_input(bad, match):
    hidden, weight, targets, weights = _inputs(5, 7, 3)
    kw = {}
    if bad == "weights_shape":
        weights = weights[:4]
    elif bad == "weights_int":
        weights = torch.ones(5, dtype=torch.long)
    else:
        kw["impl"] = "fast"
    with pytest.raises(ValueError, match=match):
        fused_nll(hidden, weight, targets, weights, **kw)


def _entry_points(hidden, weight, targets):
    """Every public way to hand targets to a kernel; each must reject out-of-range ids."""
    n = hidden.shape[0]
    cu, mask = torch.tensor([0, n // 2, n]), torch.ones(n, dtype=torch.bool)
    pair = dict(is_chosen=torch.tensor([True, False]), ref_chosen_logps=torch.zeros(1, dtype=hidden.dtype),
                ref_rejected_logps=torch.zeros(1, dtype=hidden.dtype))
    adv = torch.zeros(n, dtype=hidden.dtype)
    yield "fused_logprobs", lambda: fused_logprobs(hidden, weight, targets)
    yield "fused_logprobs onepass", lambda: fused_logprobs(hidden, weight, targets, impl="onepass")
    yield "fused_logprobs_ref", lambda: fused_logprobs_ref(hidden, weight, targets)
    yield "fused_nll", lambda: fused_nll(hidden, weight, targets, adv)
    yield "fused_nll onepass", lambda: fused_nll(hidden, weight, targets, adv, impl="onepass")
    for impl in ("recompute", "onepass"):
        yield f"grpo_loss {impl}", lambda impl=impl: grpo_loss(hidden, weight, targets, adv, None, mask, impl=impl)
        yield f"dpo_loss {impl}", lambda impl=impl: dpo_loss(hidden, weight, targets, mask, cu, impl=impl, **pair)


@pytest.mark.parametrize("bad_id", [31, 1000, -1, -7])
def test_out_of_range_targets_raise_on_every_path(bad_id):
    hidden, weight, targets, _ = _inputs(6, 31, 4)
    targets[3] = bad_id
    for name, call in _entry_points(hidden, weight, targets):
        with pytest.raises(ValueError, match=r"targets\[3\] = " + str(bad_id)):
            call()
        assert name  # (the loop names the path in the traceback when one does not raise)
