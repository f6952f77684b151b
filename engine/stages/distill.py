"""Self-distillation of format-only preference pairs (SPECS step 2).

A policy (normally `grpo_zero`) samples k = `rollout.n` answers per training prompt; the ones that are well
formatted and correct (format and accuracy rewards both non-zero) are candidates; the optional judge keeps those
whose reasoning supports their answer; up to m per prompt become *chosen*, and each *rejected* is its chosen with
one format corruption (engine/corrupt.py: same reasoning, same answer text, broken format), so the pair differs in
format only. The coupled ablation (`distill.rejected = "incorrect"`) takes a sampled wrong answer instead.

Output, in the stage directory:
    pairs.parquet   every input column of the prompt row (problem, images, answer, ...), with `id` made unique per
                    pair ("<row id>#<j>") and `prompt_id` the row's id, plus chosen, rejected, corruption,
                    source_model, chosen_format, chosen_accuracy, rejected_format, rejected_accuracy, judge
                    ("yes", "unjudged", or "" when the judge is off). `engine/stages/dpo.py` reads it as is.
    summary.json    the counts at every filter, the settings, and where the pairs came from.
    parts/          one parquet + one counts JSON per chunk of `distill.chunk_prompts` prompts, each written
                    atomically (temporary name, then rename); a rerun after a crash skips the chunks already there.
                    parts/settings.json pins what the parts were made with: a rerun with other settings stops
                    instead of mixing them.

Each rank samples its share of a chunk (seeded by run seed, chunk and rank); rank 0 gathers the completions,
asks the judge (so one process owns the verdict cache) and writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections import Counter
from pathlib import Path

import datasets

from engine import atomic, preempt
from engine.corrupt import corrupt, split_response
from engine.data import Processor, check_unique_ids, encode_rows
from engine.dist import gather_object, on_main, resolve_on_ranks
from engine.fsdp import resolve_dtype
from engine.log import log0
from engine.reward_judge import RewardJudge, check_ready, grade_scored
from engine.reward_judge import make_yes_no_judge as make_judge
from engine.rewards import score
from engine.rollout import SamplingParams, make_backend
from engine.stages import StageContext
from engine.stages.common import read_rows, together_if_local
from engine.stages.config import DistillStageConfig

datasets.disable_progress_bars()  # one line per part in the log instead of five progress bars

COUNT_KEYS = ("prompts", "samples", "well_formatted", "correct", "candidates", "unique_candidates", "judged_yes",
              "judged_no", "unjudged", "chosen", "no_rejected", "pairs", "prompts_with_pairs", "judged_open",
              "judge_failures")
"""The counts in summary.json, in filter order (`candidates`: well formatted and correct; `judged_open`: open-ended
answers whose accuracy the judge decided, `judge_failures`: those it could not, left to the rules)."""


def _write_atomic(path: Path, write) -> None:
    """`write(tmp_path)`, then fsync and rename over `path`: a crash leaves the old file or none, never half a
    file; a full disk raises DiskFullError and leaves nothing."""
    with atomic.replacing(path) as tmp:
        write(tmp)


def _write_json(path: Path, obj) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _settings(cfg: DistillStageConfig, source: str, seed: int) -> dict:
    """What determines the parts' contents; parts made with other settings are not mixed in."""
    r, d = cfg.rollout, cfg.distill
    return {"source_model": source, "data": cfg.data.train, "template": cfg.data.template, "n": r.n, "seed": seed,
            "temperature": r.temperature, "top_p": r.top_p, "max_new_tokens": r.max_new_tokens,
            "max_chosen_per_prompt": d.max_chosen_per_prompt, "rejected": d.rejected, "corruptions": d.corruptions,
            "chunk_prompts": d.chunk_prompts, "judge": cfg.judge.model if cfg.judge.enabled else ""}


