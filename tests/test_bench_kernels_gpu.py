"""bench/bench_kernels_gpu.py, the script a short device window runs once: its CPU mode must run end to end (every
row, the fp32 reference's self-check, the JSONL), and its GPU-only verdict logic must pick the right default. A
broken script found here costs nothing; found on the lent GPU it costs the window."""

import json
import math

import pytest

import kernels
from bench.bench_kernels_gpu import BUFFER_MIB, GOALS, print_goals, verdict

from ._launch import REPO, child_env, launch, python

SCRIPT = REPO / "bench" / "bench_kernels_gpu.py"


@pytest.mark.subprocess
def test_cpu_mode_runs_every_row(tmp_path):
    cpu_only = child_env(CUDA_VISIBLE_DEVICES="")
    out = launch(python(SCRIPT, "--cpu", "--out", tmp_path), env=cpu_only, timeout_s=120).stdout
    for product in ("logits x @ W^T", "dx = d @ W", "dW += d^T @ x"):
        assert f"| {product} |" in out
    configs = ["eager", "recompute"] + [f"onepass-{mib}M" for mib in BUFFER_MIB]
    for op in GOALS:
        if op == "nll-16k" and not hasattr(kernels, "fused_nll"):
            assert "fused_nll: not in this checkout, skipped" in out
            continue
        assert f"self-check {op}: " in out and f"self-check {op}: " + "FAIL" not in out
        for cfg in configs:
            line = next((ln for ln in out.splitlines() if ln.startswith(f"| {op} | {cfg} |")), None)
            assert line is not None and "FAIL" not in line and line.endswith("| n/a (CPU) |"), (op, cfg, line)
    assert "phase times" in out and "goal summary" in out and "phase profile" not in out  # no profile failed
    assert "skipped after" not in out  # the time budget cut nothing
    # GRPO: CPU mode puts tokens on a clip boundary, so the clip-flip path (errors on the rest) ran.
    grpo_eager = next(ln for ln in out.splitlines() if ln.startswith("| grpo-8x1k | eager |"))
    assert int(grpo_eager.split("|")[11]) > 0
    records = [json.loads(ln) for ln in (tmp_path / "kernels_gpu.jsonl").read_text().splitlines()]
    assert {"ceiling", "row", "phase"} <= {r["kind"] for r in records}
    for r in records:
        assert r["device"] == "cpu" and r["mode"] == "cpu" and r["torch"] and r["triton"] and r["git_sha"]
        assert r["timestamp"]


def test_gpu_verdicts_and_default_choice(capsys):
    """The GPU branch of the verdicts and the goal summary (CPU mode prints n/a), on made-up H100-like rows."""
    rows = [dict(impl="eager", config="eager", ms_p50=100.0, extra_gib=27.8, x_eager=1.0),
            dict(impl="recompute", config="recompute", ms_p50=80.0, extra_gib=3.1, x_eager=0.80),
            dict(impl="onepass", config="onepass-128M", ms_p50=83.0, extra_gib=1.25, x_eager=0.83),
            dict(impl="onepass", config="onepass-256M", ms_p50=86.0, extra_gib=1.29, x_eager=0.86),
            dict(impl="onepass", config="onepass-1024M", ms_p50=70.0, extra_gib=2.2, x_eager=0.70)]
    for r in rows:
        r["verdict"] = verdict(r, "logprobs-16k", cpu=False)
    assert [r["verdict"] for r in rows] == ["base", "FAIL (mem)", "PASS", "FAIL (time)", "FAIL (mem)"]
    assert verdict(dict(impl="onepass", x_eager=0.9, extra_gib=2.0), "logprobs-16k", cpu=False) == "FAIL (time, mem)"
    assert verdict(dict(impl="onepass", x_eager=math.nan, extra_gib=1.0), "logprobs-16k",
                   cpu=False) == "FAIL (time: no eager row)"
    assert verdict(dict(impl="onepass", error="OutOfMemoryError: x"), "logprobs-16k",
                   cpu=False).startswith("FAIL (error")
    assert verdict(dict(impl="onepass", x_eager=0.5, extra_gib=math.nan), "logprobs-16k", cpu=False) == "FAIL (mem)"
    print_goals({"logprobs-16k": {"rows": rows}, "grpo-8x1k": {"rows": rows[:2]}}, cpu=False)
    lines = capsys.readouterr().out.splitlines()
    # the default is the fastest config within the memory goal, not the fastest overall (onepass-1024M)
    assert next(ln for ln in lines if ln.startswith("| logprobs-16k |")).endswith(
        "| onepass-128M | 83.00 | 0.83 | 1.25 | PASS |")
    assert "none within 1.3 GiB" in next(ln for ln in lines if ln.startswith("| grpo-8x1k |"))
    assert "no rows" in next(ln for ln in lines if ln.startswith("| dpo-4x2x1k |"))
