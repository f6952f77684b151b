"""The report's intervals and claims: Wilson and paired intervals against hand-computed values, and the claims
reading a run directory (GRPO metrics + stage records) and saying what holds, what is not shown, what fails."""

import json

import pytest

from engine.report_claims import claims, intro, sampled_rollouts
from engine.report_stats import group_gain_ci, macro_mean_var, paired_gain, score_ci, verdict, wilson


def test_wilson_known_values():
    # Wilson (1927) at z = 1.96: 0/10 -> [0, 0.2775]; 5/10 -> [0.2366, 0.7634]; 10/10 -> [0.7225, 1].
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert score_ci([1.0] * 5 + [0.0] * 5) == pytest.approx((23.66, 76.34), abs=1e-2)


def test_partial_credit_uses_the_normal_interval():
    lo, hi = score_ci([0.5, 0.5, 0.5, 0.5])  # no spread: the interval is the point
    assert (lo, hi) == (50.0, 50.0)
    lo, hi = score_ci([0.0, 0.5, 1.0, 0.5])  # mean 0.5, sd 0.408, se 0.204
    assert (lo, hi) == pytest.approx((50 - 1.96 * 20.41, 50 + 1.96 * 20.41), abs=0.05)


def test_paired_gain_is_tighter_than_two_separate_intervals():
    base = [0.0, 1.0] * 50
    model = [1.0, 1.0] * 50  # fixes every even row, keeps every odd one
    gain, var = paired_gain(model, base)
    assert gain == 50.0 and var == pytest.approx(100 * 50**2 / 99 / 100)  # sample var of +-50 diffs, / n
    with pytest.raises(ValueError, match="same rows"):
        paired_gain([1.0], [1.0, 0.0])
    # Macro: the mean of per-category mean gains, variances of the strata added.
    gain, var = paired_gain([1, 1, 0, 0], [0, 0, 0, 0], ["a", "a", "b", "b"])
    assert gain == 50.0 and var == 0.0
    assert macro_mean_var({"a": [1.0, 1.0], "b": [0.0]}) == (0.5, 0.0)


def test_group_gain_and_verdict():
    g, lo, hi = group_gain_ci([(10.0, 4.0), (20.0, 5.0)])  # mean 15, se sqrt(9) / 2 = 1.5
    assert (g, lo, hi) == pytest.approx((15.0, 15 - 1.96 * 1.5, 15 + 1.96 * 1.5), abs=1e-3)
    assert verdict(0.1, 3) == "holds" and verdict(-3, -0.1).startswith("does not hold")
    assert verdict(-1, 1).startswith("not shown")


def _grpo_stage(out, name, init, first, last, finished):
    """A finished 8-step GRPO stage as train.py leaves it: its record (16 prompts x 8 samples) and metrics whose
    format is first[0] at step 1 and last[0] after, and accuracy first[1] in steps 1-4 and last[1] in 5-8."""
    d = out / name
    d.mkdir(parents=True)
    (d / "config.toml").write_text(f'[stage]\nname = "{name}"\ninit = "{init}"\n[stage.train]\nbatch_size = 16\n'
                                   f'[stage.rollout]\nn = 8\n')
    (d / "DONE").write_text(json.dumps({"finished": finished}) + "\n")
    rows = [{"step": s, "rollout/reward": 0.0, "rollout/format_acc": first[0] if s == 1 else last[0],
             "rollout/accuracy": first[1] if s <= 4 else last[1]} for s in range(1, 9)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_claims_from_a_run_directory(tmp_path):
    _grpo_stage(tmp_path, "specs", "cold_start", (0.75, 0.20), (0.90, 0.22), "2026-01-01T00:10:00")
    _grpo_stage(tmp_path, "grpo_zero", "pretrain", (0.33, 0.10), (0.85, 0.30), "2026-01-01T00:05:00")
    rollouts = sampled_rollouts(tmp_path)
    assert [r["stage"] for r in rollouts] == ["grpo_zero", "specs"]  # in the order they finished
    assert rollouts[0]["samples"] == 128 and rollouts[0]["init"] == "pretrain"
    scores = {"base": "pretrain", "models": {
        "pretrain": {"benchmarks": {"id": {"num": 128}}},
        "specs@40": {"benchmarks": {"id": {"num": 128}},
                     "group_gain_ci": {"id": [-4.7, -9.0, -0.4], "ood": [1.0, -3.0, 5.0]}}}}
    text = "\n".join(claims(scores, rollouts))
    # grpo_zero: 10% -> 30% over 2 batches of 128 samples at each end (8 steps: a quarter), Wilson by hand:
    # 0.1059 +- 0.0370 and 0.3030 +- 0.0558; the difference +20 points, se sqrt(.09/256 + .21/256) = 0.0342.
    assert "(grpo_zero, training prompts, steps 1-2 vs steps 7-8): 10.0% [6.9, 14.3] -> 30.0% [24.7, 35.9], " \
           "+20.0 points [+13.3, +26.7]: **holds**" in text
    assert "(specs, training prompts, steps 1-2 vs steps 7-8)" in text
    assert "+2.0 points [-5.1, +9.1]: **not shown: the interval includes zero**" in text
    assert "specs (from cold_start) starts at 75.0%" in text and "grpo_zero (from pretrain) started at 33.0%" in text
    assert "The final model beats the base** (specs@40, greedy, test rows): ID -4.7 points [-9.0, -0.4]: " \
           "**does not hold: a loss**; OOD +1.0 points [-3.0, +5.0]: **not shown" in text
    lines = intro(scores, ["toy"], rollouts)
    assert lines[0].startswith("**What this run can show.** This is the embedded toy world")
    assert "With 128 test rows a score's 95% interval is up to about +-9 points" in lines[0]
    assert intro(scores, ["mathvista"], [])[-1].startswith("- **The final model beats the base**")
