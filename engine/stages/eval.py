"""Evaluation: every model of the stage on every benchmark, greedy, then scores, the Generalization Factor and
the report.

Output, in the stage directory:
    predictions/<model>/<benchmark>.jsonl   one line per row: id, category, score (0..1), correct, response,
                                            finish_reason, error. Appended after each chunk of prompts and
                                            flushed, so a rerun resumes after the last complete line.
    scores.json                             per model and benchmark: score (%), per category, counts; per model:
                                            the group means, gains over the base, GF.
    report.md, *.png                        engine/report.py.

Prompts are built like training prompts (`template` around the benchmark's own prompt); decoding is greedy with
the builtin backend. Each rank generates its share of a chunk; rank 0 scores and writes. A row whose prompt cannot
be encoded (a bad image, too many tokens) is scored 0, as the official scripts score a missing answer, and its
error is recorded. Rows our rules cannot score (MEGA-Bench's judged or unsupported fields) are left out and
counted; MEGA-Bench's videos are fed as sampled frames (`max_images`), as its official image models do.
MEGA-Bench's score is the macro mean over its tasks, as officially.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from PIL import Image

from engine import atomic, benchmarks, preempt, tracking
from engine.benchmarks import BenchRow
from engine.data import BadRow, Processor
from engine.dist import barrier, broadcast_object, gather_object
from engine.fsdp import resolve_dtype
from engine.log import Progress, log0
from engine.predictions import append_predictions, drop_partial_line, predictions_path, read_predictions
from engine.reward_judge import make_yes_no_judge as make_judge
from engine.rewards import format_ok
from engine.rollout import RolloutBackend, SamplingParams, make_backend
from engine.stages import StageContext
from engine.stages.config import EvalStageConfig


def _open(image) -> Image.Image:
    return Image.open(image) if isinstance(image, (str, Path)) else image


def _score(module, row: BenchRow, response: str) -> float:
    """The official per-row score in [0, 1]: MEGA-Bench's partial credit, else 1.0 for a correct answer."""
    if hasattr(module, "score"):
        return float(module.score(row, response))
    return float(module.is_correct(row, response))


def resolve_models(cfg: EvalStageConfig, ctx: StageContext) -> list[str]:
    """`models` with each "<stage>@*" expanded to that stage's checkpoints; every "<stage>@<step>" checked."""
    out = []
    for m in cfg.models:
        stage, at, step = m.partition("@")
        if not at:
            out.append(m)
            continue
        ckpts = ctx.out_dir / stage / "checkpoints"
        steps = sorted(int(p.name.removeprefix("step-")) for p in ckpts.glob("step-*") if p.name[5:].isdigit())
        if step == "*":
            if not steps:
                raise ValueError(f"eval: {m}: no checkpoints in {ckpts}")
            out += [f"{stage}@{s}" for s in steps]
        elif int(step) not in steps:
            raise ValueError(f"eval: {m}: no checkpoint of step {step} in {ckpts} (there are {steps}); raise "
                             f"checkpoint.keep in stage {stage!r} to keep older ones")
        else:
            out.append(f"{stage}@{int(step)}")
    return out


def _checkpoint_dir(ctx: StageContext, model: str) -> Path:
    """The HF directory of checkpoint "<stage>@<step>", converted once (rank 0) into <eval stage>/checkpoints_hf/."""
    from engine.checkpoint import checkpoint_to_hf

    stage, _, step = model.partition("@")
    out = ctx.stage_dir / "checkpoints_hf" / model
    if ctx.dist.rank == 0 and not out.is_dir():
        ckpt = ctx.out_dir / stage / "checkpoints" / f"step-{int(step):06d}"
        log0(f"eval: converting {ckpt} to a Hugging Face directory {out}")
        checkpoint_to_hf(ckpt, ctx.model_dir(stage), out)
    barrier()
    return out