def select_pairs(cfg: DistillStageConfig, prompts: list, groups: list[list[dict]], judge, counts: Counter,
                 first_prompt: int) -> list[dict]:
    """Pairs from one chunk. `groups[i]` holds prompt i's scored samples ({"text", "format", "accuracy"}).

    Candidates are taken in sample order; with a judge, each round asks about as many candidates per prompt as
    that prompt still needs, so a prompt whose first candidates are consistent costs m requests, not k.
    """
    d = cfg.distill
    cands: list[list[dict]] = []
    for g in groups:
        counts["samples"] += len(g)
        counts["well_formatted"] += sum(s["format"] > 0 for s in g)
        counts["correct"] += sum(s["accuracy"] > 0 for s in g)
        good = [s for s in g if s["format"] > 0 and s["accuracy"] > 0]
        counts["candidates"] += len(good)
        unique = list({s["text"]: s for s in good}.values())  # the same answer twice would be a duplicate pair
        counts["unique_candidates"] += len(unique)
        cands.append(unique)
    chosen: list[list[tuple[dict, str]]] = [[] for _ in groups]
    if judge is None:
        for i, c in enumerate(cands):
            chosen[i] = [(s, "") for s in c[:d.max_chosen_per_prompt]]
    else:
        next_cand = [0] * len(groups)
        while True:
            asks = []  # (prompt, candidate)
            for i, c in enumerate(cands):
                need = d.max_chosen_per_prompt - len(chosen[i])
                take = c[next_cand[i]:next_cand[i] + max(0, need)]
                next_cand[i] += len(take)
                asks += [(i, s) for s in take]
            if not asks:
                break
            items = []
            for i, s in asks:
                reasoning, answer = split_response(s["text"])
                items.append((prompts[i]["problem"], reasoning, answer))
            for (i, s), v in zip(asks, judge.judge_many(items), strict=True):
                counts[{"yes": "judged_yes", "no": "judged_no"}.get(v.verdict, "unjudged")] += 1
                if judge.keep(v):
                    chosen[i].append((s, v.verdict))
    pairs = []
    for i, group in enumerate(chosen):
        counts["chosen"] += len(group)
        # Coupled ablation: the rejected differs in correctness and format both. Sampled answers that are wrong and
        # badly formatted come first; then wrong, well-formatted ones get a format corruption.
        wrong = [s for s in groups[i] if s["accuracy"] == 0 and s["format"] == 0] + \
            [s for s in groups[i] if s["accuracy"] == 0 and s["format"] > 0]
        for j, (s, verdict) in enumerate(group):
            if d.rejected == "corrupt":
                kind = d.corruptions[(first_prompt + i + j) % len(d.corruptions)]  # in turn: balanced kinds
                text, kind = corrupt(s["text"], kind)
                rej = {"text": text, **score_dict(text, prompts[i])}
            elif j < len(wrong) and wrong[j]["format"] == 0:
                rej, kind = wrong[j], "incorrect"
            elif j < len(wrong):
                kind = d.corruptions[(first_prompt + i + j) % len(d.corruptions)]
                text, kind = corrupt(wrong[j]["text"], kind)
                rej, kind = {"text": text, **score_dict(text, prompts[i])}, f"incorrect+{kind}"
            else:
                counts["no_rejected"] += 1
                continue
            pairs.append({"row": i, "j": j, "chosen": s["text"], "rejected": rej["text"], "corruption": kind,
                          "chosen_format": s["format"], "chosen_accuracy": s["accuracy"],
                          "rejected_format": rej["format"], "rejected_accuracy": rej["accuracy"], "judge": verdict})
    counts["pairs"] += len(pairs)
    counts["prompts_with_pairs"] += len({p["row"] for p in pairs})
    return pairs


def score_dict(text: str, prompt: dict) -> dict:
    """Rule reward of one response; `extracted` and `gold_unparseable` let the judge grade it afterwards."""
    r = score(text, prompt["answer"], prompt["choices"], declared_type=prompt.get("answer_type") or "")
    return {"format": r.format, "accuracy": r.accuracy, "extracted": r.extracted,
            "gold_unparseable": r.gold_unparseable}


