"""Evaluation: every model of the stage on every benchmark, greedy and (with `samples = k`) k sampled responses
per prompt, then scores, pass@k, the Generalization Factor and the report.

Output, in the stage directory:
    predictions/<model>/<benchmark>.jsonl   greedy, one line per row: id, category, score (0..1), correct, judge,
                                            format, response, finish_reason, error.
    predictions/<model>/<benchmark>.samples.jsonl
                                            sampled (only with `samples`), one line per row: id, category, n,
                                            temperature, top_p, and per sample: scores, judge, format, responses,
                                            finish_reasons; error.
                                            Both are appended after each chunk of prompts and flushed, so a rerun
                                            resumes after the last complete line (a sampled line written with other
                                            n / temperature / top_p is predicted again).
    scores.json                             per model and benchmark: score (%), per category, counts, the sampled
                                            accuracy and pass@k; per model: the group means, gains over the base, GF.
    report.md, *.png                        engine/report.py.

Prompts are built like training prompts (`template` around the benchmark's own prompt); the greedy pass decodes with
temperature 0, the sampled pass with `temperature` / `top_p`, seeded by the run seed and the prompts' ids (a rerun
draws the same samples). Each rank generates its share of a chunk; rank 0 scores and writes. A row whose prompt
cannot be encoded (a bad image, too many tokens) is scored 0 in every sample, as the official scripts score a missing
answer, and its error is recorded. Rows our rules cannot score (MEGA-Bench's judged or unsupported fields) are left
out and counted; MEGA-Bench's videos are fed as sampled frames (`max_images`), as its official image models do.
MEGA-Bench's score is the macro mean over its tasks, as officially.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import zlib
from pathlib import Path

from PIL import Image

from engine import atomic, benchmarks, preempt, tracking
from engine.benchmarks import BenchRow
from engine.data import BadRow, Processor
from engine.dist import gather_object, on_main, together
from engine.fsdp import resolve_dtype
from engine.log import Progress, log0
from engine.predictions import (
    append_predictions,
    drop_partial_line,
    predictions_path,
    read_predictions,
    sampled_path,
)
from engine.reward_judge import make_yes_no_judge as make_judge
from engine.rewards import format_ok
from engine.rollout import RolloutBackend, SamplingParams, make_backend
from engine.stages import StageContext
from engine.stages.common import together_if_local
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

    def convert() -> None:  # rank 0; a damaged checkpoint stops every rank with its message
        if not out.is_dir():
            ckpt = ctx.out_dir / stage / "checkpoints" / f"step-{int(step):06d}"
            log0(f"eval: converting {ckpt} to a Hugging Face directory {out}")
            checkpoint_to_hf(ckpt, ctx.model_dir(stage), out)

    on_main(convert)
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


@dataclasses.dataclass(frozen=True)
class Decoding:
    """One pass over every row: greedy (n = 1, temperature 0) or sampled (n = `samples` per prompt)."""

    n: int
    sampling: SamplingParams
    sampled: bool

    def path(self, stage_dir: Path, model: str, benchmark: str) -> Path:
        return (sampled_path if self.sampled else predictions_path)(stage_dir, model, benchmark)

    def done(self, preds: dict[str, dict]) -> set[str]:
        """Ids already predicted under these settings (a sampled line from other settings is predicted again)."""
        if not self.sampled:
            return set(preds)
        want = (self.n, self.sampling.temperature, self.sampling.top_p)
        return {i for i, p in preds.items() if (p.get("n"), p.get("temperature"), p.get("top_p")) == want}


def decodings(cfg: EvalStageConfig) -> list[Decoding]:
    """The greedy pass, then the sampled one when `samples` > 0."""
    out = [Decoding(1, SamplingParams(temperature=0.0, max_new_tokens=cfg.max_new_tokens), False)]
    if cfg.samples:
        out.append(Decoding(cfg.samples, SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                                        max_new_tokens=cfg.max_new_tokens), True))
    return out


class _Backend:
    """A model's processor and generation backend, built on first use (a model with every row predicted earlier
    loads nothing) and closed before the next model's."""

    def __init__(self, cfg: EvalStageConfig, ctx: StageContext, model_dir: Path):
        self.cfg, self.ctx, self.model_dir = cfg, ctx, model_dir
        self.processor: Processor | None = None
        self.backend: RolloutBackend | None = None

    def get(self) -> tuple[Processor, RolloutBackend]:
        if self.backend is None:
            cfg, device = self.cfg, self.ctx.dist.device
            dtype, _ = resolve_dtype(self.ctx.model.dtype, device)
            self.processor = Processor.from_pretrained(self.model_dir, min_pixels=cfg.min_pixels,
                                                       max_pixels=cfg.max_pixels)
            self.backend = make_backend(cfg.backend, self.model_dir, device=device, dtype=dtype,
                                        processor=self.processor, gpu_memory_utilization=cfg.gpu_memory_utilization,
                                        max_model_len=cfg.max_model_len, seed=self.ctx.run.seed)
        return self.processor, self.backend

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()  # the next model's backend gets the accelerator memory


