"""The evaluation report: scores per model and benchmark, the Generalization Factor, and plots.

`summarise` turns the prediction files of an eval stage into `scores.json`; `write_report` writes `report.md`,
`training_curves.png` (reward, format accuracy, accuracy and response length of every GRPO stage of the run) and
`gf.png` (GF of each evaluated model), plus, from engine/report_analyses.py, the sampled-decoding tables (sampled
accuracy, pass@k, sampled format) and, when several training checkpoints of a run were evaluated, the GF over
training steps (`gf_curves.png`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from engine import atomic, benchmarks
from engine.analyses import benchmark_means
from engine.gf import generalization_factor, group_gain
from engine.log import logger
from engine.predictions import predictions_path, read_predictions, sampled_path
from engine.report_stats import Z95, group_gain_ci, paired_gain, score_ci

CURVES = (("rollout/reward", "reward"), ("rollout/format_acc", "format accuracy"), ("rollout/accuracy", "accuracy"),
          ("rollout/response_len", "response length (tokens)"))


def summarise(cfg, ctx, benches) -> dict:
    """Scores in percent from the prediction files, each with its 95% interval; group means, the mean over all
    benchmarks, gains over the base (with paired 95% intervals) and GF per model; with samples, the same from the
    sampled predictions (`sampled`, per model and benchmark) and pass@k."""
    from engine.report_analyses import sampled_benchmark

    base = cfg.base or cfg.models[0]
    groups = {g: [b.name for b, *_ in benches if b.group == g] for g in ("id", "ood")}
    out = {"base": base, "gf_beta": cfg.gf_beta, "groups": groups, "models": {}}
    if cfg.samples:
        out["sampling"] = {"samples": cfg.samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
                           "pass_k": cfg.pass_ks()}
    row_scores: dict[str, dict[str, list[float]]] = {}  # model -> benchmark -> per-row scores in row order
    sampled_rows: dict[str, dict[str, list[float]]] = {}  # the same from the samples (per-row means)
    macro_cats: dict[str, list[str] | None] = {}  # benchmark -> row categories when its score is a macro mean
    for model in cfg.models:
        per_bench = {}
        row_scores[model], sampled_rows[model] = {}, {}
        for b, module, rows, left_out in benches:
            preds = read_predictions(predictions_path(ctx.stage_dir, model, b.name))
            got = [preds[r.id] for r in rows if r.id in preds]
            if len(got) != len(rows):
                raise ValueError(f"eval: {model} on {b.name}: {len(rows) - len(got)} rows have no prediction")
            cats = defaultdict(list)
            for p in got:
                cats[p["category"]].append(p["score"])
            macro = getattr(module, "MACRO_OVER_CATEGORIES", False)  # MEGA-Bench: mean of per-task means
            total = (sum(sum(v) / len(v) for v in cats.values()) / max(1, len(cats)) if macro
                     else sum(p["score"] for p in got) / max(1, len(got)))
            row_scores[model][b.name] = [p["score"] for p in got]
            macro_cats[b.name] = [p["category"] for p in got] if macro else None
            per_bench[b.name] = {
                "score": 100.0 * total, "ci": list(score_ci(row_scores[model][b.name], macro_cats[b.name])),
                "num": len(got), "macro_over_categories": macro,
                "errors": sum(bool(p["error"]) for p in got),
                "truncated": sum(p["finish_reason"] == "length" for p in got),
                "format": 100.0 * sum(bool(p.get("format")) for p in got) / max(1, len(got)),
                "judged": sum(bool(p.get("judge")) for p in got),
                "judged_yes": sum(p.get("judge") == "yes" for p in got),
                "left_out_unscorable": left_out, "limit": b.limit,
                "categories": {c: 100.0 * sum(v) / len(v) for c, v in sorted(cats.items())},
            }
            if cfg.samples:
                spreds = read_predictions(sampled_path(ctx.stage_dir, model, b.name))
                per_bench[b.name]["sampled"], sampled_rows[model][b.name], _ = sampled_benchmark(
                    spreds, [r.id for r in rows], cfg.samples, cfg.pass_ks(), macro, f"{model} on {b.name}")
        out["models"][model] = {"benchmarks": per_bench}
    for model, r in out["models"].items():
        r.update(_aggregate(out["models"], row_scores, model, base, groups, macro_cats, cfg.gf_beta, "score"))
        if cfg.samples:
            r["sampled"] = _aggregate(out["models"], sampled_rows, model, base, groups, macro_cats, cfg.gf_beta,
                                      "sampled")
    return out


def _aggregate(models: dict, row_scores: dict, model: str, base: str, groups: dict, macro_cats: dict, beta: float,
               key: str) -> dict:
    """Group means, the mean over all benchmarks, gains over the base (paired intervals) and GF of one model, from
    the per-benchmark scores under `key` ("score": greedy; "sampled": the sampled accuracy)."""
    def flat(m_benchmarks: dict) -> dict[str, float]:
        return {n: (v["score"] if key == "score" else v["sampled"]["score"]) for n, v in m_benchmarks.items()}

    mine, theirs = flat(models[model]["benchmarks"]), flat(models[base]["benchmarks"])
    # The group means, and the mean over all benchmarks (the "Avg." column of the paper's ablation table).
    means = benchmark_means(mine, {n: g for g, names in groups.items() for n in names})
    out = {"id_mean": means.get("id"), "ood_mean": means.get("ood"), "avg": means.get("avg")}
    if groups["id"] and groups["ood"]:
        out["g_id"] = group_gain(mine, theirs, groups["id"])
        out["g_ood"] = group_gain(mine, theirs, groups["ood"])
        out["gf"] = generalization_factor(out["g_id"], out["g_ood"], beta)
    # Gains over the base on the same rows (paired), each [gain, low, high] in points: per benchmark and group.
    paired = {n: paired_gain(row_scores[model][n], row_scores[base][n], macro_cats[n]) for n in row_scores[model]}
    out["gain_ci"] = {n: [g, g - Z95 * v ** 0.5, g + Z95 * v ** 0.5] for n, (g, v) in paired.items()}
    out["group_gain_ci"] = {g: list(group_gain_ci([paired[n] for n in names])) for g, names in groups.items()
                            if names}
    return out


def _fmt(x) -> str:
    return "" if x is None else f"{x:.2f}"


def _with_ci(x: float, ci) -> str:
    return f"{x:.2f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def _gain(r: dict, group: str, key: str, is_base: bool) -> str:
    if is_base:
        return "(base)"
    g = r.get("group_gain_ci", {}).get(group)
    return f"{r[key]:+.2f} [{g[1]:+.1f}, {g[2]:+.1f}]" if g else _fmt(r[key])


def write_report(cfg, ctx, scores: dict) -> Path:
    """report.md plus the PNG plots, in the eval stage directory; returns the markdown path."""
    from engine.report_analyses import gf_curve_lines, sampled_lines
    from engine.report_claims import intro, pct_ci, sampled_rollouts, window

    names = [b.name for b in cfg.benchmarks]
    has_gf = bool(scores["groups"]["id"] and scores["groups"]["ood"])
    head = ["model", *names, "ID mean", "OOD mean", "mean"] + (["G_ID", "G_OOD", "GF"] if has_gf else [])
    rollouts = sampled_rollouts(ctx.out_dir)
    lines = [f"# Evaluation report: {ctx.run.name}", "",
             *intro(scores, [b.kind for b in cfg.benchmarks], rollouts), "", "## Scores", "",
             f"Scores in percent (greedy decoding, at most {cfg.max_new_tokens} new tokens), each with its 95% "
             f"interval in brackets (Wilson's for 0/1 rows); mean: over all benchmarks. G_ID and G_OOD are gains "
             f"in points over "
             f"`{scores['base']}`, with the 95% interval of the gain on the same rows (paired). "
             f"GF = (1 + b^2) G_ID G_OOD / (b^2 G_ID + G_OOD), b = {cfg.gf_beta:g}, and "
             f"min(G_ID, G_OOD) when a gain is <= 0 (engine/gf.py). ID: {', '.join(scores['groups']['id']) or '-'}; "
             f"OOD: {', '.join(scores['groups']['ood']) or '-'}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, r in scores["models"].items():
        cells = [model, *(_with_ci(r["benchmarks"][n]["score"], r["benchmarks"][n]["ci"]) for n in names),
                 _fmt(r["id_mean"]), _fmt(r["ood_mean"]), _fmt(r["avg"])]
        if has_gf:
            is_base = model == scores["base"]
            cells += [_gain(r, "id", "g_id", is_base), _gain(r, "ood", "g_ood", is_base), _fmt(r["gf"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += sampled_lines(scores, names) + gf_curve_lines(scores)
    if rollouts:
        lines += ["", "## Sampled format and answer accuracy (GRPO rollouts)", "",
                  "Share of sampled responses on training prompts that are well formatted / correct, with 95% "
                  "Wilson intervals: format in the first rollout batch of each GRPO stage (the policy it starts "
                  "from) and over its last few; accuracy over its first and last few batches (different prompts "
                  "of the same training set). The paper's format-accuracy figure (41.6% -> 96.7% in GRPO-zero) is "
                  "this measure.", "",
                  "| stage | starts from | samples a rollout | format, first batch | format, last batches | accuracy, "
                  "first batches | accuracy, last batches |", "|---|---|---|---|---|---|---|"]
        for r in rollouts:
            n, nk = r["samples"], r["samples"] and r["samples"] * r["window"]
            lines.append(f"| {r['stage']} | {r['init']} | {n or '?'} | {pct_ci(r['format_start'], n)} (step "
                         f"{r['steps'][0]}) | {pct_ci(r['format'][1], nk)} ({window(r, 1)}) | "
                         f"{pct_ci(r['accuracy'][0], nk)} ({window(r, 0)}) | {pct_ci(r['accuracy'][1], nk)} "
                         f"({window(r, 1)}) |")
    notes = []
    for b in cfg.benchmarks:
        first = next(iter(scores["models"].values()))["benchmarks"][b.name]
        note = benchmarks.get(b.kind).JUDGE_NOTE
        judged = sum(r["benchmarks"][b.name]["judged"] for r in scores["models"].values())
        if note and judged:
            flipped = sum(r["benchmarks"][b.name]["judged_yes"] for r in scores["models"].values())
            notes.append(f"- **{b.name}**: rules first, then the judge ({cfg.judge.model}) on the {judged} answers "
                         f"the rules scored wrong; it found {flipped} of them matching. Official pipeline: {note}")
        elif note:
            notes.append(f"- **{b.name}** is scored by rules only: {note}")
        if b.limit:
            notes.append(f"- **{b.name}**: only the first {b.limit} rows; not comparable with published numbers.")
        if first["left_out_unscorable"]:
            needs = ""
            if b.kind == "megabench":
                from engine.benchmarks.megabench_constrained import NLTK_DATA_HINT, available
                from engine.sandbox import BWRAP_FIX, problem

                needs += "" if b.run_code else ", their program tests need `run_code = true`"
                needs += f", their program tests need a sandbox ({problem()}: {BWRAP_FIX})" if (
                    b.run_code and problem()) else ""
                needs += "" if available() else f", their constraints need NLTK's data (`{NLTK_DATA_HINT}`)"
            notes.append(f"- **{b.name}**: {first['left_out_unscorable']} rows are left out: an LLM judge scores them, "
                         f"their metric is not re-implemented{needs}, or they hold video.")
        if first["macro_over_categories"]:
            notes.append(f"- **{b.name}**: the mean of per-category (task) means, as the official number.")
    lines += ["", "## Format (greedy)", "",
              "Share of greedy responses (%) in the `<think>...</think><answer>...</answer>` format (the training "
              "reward's rule), the cold start's target:", "",
              "| model | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for model, r in scores["models"].items():
        lines.append(f"| {model} | " + " | ".join(_fmt(r["benchmarks"][n]["format"]) for n in names) + " |")
    lines += ["", "## Notes", ""] + (notes or ["- Every score is rule-based end to end, on all rows."])
    lines += ["", "## Per category", ""]
    for b in cfg.benchmarks:
        cats = sorted({c for r in scores["models"].values() for c in r["benchmarks"][b.name]["categories"]})
        lines += [f"### {b.name}", "", "| model | " + " | ".join(cats) + " |", "|" + "---|" * (len(cats) + 1)]
        for model, r in scores["models"].items():
            c = r["benchmarks"][b.name]["categories"]
            lines.append(f"| {model} | " + " | ".join(_fmt(c.get(k)) for k in cats) + " |")
        lines.append("")
    plots = _plots(ctx, scores, has_gf)
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    out = ctx.stage_dir / "report.md"
    atomic.write_text(out, "\n".join(lines) + "\n")
    return out


def _finished(done: Path) -> str:
    """When a stage finished, from its DONE marker ("~", sorting last, when absent or unreadable)."""
    if not done.exists():
        return "~"
    try:
        return str(json.loads(done.read_text()).get("finished", "~"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        logger.warning(f"{done}: unreadable stage marker ({type(e).__name__}), its curve is ordered last")
        return "~"


def _grpo_curves(out_dir: Path) -> dict[str, list[dict]]:
    """metrics.jsonl of every stage in the run that logged rollout rewards, in the order the stages finished."""
    found = []
    for metrics in out_dir.glob("*/metrics.jsonl"):
        rows = atomic.read_jsonl(metrics, repair=False)
        if rows and "rollout/reward" in rows[0]:
            found.append((_finished(metrics.parent / "DONE"), metrics.parent.name, rows))
    return {name: rows for _, name, rows in sorted(found)}


def _plots(ctx, scores: dict, has_gf: bool) -> list[Path]:
    import matplotlib

    from engine.report_analyses import gf_curve_plot

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    paths = []
    curves = _grpo_curves(ctx.out_dir)
    if curves:
        fig, axes = plt.subplots(2, 2, figsize=(10, 7))
        for ax, (key, label) in zip(axes.flat, CURVES, strict=True):
            for name, rows in curves.items():
                pts = [(r["step"], r[key]) for r in rows if key in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
            ax.set_title(label)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes.flat[0].legend()
        fig.suptitle(f"{ctx.run.name}: GRPO training curves")
        fig.tight_layout()
        paths.append(ctx.stage_dir / "training_curves.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    if has_gf:
        models = [m for m in scores["models"] if m != scores["base"]]
        fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(models) + 2), 4))
        values = [scores["models"][m]["gf"] for m in models]
        ax.bar(models, values, color=["tab:green" if v > 0 else "tab:red" for v in values])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("GF (points)")
        ax.set_title(f"Generalization Factor over {scores['base']}")
        fig.tight_layout()
        paths.append(ctx.stage_dir / "gf.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    curve = gf_curve_plot(scores, ctx.stage_dir)
    return paths + ([curve] if curve else [])
