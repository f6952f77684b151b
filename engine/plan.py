"""The memory plan of a recipe: bytes per GPU of every training and rollout stage, and whether it fits.

    python -m engine.plan recipes/specs.toml --gpus 8 --gpu-memory 80 [--nodes 1] [--model-config DIR]

Per stage and per rank (rank 0, which holds the largest FSDP2 shards): fp32 master parameter shards, fp32
gradient shards (trainable parameters only), AdamW state (two fp32 moments and a step counter per trainable
tensor), the parameters FSDP2 gathers in the compute dtype (the root, i.e. embeddings + norm + lm_head, and two
blocks: the one running and the one prefetched), activations at `train.micro_batch_tokens`, the loss path
(kernels.fused_logprobs / grpo_loss / dpo_loss buffers), and for rollout stages the builtin backend's inference
copy and static KV cache at `rollout.max_batch_rows` x `data.max_tokens`. The peak is the larger of the
training phase and the rollout phase (gradients are freed between steps; the rollout copy sleeps in host memory
while training on CUDA).

Shapes come from the model built on the meta device from its config.json, so parameter, gradient and optimizer
bytes are exact. Activations follow a per-token count of the tensors autograd saves in transformers' Qwen2
decoder layer with our varlen attention (tests/test_plan.py checks it against the saved tensors of a real
forward); the vision tower is frozen in the recipes and saves nothing; without `freeze_vision` its activations
are not counted (said in the output).
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

GIB = 2**30
RESERVED_GIB = 3.0
"""Per GPU: CUDA context, NCCL buffers and allocator slack the plan does not itemise."""
LOSS_BUFFER_BYTES = 1 * GIB
"""The fused loss kernels' logits chunk budget on CUDA (kernels/_onepass.py DEFAULT_BUFFER_BYTES order)."""


@dataclasses.dataclass
class ModelShape:
    """What the plan needs of a model: every parameter's shape, and the text decoder's widths."""

    params: dict[str, tuple[int, ...]]
    trainable: set[str]
    block_params: dict[str, int]
    """Elements of each FSDP2 unit below the root (decoder layers, vision blocks, the vision tower's rest)."""
    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    kv_dim: int
    head_dim: int
    vocab: int

    @property
    def num_params(self) -> int:
        return sum(_numel(s) for s in self.params.values())


