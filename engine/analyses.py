"""The paper's analyses (SPECS, arXiv:2510.25801) as plain functions over per-sample and per-model scores:
pass@k from n samples per prompt, the five-benchmark average beside the ID/OOD means, and the Generalization
Factor over training steps of several runs (one curve per run, from their `<stage>@<step>` checkpoints).

pass@k uses the unbiased estimator of Chen et al. 2021 (arXiv:2107.03374): with n samples of a prompt of which c
are correct, pass@k = 1 - C(n - c, k) / C(n, k), averaged over prompts; it needs n >= k. Computed as a running
product so it stays exact for n = 64 and beyond (no huge binomials).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from engine.gf import BETA, generalization_factor, group_gain


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples, drawn without replacement from n with c correct, is correct."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least k samples per prompt, got n={n}; sample n >= max(k)")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k_table(correct: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over prompts, in percent, for each k; `correct[p]` holds prompt p's n sample verdicts."""
    if not correct:
        raise ValueError("pass@k of no prompts")
    n = {len(c) for c in correct}
    if len(n) != 1:
        raise ValueError(f"every prompt needs the same number of samples, got {sorted(n)}")
    return {k: 100.0 * sum(pass_at_k(len(c), sum(map(bool, c)), k) for c in correct) / len(correct) for k in ks}


def benchmark_means(scores: Mapping[str, float], groups: Mapping[str, str]) -> dict[str, float]:
    """The mean over all benchmarks ("avg", the paper's ablation-table column) and over each group ("id", "ood")."""
    out = {"avg": sum(scores.values()) / len(scores)} if scores else {}
    for g in ("id", "ood"):
        names = [b for b, grp in groups.items() if grp == g and b in scores]
        if names:
            out[g] = sum(scores[b] for b in names) / len(names)
    return out


_STEP = re.compile(r"^(?P<stage>[^@]+)@(?P<step>\d+)$")


def gf_curves(scores: Mapping[str, Mapping[str, float]], base: str, groups: Mapping[str, str],
              beta: float = BETA) -> dict[str, list[tuple[int, float]]]:
    """GF over training steps: stage -> [(step, GF)], sorted by step, for every model named `<stage>@<step>`.

    Args:
        scores: model name -> benchmark -> score (the eval stage's scores.json layout).
        base: the model the gains are measured against.
        groups: benchmark -> "id" | "ood" | "none".
    """
    ids = [b for b, g in groups.items() if g == "id"]
    oods = [b for b, g in groups.items() if g == "ood"]
    curves: dict[str, list[tuple[int, float]]] = {}
    for model, s in scores.items():
        m = _STEP.match(model)
        if m is None:
            continue
        gf = generalization_factor(group_gain(s, scores[base], ids), group_gain(s, scores[base], oods), beta)
        curves.setdefault(m.group("stage"), []).append((int(m.group("step")), gf))
    return {stage: sorted(points) for stage, points in curves.items()}


def plot_gf_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str) -> None:
    """One line per run: GF against optimizer step, written to `path` (png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for stage, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=stage)
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("GF (b = 2)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
