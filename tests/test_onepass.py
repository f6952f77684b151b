"""kernels/_onepass.py: the one-pass (6NVH) path of grpo_loss / dpo_loss.

The direct-formula tests of tests/test_grpo_loss.py and tests/test_dpo_loss.py also run impl="onepass" (fp64, in
chunks that cut sequences). Here: the chunking rules, the DPO fallback, partial and no gradients, bad input. The
Triton row kernels run in the interpreter in tests/_interp_onepass.py (run by tests/test_fused_logprobs_triton.py).
"""

import importlib
import logging

import pytest
import torch

from kernels import _onepass, fused_logprobs
from kernels._testing import assert_close
from kernels.dpo_loss import dpo_loss, dpo_loss_ref, pair_groups
from kernels.grpo_loss import grpo_loss, grpo_loss_ref


def test_chunk_tokens_fits_the_buffer():
    # Qwen2.5-VL's vocabulary: 512 MiB holds 832 rows of fp32 logits (dlogits are written over them), in 64s
    assert _onepass.chunk_tokens(152_064) == 832
    assert 832 * 152_064 * 4 <= 512 << 20 < 896 * 152_064 * 4
    assert _onepass.chunk_tokens(152_064, 1 << 20) == 1  # never zero
    assert _onepass.chunk_tokens(100, 100 * 4 * 50) == 50  # below 64: not rounded
    assert _onepass.token_chunks(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]


def test_pair_groups_keep_pairs_whole_and_cover_every_token_once():
    lens = [5, 3, 7, 2, 4, 6, 1, 1]
    is_chosen = torch.tensor([False, True, True, False, True, False, False, True])
    cu = torch.tensor([0, *lens]).cumsum(0)
    chosen, rejected = is_chosen.nonzero().squeeze(1), (~is_chosen).nonzero().squeeze(1)
    groups = pair_groups(cu, chosen, rejected, 18)
    assert sorted(torch.cat(groups).tolist()) == list(range(sum(lens)))
    assert [g.numel() for g in groups] == [17, 12]  # pairs of 8, 9, 10 and 2 tokens, packed greedily
    for g in groups:  # a pair's two sequences land in the same chunk
        in_g = set(torch.searchsorted(cu[1:], g, right=True).tolist())
        for c, r in zip(chosen.tolist(), rejected.tolist(), strict=True):
            assert (c in in_g) == (r in in_g)
    assert pair_groups(cu, chosen, rejected, 9) is None  # the pair of 4 + 6 tokens does not fit
    # pairs longer than the chunk but within max_pair get a chunk of their own
    assert [g.numel() for g in pair_groups(cu, chosen, rejected, 9, max_pair=10)] == [8, 9, 10, 2]


def _dpo_inputs():
    g = torch.Generator().manual_seed(0)
    lens, is_chosen = [9, 4, 3, 8], [True, True, False, False]
    n, v, h = sum(lens), 31, 16
    return dict(hidden=torch.randn(n, h, dtype=torch.float64, generator=g).requires_grad_(),
                weight=torch.randn(v, h, dtype=torch.float64, generator=g).requires_grad_(),
                targets=torch.randint(0, v, (n,), generator=g), mask=torch.rand(n, generator=g) > 0.3,
                cu_seqlens=torch.tensor([0, *lens]).cumsum(0), is_chosen=torch.tensor(is_chosen),
                ref_chosen_logps=-30 + torch.randn(2, dtype=torch.float64, generator=g),
                ref_rejected_logps=-30 + torch.randn(2, dtype=torch.float64, generator=g))


def _dpo(fn, x, **kw):
    loss, _ = fn(x["hidden"], x["weight"], x["targets"], x["mask"], x["cu_seqlens"], x["is_chosen"],
                 x["ref_chosen_logps"], x["ref_rejected_logps"], **kw)
    return (loss, *torch.autograd.grad(loss, (x["hidden"], x["weight"])))


def test_dpo_pair_longer_than_the_buffer_falls_back_with_a_warning(monkeypatch, caplog):
    x = _dpo_inputs()  # pairs of 9 + 3 and 4 + 8 tokens
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 10 * 31 * 8)  # 10 tokens: no pair fits
    monkeypatch.setattr(_onepass, "MAX_PAIR_BUFFER_BYTES", 11 * 31 * 8)  # and none may grow the buffer enough
    calls = []
    monkeypatch.setattr(_onepass, "onepass", lambda *a, **k: calls.append(1))
    with caplog.at_level(logging.WARNING, logger="kernels"):
        got = _dpo(dpo_loss, x, impl="onepass")
    assert not calls and "using impl='recompute'" in caplog.text
    for a, b in zip(got, _dpo(dpo_loss_ref, x), strict=True):
        assert_close(a, b, atol=1e-10, rtol=1e-9)


