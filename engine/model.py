"""Loading Hugging Face checkpoints and the policy wrapper that turns hidden states into per-token log-probs.

Supported: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) and text-only Qwen2 (`AutoModelForCausalLM`).
The policy never builds the full [tokens, vocab] logits: it takes the last hidden states at the positions
that have a target, and `kernels.fused_logprobs` computes log-probs from them and the lm_head weight.

Letters: B batch rows, T sequence length, H hidden size, N tokens with a target.
"""

import itertools
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
)

from engine import attention, hf_files
from engine.log import warn_once
from kernels import fused_logprobs

VLM_TYPES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
TEXT_TYPES = {"qwen2"}
# Batch keys the backbone understands; anything else (labels, bookkeeping) stays out of the forward.
_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                 "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def model_class(path: str | Path) -> tuple[PretrainedConfig, type]:
    """The config of checkpoint directory `path` and the transformers class that builds it.

    Raises:
        ValueError: no config.json, or an architecture other than Qwen2.5-VL / Qwen2.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json: expected a Hugging Face checkpoint directory")
    config = AutoConfig.from_pretrained(path)
    if config.model_type in VLM_TYPES:
        return config, VLM_TYPES[config.model_type]
    if config.model_type in TEXT_TYPES:
        return config, AutoModelForCausalLM
    raise ValueError(f"model type {config.model_type!r} in {path}/config.json is not supported "
                     f"(supported: {', '.join([*VLM_TYPES, *TEXT_TYPES])})")


def _attn_name(attn_implementation: str) -> str:
    return attention.register() if attn_implementation == "varlen" else attn_implementation


def load_hf_model(path: str | Path, *, attn_implementation: str = "varlen") -> PreTrainedModel:
    """Load a checkpoint directory whole, in fp32 on CPU, with transformers' `from_pretrained`.

    The plain twin of `build_meta_model` + `load_weights` (which the training stages use): tests compare the two.
    """
    _, cls = model_class(path)
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation=_attn_name(attn_implementation))


def build_meta_model(path: str | Path, *, attn_implementation: str = "varlen") -> PreTrainedModel:
    """The model of checkpoint directory `path` with fp32 parameters on the meta device (no memory, no weights).

    Shard it (engine.fsdp.parallelize), then `load_weights`. Tied weights are tied; the generation config is
    read as `from_pretrained` reads it; the model is in eval mode, as `from_pretrained` returns it.
    """
    config, cls = model_class(path)
    build = cls.from_config if cls is AutoModelForCausalLM else cls._from_config
    with torch.device("meta"):
        model = build(config, dtype=torch.float32, attn_implementation=_attn_name(attn_implementation))
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


@torch.no_grad()
def load_weights(model: PreTrainedModel, path: str | Path, device: torch.device) -> int:
    """Materialise meta model `model` (plain or FSDP2-sharded) on `device` and fill it from checkpoint `path`.

    Each rank reads only its shards' rows (engine/hf_files.py); parameters and persistent buffers come from the
    checkpoint, non-persistent buffers (rotary inv_freq) are computed as `from_pretrained` computes them. Host
    memory: this rank's shards plus one slice of the largest tensor. Returns the bytes read on this rank.

    Raises:
        ValueError: a missing weights file, a missing tensor or a shape mismatch, naming the file and tensor; raised
            identically on every rank before anything is read (call it before any other collective can hang).
    """
    files = hf_files.CheckpointFiles(path)
    found = hf_files.match_tensors(files, model)
    unused = hf_files.unused_tensors(files, found, model)
    if unused:
        warn_once(f"checkpoint {path}: {len(unused)} tensor(s) not used by {type(model).__name__}, e.g. {unused[:3]}")
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model.to_empty(device=device)
    num_bytes = hf_files.load_into(files, model, found)
    init_non_persistent_buffers(model)
    return num_bytes


@torch.no_grad()
def init_non_persistent_buffers(model: PreTrainedModel) -> None:
    """Recompute the buffers a checkpoint does not store (rotary inv_freq) with transformers' own `_init_weights`,
    which is what `from_pretrained` runs for them; only modules without parameters of their own are touched."""
    persistent = set(model.state_dict().keys())
    for module_name, module in model.named_modules():
        own = [n for n, _ in module.named_buffers(recurse=False)]
        prefix = f"{module_name}." if module_name else ""
        if not any(prefix + n not in persistent for n in own):
            continue
        if next(module.parameters(recurse=False), None) is not None:
            raise ValueError(f"{module_name} ({type(module).__name__}) has parameters and non-persistent buffers; "
                             "the engine cannot initialise its buffers without resetting its weights")
        model._init_weights(module)


class Policy(nn.Module):
    """Wraps a causal LM so that `forward(batch)` returns the log-probs of the batch's target tokens.

    FSDP2's root wrapping goes around this module, so the embeddings, final norm and lm_head (root
    parameters) are gathered for the whole forward, including the log-prob computation outside `hf.forward`.
    """

    def __init__(self, hf_model: PreTrainedModel, *, chunk_tokens: int = 1024):
        super().__init__()
        self.hf = hf_model
        self.chunk_tokens = chunk_tokens

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last hidden states [B, T, H] of the backbone (no lm_head)."""
        inputs = {k: batch[k] for k in _FORWARD_KEYS if k in batch}
        hidden = self.hf.model(**inputs, use_cache=False).last_hidden_state
        if "pixel_values" not in batch and getattr(self.hf.model, "visual", None) is not None:
            # Under FSDP2 every rank must run the vision tower's all-gathers the same number of times: a
            # micro-batch without images runs it on one tiny dummy image and adds its output times zero.
            hidden = hidden + 0.0 * self._dummy_vision(hidden).to(hidden.dtype)
        return hidden

    def _dummy_vision(self, like: torch.Tensor) -> torch.Tensor:
        vc = self.hf.config.vision_config
        merge = vc.spatial_merge_size
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        grid = torch.tensor([[1, merge, merge]], device=like.device)
        pixels = torch.zeros(merge * merge, patch_dim, device=like.device, dtype=like.dtype)
        out = self.hf.model.get_image_features(pixels, grid, return_dict=True).pooler_output
        return torch.cat(list(out)).sum()

    def target_hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hidden states [N, H] at the positions that have a target, the targets [N] and the lm_head weight
        [V, H] (gathered under FSDP2 while inside this module's forward). Position t predicts label t+1."""
        hidden_BTH = self.hidden_states(batch)
        targets_BT = batch["labels"][:, 1:]
        mask_BT = targets_BT != -100
        return hidden_BTH[:, :-1][mask_BT], targets_BT[mask_BT], self.hf.get_output_embeddings().weight

    def forward(self, batch: dict[str, torch.Tensor], temperature: float = 1.0, loss_fn=None):
        """Log-probs [N] fp32 of `labels[:, 1:]` where they are not -100, in row-major order.

        With `loss_fn`, returns `loss_fn(hidden [N, H], weight [V, H], targets [N])` instead: fused losses
        (kernels.dpo_loss, kernels.grpo_loss) must run inside this forward so FSDP2 has the lm_head gathered.
        """
        hidden_NH, targets_N, weight_VH = self.target_hidden(batch)
        if loss_fn is not None:
            return loss_fn(hidden_NH, weight_VH, targets_N)
        return fused_logprobs(hidden_NH, weight_VH, targets_N, temperature=temperature,
                              chunk_tokens=self.chunk_tokens)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; works on FSDP2-sharded models (counts the global shapes)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def flops_per_token(hf_model: PreTrainedModel) -> int:
    """Approximate training FLOPs per token: 6 x (text parameters), ignoring attention's quadratic term."""
    return 6 * sum(p.numel() for n, p in hf_model.named_parameters() if "visual" not in n)
