"""Token sampling for the builtin backend: temperature, vision-token ban, top_p, and one RNG stream per row.

Each completion (row r = prompt index x n + sample index of a `generate` call) draws its k-th token from its own
counter-based random stream: u(seed, r, k), an integer hash (splitmix64's finaliser) of those three numbers made
uniform in (0, 1), and the token is the one whose interval of the cumulative distribution (fp64, vocabulary order)
holds u, i.e. v with probability p_v (inverse-CDF sampling; one uniform and one cumsum per row, as cheap as
`torch.multinomial`). So a row's completion depends only on (seed, r, its prompt, the weights), not on which batch
or decode slot it ran in or what ran beside it: the static and the continuous schedules give the same samples, and
a resumed run samples what the first run did. The hash is plain int64 arithmetic (wrapping multiplication), so CPU
and GPU draw the same uniforms.
"""

from __future__ import annotations

import torch

from engine.rollout.base import SamplingParams

__all__ = ["row_keys", "sample"]

_GAMMA = 0x9E3779B97F4A7C15 - 2**64  # splitmix64's increment and multipliers, as signed int64
_MUL1 = 0xBF58476D1CE4E5B9 - 2**64
_MUL2 = 0x94D049BB133111EB - 2**64


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic: it copies the sign bit in)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (multiplication wraps mod 2^64): a bijection that scrambles every bit."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """The RNG key of each row number [B] (int64) under `seed`: distinct rows and seeds give unrelated streams."""
    base = _mix(torch.tensor(seed % 2**63, dtype=torch.long, device=rows.device))
    return _mix(base + rows.long() * _GAMMA)


def _uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """u[b] in (0, 1), fp64: a pure function of (keys[b], steps[b]); keys, steps [B] int64."""
    bits = _shr(_mix(keys + _mix(steps.long() + 1) * _MUL1), 11)  # top 53 bits
    return (bits.double() + 0.5) * 2.0**-53


def sample(logits: torch.Tensor, sampling: SamplingParams, banned_ids: list[int], keys: torch.Tensor,
           steps: torch.Tensor):
    """One token per row and its log-prob under the full-vocabulary softmax(logits / temperature).

    The log-prob is taken before the vision-token ban and top_p so it equals what the trainer recomputes from
    the same weights; the token is drawn from the banned, nucleus-truncated distribution (argmax when the
    temperature is 0).

    Args:
        logits: [B, V] next-token logits, any float dtype.
        sampling: temperature and top_p.
        banned_ids: token ids never drawn.
        keys: [B] int64 `row_keys` of the rows.
        steps: [B] int64 index of the token being drawn in each row's completion (0 for the first).

    Returns:
        tokens [B] int64, logprobs [B] fp32.
    """
    logits_BV = logits.float()  # fp32 softmax even for a bf16 model
    if sampling.temperature > 0:
        logits_BV = logits_BV / sampling.temperature
    logp_BV = torch.log_softmax(logits_BV, dim=-1)
    masked_BV = logp_BV.clone()
    masked_BV[:, banned_ids] = float("-inf")
    if sampling.temperature == 0:
        tok_B = masked_BV.argmax(-1)
    else:
        if sampling.top_p < 1.0:
            sorted_BV, order_BV = masked_BV.sort(-1, descending=True)
            probs_BV = sorted_BV.softmax(-1)
            # Drop a token when the tokens ranked above it already reach top_p (the top token always stays).
            drop_BV = probs_BV.cumsum(-1) - probs_BV >= sampling.top_p
            masked_BV = masked_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
        # Inverse CDF in fp64: the first token whose cumulative probability exceeds u x total (right=True skips
        # zero-probability tokens: their interval is empty).
        cdf_BV = masked_BV.double().softmax(-1).cumsum(-1)
        u_B1 = (_uniforms(keys, steps) * cdf_BV[:, -1])[:, None]
        tok_B = torch.searchsorted(cdf_BV, u_B1, right=True).view(-1).clamp_(max=cdf_BV.shape[-1] - 1)
    return tok_B, logp_BV.gather(-1, tok_B[:, None]).view(-1)
