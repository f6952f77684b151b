"""Judged accuracy rewards for open-ended answers (SPECS, arXiv:2510.25801: rules for multiple choice and numbers,
an LLM judge for open-ended answers), shared by the GRPO and distill stages.

One interface, two backends, chosen by `judge.backend`:
  gemini  `engine.judge.Judge` (Gemini's REST API; key from GOOGLE_API_KEY or GEMINI_API_KEY)
  openai  `engine.judge_openai.OpenAIJudge`: any OpenAI-compatible chat endpoint at `judge.base_url` (GPT-4o, or a
          judge served locally by vLLM / SGLang); key from the variable named by `judge.api_key_env`. base_url =
          "local" starts engine/judge_local.py's rule-based stand-in on 127.0.0.1 (demo and tests; not an LLM).
Both send their requests through engine/http_json.py (deadline, size cap, no redirects); no SDK is needed.

Which answers are judged: those whose row is open-ended (its `answer_type` column says "open", or, without one,
its gold is free text: not a choice, number or math expression, see `rewards.answer_type`) and whose rule verdict
is wrong. A rule match is never re-asked. The judge sees (question, gold, extracted final answer) through
`OPEN_ANSWER_PROMPT`, the one prompt of this module; verdicts are cached on disk keyed by (model, prompt), i.e. by
(question, gold, answer). "yes" sets the accuracy reward, "no" keeps it 0; an unjudged item (retries or budget
spent, unparseable reply, outage) keeps the rule verdict and is counted as a failure. A judge outage never stops a
run; a misconfigured judge (no key, bad URL) stops it at stage start (`check_ready`), before any rollout.

In a multi-process run every rank calls `RewardJudge.grade` with its own completions; rank 0 asks for all of them
at once (one process owns the cache file) and sends the verdicts back.
"""

from __future__ import annotations

import dataclasses
import time

from engine.dist import broadcast_object, gather_object
from engine.env import env
from engine.judge import KEY_VARS, Judge, JudgeConfig, Verdict
from engine.judge_local import LOCAL, start_local_judge
from engine.judge_openai import OpenAIJudge, split_url
from engine.judge_settings import JudgeSettings
from engine.log import log0, logger
from engine.rewards import Reward, RewardConfig, answer_type

OPEN_ANSWER_PROMPT = """You are grading a student's final answer to a question against the reference answer.

Question:
{question}

Reference answer:
{gold}

Student's final answer:
{answer}

Is the student's final answer correct, that is, does it state the same thing as the reference answer? Paraphrases,
synonyms, equivalent forms and different units or wording that keep the meaning count as correct; a different,
partial or hedged answer (several candidates), or no answer, is wrong. Reply with one word first, YES or NO; you may
add one short sentence after it."""
"""The judge prompt of the accuracy reward. One (question, gold, answer) triple per request, temperature 0."""


def _openai_key(cfg: JudgeSettings) -> str:
    if not cfg.api_key_env:
        return ""
    key = env(cfg.api_key_env)
    if not key:
        raise RuntimeError(f"the judge is enabled (judge.backend = 'openai') but {cfg.api_key_env} is not set; export "
                           f"it with the endpoint's API key, set judge.api_key_env = '' for a server without a key, "
                           f"or set judge.enabled = false")
    return key


def check_ready(cfg: JudgeConfig) -> None:
    """Raise before any work when an enabled judge cannot run: bad settings (ValueError), a malformed URL
    (ValueError naming it) or a missing key (RuntimeError naming the variable). Call it on every rank. A plain
    JudgeConfig is the gemini backend."""
    if not cfg.enabled:
        return
    errs = cfg.check()
    if errs:
        raise ValueError("judge config: " + "; ".join(errs))
    if isinstance(cfg, JudgeSettings) and cfg.backend == "openai":
        if cfg.base_url == LOCAL:  # the in-process stand-in (engine/judge_local.py): no URL to check, no key
            return
        split_url(cfg.base_url)
        _openai_key(cfg)
    else:
        if cfg.base_url:
            split_url(cfg.base_url)
        if not any(env(name) for name in KEY_VARS):
            raise RuntimeError(f"the judge is enabled (judge.backend = 'gemini') but neither {KEY_VARS[0]} nor "
                               f"{KEY_VARS[1]} is set; export one with a Gemini API key, or set judge.enabled = false")