def run(cfg: EvalStageConfig, ctx: StageContext) -> None:
    # Each rank reads the benchmarks (a file one rank cannot read stops them all); rank 0 owns the judge and its
    # cache, and finds the checkpoints. Any error stops every rank with the same message.
    benches = together(lambda: load_benchmarks(cfg, ctx))
    judge = None
    if cfg.judge.enabled:
        judge = on_main(lambda: make_judge(dataclasses.replace(cfg.judge, cache_path=cfg.judge.cache_path
                                                               or str(ctx.stage_dir / "judge_cache.jsonl"))),
                        share=False)
    models = on_main(lambda: resolve_models(cfg, ctx))
    for model in models:
        backend = _Backend(cfg, ctx, _checkpoint_dir(ctx, model) if "@" in model else ctx.model_dir(model))
        for b, module, rows, _ in benches:
            for decoding in decodings(cfg):
                _predict(cfg, ctx, backend, judge, model, (b, module, rows), decoding)
        backend.close()
    on_main(lambda: _summarise_and_report(cfg, ctx, models, benches))  # rank 0 writes; its error stops every rank


def _predict(cfg: EvalStageConfig, ctx: StageContext, backend: _Backend, judge, model: str, bench: tuple,
             decoding: Decoding) -> None:
    """Predict, score and append the rows of one benchmark not yet in its prediction file, a chunk at a time."""
    b, module, rows = bench
    rank, world = ctx.dist.rank, ctx.dist.world_size
    path = decoding.path(ctx.stage_dir, model, b.name)

    def read_done() -> set[str]:  # rank 0 owns the file
        drop_partial_line(path)
        return decoding.done(read_predictions(path))

    done = on_main(read_done)
    todo = [r for r in rows if r.id not in done]
    what = f"{model} on {b.name}" + (f", {decoding.n} samples a prompt" if decoding.sampled else "")
    log0(f"eval: {what}: {len(rows) - len(todo)} rows predicted earlier, {len(todo)} to go")
    if not todo:
        return
    processor, generator = together_if_local(backend.get, cfg.backend)  # one rank's error stops them all
    progress = Progress(f"eval: {what}", len(todo), "prompts")
    for start in range(0, len(todo), cfg.chunk_prompts):
        chunk = todo[start:start + cfg.chunk_prompts]
        local = together_if_local(functools.partial(_generate, cfg, processor, generator, chunk[rank::world],
                                                     decoding, ctx.run.seed), generator)  # e.g. out of memory
        gathered = gather_object(local)
        # Rank 0 scores (and asks the judge) and writes; an error there stops every rank, before the next collective.
        on_main(functools.partial(_append_chunk, path, module, judge, decoding, chunk, gathered))
        progress.update(len(chunk))
        if preempt.agreed(ctx.dist.device):  # a signal: stop after this chunk, which is written
            raise preempt.Preempted(f"eval: {what} after {start + len(chunk)} of {len(todo)} prompts (written; a "
                                    f"rerun continues from there)")


def _append_chunk(path: Path, module, judge, decoding: Decoding, chunk: list[BenchRow], gathered: list) -> None:
    """Score every rank's predictions of `chunk` and append their lines to `path` (rank 0)."""
    by_id = {p["id"]: p for part in gathered for p in part}
    path.parent.mkdir(parents=True, exist_ok=True)
    append_predictions(path, _records(module, judge, decoding, chunk, by_id))


