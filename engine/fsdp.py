"""FSDP2 wrapping, the optimizer and the learning-rate schedule.

Sharding: `fully_shard` on every decoder layer and every vision block (the modules transformers marks as
`GradientCheckpointingLayer`), then on the vision tower (its patch embedding and merger), then on the root.
Master weights, gradient reduction and optimizer state stay fp32; `param_dtype` is the compute dtype.
"""

import math

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from transformers.modeling_layers import GradientCheckpointingLayer

from engine.dist import DistInfo
from engine.sections import OptimConfig


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The compute dtype for `model.dtype` and the reason, for the startup block."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16, "auto: bfloat16 on CUDA"
        return torch.float32, "auto: float32 on CPU (bf16 matmuls are slow and inexact there)"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name], f"model.dtype = {name}"


def vision_tower(hf_model: nn.Module) -> nn.Module | None:
    """The vision encoder of a VLM (`model.visual` in transformers' Qwen2/2.5-VL), or None for text models."""
    inner = getattr(hf_model, "model", None)
    return getattr(inner, "visual", None)


def parallelize(policy: nn.Module, hf_model: nn.Module, dist_info: DistInfo, *, param_dtype: torch.dtype,
                activation_checkpointing: bool, freeze_vision: bool) -> nn.Module:
    """Freeze, checkpoint and shard `policy` (whose submodule is `hf_model`) in place; returns it on its device,
    or still on the meta device when it was built there (then `engine.model.load_weights` fills the shards)."""
    visual = vision_tower(hf_model)
    if freeze_vision and visual is not None:
        visual.requires_grad_(False)
    if activation_checkpointing:
        # Non-reentrant checkpointing composes with FSDP2's hooks; transformers keeps the state-dict keys intact,
        # which a checkpoint_wrapper around each layer would not.
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh(dist_info.device.type, (dist_info.world_size,), mesh_dim_names=("dp",))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in hf_model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            fully_shard(module, mesh=mesh, mp_policy=mp)
    if visual is not None:
        fully_shard(visual, mesh=mesh, mp_policy=mp)
    # The root holds the embeddings, the final norm and lm_head; FSDP2 keeps the root unsharded between
    # forward and backward, so the lm_head weight used by the log-prob function stays valid.
    fully_shard(policy, mesh=mesh, mp_policy=mp)
    if any(p.is_meta for p in policy.parameters()):
        return policy  # built on the meta device: engine.model.load_weights materialises the local shards
    return policy.to(dist_info.device)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach on CUDA only: on CPU the foreach kernels do not all accept DTensor mixes, and the per-tensor loop
    # costs little at the model sizes run there.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             foreach=torch.cuda.is_available())


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of `cfg.lr` at optimizer step `step` (0-based): linear warmup, then cosine or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