def make_yes_no_judge(cfg: JudgeConfig) -> Judge | OpenAIJudge | None:
    """The yes/no judge of `cfg.backend` (a plain JudgeConfig means gemini), or None when the judge is off."""
    if not cfg.enabled:
        return None
    if isinstance(cfg, JudgeSettings):
        check_ready(cfg)
        if cfg.backend == "openai" and cfg.base_url == LOCAL:  # a stand-in for GPT-4o, served in this process
            return OpenAIJudge(dataclasses.replace(cfg, base_url=start_local_judge()), "")
        if cfg.backend == "openai":
            return OpenAIJudge(cfg, _openai_key(cfg))
    return Judge(cfg)


@dataclasses.dataclass(slots=True)
class RowInfo:
    """What the judge and the per-source metrics need of a prompt row beyond its Sample."""

    question: str
    answer_type: str = ""
    """The row's declared answer type ("" when the data has none)."""
    data_source: str = ""


def row_infos(rows) -> dict[str, RowInfo]:
    """Row id -> RowInfo for a datasets.Dataset of prompt rows; ids as engine.data.encode_rows assigns them. The
    source is the `data_source` column, else the `task` column, else empty (not monitored per source)."""
    cols = rows.column_names
    ids = [str(x) if x not in (None, "") else f"row-{i}" for i, x in enumerate(rows["id"])] if "id" in cols \
        else [f"row-{i}" for i in range(len(rows))]
    n = len(ids)
    problems = rows["problem"] if "problem" in cols else [""] * n
    types = rows["answer_type"] if "answer_type" in cols else [""] * n
    # The toy world and task-tagged sets name their family in `task`: monitored per source like a data_source.
    sources = rows["data_source"] if "data_source" in cols else rows["task"] if "task" in cols else [""] * n
    return {i: RowInfo(q or "", t or "", s or "") for i, q, t, s in zip(ids, problems, types, sources, strict=True)}


@dataclasses.dataclass(slots=True)
class JudgeTally:
    """One batch's judge work, as seen by this process."""

    num_asked: int = 0
    """Completions sent for a verdict (open-ended rows the rules scored wrong)."""
    num_judged: int = 0
    """Completions whose accuracy the judge decided (yes or no; cached verdicts included)."""
    num_failures: int = 0
    """Completions left unjudged (outage, budget, unparseable): scored by the rules."""
    num_requests: int = 0
    """HTTP requests sent for the whole batch (rank 0's count; 0 on other ranks)."""
    seconds: float = 0.0


def open_item(reward: Reward, kind: str, question: str, gold: str) -> tuple[str, str, str] | None:
    """The (question, gold, answer) to judge for one rule-scored completion of a row whose answer type is `kind`
    (`rewards.answer_type`), or None when the rules decide (not open-ended, already right, or no usable gold)."""
    if kind != "open" or reward.accuracy > 0 or reward.gold_unparseable or not gold.strip():
        return None
    return (question, gold.strip(), reward.extracted)


def _ask(client, items: list[tuple[str, str, str]]) -> list[str]:
    """Verdict strings for `items`; an unexpected client error makes them all "unjudged" (never raises)."""
    if not items:
        return []
    prompts = [OPEN_ANSWER_PROMPT.format(question=q, gold=g, answer=a) for q, g, a in items]
    try:
        verdicts: list[Verdict] = client.ask_many(prompts)
    except Exception as exc:  # noqa: BLE001 - a judge outage never stops a run
        logger.warning("judge: %d items left to the rules after %s", len(items), type(exc).__name__)
        return ["unjudged"] * len(items)
    return [v.verdict for v in verdicts]