def _part_dataset(rows: datasets.Dataset, row_index: list[int], pairs: list[dict], source: str) -> datasets.Dataset:
    """The prompt rows of `pairs` (every input column) plus the pair columns."""
    extra = ["chosen", "rejected", "corruption", "chosen_format", "chosen_accuracy", "rejected_format",
             "rejected_accuracy", "judge"]
    clash = [c for c in [*extra, "prompt_id", "source_model"] if c in rows.column_names]
    part = rows.select([row_index[p["row"]] for p in pairs]).remove_columns(clash)
    ids = [str(x) for x in part["id"]] if "id" in part.column_names else [f"row-{row_index[p['row']]}" for p in pairs]
    part = part.remove_columns([c for c in ("id",) if c in part.column_names])
    part = part.add_column("id", [f"{i}#{p['j']}" for i, p in zip(ids, pairs, strict=True)])
    part = part.add_column("prompt_id", ids).add_column("source_model", [source] * len(pairs))
    for c in extra:
        part = part.add_column(c, [p[c] for p in pairs])
    return part


def _load_prompts(cfg: DistillStageConfig, processor: Processor, ctx: StageContext):
    """(rows, encoded prompts, encode report, data path); at most distill.num_prompts prompts."""
    path = ctx.resolve_path(cfg.data.train)
    rows = read_rows(path, cfg.data.columns)
    prompts, report = encode_rows(rows, processor, template=cfg.data.template, system=cfg.data.system or None,
                                  on_bad_row=cfg.data.on_bad_row, max_tokens=cfg.data.max_tokens, source=str(path),
                                  max_pixel_bytes=cfg.data.max_pixel_bytes)
    if cfg.distill.num_prompts:
        prompts = prompts[:cfg.distill.num_prompts]
    return rows, prompts, report, path


