"""Loading Hugging Face checkpoints and the policy wrapper that turns hidden states into per-token log-probs.

Supported: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) and text-only Qwen2 (`AutoModelForCausalLM`).
The policy never builds the full [tokens, vocab] logits: it takes the last hidden states at the positions
that have a target, and `kernels.fused_logprobs` computes log-probs from them and the lm_head weight.

Letters: B batch rows, T sequence length, H hidden size, N tokens with a target.
"""

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, Qwen2_5_VLForConditionalGeneration

from engine import attention
from kernels import fused_logprobs

VLM_TYPES = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
TEXT_TYPES = {"qwen2"}
# Batch keys the backbone understands; anything else (labels, bookkeeping) stays out of the forward.
_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                 "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def load_hf_model(path: str | Path, *, attn_implementation: str = "varlen") -> PreTrainedModel:
    """Load a checkpoint directory in fp32 on CPU (master weights; FSDP2 casts for compute)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"model path {str(path)!r} has no config.json: expected a Hugging Face checkpoint directory")
    config = AutoConfig.from_pretrained(path)
    if config.model_type in VLM_TYPES:
        cls = VLM_TYPES[config.model_type]
    elif config.model_type in TEXT_TYPES:
        cls = AutoModelForCausalLM
    else:
        raise ValueError(f"model type {config.model_type!r} in {path}/config.json is not supported "
                         f"(supported: {', '.join([*VLM_TYPES, *TEXT_TYPES])})")
    if attn_implementation == "varlen":
        attn_implementation = attention.register()
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)


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