class RewardJudge:
    """Grades the open-ended completions of a batch; every rank builds one and calls `grade` in step."""

    def __init__(self, cfg: JudgeConfig, rank: int = 0, client: Judge | OpenAIJudge | None = None):
        check_ready(cfg)  # every rank: a misconfiguration stops all of them with the same message
        self.cfg, self.rank = cfg, rank
        self.client = client if client is not None else make_yes_no_judge(cfg) if rank == 0 else None
        where = f" at {cfg.base_url}" if cfg.base_url else ""
        if cfg.base_url == LOCAL:
            where = " (LOCAL STAND-IN for GPT-4o: a string/number rule, engine/judge_local.py)"
        log0(f"reward judge: {getattr(cfg, 'backend', 'gemini')} {cfg.model}{where}"
             + f" for open-ended answers | cache {cfg.cache_path or 'in memory'} | request budget "
             f"{cfg.request_budget or 'unlimited'}")

    def grade(self, rewards: list[Reward], items: list[tuple[str, str, str] | None], reward_cfg: RewardConfig,
              distributed: bool = True) -> JudgeTally:
        """Set the accuracy of each completion with an item from the judge's verdict, in place.

        Args:
            rewards: this process's rule rewards, one per completion (updated in place).
            items: per completion, the (question, gold, answer) to judge (`open_item`), or None.
            reward_cfg: the reward weights.
            distributed: gather every rank's items to rank 0 (a collective: all ranks must call it).
        """
        start_s = time.perf_counter()
        mine = [i for i, it in enumerate(items) if it is not None]
        asked = [items[i] for i in mine]
        parts = gather_object(asked) if distributed else [asked]
        answer = None
        if self.client is not None:
            try:
                answer = self._answer(parts)
            except Exception as exc:  # noqa: BLE001 - never stops a run, nor leaves the other ranks in the broadcast
                logger.warning("judge: %d items left to the rules after %s: %s", sum(map(len, parts)),
                               type(exc).__name__, exc)
                answer = ([["unjudged"] * len(part) for part in parts], 0)
        by_rank, num_requests = broadcast_object(answer) if distributed else answer
        verdicts = by_rank[self.rank if distributed else 0]
        tally = JudgeTally(num_asked=len(mine), num_requests=num_requests if self.rank == 0 else 0)
        for i, verdict in zip(mine, verdicts, strict=True):
            if verdict == "unjudged":
                tally.num_failures += 1
                continue
            tally.num_judged += 1
            r = rewards[i]
            r.accuracy = reward_cfg.accuracy_weight if verdict == "yes" else 0.0
            if reward_cfg.require_format_for_accuracy and r.format == 0:
                r.accuracy = 0.0
            r.total, r.method = r.format + r.accuracy, "judge"
        tally.seconds = time.perf_counter() - start_s
        return tally

    def _answer(self, parts: list[list[tuple[str, str, str]]]) -> tuple[list[list[str]], int]:
        """Rank 0: the verdicts of every rank's items, split back by rank, and the HTTP requests this took."""
        before = self.client.stats.num_requests
        flat = _ask(self.client, [x for part in parts for x in part])
        answer, start = [], 0
        for part in parts:
            answer.append(flat[start:start + len(part)])
            start += len(part)
        return answer, self.client.stats.num_requests - before


def grade_scored(judge: RewardJudge, groups: list[list[dict]], rows: list[dict],
                 reward_cfg: RewardConfig | None = None) -> JudgeTally:
    """Single-process grading of rule-scored samples kept as dicts (the distill stage), in place.

    Args:
        judge: a RewardJudge with a client (rank 0).
        groups: per row, its samples {"text", "format", "accuracy", "extracted", "gold_unparseable"}.
        rows: per row {"problem", "answer", "choices", "answer_type" (optional)}.
        reward_cfg: the reward weights (default RewardConfig()).
    """
    reward_cfg = reward_cfg or RewardConfig()
    flat, items, where = [], [], []
    for row, group in zip(rows, groups, strict=True):
        kind = answer_type(row["answer"], row["choices"], row.get("answer_type") or "")
        for s in group:
            r = Reward(s["format"], s["accuracy"], s["format"] + s["accuracy"], s["gold_unparseable"], s["extracted"])
            flat.append(r)
            items.append(open_item(r, kind, row["problem"] or "", row["answer"]))
            where.append(s)
    tally = judge.grade(flat, items, reward_cfg, distributed=False)
    for s, r in zip(where, flat, strict=True):
        s["accuracy"] = r.accuracy
    return tally
