"""The chunked torch reference against full-logits formulas: log-probs, entropy, every gradient, gradcheck, errors."""

import logging

import pytest
import torch

from kernels import fused_logprobs, fused_logprobs_ref, logprobs_bwd, logprobs_fwd
from kernels.fused_logprobs import _backend


def _naive(hidden, weight, targets, temperature=1.0, ignore_index=-100):
    """Full [N, V] logits: (logp, entropy), the formulas the chunked and Triton paths must reproduce."""
    logits = (hidden @ weight.T) / temperature
    valid = targets != ignore_index
    logsm = torch.log_softmax(logits, -1)
    logp = logsm.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    ent = -(logsm.exp() * logsm).sum(-1)
    return torch.where(valid, logp, 0.0), torch.where(valid, ent, 0.0)


def _inputs(n, v, h, dtype=torch.float64, ignore_every=3):
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    targets[::ignore_every] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("n,v,h", [(1, 13, 16), (7, 257, 24), (33, 1000, 96), (130, 257, 16)])
@pytest.mark.parametrize("chunk", [1, 5, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_full_logits(n, v, h, chunk, temperature):
    hidden, weight, targets = _inputs(n, v, h)
    g, ge = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    logp, ent = fused_logprobs_ref(hidden, weight, targets, temperature=temperature, chunk_tokens=chunk,
                                   return_entropy=True)
    (logp * g + ent * ge).sum().backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_logp, ref_ent = _naive(hidden, weight, targets, temperature)
    (ref_logp * g + ref_ent * ge).sum().backward()
    # fp64 end to end on both sides: only the summation order differs.
    torch.testing.assert_close(logp, ref_logp, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-9, atol=1e-9)
    assert (logp[targets == -100] == 0).all() and (ent[targets == -100] == 0).all()
    assert (gh[targets == -100] == 0).all()


def test_fp32_inputs_give_fp32_outputs_close_to_fp64():
    hidden, weight, targets = _inputs(9, 300, 32)
    logp, ent = fused_logprobs_ref(hidden.float(), weight.float(), targets, return_entropy=True, chunk_tokens=4)
    ref_logp, ref_ent = _naive(hidden, weight, targets)
    assert logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)  # fp32 logits vs fp64
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)  # fp32 logits vs fp64


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_gradcheck_logp_and_entropy(temperature):
    hidden, weight, targets = _inputs(5, 11, 6, ignore_every=4)

    def f(hid, wt):
        logp, ent = fused_logprobs_ref(hid, wt, targets, temperature=temperature, return_entropy=True,
                                       chunk_tokens=2)
        return logp, ent

    assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-6)


def test_entropy_only_backward():
    """Only entropy reaches the loss: the logp gradient arrives as None and must count as zero."""
    hidden, weight, targets = _inputs(6, 20, 8)
    _, ent = fused_logprobs_ref(hidden, weight, targets, return_entropy=True)
    ent.sum().backward()
    gh = hidden.grad.clone()
    hidden.grad = None
    _naive(hidden, weight, targets)[1].sum().backward()
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-9, atol=1e-9)  # fp64 both sides


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("need_weight_grad", [False, True])
def test_fwd_bwd_functions_match_autograd(with_entropy, need_weight_grad):
    hidden, weight, targets = _inputs(17, 91, 12)
    g, ge = torch.randn(17, dtype=torch.float64), torch.randn(17, dtype=torch.float64)
    logp, lse, ent = logprobs_fwd(hidden, weight, targets, temperature=0.8, return_entropy=with_entropy,
                                  chunk_tokens=4)
    assert (ent is not None) == with_entropy and not logp.requires_grad
    gh, gw = logprobs_bwd(hidden, weight, targets, lse, g, grad_entropy=ge if with_entropy else None,
                          entropy=ent, temperature=0.8, need_weight_grad=need_weight_grad, chunk_tokens=4)
    ref_logp, ref_ent = _naive(hidden, weight, targets, 0.8)
    loss = (ref_logp * g).sum() + ((ref_ent * ge).sum() if with_entropy else 0)
    loss.backward()
    torch.testing.assert_close(logp, ref_logp.detach(), rtol=1e-9, atol=1e-9)  # fp64 both sides
    torch.testing.assert_close(lse, torch.logsumexp(hidden @ weight.T / 0.8, -1).detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-9, atol=1e-9)  # fp64 both sides
    if need_weight_grad:
        torch.testing.assert_close(gw, weight.grad, rtol=1e-9, atol=1e-9)  # fp64 both sides
    else:
        assert gw is None


def test_large_logits_are_stable():
    hidden = torch.full((4, 8), 100.0)
    weight = torch.randn(50, 8) * 10
    logp, ent = fused_logprobs_ref(hidden, weight, torch.arange(4), return_entropy=True)
    assert torch.isfinite(logp).all() and (logp <= 0).all() and torch.isfinite(ent).all() and (ent >= -1e-4).all()


def test_cpu_dispatch_is_ref_and_logged_once(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _backend(torch.device("cpu"), None) == "ref"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend(torch.device("cpu"), None) == "triton"
    with caplog.at_level(logging.INFO, logger="kernels"):
        _backend(torch.device("cpu"), None)
    assert not caplog.records  # already logged above (or earlier in the session)
    monkeypatch.delenv("TRITON_INTERPRET")
    hidden, weight, targets = _inputs(3, 10, 4)
    torch.testing.assert_close(fused_logprobs(hidden, weight, targets), fused_logprobs_ref(hidden, weight, targets))


def _args():
    return torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize("fn", [fused_logprobs_ref, fused_logprobs, logprobs_fwd])
@pytest.mark.parametrize("change,name", [
    (lambda h, w, t: (h[0], w, t), "hidden"),
    (lambda h, w, t: (h.int(), w, t), "hidden"),
    (lambda h, w, t: (h, torch.randn(10, 9), t), "weight"),
    (lambda h, w, t: (h, w.half(), t), "weight"),
    (lambda h, w, t: (h, w, torch.zeros(4, dtype=torch.long)), "targets"),
    (lambda h, w, t: (h, w, t.float()), "targets"),
])
def test_bad_arguments_name_the_argument(fn, change, name):
    with pytest.raises(ValueError, match=name):
        fn(*change(*_args()))


def test_bad_temperature_and_bwd_vectors_raise():
    h, w, t = _args()
    with pytest.raises(ValueError, match="temperature"):
        fused_logprobs(h, w, t, temperature=0.0)
    _, lse, ent = logprobs_fwd(h, w, t, return_entropy=True)
    with pytest.raises(ValueError, match="lse"):
        logprobs_bwd(h, w, t, lse[:2], torch.ones(3))
    with pytest.raises(ValueError, match="grad_logp"):
        logprobs_bwd(h, w, t, lse, torch.ones(3, 1))
    with pytest.raises(ValueError, match="grad_entropy"):
        logprobs_bwd(h, w, t, lse, torch.ones(3), grad_entropy=torch.ones(3))
    with pytest.raises(ValueError, match="entropy"):
        logprobs_bwd(h, w, t, lse, torch.ones(3), grad_entropy=torch.ones(3), entropy=ent[:1])


def test_non_contiguous_inputs_are_accepted():
    h, w, t = _inputs(6, 12, 10)
    out = fused_logprobs_ref(h.detach().T.contiguous().T, w.detach()[:, :], t)
    torch.testing.assert_close(out, fused_logprobs_ref(h.detach(), w.detach(), t))