def model_shape(config, freeze_vision: bool) -> ModelShape:
    """The shapes of the model `config` describes (a transformers config of Qwen2 or Qwen2.5-VL), built on meta."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    from engine.model import VLM_TYPES

    with torch.device("meta"):
        if config.model_type in VLM_TYPES:
            model = VLM_TYPES[config.model_type]._from_config(config, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    trainable = {n for n in params if not (freeze_vision and ".visual." in f".{n}")}
    blocks = {}
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer):
            blocks[name] = sum(p.numel() for p in module.parameters())
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is not None:
        in_blocks = {id(p) for m in visual.modules() if isinstance(m, GradientCheckpointingLayer)
                     for p in m.parameters()}
        blocks["model.visual"] = sum(p.numel() for p in visual.parameters() if id(p) not in in_blocks)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelShape(params, trainable, blocks, text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                      text.num_attention_heads, text.num_key_value_heads * head_dim, head_dim, text.vocab_size)


def shard_elements(shape: tuple[int, ...], world: int, rank: int) -> int:
    """Elements of rank `rank`'s FSDP2 shard of a tensor (dim 0 split like torch.chunk)."""
    rows = shape[0] if shape else 1
    per_rank = -(-rows // world)
    start = min(rows, rank * per_rank)
    return (min(rows, start + per_rank) - start) * _numel(shape[1:])


def state_bytes(shape: ModelShape, world: int, rank: int = 0) -> dict[str, int]:
    """Exact bytes of this rank's fp32 parameter shards, gradient shards and AdamW state (exp_avg, exp_avg_sq and
    a 4-byte step per trainable tensor)."""
    params = sum(shard_elements(s, world, rank) for s in shape.params.values()) * 4
    grads = sum(shard_elements(s, world, rank) for n, s in shape.params.items() if n in shape.trainable) * 4
    return {"params": params, "grads": grads, "optimizer": 2 * grads + 4 * len(shape.trainable)}


def layer_activation_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """Bytes autograd saves per token in one decoder layer: the two RMSNorms keep an fp32 copy of their input (8H)
    and a 4-byte rstd each; q/k/v, RoPE, attention and o_proj keep 7 H-sized and 2 KV-sized tensors in the compute
    dtype, the SwiGLU MLP 4 I-sized ones; attention keeps a 4-byte log-sum-exp per head."""
    c = compute_bytes
    return 8 * shape.hidden + c * (7 * shape.hidden + 4 * shape.intermediate + 2 * shape.kv_dim) + 8 \
        + 4 * shape.num_heads


def base_activation_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """Per token outside the layers: the final RMSNorm (fp32 input, rstd, output) and the rotary cos/sin tables."""
    c = compute_bytes
    return 4 * shape.hidden + 4 + c * shape.hidden + 2 * c * shape.head_dim + 8


def activation_bytes(shape: ModelShape, tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """Activations of one micro-batch of `tokens` packed tokens. With checkpointing each layer keeps only its
    input, and backward recomputes one layer at a time (that layer's full activations on top)."""
    layer = layer_activation_bytes(shape, compute_bytes)
    base = base_activation_bytes(shape, compute_bytes)
    if checkpointing:
        return tokens * (shape.num_layers * compute_bytes * shape.hidden + base + layer)
    return tokens * (shape.num_layers * layer + base)


def kv_cache_bytes(shape: ModelShape, rows: int, length: int, compute_bytes: int) -> int:
    """The builtin backend's static K/V cache: rows x length slots of K and V in every layer."""
    return rows * length * shape.num_layers * 2 * shape.kv_dim * compute_bytes


def loss_bytes(shape: ModelShape, tokens: int, compute_bytes: int, device: str, chunk_tokens: int) -> int:
    """The loss path at `tokens` target tokens: the gathered target hidden states, their fp32 gradient, the fp32
    lm_head gradient, and the logits chunk (CUDA: the kernels' buffer budget, at most tokens x V fp32; CPU: chunk x
    V fp32, three alive)."""
    v, h = shape.vocab, shape.hidden
    chunk = min(LOSS_BUFFER_BYTES, tokens * v * 4) if device == "cuda" else 3 * min(tokens, chunk_tokens) * v * 4
    return tokens * h * (compute_bytes + 4) + v * h * 4 + chunk


def gathered_bytes(shape: ModelShape, compute_bytes: int) -> int:
    """Unsharded compute-dtype parameters FSDP2 holds at once: the root (all parameters outside the blocks) and
    the two largest blocks (the running one and the prefetched one)."""
    in_blocks = sum(shape.block_params.values())
    largest = sorted(shape.block_params.values(), reverse=True)[:2]
    return (shape.num_params - in_blocks + sum(largest)) * compute_bytes


@dataclasses.dataclass
class StagePlan:
    name: str
    kind: str
    train: dict[str, int]
    """Training phase rows (bytes); empty for a rollout-only stage."""
    rollout: dict[str, int]
    """Rollout phase rows (bytes); empty for a stage without rollouts."""
    notes: list[str]

    @property
    def peak(self) -> int:
        return max(sum(self.train.values()), sum(self.rollout.values()))


def plan_stage(stage, model_cfg, shape: ModelShape, world: int, device: str,
               gpu_memory_gib: float) -> StagePlan | None:
    """The plan of one recipe stage on rank 0, or None for a stage that holds no model (toy, eval)."""
    train_cfg, rollout_cfg = getattr(stage, "train", None), getattr(stage, "rollout", None)
    if train_cfg is None and rollout_cfg is None:
        return None
    compute = 2 if (model_cfg.dtype == "bfloat16" or (model_cfg.dtype == "auto" and device == "cuda")) else 4
    state = state_bytes(shape, world)
    notes = [] if model_cfg.freeze_vision else ["vision tower trained: its activations are not counted"]
    train, rollout = {}, {}
    if train_cfg is not None:
        tokens = train_cfg.micro_batch_tokens
        train = {**state, "gathered params": gathered_bytes(shape, compute),
                 "activations": activation_bytes(shape, tokens, compute, model_cfg.activation_checkpointing),
                 "loss path": loss_bytes(shape, tokens, compute, device, model_cfg.logprob_chunk_tokens)}
        grpo = getattr(stage, "grpo", None)
        if grpo is not None and grpo.kl_coef > 0:
            train["reference model"] = state["params"]
        other = activation_bytes(shape, tokens, compute, not model_cfg.activation_checkpointing)
        notes.append(f"activations {'without' if model_cfg.activation_checkpointing else 'with'} checkpointing "
                     f"would be {other / GIB:.2f} GiB")
    if rollout_cfg is not None:
        length = stage.data.max_tokens
        # A training stage keeps its shards and optimizer state while it samples; a rollout-only stage holds none.
        rollout = {"params": state["params"], "optimizer": state["optimizer"]} if train_cfg is not None else {}
        if rollout_cfg.backend == "vllm":
            rollout["vllm (gpu_memory_utilization)"] = int(rollout_cfg.gpu_memory_utilization * gpu_memory_gib * GIB)
        else:
            rollout["rollout copy"] = shape.num_params * compute
            rollout["kv cache"] = kv_cache_bytes(shape, rollout_cfg.max_batch_rows, length, compute)
            rollout["sampling logits"] = 4 * rollout_cfg.max_batch_rows * shape.vocab * 4
    return StagePlan(stage.name, stage.kind, train, rollout, notes)


def planned_peak_gib(stage, model_cfg, config, world: int, device: torch.device) -> float | None:
    """The plan's peak (GiB per rank) of one stage whose model has the transformers `config`, for logging beside
    the measured peak; None for a stage without a plan. A vLLM rollout counts gpu_memory_utilization x this GPU."""
    gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else 0.0
    plan = plan_stage(stage, model_cfg, model_shape(config, model_cfg.freeze_vision), world, device.type, gpu_gib)
    return None if plan is None else plan.peak / GIB


def plan_recipe(cfg, world: int, gpu_memory_gib: float, device: str = "cuda", config=None) -> list[StagePlan]:
    """Plans of every stage of recipe `cfg` (an engine.config.Config) on `world` GPUs of `gpu_memory_gib` each.
    `config`: the model's transformers config; None reads `cfg.model.path`/config.json."""
    if config is None:
        from engine.model import model_class

        config, _ = model_class(cfg.model.path)
    shape = model_shape(config, cfg.model.freeze_vision)
    plans = [plan_stage(s, cfg.model, shape, world, device, gpu_memory_gib) for s in cfg.stages]
    return [p for p in plans if p is not None]


def advice(plan: StagePlan) -> str:
    """Which setting to change, from the largest item that a setting controls."""
    rows = {**plan.rollout, **plan.train}
    tips = {"activations": "lower train.micro_batch_tokens or set model.activation_checkpointing = true",
            "kv cache": "lower rollout.max_batch_rows (or data.max_tokens)",
            "loss path": "lower train.micro_batch_tokens",
            "rollout copy": "use more GPUs or rollout.backend = 'vllm' with a lower gpu_memory_utilization",
            "optimizer": "use more GPUs (the optimizer state is sharded over them)"}
    worst = max((k for k in rows if k in tips), key=lambda k: rows[k], default="optimizer")
    return f"largest adjustable item: {worst} ({rows[worst] / GIB:.1f} GiB): {tips[worst]}"


def format_plan(plans: list[StagePlan], world: int, gpu_memory_gib: float) -> tuple[str, list[str]]:
    """A table (GiB per rank) and the names of the stages that do not fit."""
    budget = gpu_memory_gib - RESERVED_GIB
    lines = [f"memory plan: {world} GPU(s) x {gpu_memory_gib:g} GiB ({budget:g} GiB after {RESERVED_GIB:g} "
             "reserved for CUDA context, NCCL and fragmentation); GiB per rank"]
    too_big = []
    for p in plans:
        fits = p.peak / GIB <= budget
        lines.append(f"  {p.name} ({p.kind}): peak {p.peak / GIB:.2f} GiB {'fits' if fits else 'DOES NOT FIT'}")
        for phase, rows in (("train", p.train), ("rollout", p.rollout)):
            if rows:
                items = " | ".join(f"{k} {v / GIB:.2f}" for k, v in rows.items())
                lines.append(f"    {phase:7s} {sum(rows.values()) / GIB:7.2f} = {items}")
        lines.extend(f"    note: {n}" for n in p.notes)
        if not fits:
            too_big.append(p.name)
            lines.append(f"    -> {advice(p)}")
    return "\n".join(lines), too_big


def check_at_startup(cfg, world: int, device: torch.device, *, allow_oversize: bool,
                     gpu_memory_gib: float | None = None) -> None:
    """Log the recipe's plan (rank 0) before any model is loaded; on CUDA, raise if a stage does not fit.
    `gpu_memory_gib`: None asks the device.

    Raises:
        ValueError: on CUDA, a stage's planned peak exceeds the GPU (naming the stage and the setting to change),
            unless `allow_oversize`. Every rank computes the same plan, so every rank raises.
    """
    from engine.log import log0, warn_once

    if not cfg.model.path or not (Path(cfg.model.path) / "config.json").is_file():
        log0(f"memory plan: skipped, no config.json at model.path {cfg.model.path!r} yet")
        return
    if device.type != "cuda":
        gpu_memory_gib = float("inf")
    elif gpu_memory_gib is None:
        gpu_memory_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    plans = plan_recipe(cfg, world, gpu_memory_gib, device.type)
    text, too_big = format_plan(plans, world, gpu_memory_gib if device.type == "cuda" else 1e9)
    log0(text if device.type == "cuda" else text.split("\n", 1)[-1] + "\n  (CPU run: host memory, not checked)")
    if too_big and device.type == "cuda":
        message = (f"memory plan: stage(s) {', '.join(too_big)} do not fit in {gpu_memory_gib:.1f} GiB per GPU (see "
                   "the plan above); change the setting it names, or pass --ignore-memory-plan to start anyway")
        if not allow_oversize:
            raise ValueError(message)
        warn_once(message)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the per-GPU memory plan of a recipe.")
    parser.add_argument("recipe")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory of one GPU, GiB")
    parser.add_argument("--model-config", default=None,
                        help="a directory with the model's config.json, when model.path is not on this machine")
    args, overrides = parser.parse_known_args(argv)
    from transformers import AutoConfig

    from engine import hub
    from engine.config import ConfigError, load_config

    try:
        cfg = load_config(args.recipe, overrides)
    except ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    config_dir = Path(args.model_config or cfg.model.path)
    if not args.model_config and hub.is_hub_id(cfg.model.path):  # a cached id (load_config checked it is one)
        config_dir = hub.cached_snapshot(cfg.model.path) or config_dir
    if not (config_dir / "config.json").is_file():
        sys.stderr.write(f"error: {config_dir}/config.json not found: pass --model-config DIR (a directory with the "
                         "model's config.json)\n")
        return 2
    world = args.gpus * args.nodes
    plans = plan_recipe(cfg, world, args.gpu_memory, "cuda", AutoConfig.from_pretrained(config_dir))
    text, too_big = format_plan(plans, world, args.gpu_memory)
    sys.stdout.write(text + "\n")
    return 1 if too_big else 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    sys.exit(main())