def _grpo_inputs():
    g = torch.Generator().manual_seed(1)
    n, v, h = 23, 19, 8
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g)
    return dict(hidden=hidden, weight=weight, targets=torch.randint(0, v, (n,), generator=g),
                advantages=torch.randn(n, generator=g), old_logprobs=-3 + 0.2 * torch.randn(n, generator=g),
                mask=torch.rand(n, generator=g) > 0.2)


def _grpo(fn, x, hidden, weight, **kw):
    return fn(hidden, weight, x["targets"], x["advantages"], x["old_logprobs"], x["mask"], return_entropy=True, **kw)


def test_grpo_partial_and_no_gradients(monkeypatch):
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", 5 * 19 * 8)  # 5 tokens a chunk
    x = _grpo_inputs()
    h, w = x["hidden"].clone().requires_grad_(), x["weight"].clone().requires_grad_()
    r_loss, r_m = _grpo(grpo_loss_ref, x, h, w)
    r_gh, r_gw = torch.autograd.grad(r_loss, (h, w))
    # hidden only (a frozen lm_head), weight only (frozen trunk)
    loss, _ = _grpo(grpo_loss, x, h, w.detach(), impl="onepass")
    assert_close(torch.autograd.grad(loss, h)[0], r_gh, atol=1e-12, rtol=1e-10, name="grad_hidden only")
    loss, _ = _grpo(grpo_loss, x, h.detach(), w, impl="onepass")
    assert_close(torch.autograd.grad(loss, w)[0], r_gw, atol=1e-12, rtol=1e-10, name="grad_weight only")
    # no_grad: the log-probs and metrics only; no dlogits or gradient matmul is run

    def no_grad_work(*args, **kwargs):
        raise AssertionError("gradient work under no_grad")

    monkeypatch.setattr(_onepass, "dlogits_ref", no_grad_work)
    with torch.no_grad():
        loss, m = _grpo(grpo_loss, x, h, w, impl="onepass")
    assert_close(loss, r_loss.detach(), atol=1e-12, name="no_grad loss")
    assert_close(m["entropy_mean"], r_m["entropy_mean"], atol=1e-12, name="no_grad entropy")


@pytest.mark.parametrize("n,v,h,chunk", [(1, 13, 16, 1), (33, 1000, 96, 5), (130, 257, 16, 64)])
@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_fused_logprobs_onepass_matches_full_logits(monkeypatch, n, v, h, chunk, with_entropy_grad):
    """fused_logprobs(impl="onepass") in fp64 against log_softmax of the full logits, gradients through the
    log-probs and the entropy; the recompute backward is never used."""
    monkeypatch.setattr(_onepass, "DEFAULT_BUFFER_BYTES", chunk * v * 8)

    def no_recompute(*args, **kwargs):
        raise AssertionError("impl='onepass' fell back to logprobs_bwd")

    monkeypatch.setattr(importlib.import_module("kernels.fused_logprobs"), "logprobs_bwd", no_recompute)
    g = torch.Generator().manual_seed(n)
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(v, h, dtype=torch.float64, generator=g).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::3] = -100
    up, up_e = torch.randn(n, dtype=torch.float64, generator=g), torch.randn(n, dtype=torch.float64, generator=g)
    logp, ent = fused_logprobs(hidden, weight, targets, temperature=0.7, return_entropy=True, impl="onepass")
    loss = (logp * up + ent * up_e).sum() if with_entropy_grad else (logp * up).sum()
    got = (logp, ent, *torch.autograd.grad(loss, (hidden, weight)))
    logits = hidden @ weight.T / 0.7
    full_logp = torch.log_softmax(logits, -1)
    ok = targets != -100
    r_logp = torch.where(ok, full_logp.gather(1, targets.clamp(min=0)[:, None]).squeeze(1), 0.0)
    r_ent = torch.where(ok, -(full_logp.exp() * full_logp).sum(-1), 0.0)
    r_loss = (r_logp * up + r_ent * up_e).sum() if with_entropy_grad else (r_logp * up).sum()
    want = (r_logp, r_ent, *torch.autograd.grad(r_loss, (hidden, weight)))
    for name, a, b in zip(("logp", "entropy", "grad_hidden", "grad_weight"), got, want, strict=True):
        assert_close(a, b, atol=1e-10, rtol=1e-9, name=name)


def test_bad_impl_is_named():
    x = _grpo_inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        _grpo(grpo_loss, x, x["hidden"], x["weight"], impl="fast")
    d = _dpo_inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        _dpo(dpo_loss, d, impl="tiled")
    with pytest.raises(ValueError, match="impl must be"):
        fused_logprobs(x["hidden"], x["weight"], x["targets"], impl="cublas")