def load_benchmarks(cfg: EvalStageConfig, ctx: StageContext) -> list[tuple]:
    """(config, module, rows to evaluate, number of rows left out as unscorable by rules) per benchmark."""
    out = []
    for b in cfg.benchmarks:
        module = benchmarks.get(b.kind)
        # MEGA-Bench feeds a video as frames sampled by the official rule (engine/benchmarks/video.py).
        options = ({"max_images": b.max_images, "demo_video_frames": b.demo_video_frames, "run_code": b.run_code}
                   if b.kind == "megabench" else {})
        rows = module.load(ctx.resolve_path(b.path), **options)
        if b.limit:
            rows = rows[:b.limit]
        # Rows our rules cannot score (an LLM-judged field, a metric not re-implemented) or whose media we cannot
        # feed (videos not turned into frames: max_images = 0) are left out and counted; the report says how many.
        def unscorable(r: BenchRow) -> bool:
            return bool(r.meta.get("needs_judge") or r.meta.get("scorable") is False
                        or (r.meta.get("videos") and "video_frames" not in r.meta))

        left = [r for r in rows if unscorable(r)]
        rows = [r for r in rows if not unscorable(r)]
        ids = [r.id for r in rows]
        if len(set(ids)) != len(ids):
            raise ValueError(f"benchmark {b.name}: row ids are not unique")
        # A partial image set would give a number that silently does not compare with published ones.
        missing = [str(im) for r in rows for im in r.images if isinstance(im, (str, Path)) and not Path(im).is_file()]
        if missing:
            raise ValueError(f"benchmark {b.name}: {len(missing)} image files are missing, e.g. {missing[:3]}; put the "
                             f"release's images under {ctx.resolve_path(b.path)} (see the README, 'Evaluation data')")
        out.append((b, module, rows, len(left)))
        log0(f"eval: {b.name} ({b.kind}, group {b.group}): {len(rows)} rows"
             + (f", {len(left)} left out (an LLM judge, a metric we lack, or unframed video)" if left else ""))
    return out


