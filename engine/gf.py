"""The Generalization Factor (SPECS, arXiv 2510.25801): one number that rewards gains that carry over from the
in-distribution (ID) benchmarks to the out-of-distribution (OOD) ones.

    GF = (1 + b^2) * G_ID * G_OOD / (b^2 * G_ID + G_OOD),   b = 2

an F-beta-style weighted harmonic mean of the two gains, G_ID and G_OOD being a model's score gains over the base
model averaged over each benchmark group. As in F-beta (with G_ID as precision and G_OOD as recall), b = 2 makes
the OOD gain count b times as much as the ID gain, and the harmonic mean is pulled towards the smaller one.

Zero and negative gains (the paper does not say; our definition): the formula is a harmonic mean and only means
something for positive gains. When either gain is <= 0 we return min(G_ID, G_OOD): zero when a group did not
improve, and the larger of the two losses when a group regressed, so a model never gets generalisation credit for
a group it made worse. This is continuous with the formula, which tends to 0 as either gain tends to 0 from above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

BETA = 2.0


def generalization_factor(g_id: float, g_ood: float, beta: float = BETA) -> float:
    """GF of an ID gain and an OOD gain (in score points, e.g. percentage points); see the module docstring."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if g_id <= 0 or g_ood <= 0:
        return min(g_id, g_ood)
    b2 = beta * beta
    return (1 + b2) * g_id * g_ood / (b2 * g_id + g_ood)


def group_gain(scores: Mapping[str, float], base: Mapping[str, float], names: Sequence[str]) -> float:
    """Mean over `names` of scores[name] - base[name]; a clear error when a benchmark is missing."""
    if not names:
        raise ValueError("a benchmark group is empty; name at least one benchmark in each of the ID and OOD groups")
    missing = [n for n in names if n not in scores or n not in base]
    if missing:
        raise ValueError(f"no score for {missing} (model or base); evaluate every benchmark of the group")
    return sum(scores[n] - base[n] for n in names) / len(names)


__all__ = ["BETA", "generalization_factor", "group_gain"]
