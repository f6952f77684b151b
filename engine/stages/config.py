"""Stage configs: one dataclass per stage kind, built from a `[[stages]]` table, and the registry of kinds.

A stage kind registers itself with `@stage_kind(kind, runner)`: its config class here, its runner module (with
`run(cfg, ctx)`) imported only when a stage of that kind runs, so a toy run never imports the RL stack. The
recipe loader (engine/config.py) and `engine.stages.run_stage` both read `STAGE_KINDS`.

A stage names its model inputs by earlier stage names (or "model" for `[model].path`), and its file inputs
either as plain paths or as `<stage>:relative/path` inside an earlier stage's output directory. The shared
sub-tables (optim, train, checkpoint, data, rollout) are defined in engine/sections.py.
"""

import dataclasses
import importlib.util
from collections.abc import Callable
from typing import ClassVar, Literal

from engine.corrupt import CORRUPTIONS
from engine.judge_settings import JudgeSettings
from engine.sections import DEFAULT_TEMPLATE, CheckpointConfig, DataConfig, OptimConfig, RolloutConfig, TrainConfig
from engine.toy_spec import ToySpec

CORRUPTION_NAMES = tuple(CORRUPTIONS)


@dataclasses.dataclass(kw_only=True)
class StageConfig:
    name: str
    """Stage name: its output directory and how later stages refer to it."""
    kind: str
    """Stage kind (toy, sft, ...)."""
    produces_model: ClassVar[bool] = True
    runner: ClassVar[str] = ""
    """Module whose `run(cfg, ctx)` runs a stage of this kind; set by `stage_kind`."""

    def model_inputs(self) -> dict[str, str]:
        """Keys of this stage that name a model: "model" or an earlier stage."""
        return {}

    def path_inputs(self) -> dict[str, str]:
        """Keys of this stage that name files: plain paths or `<stage>:relative/path`."""
        return {}

    def model_paths(self) -> dict[str, str]:
        """Keys of this stage that name a model outside the run: a Hugging Face directory or model id, checked and
        resolved as `[model].path` is (engine/hub.py)."""
        return {}

    def check(self) -> list[str]:
        return [] if self.name.strip() else ["name must not be empty"]


STAGE_KINDS: dict[str, type[StageConfig]] = {}
"""Stage kind (the `kind` key of a `[[stages]]` table) -> its config class, in registration order."""


def stage_kind(kind: str, runner: str) -> Callable[[type[StageConfig]], type[StageConfig]]:
    """Class decorator: register a stage config class under `kind`, run by module `runner` (imported lazily)."""

    def register(cls: type[StageConfig]) -> type[StageConfig]:
        assert kind not in STAGE_KINDS, f"stage kind {kind!r} registered twice"
        cls.runner = runner
        STAGE_KINDS[kind] = cls
        return cls

    return register


@stage_kind("toy", runner="engine.stages.toy")
@dataclasses.dataclass(kw_only=True)
class ToyStageConfig(ToySpec, StageConfig):
    """Builds the embedded toy world: data under `data/`, a tiny random Qwen2.5-VL plus tokenizer in `hf/`.
    Its keys are the fields of `ToySpec` (engine/toy_spec.py), passed to `build_toy_world` as they are."""

    def check(self) -> list[str]:
        return StageConfig.check(self) + ToySpec.check(self)


@dataclasses.dataclass(kw_only=True)
class TrainingStageConfig(StageConfig):
    """What every training stage has: a starting model, training data, the optimizer, the loop, checkpoints.
    Sub-tables that have a `check()` are checked automatically."""

    init: str
    """Model to start from: "model" or an earlier stage's name."""
    data: DataConfig
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def model_inputs(self) -> dict[str, str]:
        return {"init": self.init}

    def path_inputs(self) -> dict[str, str]:
        return {"data.train": self.data.train}

    def check(self) -> list[str]:
        problems = super().check()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and hasattr(value, "check"):
                problems.extend(value.check())
        return problems


