"""The top of the evaluation report: what the run can show, and the SPECS claims checked against its numbers.

Every claim is computed from this run's measurements with a 95% interval and stated as it came out: "holds" when
the interval of the effect excludes zero upwards, "not shown" when it includes zero, "does not hold" when it lies
below. Nothing here picks models, rows or settings to make a claim hold.

Sampled format and answer accuracy come from the GRPO stages' own rollouts (metrics.jsonl: training prompts,
the stage's temperature): the first rollout batch measures the policy a stage starts from; accuracy changes are
compared over the first and last few batches (different prompts of the same training set). That is the measure
of the paper's format-accuracy figure (41.6% -> 96.7% during GRPO-zero); the eval tables decode greedily, which
on a small model can give a very different format share. When the eval stage also samples (`samples = k`), the
claims on test rows use the sampled accuracy (the mean over a prompt's k samples) and say so.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from engine.report_stats import Z95, verdict, wilson

WINDOW_STEPS = 5
"""Rollout batches averaged at each end of a GRPO stage for its accuracy change (at most a quarter of its steps)."""


def sampled_rollouts(out_dir: Path) -> list[dict]:
    """Per GRPO stage of the run (in the order they finished): where it started, samples per rollout batch, sampled
    format of its first rollout batch (the policy it starts from) and of its last ones, and sampled answer accuracy
    over its first and last few rollout batches (one batch is 16-ish prompts: too few to compare alone)."""
    found = []
    for metrics in out_dir.glob("*/metrics.jsonl"):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "rollout/format_acc" in r]  # with mini-batches, a rollout's first step only
        if not rows:
            continue
        stage_dir = metrics.parent
        done = stage_dir / "DONE"
        when = json.loads(done.read_text()).get("finished", "") if done.is_file() else "~"
        record = stage_dir / "config.toml"  # engine/stage_record.py: the settings the stage ran with
        stage = tomllib.loads(record.read_text()).get("stage", {}) if record.is_file() else {}
        samples = (stage.get("train", {}).get("batch_size", 0) * stage.get("rollout", {}).get("n", 0)) or None
        k = max(1, min(WINDOW_STEPS, len(rows) // 4))
        head, tail = rows[:k], rows[-k:]

        def mean(rs, key):
            return sum(r[key] for r in rs) / len(rs)

        found.append((when, {"stage": stage_dir.name, "init": stage.get("init", "?"), "samples": samples,
                             "window": k, "steps": (rows[0]["step"], rows[k - 1]["step"], rows[-k]["step"],
                                                    rows[-1]["step"]),
                             "format_start": rows[0]["rollout/format_acc"],
                             "format": (mean(head, "rollout/format_acc"), mean(tail, "rollout/format_acc")),
                             "accuracy": (mean(head, "rollout/accuracy"), mean(tail, "rollout/accuracy"))}))
    return [r for _, r in sorted(found, key=lambda x: x[0])]


def window(r: dict, end: int) -> str:
    """`steps 1-5` / `step 1` for the first (end 0) or last (end 1) window of a rollouts entry."""
    a, b = r["steps"][2 * end], r["steps"][2 * end + 1]
    return f"step {a}" if a == b else f"steps {a}-{b}"


def pct_ci(p: float, n: int | None) -> str:
    """`41.6% [33.2, 50.4]` (Wilson), or without the interval when the sample count is unknown."""
    if not n:
        return f"{100 * p:.1f}%"
    lo, hi = wilson(p * n, n)
    return f"{100 * p:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _diff(p1: float, n1: int | None, p2: float, n2: int | None) -> tuple[float, float, float] | None:
    """p2 - p1 in points with a 95% normal interval for two independent proportions; None without counts."""
    if not (n1 and n2):
        return None
    se = (p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2) ** 0.5
    d = 100 * (p2 - p1)
    return d, d - 100 * Z95 * se, d + 100 * Z95 * se


def _effect(d) -> str:
    return f"{d[0]:+.1f} points [{d[1]:+.1f}, {d[2]:+.1f}]"


def claims(scores: dict, rollouts: list[dict]) -> list[str]:
    """The SPECS claims this run can test, one bullet each, with the effect, its interval and the verdict."""
    out = []
    for r in rollouts:
        n = r["samples"] and r["samples"] * r["window"]
        d = _diff(r["accuracy"][0], n, r["accuracy"][1], n)
        if d:
            out.append(f"- **GRPO raises sampled answer accuracy** ({r['stage']}, training prompts, {window(r, 0)} vs "
                       f"{window(r, 1)}): {pct_ci(r['accuracy'][0], n)} -> {pct_ci(r['accuracy'][1], n)}, "
                       f"{_effect(d)}: **{verdict(d[1], d[2])}**.")
    if len(rollouts) >= 2:
        first, last = rollouts[0], rollouts[-1]
        d = _diff(first["format_start"], first["samples"], last["format_start"], last["samples"])
        if d:
            out.append(f"- **The cold start hands the final GRPO a well-formatted policy**: {last['stage']} (from "
                       f"{last['init']}) starts at {pct_ci(last['format_start'], last['samples'])} well-formatted "
                       f"samples, {first['stage']} (from {first['init']}) started at "
                       f"{pct_ci(first['format_start'], first['samples'])}; {_effect(d)}: **{verdict(d[1], d[2])}**.")
    models = [m for m in scores["models"] if m != scores["base"]]
    how = decoding(scores)
    for model in models:
        r = scores["models"][model]
        g = (r.get("sampled") or r).get("group_gain_ci", {})  # sampled accuracy where the stage sampled
        parts = [f"{name.upper()} {g[name][0]:+.1f} points [{g[name][1]:+.1f}, {g[name][2]:+.1f}]: "
                 f"**{verdict(g[name][1], g[name][2])}**" for name in ("id", "ood") if name in g]
        if parts:
            what = "The final model beats the base" if model == models[-1] else f"{model} vs the base"
            out.append(f"- **{what}** ({model}, {how}, test rows): " + "; ".join(parts) + ".")
    return out


def decoding(scores: dict) -> str:
    """How the claims' test scores were decoded: "greedy", or "sampled accuracy, k samples at temperature T"."""
    s = scores.get("sampling")
    return f"sampled accuracy, {s['samples']} samples at temperature {s['temperature']:g}" if s else "greedy"


