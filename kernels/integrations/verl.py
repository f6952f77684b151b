"""verl adapter: the FSDP actor's per-token log-probs and entropies from `fused_logprobs`. Checked against verl 0.9.1.

verl 0.9's actor (`verl.workers.engine.fsdp.transformer_impl.FSDPEngineWithLMHead`) has a fused-kernel mode: with
`actor_rollout_ref.model.use_fused_kernels=True` it calls the model as
`model(input_ids, position_ids, ..., temperature=T, return_dict=True, shift_labels=<next-token ids>)` and reads
`output.log_probs` / `output.entropy` ([1, total_tokens] packed, or [B, T] padded) instead of logits. verl fills
that contract with its own backends by replacing the model *class*'s forward; `install_head(model)` fills it with
`fused_logprobs` on one model instance and returns undo():

    from kernels.integrations.verl import install_head
    undo = install_head(actor_module)            # the HF model, before FSDP wraps it (or the wrapped root)

Set `fused_kernel_options.impl_backend` to a name verl does not know (e.g. "specs"): verl then skips its own
patch ("Skipping monkey patch") but still takes the fused branch, which reads our outputs. The policy loss stays
verl's (it consumes per-token log-probs); what the fused head removes is the [tokens, vocab] logits and their
log-softmax. This module imports nothing from verl.

Refused: a per-sample temperature tensor (verl refuses it with fused kernels too), and models whose logits are not
`hidden @ lm_head.weight.T` (see `head.check_model`). verl's `calculate_sum_pi_squared` and top-k distillation
need full logits; verl itself refuses them in fused mode.
"""

import torch

from kernels.integrations.head import (
    FusedHeadOutput,
    backbone_hidden,
    check_model,
    lm_head_weight,
    token_logprobs,
    wrap_forward,
)


def install_head(model: torch.nn.Module, *, impl: str = "recompute"):
    """Make verl's fused-kernel calls on `model` return `fused_logprobs` log-probs and entropies. Returns undo().

    A call with `temperature=` (verl's fused mode) returns FusedHeadOutput(log_probs, entropy), both fp32 and
    shaped like the input ids, for the next-token ids `shift_labels` (else `labels` or `input_ids` rolled left
    by one, as verl does); any other call goes to the previous forward."""
    check_model(model)

    def handler(self, previous, *args, temperature=None, shift_labels=None, labels=None, **kwargs):
        if temperature is None and shift_labels is None:
            return previous(*args, **kwargs, **({} if labels is None else {"labels": labels}))
        temperature = 1.0 if temperature is None else temperature
        if isinstance(temperature, torch.Tensor):
            raise ValueError(f"temperature must be one float for the fused head, got a tensor of shape "
                             f"{tuple(temperature.shape)} (per-sample temperature); verl refuses it with "
                             "use_fused_kernels too")
        if shift_labels is None:
            ids = labels if labels is not None else kwargs.get("input_ids")
            if ids is None:
                raise ValueError("the fused head needs shift_labels, labels or input_ids to know the next tokens")
            shift_labels = torch.roll(ids, shifts=-1, dims=-1)
        hidden = backbone_hidden(self, *args, **kwargs)
        weight = lm_head_weight(self)
        logp, ent = token_logprobs(hidden, weight, shift_labels.to(weight.device), temperature=float(temperature),
                                   entropy=True, impl=impl)
        return FusedHeadOutput(log_probs=logp, entropy=ent)

    return wrap_forward(model, handler)
