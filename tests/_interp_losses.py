"""The losses end to end through Triton kernels in the CPU interpreter: grpo_loss's recompute path (the log-prob
kernels of kernels/_logprobs_triton.py) and fused_nll on both paths. Run by tests/test_triton_interpreter.py."""

import os

import pytest
import torch

from kernels import _onepass, fused_nll, fused_nll_ref
from kernels._testing import assert_close, assert_rel_close
from kernels.grpo_loss import grpo_loss, grpo_loss_ref
from tests.test_grpo_loss import _make, _run

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="run with TRITON_INTERPRET=1 by tests/test_triton_interpreter.py")


def test_grpo_recompute_through_triton_kernels():
    x = _make([5, 9, 3], dtype=torch.float32, seed=3)
    kw = dict(agg="seq-mean-token-mean", kl_coef=0.1, dual_clip=3.0, return_entropy=True)
    loss, metrics, gh, gw = _run(grpo_loss, x, **kw)  # CPU + TRITON_INTERPRET=1: the Triton kernels, interpreted
    r_loss, r_metrics, r_gh, r_gw = _run(grpo_loss_ref, x, **kw)  # fused_logprobs_ref: always the torch path
    assert_close(loss, r_loss, atol=1e-5, rtol=1e-5, name="loss")  # fp32, tiled vs chunked summation order
    assert_close(gh, r_gh, atol=1e-5, rtol=1e-4, name="grad_hidden")
    assert_close(gw, r_gw, atol=1e-5, rtol=1e-4, name="grad_weight")
    assert_close(metrics["entropy_mean"], r_metrics["entropy_mean"], atol=1e-5, name="entropy_mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["recompute", "onepass"])
def test_fused_nll_through_triton_kernels(monkeypatch, dtype, impl):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 9 * 257 * 4)  # 9-token chunks
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(40, 24, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(257, 24, generator=g) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, 257, (40,), generator=g)
    targets[5] = -100
    weights = torch.rand(40, generator=g) / 40
    loss = fused_nll(hidden, weight, targets, weights, temperature=0.9, impl=impl)
    got = (loss, *torch.autograd.grad(loss, (hidden, weight)))
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = fused_nll_ref(h32, w32, targets, weights, temperature=0.9)
    want = (ref, *torch.autograd.grad(ref, (h32, w32)))
    for name, kind, a, b in zip(("loss", "grad_hidden", "grad_weight"), ("value", "grad", "grad"), got, want,
                                strict=True):
        assert_rel_close(a, b, dtype, kind, name=f"{name} {impl}")