def _records(module, judge, decoding: Decoding, chunk: list[BenchRow], by_id: dict[str, dict]) -> list[dict]:
    """The prediction lines of one chunk: every response scored by the benchmark's rules, then the judge on the
    rule-wrong ones where the official pipeline asks an LLM (rank 0)."""
    scored = []
    for row in chunk:
        p = by_id[row.id]
        scored.append((row, p, [0.0 if p["error"] else _score(module, row, r) for r in p["responses"]]))
    asks = [(i, j) for i, (_, p, scores) in enumerate(scored) for j, s in enumerate(scores)
            if s < 1.0 and not p["error"] and p["responses"][j].strip()]
    verdicts = _judge_wrong(judge, module, [(scored[i][0], scored[i][1]["responses"][j]) for i, j in asks])
    by_sample = dict(zip(asks, verdicts, strict=True))
    out = []
    for i, (row, p, scores) in enumerate(scored):
        judged = [by_sample.get((i, j), "") for j in range(len(scores))]
        scores = [1.0 if v == "yes" else s for s, v in zip(scores, judged, strict=True)]
        formats = [format_ok(r) for r in p["responses"]]
        if not decoding.sampled:
            out.append({"id": row.id, "category": row.category, "score": scores[0], "correct": scores[0] == 1.0,
                        "judge": judged[0], "format": formats[0], "response": p["responses"][0],
                        "finish_reason": p["finish_reasons"][0], "error": p["error"]})
            continue
        out.append({"id": row.id, "category": row.category, "n": decoding.n,
                    "temperature": decoding.sampling.temperature, "top_p": decoding.sampling.top_p,
                    "scores": scores, "judge": judged, "format": formats, "responses": p["responses"],
                    "finish_reasons": p["finish_reasons"], "error": p["error"]})
    return out


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


def _judge_wrong(judge, module, asks: list[tuple[BenchRow, str]]) -> list[str]:
    """Verdicts ("yes", "no", "unjudged") of the judge on rule-wrong (row, response) pairs, for a benchmark whose
    official pipeline uses an LLM; "" for each pair when there is none to ask. Partial-credit benchmarks
    (MEGA-Bench) are not asked."""
    if judge is None or not module.JUDGE_NOTE or hasattr(module, "score") or not asks:
        return [""] * len(asks)
    return [v.verdict for v in judge.match_many([(row.problem, _gold_text(row), r) for row, r in asks])]


def _gold_text(row: BenchRow) -> str:
    """The reference answer as the judge sees it: with the option's text for a multiple-choice letter."""
    letters = "ABCDEFGHIJ"
    if row.choices and len(row.answer) == 1 and row.answer in letters[:len(row.choices)]:
        return f"{row.answer}. {row.choices[letters.index(row.answer)]}"
    return row.answer


def _generate(cfg: EvalStageConfig, processor: Processor, backend: RolloutBackend, rows: list[BenchRow],
              decoding: Decoding, seed: int) -> list[dict]:
    """{"id", "responses", "finish_reasons", "error"} per row, `decoding.n` responses each."""
    n, samples, out = decoding.n, [], []
    for row in rows:
        try:
            samples.append((row, processor.encode(row.problem, [_open(im) for im in row.images], template=cfg.template,
                                                  system=cfg.system or None, row_id=row.id)))
        except (BadRow, OSError) as e:  # OSError: an unreadable image file
            out.append({"id": row.id, "responses": [""] * n, "finish_reasons": ["error"] * n, "error": str(e)[:300]})
    if samples:
        # Seeded by the prompts themselves, so a resumed run draws the same samples for the same rows.
        ids = ",".join(row.id for row, _ in samples)
        sampling = dataclasses.replace(decoding.sampling, seed=(seed * 1_000_003 + zlib.crc32(ids.encode())) % 2**31)
        groups = backend.generate([s for _, s in samples], n, sampling)
        for (row, _), group in zip(samples, groups, strict=True):
            out.append({"id": row.id, "responses": [c.text for c in group],
                        "finish_reasons": [c.finish_reason for c in group], "error": ""})
    return out