def _decoding_note(scores: dict) -> str:
    s = scores.get("sampling")
    if not s:
        return ("The evaluation decodes greedily; training rollouts sample (temperature 1), and a model this small "
                "can be well formatted far more often greedily than when sampling, so both are shown.")
    return (f"The evaluation decodes greedily and also samples {s['samples']} responses a prompt at temperature "
            f"{s['temperature']:g}; a model this small can be well formatted far more often greedily than when "
            "sampling, so both are shown, and the claims on test rows use the sampled accuracy.")


def intro(scores: dict, benchmark_kinds: list[str], rollouts: list[dict]) -> list[str]:
    """The opening paragraphs: what the run is, what it can and cannot show, then the claims."""
    nums = sorted({b["num"] for r in scores["models"].values() for b in r["benchmarks"].values()})
    half = 100 * Z95 * (0.25 / nums[0]) ** 0.5 if nums else 0.0
    if benchmark_kinds and all(k == "toy" for k in benchmark_kinds):
        lines = [
            "**What this run can show.** This is the embedded toy world: a tiny Qwen2.5-VL-shaped model (a few "
            "hundred thousand parameters at the default spec), trained from scratch on synthetic pictures in "
            "minutes on a CPU. It runs every SPECS stage through the same code as a real run. In recipes/tiny.toml's "
            "world the pretrained base reads the pictures in part (almost always which colour most shapes have, "
            "often how many shapes there are, seldom how many of one colour: see the per-category tables), so GRPO "
            "has answer accuracy to sharpen, and it samples the `<think>...</think><answer>...</answer>` format only "
            "some of the time, which is what the cold start is about. It is not a small copy of the paper's "
            "experiment: three question families, one-sentence templated reasoning, a few thousand rollouts, a "
            "local rule standing in for the GPT-4o judge (engine/judge_local.py), and an out-of-distribution split "
            "that asks the same questions about larger, denser pictures than any seen in training, not other tasks. "
            "Small changes to the training recipe moved its final scores by several points (docs/LOG.md), so one "
            "run's claims are one sample. With "
            f"{nums[0] if nums else 0} test rows a score's 95% interval is up to about +-{half:.0f} points: smaller "
            "differences are noise. " + _decoding_note(scores) + " Each claim below is computed from this run; one "
            "that is not shown or does not hold is reported as it came out."]
    else:
        sampled = scores.get("sampling")
        lines = [
            f"**How to read this.** Scores are in percent, each with its 95% interval (up to about +-{half:.0f} points "
            f"at {nums[0] if nums else 0} rows); gains over the base are paired on the same rows. The main table is "
            "greedy" + (f"; the claims use the sampled accuracy ({sampled['samples']} samples a prompt at temperature "
                        f"{sampled['temperature']:g}, section 'Sampled decoding')" if sampled else "")
            + ". Each claim below is computed from this run's numbers."]
    found = claims(scores, rollouts)
    lines += ["", "**The SPECS claims, measured in this run** (95% intervals; sampled rollouts treat a prompt's "
              "samples as independent, which makes those intervals somewhat too narrow):", ""]
    lines += found or ["- None can be tested: no GRPO stage logged rollouts and no model but the base was evaluated."]
    return lines
