"""The chunked log-prob function against full-logits log_softmax: forward and both gradients."""

import pytest
import torch

from kernels import fused_logprobs_ref


def _naive(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    logits = (hidden.float() @ weight.float().T) / temperature
    valid = targets != ignore_index
    logp = torch.log_softmax(logits, -1).gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    return torch.where(valid, logp, 0.0)


@pytest.mark.parametrize("n,v,h", [(1, 13, 16), (7, 257, 24), (33, 1000, 96), (130, 257, 16)])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_full_logits(n, v, h, chunk, temperature):
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[::3] = -100
    g = torch.randn(n, dtype=torch.float64)
    out = fused_logprobs_ref(hidden, weight, targets, temperature=temperature, chunk_tokens=chunk)
    (out * g).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = _naive(hidden, weight, targets, temperature)
    (ref * g.float()).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)  # both fp32 inside; summation order differs
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-4, atol=1e-4)  # both fp32 inside; summation order differs
    torch.testing.assert_close(gw, weight.grad, rtol=1e-4, atol=1e-4)  # both fp32 inside; summation order differs
    assert (out[targets == -100] == 0).all()


def test_large_logits_are_stable():
    hidden = torch.full((4, 8), 100.0)
    weight = torch.randn(50, 8) * 10
    out = fused_logprobs_ref(hidden, weight, torch.arange(4))
    assert torch.isfinite(out).all() and (out <= 0).all()


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="weight"):
        fused_logprobs_ref(torch.randn(3, 8), torch.randn(10, 9), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        fused_logprobs_ref(torch.randn(3, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long))
