"""The report's sections for the paper's analyses (SPECS, arXiv:2510.25801): sampled accuracy and pass@k from k
sampled responses per prompt, and the Generalization Factor over training steps of `<stage>@<step>` checkpoints.

`sampled_benchmark` turns one model's sampled prediction lines on one benchmark into its scores.json entry;
`sampled_lines` and `gf_curve_lines` write the report's sections; `gf_curve_plot` the plot. The estimators are
engine/analyses.py's (pass@k: the unbiased estimator of Chen et al. 2021 from n samples per prompt).

A sample counts as correct for pass@k when it scores 1 (a partial-credit benchmark's row, MEGA-Bench's, counts only
when fully right); the sampled accuracy is the mean over prompts of the mean score of their samples (pass@1 for
0/1 rows), with the 95% interval of that mean over prompts, so a prompt's samples are not taken as independent.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from engine.analyses import gf_curves, pass_at_k_table, plot_gf_curves
from engine.report_stats import score_ci


def sampled_benchmark(preds: dict[str, dict], row_ids: list[str], n: int, ks: list[int], macro: bool,
                      where: str) -> tuple[dict, list[float], list[str]]:
    """scores.json's `sampled` entry of one model on one benchmark, its per-row mean scores and row categories.

    Args:
        preds: id -> sampled prediction line (engine/stages/eval.py).
        row_ids: the benchmark's rows, in order.
        n: samples per prompt the stage asked for; every row must have exactly that many.
        ks: the k of pass@k.
        macro: the score is the mean of per-category means (MEGA-Bench).
        where: "<model> on <benchmark>", for the error message.
    """
    got = [preds.get(i) for i in row_ids]
    missing = sum(p is None or p.get("n") != n for p in got)
    if missing:
        raise ValueError(f"eval: {where}: {missing} rows have no {n} sampled predictions")
    per_row = [sum(p["scores"]) / n for p in got]
    cats = [p["category"] for p in got]
    by_cat: dict[str, list[float]] = defaultdict(list)
    for c, s in zip(cats, per_row, strict=True):
        by_cat[c].append(s)
    total = (sum(sum(v) / len(v) for v in by_cat.values()) / len(by_cat) if macro
             else sum(per_row) / max(1, len(per_row)))
    num = max(1, n * len(got))
    entry = {
        "score": 100.0 * total, "ci": list(score_ci(per_row, cats if macro else None)), "num": len(got), "n": n,
        "format": 100.0 * sum(sum(map(bool, p["format"])) for p in got) / num,
        "truncated": sum(r == "length" for p in got for r in p["finish_reasons"]),
        "errors": sum(bool(p["error"]) for p in got),
        "pass_at_k": {str(k): v for k, v in pass_at_k_table([[s == 1.0 for s in p["scores"]] for p in got],
                                                            ks).items()} if got else {},
    }
    return entry, per_row, cats


def _cell(x: float | None, ci=None) -> str:
    if x is None:
        return ""
    return f"{x:.2f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{x:.2f}"


def sampled_lines(scores: dict, names: list[str]) -> list[str]:
    """The report's section on sampled decoding: accuracy with intervals, group means and GF; pass@k; format."""
    s = scores.get("sampling")
    if not s:
        return []
    models, ks = scores["models"], s["pass_k"]
    has_gf = bool(scores["groups"]["id"] and scores["groups"]["ood"])
    head = ["model", *names, "ID mean", "OOD mean", "mean"] + (["G_ID", "G_OOD", "GF"] if has_gf else [])
    lines = ["", f"## Sampled decoding ({s['samples']} samples a prompt)", "",
             f"Each prompt answered {s['samples']} times at temperature {s['temperature']:g}, top_p {s['top_p']:g}. "
             "Sampled accuracy is the mean over prompts of the share of a prompt's samples that are right (pass@1), "
             "in percent, with the 95% interval over prompts; gains over the base are paired on the same rows. "
             "The claims at the top use these numbers.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in models.items():
        agg = r["sampled"]
        cells = [model, *(_cell(r["benchmarks"][n]["sampled"]["score"], r["benchmarks"][n]["sampled"]["ci"])
                          for n in names), _cell(agg["id_mean"]), _cell(agg["ood_mean"]), _cell(agg["avg"])]
        if has_gf:
            if model == scores["base"]:
                cells += ["(base)", "(base)", _cell(agg["gf"])]
            else:
                g = agg["group_gain_ci"]
                cells += [f"{agg['g_id']:+.2f} [{g['id'][1]:+.1f}, {g['id'][2]:+.1f}]",
                          f"{agg['g_ood']:+.2f} [{g['ood'][1]:+.1f}, {g['ood'][2]:+.1f}]", _cell(agg["gf"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"### pass@k ({s['samples']} samples a prompt)", "",
              "The unbiased estimator 1 - C(n-c, k) / C(n, k) from n samples of which c are right (Chen et al. 2021), "
              "averaged over prompts, in percent; a sample is right when it scores 1.", "",
              "| model | benchmark | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|" + "---|" * (len(ks) + 2)]
    for model, r in models.items():
        for n in names:
            p = r["benchmarks"][n]["sampled"]["pass_at_k"]
            lines.append(f"| {model} | {n} | " + " | ".join(f"{p[str(k)]:.2f}" for k in ks) + " |")
    lines += ["", "### Format (sampled)", "",
              "Share of sampled responses (%) in the `<think>...</think><answer>...</answer>` format, the measure of "
              "the paper's format-accuracy figure (41.6% -> 96.7% in GRPO-zero):", "",
              "| model | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for model, r in models.items():
        lines.append(f"| {model} | " + " | ".join(_cell(r["benchmarks"][n]["sampled"]["format"]) for n in names)
                     + " |")
    return lines


def _curves(scores: dict, sampled: bool) -> dict[str, list[tuple[int, float]]]:
    flat = {m: {b: (v["sampled"]["score"] if sampled else v["score"]) for b, v in r["benchmarks"].items()}
            for m, r in scores["models"].items()}
    groups = {b: g for g, names in scores["groups"].items() for b in names}
    return gf_curves(flat, scores["base"], groups, scores["gf_beta"])


def has_gf_curves(scores: dict) -> bool:
    """True when some run has two or more `<stage>@<step>` checkpoints among the models, and both groups exist."""
    if not (scores["groups"]["id"] and scores["groups"]["ood"]):
        return False
    return any(len(points) >= 2 for points in _curves(scores, False).values())


def gf_curve_lines(scores: dict) -> list[str]:
    """The report's table of GF over training steps (greedy, and sampled when there are samples)."""
    if not has_gf_curves(scores):
        return []
    sampled = bool(scores.get("sampling"))
    greedy = _curves(scores, False)
    by_sample = _curves(scores, True) if sampled else {}
    lines = ["", "## GF over training steps", "",
             f"The Generalization Factor over `{scores['base']}` of each evaluated training checkpoint "
             "(`<stage>@<step>` models), one row per checkpoint; gf_curves.png plots it"
             + (" (sampled)." if sampled else "."), "",
             "| run | step | GF (greedy) |" + (" GF (sampled) |" if sampled else ""),
             "|---|---|---|" + ("---|" if sampled else "")]
    for stage, points in greedy.items():
        extra = dict(by_sample.get(stage, []))
        for step, gf in points:
            lines.append(f"| {stage} | {step} | {gf:.2f} |" + (f" {extra[step]:.2f} |" if sampled else ""))
    return lines


def gf_curve_plot(scores: dict, stage_dir: Path) -> Path | None:
    """gf_curves.png: GF against step, one line per run (sampled scores when there are samples); None without."""
    if not has_gf_curves(scores):
        return None
    path = stage_dir / "gf_curves.png"
    plot_gf_curves(_curves(scores, bool(scores.get("sampling"))), str(path))
    return path