def _parts_done(parts_dir: Path, settings: dict) -> set[int]:
    """The parts already written (rank 0 pins the settings on first use and refuses parts made with others)."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    pinned = parts_dir / "settings.json"
    if pinned.exists():
        try:
            old = json.loads(pinned.read_text())
        except ValueError as e:
            raise ValueError(f"{pinned} is not JSON ({e}); move {parts_dir} away to start the parts over") from None
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise ValueError(f"{parts_dir} holds parts made with other settings {diff} (old, new); restore them to "
                             f"resume, or move that directory away to start over")
    else:
        _write_json(pinned, settings)
    return {int(p.name[5:10]) for p in parts_dir.glob("part-*.json")}


def _judges(cfg: DistillStageConfig, ctx: StageContext):
    """(the consistency judge, the reward judge for open-ended answers), both on rank 0 only (None elsewhere or when
    off). Every rank checks the judge settings first, so a missing key stops the stage before any sampling."""
    if not cfg.judge.enabled:
        return None, None
    check_ready(cfg.judge)
    return on_main(lambda: _make_judges(cfg, ctx), share=False) or (None, None)


def _make_judges(cfg: DistillStageConfig, ctx: StageContext):
    judge_cfg = dataclasses.replace(cfg.judge, cache_path=cfg.judge.cache_path
                                    or str(ctx.stage_dir / "judge_cache.jsonl"))
    judge = make_judge(judge_cfg)
    open_answers = getattr(cfg.judge, "open_answers", True)  # a plain JudgeConfig (tests) grades them too
    return judge, (RewardJudge(judge_cfg, client=judge) if open_answers else None)


def run(cfg: DistillStageConfig, ctx: StageContext) -> None:
    dist_info, world, rank = ctx.dist, ctx.dist.world_size, ctx.dist.rank
    if cfg.model_dir:  # an external model: a directory or a Hugging Face id (cached, else downloaded by rank 0)
        model_dir = resolve_on_ranks(cfg.model_dir, f"stages.{cfg.name}.model_dir", dist_info.is_main)
    else:
        model_dir = ctx.model_dir(cfg.policy)
    source = str(cfg.model_dir or cfg.policy)
    processor = Processor.from_pretrained(model_dir, min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    rows, prompts, report, path = _load_prompts(cfg, processor, ctx)
    ids = [str(x) for x in rows["id"]] if "id" in rows.column_names else [f"row-{i}" for i in range(len(rows))]
    check_unique_ids(ids, path)  # every rank reads the same rows, so every rank stops with the same message
    index_of = {row_id: i for i, row_id in enumerate(ids)}
    problems = rows["problem"]
    answer_types = rows["answer_type"] if "answer_type" in rows.column_names else [""] * len(rows)
    parts_dir = ctx.stage_dir / "parts"
    settings = _settings(cfg, source, ctx.run.seed)
    done = on_main(lambda: _parts_done(parts_dir, settings))  # a bad settings.json stops every rank alike
    chunk = cfg.distill.chunk_prompts
    num_chunks = (len(prompts) + chunk - 1) // chunk
    judge, reward_judge = _judges(cfg, ctx)
    log0(f"distill: {len(prompts)} prompts ({report.num_skipped} bad rows skipped) x {cfg.rollout.n} samples from "
         f"{source} | rejected = {cfg.distill.rejected} | up to {cfg.distill.max_chosen_per_prompt} chosen per "
         f"prompt | judge {'on: ' + cfg.judge.model if judge or cfg.judge.enabled else 'off'} | {num_chunks} parts, "
         f"{len(done)} already written")
    todo = [c for c in range(num_chunks) if c not in done]
    if todo:  # built on every rank (each samples its share); one rank that cannot build it stops them all
        backend = together_if_local(lambda: _backend(cfg, ctx, model_dir, processor), cfg.rollout.backend)
    writer = _PartWriter(cfg, rows, index_of, source, parts_dir, num_chunks, judge, reward_judge)
    for c in todo:
        t0 = time.perf_counter()
        chunk_prompts = prompts[c * chunk:(c + 1) * chunk]
        mine = list(range(rank, len(chunk_prompts), world))
        sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  max_new_tokens=cfg.rollout.max_new_tokens,
                                  seed=ctx.run.seed * 1_000_003 + c * world + rank)
        meta = [{"problem": problems[index_of[s.row_id]], "answer": s.answer, "choices": s.choices,
                 "answer_type": answer_types[index_of[s.row_id]]} for s in chunk_prompts]
        # Every rank samples, also with no prompts (a tensor-parallel vLLM engine spans several ranks); one rank's
        # failure (e.g. out of memory) stops them all.
        gathered = gather_object(together_if_local(functools.partial(_sample, backend, cfg, chunk_prompts, mine, meta,
                                                                     sampling), backend))
        # Rank 0 judges, pairs and writes the part; an error there stops every rank before the next collective.
        on_main(functools.partial(writer.write, c, chunk_prompts, meta, gathered, t0))
        if preempt.agreed(dist_info.device):  # a signal: stop after this part, which is written
            raise preempt.Preempted(f"distill after part {c + 1}/{num_chunks} (written; a rerun continues)")
    if todo:
        backend.close()
    # "no pairs", a full disk: every rank stops with rank 0's message, none is left waiting at a collective
    on_main(lambda: _finish(cfg, ctx, parts_dir, num_chunks, settings, report.num_skipped, judge))


def _sample(backend, cfg: DistillStageConfig, chunk_prompts: list, mine: list[int], meta: list[dict],
            sampling: SamplingParams) -> dict[int, list[dict]]:
    """This rank's prompts `mine` of the chunk, `rollout.n` samples each, scored by the rules."""
    out = backend.generate([chunk_prompts[i] for i in mine], cfg.rollout.n, sampling)
    return {i: [{"text": x.text, **score_dict(x.text, meta[i])} for x in g] for i, g in zip(mine, out, strict=True)}


