"""The library-free part of the adapters: a Hugging Face causal LM's last hidden states and lm_head weight turned into
per-token log-probs by `fused_logprobs`, and a per-instance forward wrap with an undo.

Both trainers we adapt already call their model with an extra keyword and read per-token log-probs off the output
(TRL 1.16: `model(..., labels=..., fused_lm_head=True).log_probs`; verl 0.9 with `use_fused_kernels`:
`model(..., shift_labels=..., temperature=...).log_probs`). `wrap_forward` is how the adapters answer those calls:
it replaces `forward` on one model instance only (the class and other instances are untouched) and returns the
function that restores it.

Shapes: B sequences, T positions, H hidden size, V vocabulary, N scored tokens.
"""

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.fused_logprobs import fused_logprobs

IGNORE_INDEX = -100
# Config fields that change the logits after the lm_head matmul; our kernels compute plain hidden @ weight.T / T.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


@dataclass
class FusedHeadOutput:
    """What a wrapped forward returns in place of logits: per-token fp32 log-probs (and entropies), 0 where unscored."""

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def check_model(model: torch.nn.Module) -> None:
    """Raise ValueError unless `model` is a causal LM whose logits are exactly `hidden @ lm_head.weight.T`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"model {type(model).__name__} has no nn.Linear output embedding (got {type(head).__name__}): "
                         "the fused head needs a Hugging Face causal LM with a plain lm_head")
    if head.bias is not None:
        raise ValueError(f"model {type(model).__name__}'s lm_head has a bias; the fused kernels compute "
                         "hidden @ weight.T only: use the trainer's own head for this model")
    text_config = model.config.get_text_config()
    scaled = [f"{k}={getattr(text_config, k)}" for k in _LOGIT_TRANSFORMS
              if getattr(text_config, k, None) not in (None, 1.0)]
    if scaled:
        raise ValueError(f"model {type(model).__name__} transforms its logits ({', '.join(scaled)}); the fused kernels "
                         "support plain logits / temperature only: use the trainer's own head for this model")


def lm_head_weight(model: torch.nn.Module) -> torch.Tensor:
    """The [V, H] lm_head weight, gathered whole when FSDP2 shards it (a DTensor)."""
    weight = model.get_output_embeddings().weight
    if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: the kernels need the full [V, H] matrix on this rank
        weight = weight.full_tensor()
    return weight


def backbone_hidden(model: torch.nn.Module, *args, **kwargs) -> torch.Tensor:
    """Last hidden states [B, T, H] of the backbone (`model.base_model`: the decoder with its final norm)."""
    kwargs["use_cache"] = False
    kwargs.pop("return_dict", None)
    return model.base_model(*args, return_dict=True, **kwargs).last_hidden_state


def token_logprobs(hidden_BTH: torch.Tensor, weight_VH: torch.Tensor, labels_BT: torch.Tensor, *,
                   temperature: float = 1.0, entropy: bool = False, impl: str = "recompute"
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-position log-probs of `labels_BT` (already aligned with the positions), computed only where the label is
    not -100 and zero elsewhere. Returns (logp_BT, entropy_BT or None), fp32, differentiable w.r.t. hidden and
    weight. The hidden states are cast to the weight's dtype (a fp32 head under bf16 autocast)."""
    mask_BT = labels_BT != IGNORE_INDEX
    hidden_NH = hidden_BTH[mask_BT].to(weight_VH.dtype)
    out = fused_logprobs(hidden_NH, weight_VH, labels_BT[mask_BT], temperature=temperature, return_entropy=entropy,
                         impl=impl)
    logp_N, ent_N = out if entropy else (out, None)
    # masked_scatter keeps the result in the graph even when no position is scored (an all-padding micro-batch)
    logp_BT = logp_N.new_zeros(mask_BT.shape).masked_scatter(mask_BT, logp_N)
    ent_BT = None if ent_N is None else ent_N.new_zeros(mask_BT.shape).masked_scatter(mask_BT, ent_N)
    return logp_BT, ent_BT


def wrap_forward(model: torch.nn.Module, handler: Callable) -> Callable[[], None]:
    """Make `model.forward(*args, **kwargs)` call `handler(model, previous_forward, *args, **kwargs)` on this instance.

    Returns `undo()`, which restores the previous forward; it raises RuntimeError if another wrap was installed on
    top of this one since (undo that one first). The wrap keeps the class forward's signature, which `generate`
    validates its keyword arguments against.
    """
    previous = model.forward  # the class method, or an earlier instance wrap (TRL installs one in __init__)
    had_instance_forward = "forward" in model.__dict__
    saved = model.__dict__.get("forward")

    @functools.wraps(type(model).forward)
    def forward(self, *args, **kwargs):
        return handler(self, previous, *args, **kwargs)

    bound = types.MethodType(forward, model)
    model.forward = bound

    def undo() -> None:
        if model.__dict__.get("forward") is not bound:
            raise RuntimeError(f"{type(model).__name__}.forward was replaced after this wrap; undo that change first")
        if had_instance_forward:
            model.forward = saved
        else:
            del model.forward

    return undo