def run(cfg: EvalStageConfig, ctx: StageContext) -> None:
    dist_info, world, rank = ctx.dist, ctx.dist.world_size, ctx.dist.rank
    benches = load_benchmarks(cfg, ctx)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
    dtype, _ = resolve_dtype(ctx.model.dtype, dist_info.device)
    judge = None
    if rank == 0 and cfg.judge.enabled:  # one process owns the judge and its cache
        judge = make_judge(dataclasses.replace(cfg.judge, cache_path=cfg.judge.cache_path
                                               or str(ctx.stage_dir / "judge_cache.jsonl")))
    models, error = [], ""
    if rank == 0:
        try:
            models = resolve_models(cfg, ctx)
        except ValueError as e:
            error = str(e)
    models, error = broadcast_object((models, error))
    if error:  # every rank stops with the same message
        raise ValueError(error)
    for model in models:
        model_dir = _checkpoint_dir(ctx, model) if "@" in model else ctx.model_dir(model)
        processor, backend = None, None
        for b, module, rows, _ in benches:
            path = predictions_path(ctx.stage_dir, model, b.name)
            if rank == 0:
                drop_partial_line(path)
            done = broadcast_object(set(read_predictions(path)) if rank == 0 else set())
            todo = [r for r in rows if r.id not in done]
            log0(f"eval: {model} on {b.name}: {len(rows) - len(todo)} rows predicted earlier, {len(todo)} to go")
            if not todo:
                continue
            if backend is None:
                processor = Processor.from_pretrained(model_dir, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
                backend = make_backend(cfg.backend, model_dir, device=dist_info.device, dtype=dtype,
                                       processor=processor, gpu_memory_utilization=cfg.gpu_memory_utilization,
                                       max_model_len=cfg.max_model_len, seed=ctx.run.seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            progress = Progress(f"eval: {model} on {b.name}", len(todo), "prompts")
            for start in range(0, len(todo), cfg.chunk_prompts):
                chunk = todo[start:start + cfg.chunk_prompts]
                local = _generate(cfg, processor, backend, chunk[rank::world], sampling)
                gathered = gather_object(local)
                if rank == 0:
                    by_id = {p["id"]: p for part in gathered for p in part}
                    scored = [(row, by_id[row.id], _score(module, row, by_id[row.id]["response"])
                               if not by_id[row.id]["error"] else 0.0) for row in chunk]
                    verdicts = _judge_wrong(judge, module, scored)
                    records = []
                    for row, p, s in scored:
                        verdict = verdicts.get(row.id, "")
                        s = 1.0 if verdict == "yes" else s
                        records.append({"id": row.id, "category": row.category, "score": s, "correct": s == 1.0,
                                        "judge": verdict, "format": format_ok(p["response"]), **p})
                    append_predictions(path, records)
                progress.update(len(chunk))
                if preempt.agreed(dist_info.device):  # a signal: stop after this chunk, which is written
                    raise preempt.Preempted(f"eval: {model} on {b.name} after {start + len(chunk)} of {len(todo)} "
                                            f"prompts (written; a rerun continues from there)")
        if backend is not None:
            backend.close()  # the next model's backend gets the accelerator memory
    error = ""
    if rank == 0:
        try:
            _summarise_and_report(cfg, ctx, models, benches)
        except (ValueError, atomic.DiskFullError) as e:  # every rank stops with it, none is left in a collective
            error = f"{type(e).__name__}: {e}"
    error = broadcast_object(error)
    if error:
        raise ValueError(f"eval report: {error}")



def _summarise_and_report(cfg: EvalStageConfig, ctx: StageContext, models: list[str], benches: list) -> None:
    """scores.json and report.md from the prediction files (rank 0); the scores and report to the trackers."""
    from engine.report import summarise, write_report

    scores = summarise(dataclasses.replace(cfg, models=models), ctx, benches)
    atomic.write_text(ctx.stage_dir / "scores.json", json.dumps(scores, indent=2) + "\n")
    report = write_report(cfg, ctx, scores)
    tracking.log_eval(scores, report)
    lines = report.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| model"))
    table = lines[first:lines.index("", first)]
    found = [line for line in lines[:first] if line.startswith("- **")]  # the claims, as measured
    log0("eval: scores (%%) with 95%% intervals, gains over %s and GF; full report: %s\n%s\n%s", scores["base"],
         report, "\n".join(table), "\n".join(found))


def _judge_wrong(judge, module, scored: list[tuple]) -> dict[str, str]:
    """Ask the judge about the rule-wrong answers of a benchmark whose official pipeline uses an LLM. -> id: verdict.
    Partial-credit benchmarks (MEGA-Bench) and rows without a response are not asked."""
    if judge is None or not module.JUDGE_NOTE or hasattr(module, "score"):
        return {}
    ask = [(row, p) for row, p, s in scored if s < 1.0 and not p["error"] and p["response"].strip()]
    verdicts = judge.match_many([(row.problem, _gold_text(row), p["response"]) for row, p in ask]) if ask else []
    return {row.id: v.verdict for (row, _), v in zip(ask, verdicts, strict=True)}


def _gold_text(row: BenchRow) -> str:
    """The reference answer as the judge sees it: with the option's text for a multiple-choice letter."""
    letters = "ABCDEFGHIJ"
    if row.choices and len(row.answer) == 1 and row.answer in letters[:len(row.choices)]:
        return f"{row.answer}. {row.choices[letters.index(row.answer)]}"
    return row.answer


def _generate(cfg: EvalStageConfig, processor: Processor, backend: RolloutBackend, rows: list[BenchRow],
              sampling: SamplingParams) -> list[dict]:
    samples, out = [], []
    for row in rows:
        try:
            samples.append((row, processor.encode(row.problem, [_open(im) for im in row.images], template=cfg.template,
                                                  system=cfg.system or None, row_id=row.id)))
        except (BadRow, OSError) as e:  # OSError: an unreadable image file
            out.append({"id": row.id, "response": "", "finish_reason": "error", "error": str(e)[:300]})
    if samples:
        groups = backend.generate([s for _, s in samples], 1, sampling)
        for (row, _), (c,) in zip(samples, groups, strict=True):
            out.append({"id": row.id, "response": c.text, "finish_reason": c.finish_reason, "error": ""})
    return out