def _backend(cfg: DistillStageConfig, ctx: StageContext, model_dir: Path, processor: Processor):
    dtype, _ = resolve_dtype(ctx.model.dtype, ctx.dist.device)
    r = cfg.rollout
    return make_backend(r.backend, model_dir, device=ctx.dist.device, dtype=dtype, processor=processor,
                        gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager,
                        max_model_len=r.max_model_len or cfg.data.max_tokens, seed=ctx.run.seed,
                        max_batch_rows=r.max_batch_rows, compile_decode=r.compile_decode, batching=r.batching,
                        require=r.require, tensor_parallel_size=r.tensor_parallel_size)


@dataclasses.dataclass
class _PartWriter:
    """What rank 0 needs to turn a chunk's scored samples into a part: judges, pairs, the files."""

    cfg: DistillStageConfig
    rows: datasets.Dataset
    index_of: dict[str, int]
    source: str
    parts_dir: Path
    num_chunks: int
    judge: object
    reward_judge: RewardJudge | None

    def write(self, c: int, chunk_prompts: list, meta: list[dict], gathered: list[dict], start_s: float) -> None:
        """Part `c`: the pairs of its prompts (part-NNNNN.parquet, if any) and its counts (part-NNNNN.json, which
        marks it done)."""
        scored = {k: v for part in gathered for k, v in part.items()}
        groups = [scored[i] for i in range(len(chunk_prompts))]
        counts = Counter(prompts=len(chunk_prompts))
        if self.reward_judge is not None:  # open-ended answers the rules score wrong: the judge decides
            tally = grade_scored(self.reward_judge, groups, meta)
            counts.update(judged_open=tally.num_judged, judge_failures=tally.num_failures)
        chunk = self.cfg.distill.chunk_prompts
        pairs = select_pairs(self.cfg, meta, groups, self.judge, counts, first_prompt=c * chunk)
        if pairs:
            row_index = [self.index_of[s.row_id] for s in chunk_prompts]
            part = _part_dataset(self.rows, row_index, pairs, self.source)
            _write_atomic(self.parts_dir / f"part-{c:05d}.parquet", lambda p: part.to_parquet(str(p)))
        _write_json(self.parts_dir / f"part-{c:05d}.json", {k: counts[k] for k in COUNT_KEYS})  # marks it done
        log0(f"distill: part {c + 1}/{self.num_chunks}: {counts['candidates']}/{counts['samples']} samples correct "
             f"and well formatted -> {counts['pairs']} pairs ({time.perf_counter() - start_s:.1f} s)")


def _finish(cfg: DistillStageConfig, ctx: StageContext, parts_dir: Path, num_chunks: int, settings: dict,
            num_bad_rows: int, judge) -> None:
    """Concatenate the parts into pairs.parquet and write summary.json (rank 0)."""
    totals = Counter()
    files = []
    for c in range(num_chunks):
        totals.update(json.loads((parts_dir / f"part-{c:05d}.json").read_text()))
        if (parts_dir / f"part-{c:05d}.parquet").exists():
            files.append(str(parts_dir / f"part-{c:05d}.parquet"))
    if not files:
        raise ValueError(f"distill: no pairs from {totals['samples']} samples ({totals['candidates']} correct and "
                         f"well formatted); sample more (rollout.n), use more prompts, or a stronger policy")
    pairs = datasets.concatenate_datasets([datasets.Dataset.from_parquet(f) for f in files])
    out = ctx.stage_dir / "pairs.parquet"
    _write_atomic(out, lambda p: pairs.to_parquet(str(p)))
    counts = {k: totals[k] for k in COUNT_KEYS}
    kinds = dict(Counter(pairs["corruption"]))
    summary = {"counts": counts, "bad_rows_skipped": num_bad_rows, "corruptions": kinds, "settings": settings,
               "pairs": str(out), **({"judge": judge.stats.as_dict()} if judge else {})}
    _write_json(ctx.stage_dir / "summary.json", summary)
    log0("distill: " + " -> ".join(f"{k} {v}" for k, v in counts.items()) + f" | corruptions {kinds} | {out}")
