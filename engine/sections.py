"""Config sections of the shared components: one dataclass per sub-table of a `[[stages]]` table.

    [stages.optim]       OptimConfig       the optimizer and learning-rate schedule (engine/fsdp.py)
    [stages.train]       TrainConfig       the optimizer-step loop (engine/trainer.py)
    [stages.checkpoint]  CheckpointConfig  resumable checkpoints (engine/checkpoint.py)
    [stages.data]        DataConfig        training rows and prompts (engine/data.py)
    [stages.rollout]     RolloutConfig     the generation backends (engine/rollout/)

A leaf module: it imports nothing of `engine` and no torch, so a component imports its section from here without
pulling in stage, reward or judge code, and reading a recipe (`python -m engine.config`) stays fast. The stage
configs (engine/stages/config.py) are built from these sections. Each `check()` returns one message per problem;
the loader (engine/config.py) collects them all.
"""

import dataclasses
import importlib.util
from typing import Literal


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warmup length, in optimizer steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Learning-rate shape after warmup."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of `lr`."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still measured)."""

    def check(self) -> list[str]:
        problems = []
        if self.lr <= 0:
            problems.append(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            problems.append(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm < 0:
            problems.append(f"optim.max_grad_norm must be >= 0, got {self.max_grad_norm}")
        if self.weight_decay < 0:
            problems.append(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.eps <= 0:
            problems.append(f"optim.eps must be > 0 (it keeps AdamW's division finite), got {self.eps}")
        return problems


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    steps: int = 0
    """Optimizer steps; 0 derives them from `epochs` and the data size."""
    epochs: float = 1.0
    """Passes over the training data when `steps` is 0."""
    batch_size: int = 8
    """Samples per optimizer step, over all ranks (must divide by the world size)."""
    micro_batch_tokens: int = 4096
    """Token budget of one micro-batch on one rank (padded tokens count). Micro-batches accumulate gradients
    until the step's batch is consumed, so the number of accumulation steps follows from this budget."""
    packing: bool = True
    """Pack a micro-batch's samples into one row (no padding; boundaries and per-sample M-RoPE positions carried
    along) instead of padding them to the longest. `micro_batch_tokens` then counts real tokens."""
    max_bad_steps: int = 3
    """Consecutive steps with a non-finite loss or gradient norm that stop the stage (each is skipped)."""

    def check(self) -> list[str]:
        problems = []
        if self.steps < 0:
            problems.append(f"train.steps must be >= 0, got {self.steps}")
        if self.steps == 0 and self.epochs <= 0:
            problems.append(f"train.epochs must be > 0 when train.steps = 0, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch_tokens < 1:
            problems.append(f"train.micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.max_bad_steps < 1:
            problems.append(f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        return problems


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0
    """Save a resumable checkpoint every this many optimizer steps (0: only at the end of the stage)."""
    keep: int = 2
    """Keep the newest this many checkpoints; older ones are deleted."""

    def check(self) -> list[str]:
        problems = []
        if self.every < 0:
            problems.append(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep < 1:
            problems.append(f"checkpoint.keep must be >= 1, got {self.keep}")
        return problems


DEFAULT_TEMPLATE = (
    "{problem}\nThink step by step inside <think> </think> tags, then give the final answer inside "
    "<answer> </answer> tags."
)


COLUMNS = ("problem", "answer", "images", "choices", "id")
"""Our column names in training data; `data.columns` maps them to a dataset's own."""


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    train: str
    """Training rows: a parquet/jsonl/arrow file or a directory of them, or `<stage>:relative/path`."""
    template: str = DEFAULT_TEMPLATE
    """User prompt template; `{problem}` is replaced by the row's problem text."""
    system: str = ""
    """System prompt; empty uses the chat template's default."""
    response_column: str = "response"
    """Column holding the target response (SFT)."""
    min_pixels: int | None = None
    """Smallest image area after resizing, in pixels; unset keeps the model's image processor setting."""
    max_pixels: int | None = None
    """Largest image area after resizing, in pixels; unset keeps the model's image processor setting."""
    max_tokens: int = 4096
    """Longest sample (prompt + response) in tokens; longer rows are bad rows."""
    max_cached_pixel_gib: float = 8.0
    """Keep up to this many GiB of encoded image patches in host memory per process; images past it are
    re-encoded from the files each time they are used (slower, same numbers). 448x448 is ~4.8 MB an image."""
    on_bad_row: Literal["skip", "error"] = "skip"
    """A row with a missing/corrupt image, a placeholder/image count mismatch or empty text: skip it (counted
    and logged with its id) or stop with an error naming it."""
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    """The data's names for our columns, for data named otherwise: `{images = "image", problem = "question"}`
    (keys: problem, answer, images, choices, id). A column `image` holding one image a row is read as `images`
    without a mapping."""

    @property
    def max_pixel_bytes(self) -> int:
        return int(self.max_cached_pixel_gib * 2**30)

    def check(self) -> list[str]:
        problems = []
        if "{problem}" not in self.template:
            problems.append(f"data.template must contain '{{problem}}', got {self.template!r}")
        if self.max_tokens < 2:
            problems.append(f"data.max_tokens must be >= 2, got {self.max_tokens}")
        if self.max_cached_pixel_gib < 0:
            problems.append(f"data.max_cached_pixel_gib must be >= 0, got {self.max_cached_pixel_gib}")
        problems.extend(f"data.{k} must be >= 1 when set, got {v}" for k, v in
                        (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels)) if v is not None and v < 1)
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            problems.append(f"data.min_pixels ({self.min_pixels}) > data.max_pixels ({self.max_pixels})")
        problems.extend(f"data.columns.{k}: not one of our columns ({', '.join(COLUMNS)}); the key is our name, "
                        f"the value the data's" for k in self.columns if k not in COLUMNS)
        return problems


@dataclasses.dataclass(kw_only=True)
class RolloutConfig:
    backend: Literal["builtin", "vllm"] = "builtin"
    """Rollout engine: "builtin" (our decode loop over an inference copy of the policy; always available) or "vllm"
    (a colocated vLLM engine with the trainer's weights streamed in; `pip install .[vllm]`). The GPU recipes ask for
    vllm; without vLLM installed the stage says so once and uses builtin, unless `require` is set."""
    require: bool = False
    """vllm: stop at startup when vLLM is not installed, instead of falling back to the builtin backend."""
    gpu_memory_utilization: float = 0.4
    """vllm: share of the GPU's memory vLLM may take (weights + KV cache); the trainer needs the rest while vLLM
    sleeps only in part (sleep level 1 frees the KV cache and moves the weights to host memory)."""
    tensor_parallel_size: int = 1
    """vllm: GPUs one engine spans (consecutive ranks), for a model that does not fit one GPU, such as a 72B teacher
    sampling in a distill stage; must divide the world size. 1: one engine per rank."""
    max_model_len: int = 0
    """vllm: longest prompt + response in tokens; 0 derives it from data.max_tokens."""
    enforce_eager: bool = False
    """vllm: skip CUDA graph capture (faster start, slower decoding; always on for CPU tests)."""
    n: int = 8
    """Completions per prompt (the GRPO group size)."""
    temperature: float = 1.0
    """Sampling temperature (the loss uses the same one)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 256
    """Longest completion, in tokens."""
    batching: Literal["continuous", "static"] = "continuous"
    """builtin: "continuous" refills a decode slot with the next (prompt, sample) as soon as its row ends;
    "static" decodes batches of max_batch_rows rows until each batch's longest row ends (the reference schedule)."""
    compile_decode: bool = False
    """builtin: compile the decode step (torch.compile; on CUDA "reduce-overhead", i.e. CUDA graphs). Costs a
    compile per (rows, cache-length bucket) shape."""
    max_batch_rows: int = 64
    """builtin: decode slots, i.e. most sequences (prompts x n) decoded together; its static KV cache holds this many
    rows of the longest prompt + max_new_tokens (7B: ~57 KB a token, so 64 rows x 11K tokens is ~40 GB)."""

    def check(self) -> list[str]:
        problems = []
        if self.n < 2:
            problems.append(f"rollout.n must be >= 2 (group-normalised advantages), got {self.n}")
        if self.temperature <= 0:
            problems.append(f"rollout.temperature must be > 0 for GRPO sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            problems.append(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_batch_rows < 1:
            problems.append(f"rollout.max_batch_rows must be >= 1, got {self.max_batch_rows}")
        if not 0 < self.gpu_memory_utilization <= 1 or self.max_model_len < 0:
            problems.append(f"rollout.gpu_memory_utilization must be in (0, 1] and max_model_len >= 0, got "
                            f"{self.gpu_memory_utilization}, {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            problems.append(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        elif self.tensor_parallel_size > 1 and self.backend != "vllm":
            problems.append(f"rollout.tensor_parallel_size = {self.tensor_parallel_size} needs backend = 'vllm' (the "
                            "builtin backend keeps a whole model copy per rank)")
        vllm_missing = importlib.util.find_spec("vllm") is None
        if self.backend == "vllm" and vllm_missing and (self.require or self.tensor_parallel_size > 1):
            why = "rollout.require = true" if self.require else f"tensor_parallel_size = {self.tensor_parallel_size}"
            problems.append(f"rollout.backend = 'vllm' ({why}) but vLLM is not installed: pip install -e '.[vllm]' "
                            "(GPU), or see `make test-vllm` for the CPU build; or use backend = 'builtin'")
        return problems