@stage_kind("sft", runner="engine.stages.sft")
@dataclasses.dataclass(kw_only=True)
class SFTStageConfig(TrainingStageConfig):
    """Supervised fine-tuning: next-token loss on the response tokens only."""

    loss_impl: Literal["recompute", "onepass"] = "recompute"
    """kernels.fused_nll implementation: recompute (8NVH, O(N) memory) or onepass (6NVH, a [C, V] buffer)."""


@dataclasses.dataclass(kw_only=True)
class DPOConfig:
    beta: float = 0.1
    """DPO inverse temperature. The SPECS paper does not publish it; 0.1 is our choice (TRL's default)."""
    sft_weight: float = 1.0
    """Weight of the SFT (NLL of the chosen response) term: loss = DPO + sft_weight x SFT (paper: 1)."""
    sft_norm: Literal["token-mean", "seq-mean"] = "token-mean"
    """SFT normalisation: over all chosen response tokens of the step, or per chosen sequence."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative DPO); 0 is plain DPO."""
    chosen_column: str = "chosen"
    """Column of the preferred response."""
    rejected_column: str = "rejected"
    """Column of the dispreferred response."""
    loss_impl: Literal["recompute", "onepass"] = "recompute"
    """kernels.dpo_loss implementation: recompute (8NVH, O(N) memory) or onepass (6NVH, a [C, V] buffer)."""

    def check(self) -> list[str]:
        problems = []
        if self.beta <= 0:
            problems.append(f"dpo.beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            problems.append(f"dpo.sft_weight must be >= 0, got {self.sft_weight}")
        if not 0 <= self.label_smoothing <= 0.5:
            problems.append(f"dpo.label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
        return problems


@stage_kind("dpo", runner="engine.stages.dpo")
@dataclasses.dataclass(kw_only=True)
class DPOStageConfig(TrainingStageConfig):
    """Preference training: DPO + sft_weight x SFT on (chosen, rejected) pairs, the SPECS cold start."""

    ref: str = ""
    """Reference model; empty: the same checkpoint as `init`. Its log-probs are computed once before training."""
    dpo: DPOConfig = dataclasses.field(default_factory=DPOConfig)

    def model_inputs(self) -> dict[str, str]:
        return {**super().model_inputs(), **({"ref": self.ref} if self.ref else {})}

    def check(self) -> list[str]:
        problems = super().check()
        if not self.train.packing:
            problems.append("train.packing = false is not supported by the dpo stage (pairs are packed rows)")
        return problems


@dataclasses.dataclass(kw_only=True)
class GRPOConfig:
    clip_low: float = 0.2
    """PPO clip below 1 (ratio >= 1 - clip_low)."""
    clip_high: float = 0.28
    """PPO clip above 1 (DAPO clip-higher: ratio <= 1 + clip_high)."""
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = "token-mean"
    """Loss aggregation over the step's response tokens (see kernels/grpo_loss.py)."""
    scale_by_std: bool = True
    """Divide group-centred rewards by the group's standard deviation (GRPO); false: Dr.GRPO."""
    filter_equal_groups: bool = True
    """Drop groups whose rewards are all equal (their advantages are zero): DAPO's dynamic sampling filter."""
    format_weight: float = 0.5
    """Reward for a well-formatted response (the paper: 0.5)."""
    accuracy_weight: float = 1.0
    """Reward for a correct answer (the paper: 1.0)."""
    mini_batches: int = 1
    """Optimizer steps per pass over a rollout batch (PPO mini-batches; each rank splits its prompt groups)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch. With mini_batches x ppo_epochs > 1 the policy moves between the rollout
    and later updates, and the clipped importance ratio does its job; 1 x 1 is on-policy (ratio exactly 1)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference model (`ref`); 0 (the paper, DAPO) loads no reference model."""
    kl_estimator: Literal["k1", "k3", "low_var_kl"] = "k3"
    """KL estimator per token (kernels/grpo_loss.py)."""
    tis_cap: float = 0.0
    """Truncated importance sampling: weight each token by min(exp(trainer log-prob - rollout log-prob), tis_cap),
    correcting for the rollout engine's numerics (bf16, another kernel, vLLM); 0 turns it off."""
    loss_impl: Literal["recompute", "onepass"] = "recompute"
    """kernels.grpo_loss implementation: recompute (8NVH, O(N) memory) or onepass (6NVH, a [C, V] buffer)."""
    box_iou: Literal["dynamic", "average"] = "dynamic"
    """Detection/grounding rows (answer type "boxes"): "dynamic" scores at V-Triune's IoU threshold for the training
    progress (0.85 for the first 10% of the rollout batches, 0.95 up to 25%, then 0.99), as its release trains;
    "average" takes the mean over thresholds 0.5 ... 0.99 (engine/reward_boxes.py)."""

    @property
    def steps_per_rollout(self) -> int:
        return self.mini_batches * self.ppo_epochs

    def check(self) -> list[str]:
        problems = []
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            problems.append(f"grpo.clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, "
                            f"{self.clip_high}")
        if self.mini_batches < 1 or self.ppo_epochs < 1:
            problems.append(f"grpo.mini_batches and grpo.ppo_epochs must be >= 1, got {self.mini_batches}, "
                            f"{self.ppo_epochs}")
        if min(self.format_weight, self.accuracy_weight) < 0 or self.format_weight + self.accuracy_weight == 0:
            problems.append(f"grpo.format_weight and grpo.accuracy_weight must be >= 0 and not both 0 (every reward "
                            f"would be equal), got {self.format_weight}, {self.accuracy_weight}")
        if self.kl_coef < 0 or (self.tis_cap and self.tis_cap < 1):
            problems.append(f"grpo.kl_coef must be >= 0 and grpo.tis_cap 0 (off) or >= 1, got {self.kl_coef}, "
                            f"{self.tis_cap}")
        return problems


@stage_kind("grpo", runner="engine.stages.grpo")
@dataclasses.dataclass(kw_only=True)
class GRPOStageConfig(TrainingStageConfig):
    """GRPO: sample n completions per prompt, reward them, and take a clipped policy-gradient step.
    `train.batch_size` counts prompts per step (each gives `rollout.n` completions)."""

    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    grpo: GRPOConfig = dataclasses.field(default_factory=GRPOConfig)
    ref: str = ""
    """Reference model of the KL penalty (when grpo.kl_coef > 0); empty: the same checkpoint as `init`."""
    judge: JudgeSettings = dataclasses.field(default_factory=JudgeSettings)
    """Optional LLM judge of open-ended answers for the accuracy reward (engine/reward_judge.py; Gemini or any
    OpenAI-compatible endpoint); off by default. An empty `judge.cache_path` caches verdicts in
    `<stage>/judge_cache.jsonl`."""

    def model_inputs(self) -> dict[str, str]:
        return {**super().model_inputs(), **({"ref": self.ref} if self.ref else {})}

    def check(self) -> list[str]:
        problems = super().check()
        if not self.train.packing:
            problems.append("train.packing = false is not supported by the grpo stage")
        k = self.grpo.steps_per_rollout
        if k > 1 and self.train.steps % k:
            problems.append(f"train.steps = {self.train.steps} must be a multiple of grpo.mini_batches x "
                            f"grpo.ppo_epochs = {k} (optimizer steps per rollout batch)")
        if k > 1 and self.checkpoint.every % k:
            problems.append(f"checkpoint.every = {self.checkpoint.every} must be a multiple of {k}: checkpoints are "
                            f"taken between rollout batches")
        if self.train.batch_size % self.grpo.mini_batches:
            problems.append(f"train.batch_size = {self.train.batch_size} prompts must divide into grpo.mini_batches "
                            f"= {self.grpo.mini_batches}")
        return problems


@dataclasses.dataclass(kw_only=True)
class DistillConfig:
    max_chosen_per_prompt: int = 1
    """Chosen responses kept per prompt (m); each gives one pair. Our choice: the paper does not publish it."""
    rejected: Literal["corrupt", "incorrect"] = "corrupt"
    """How a rejected response is made: "corrupt" (SPECS, decoupled: the chosen response with one format
    corruption, same reasoning and answer) or "incorrect" (the coupled ablation: a sampled wrong answer)."""
    corruptions: list[str] = dataclasses.field(default_factory=lambda: list(CORRUPTION_NAMES))
    """Corruptions to use, in turn (engine/corrupt.py; the five are our choice, the paper does not list them)."""
    chunk_prompts: int = 64
    """Prompts per part file: the unit of resumption (a rerun skips parts already written)."""
    num_prompts: int = 0
    """Use only the first this many prompts (0: all)."""

    def check(self) -> list[str]:
        problems = []
        if self.max_chosen_per_prompt < 1:
            problems.append(f"distill.max_chosen_per_prompt must be >= 1, got {self.max_chosen_per_prompt}")
        unknown = [c for c in self.corruptions if c not in CORRUPTION_NAMES]
        if unknown or not self.corruptions:
            problems.append(f"distill.corruptions: unknown or empty {unknown or self.corruptions}; "
                            f"choose from {list(CORRUPTION_NAMES)}")
        if self.chunk_prompts < 1 or self.num_prompts < 0:
            problems.append(f"distill.chunk_prompts must be >= 1 and num_prompts >= 0, got {self.chunk_prompts}, "
                            f"{self.num_prompts}")
        return problems


@stage_kind("distill", runner="engine.stages.distill")
@dataclasses.dataclass(kw_only=True)
class DistillStageConfig(StageConfig):
    """Self-distillation: sample k answers per prompt from `policy`, keep the correct well-formatted ones
    (optionally judged consistent), and write (chosen, rejected) pairs to `<stage>/pairs.parquet`."""

    produces_model: ClassVar[bool] = False
    policy: str = ""
    """Model that samples: "model" (the base: the base-model distillation ablation) or an earlier stage."""
    model_dir: str = ""
    """A model outside this run (an external teacher): a Hugging Face directory or model id, as `[model].path`;
    overrides `policy` when set."""
    data: DataConfig
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    """Sampling: `rollout.n` answers per prompt (k)."""
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    judge: JudgeSettings = dataclasses.field(default_factory=JudgeSettings)
    """Optional LLM judge (Gemini or an OpenAI-compatible endpoint, engine/reward_judge.py); off by default. When on,
    it checks that each candidate's reasoning supports its answer, and (with `judge.open_answers`) grades open-ended
    answers the rules score wrong. An empty `judge.cache_path` caches verdicts in `<stage>/judge_cache.jsonl`, so a
    rerun sends nothing twice."""

    def model_inputs(self) -> dict[str, str]:
        return {} if self.model_dir else {"policy": self.policy}

    def path_inputs(self) -> dict[str, str]:
        return {"data.train": self.data.train}

    def model_paths(self) -> dict[str, str]:
        return {"model_dir": self.model_dir} if self.model_dir else {}

    def check(self) -> list[str]:
        problems = super().check()
        if not self.policy and not self.model_dir:
            problems.append("set policy (an earlier stage or 'model') or model_dir (an external model directory or "
                            "Hugging Face model id)")
        for sub in (self.data, self.rollout, self.distill, self.judge):
            problems.extend(sub.check())
        return problems


@dataclasses.dataclass(kw_only=True)
class BenchmarkConfig:
    name: str
    """Column name in the report (unique within the stage)."""
    kind: Literal["toy", "mathvista", "mathverse", "mathvision", "mmmu", "megabench"]
    """Loader and scorer: engine/benchmarks/<kind>.py; "toy" reads a toy world split (parquet)."""
    path: str
    """The benchmark's local directory (official release layout, see its module), a toy parquet file, or
    `<stage>:relative/path`."""
    group: Literal["id", "ood", "none"] = "none"
    """Which group's mean gain it enters for the Generalization Factor (in-distribution or out-of-distribution)."""
    limit: int = 0
    """Evaluate only the first this many rows (0: all). A limited score does not compare with published ones."""
    max_images: int = 18
    """MEGA-Bench: the model's image budget per prompt (the official max_num_image), from which the frames fed per
    query video follow (official megabench/models/base_model.py; engine/benchmarks/video.py). 18 and
    `demo_video_frames` 2 are the official settings for Qwen2-VL-7B (models/model_type.py). 0: video rows are left
    out."""
    demo_video_frames: int = 2
    """MEGA-Bench: frames shared by the demonstration's videos (the official total_demo_video_frames)."""
    run_code: bool = False
    """MEGA-Bench: run each response's program on its test cases to score the 8 program_judge tasks, as the official
    evaluator does (engine/benchmarks/megabench_code.py: a subprocess per case with memory, file-size and time
    limits, in a temporary folder; it contains accidents, not hostile code). Off: those tasks are left out."""


@stage_kind("eval", runner="engine.stages.eval")
@dataclasses.dataclass(kw_only=True)
class EvalStageConfig(StageConfig):
    """Greedy (and, with `samples`, sampled) evaluation of several models on several benchmarks, with the
    Generalization Factor, pass@k and a report (`<stage>/report.md`, `scores.json`, plots)."""

    produces_model: ClassVar[bool] = False
    models: list[str]
    """Models to evaluate, in report order: "model", an earlier stage (its final export), "<stage>@<step>" (one
    of its training checkpoints) or "<stage>@*" (all of them, oldest first; keep them with `checkpoint.keep`)."""
    base: str = ""
    """Model the gains are measured against (GF); empty: the first of `models`."""
    benchmarks: list[BenchmarkConfig]
    template: str = DEFAULT_TEMPLATE
    """User prompt template, as in training; `{problem}` is the benchmark's own prompt."""
    system: str = ""
    """System prompt; empty uses the chat template's default."""
    max_new_tokens: int = 1024
    """Longest response, in tokens (greedy and sampled decoding)."""
    samples: int = 0
    """Sampled responses per prompt, besides the greedy one (0: greedy only). With k > 0 the report adds each
    model's sampled accuracy (the mean over its k samples per prompt), sampled format and pass@k, and its claims
    use the sampled accuracy. The paper's pass@64 needs 64."""
    temperature: float = 1.0
    """Softmax temperature of the sampled responses (the greedy one is always argmax)."""
    top_p: float = 1.0
    """Nucleus sampling of the sampled responses (1.0 = off)."""
    pass_k: list[int] = dataclasses.field(default_factory=list)
    """k of the pass@k columns, each in [1, samples]; empty: 1, 2, 4, ... up to `samples`, and `samples` itself."""
    chunk_prompts: int = 64
    """Prompts per generation round; predictions are appended after each, so a rerun resumes there."""
    min_pixels: int | None = None
    """Smallest image area after resizing, in pixels; unset keeps the model's image processor setting."""
    max_pixels: int | None = None
    """Largest image area after resizing, in pixels; unset keeps the model's image processor setting."""
    gf_beta: float = 2.0
    """b of the Generalization Factor (the paper: 2)."""
    backend: Literal["builtin", "vllm"] = "builtin"
    """Generation engine, as `rollout.backend` in training stages."""
    judge: JudgeSettings = dataclasses.field(default_factory=JudgeSettings)
    """Optional LLM check (Gemini or an OpenAI-compatible endpoint), for benchmarks whose official pipeline asks an
    LLM (MathVista, MathVerse, ...): a response the rules score wrong is scored right when the judge says its final
    answer matches the reference. Off by default (needs a key); verdicts are cached in `<stage>/judge_cache.jsonl`."""
    gpu_memory_utilization: float = 0.9
    """vllm: share of the GPU's memory vLLM may take (nothing else is resident during evaluation)."""
    max_model_len: int = 16384
    """vllm: longest prompt + response in tokens."""

    def pass_ks(self) -> list[int]:
        """The k of the pass@k columns, ascending ([] without samples)."""
        if self.pass_k or not self.samples:
            return sorted(set(self.pass_k))
        return sorted({2 ** i for i in range(self.samples.bit_length()) if 2 ** i <= self.samples} | {self.samples})

    def model_inputs(self) -> dict[str, str]:
        refs = {f"models[{i}]": m.partition("@")[0] for i, m in enumerate(self.models)}
        return refs | ({"base": self.base.partition("@")[0]} if self.base else {})

    def path_inputs(self) -> dict[str, str]:
        return {f"benchmarks[{i}].path": b.path for i, b in enumerate(self.benchmarks)}

    def check(self) -> list[str]:
        problems = super().check()
        if not self.models:
            problems.append("models must name at least one model")
        if self.base and self.base not in self.models:
            problems.append(f"base = {self.base!r} is not one of models {self.models}")
        if (self.base or (self.models[0] if self.models else "")).endswith("@*"):
            problems.append("the base model must be one model, not '<stage>@*'")
        for m in self.models:
            stage, at, step = m.partition("@")
            if at and not (step == "*" or step.isdigit()) or at and stage == "model":
                problems.append(f"models: {m!r} is not '<stage>', '<stage>@<step>' or '<stage>@*'")
        names = [b.name for b in self.benchmarks]
        if not names or len(set(names)) != len(names):
            problems.append(f"benchmarks: need at least one, with distinct names, got {names}")
        if any(n.endswith(".samples") for n in names):  # predictions/<model>/<name>.samples.jsonl is taken
            problems.append(f"benchmarks: a name may not end with '.samples', got {names}")
        if any(b.limit < 0 for b in self.benchmarks):
            problems.append("benchmarks.limit must be >= 0")
        groups = {b.group for b in self.benchmarks}
        if ("id" in groups) != ("ood" in groups):
            problems.append("the Generalization Factor needs benchmarks in both groups 'id' and 'ood' (or none)")
        if "{problem}" not in self.template:
            problems.append(f"template must contain '{{problem}}', got {self.template!r}")
        if self.max_new_tokens < 1 or self.chunk_prompts < 1 or self.gf_beta <= 0:
            problems.append("max_new_tokens and chunk_prompts must be >= 1 and gf_beta > 0")
        if self.samples < 0:
            problems.append(f"samples must be >= 0 (0: greedy only), got {self.samples}")
        if self.samples and self.temperature <= 0:
            problems.append(f"temperature must be > 0 to sample (the greedy response is already there), got "
                            f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        bad = [k for k in self.pass_k if not 1 <= k <= self.samples]
        if bad:
            problems.append(f"pass_k {bad}: each k must be in [1, samples = {self.samples}]; raise samples (pass@k "
                            f"needs at least k samples per prompt) or drop them")
        problems.extend(f"{k} must be >= 1 when set, got {v}" for k, v in
                        (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v is not None and v < 1)
        if not 0 < self.gpu_memory_utilization <= 1 or self.max_model_len < 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1] and max_model_len >= 1, got "
                            f"{self.gpu_memory_utilization}, {self.max_model_len}")
        if any(b.max_images < 0 or b.demo_video_frames < 0 for b in self.benchmarks):
            problems.append("benchmarks.max_images and benchmarks.demo_video_frames must be >= 0")
        if self.backend == "vllm" and importlib.util.find_spec("vllm") is None:
            problems.append("backend = 'vllm' but vLLM is not installed: pip install -e '.[vllm]'; or use 'builtin'")
        problems.extend(self.judge.check())
        return problems
