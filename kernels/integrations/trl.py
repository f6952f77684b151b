"""TRL adapters: `GRPOTrainer` and `DPOTrainer` subclasses whose losses run on `grpo_loss` / `dpo_loss` and whose
per-token log-probs (old, reference, metrics) come from `fused_logprobs`, fed with the backbone's last hidden
states and the lm_head weight instead of logits. Checked against TRL 1.16.0.

    from kernels.integrations.trl import FusedGRPOTrainer      # drop-in for trl.GRPOTrainer
    trainer = FusedGRPOTrainer(model="path/to/qwen", reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds)

How: TRL 1.16 already calls `model(..., labels=labels, fused_lm_head=True)` and reads `.log_probs` / `.entropy`
(its own chunked head, installed per instance in `__init__`). These trainers wrap that instance forward once more
(`kernels.integrations.head.wrap_forward`) so those calls run `fused_logprobs`, and add
`model(..., return_last_hidden=True)` for the loss, which then sees hidden states and never logits. The call still
goes through the (possibly DDP/FSDP-wrapped) model, so its hooks run as in TRL.

Options are mapped, and anything else is refused at construction with every problem listed (see `grpo_options`,
`dpo_options` and kernels/README.md).
"""

import torch
from trl import DPOTrainer, GRPOTrainer

from kernels.dpo_loss import dpo_loss
from kernels.grpo_loss import grpo_loss
from kernels.integrations.head import (
    FusedHeadOutput,
    backbone_hidden,
    check_model,
    lm_head_weight,
    token_logprobs,
    wrap_forward,
)

# TRL loss_type -> our aggregation; each is then rescaled to TRL's normaliser in `_grpo_scale`.
GRPO_AGGS = {"grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
             "dapo": "token-mean", "luspo": "seq-mean-token-sum"}
DPO_LOSS_TYPES = ("sigmoid", "sft")
# Per-sample vision inputs GRPO forwards to the model with the token ids (whole batch, no slicing needed).
_GRPO_MODEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                    "mm_token_type_ids")


# ------------------------------------------------------------------------------------------------- the head
def install_head(model: torch.nn.Module, *, temperature: float = 1.0, entropy: bool = False,
                 impl: str = "recompute"):
    """Make `model`'s TRL fused-head calls use `fused_logprobs`, and add `return_last_hidden=True`. Returns undo().

    `model(..., labels=L, fused_lm_head=True)` -> FusedHeadOutput(log_probs [B, T-1], entropy [B, T-1] or None),
    scored where L[:, 1:] != -100 (or where `shift_labels` != -100, unshifted); `model(..., return_last_hidden=True)`
    -> the backbone's last hidden states [B, T, H]; every other call goes to the previous forward."""
    check_model(model)

    def handler(self, previous, *args, fused_lm_head=False, return_last_hidden=False, labels=None,
                shift_labels=None, num_items_in_batch=None, **kwargs):
        if return_last_hidden:
            return backbone_hidden(self, *args, **kwargs)
        if not fused_lm_head:  # generation and plain calls: TRL's forward (itself the model's own)
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return previous(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        if kwargs.get("output_router_logits"):
            raise ValueError("the fused head does not return MoE router logits (output_router_logits=True): "
                             "set router_aux_loss_coef=0 or use the trainer's own head")
        hidden = backbone_hidden(self, *args, **kwargs)
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        weight = lm_head_weight(self)
        logp, ent = token_logprobs(hidden, weight, shift_labels.to(weight.device), temperature=temperature,
                                   entropy=entropy, impl=impl)
        return FusedHeadOutput(log_probs=logp, entropy=ent)

    return wrap_forward(model, handler)


def _raise_if(problems: list[str], trainer: str) -> None:
    if problems:
        raise ValueError(f"{trainer}: {len(problems)} unsupported option(s) for the fused kernels:\n  "
                         + "\n  ".join(problems))


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


# ------------------------------------------------------------------------------------------------------ GRPO
def grpo_options(trainer: GRPOTrainer) -> dict:
    """`grpo_loss` keyword arguments for a constructed GRPOTrainer's resolved options; ValueError listing every
    option the fused loss cannot reproduce exactly."""
    args, problems = trainer.args, []
    if trainer.loss_type not in GRPO_AGGS:
        problems.append(f"loss_type={trainer.loss_type!r}: supported are {sorted(GRPO_AGGS)}")
    if trainer.importance_sampling_level != "token":
        problems.append(f"importance_sampling_level={trainer.importance_sampling_level!r}: only 'token'")
    if args.delta is not None and not args.delta > 1 + trainer.epsilon_high:
        problems.append(f"delta={args.delta}: must be > 1 + epsilon_high ({1 + trainer.epsilon_high}) to map onto "
                        "the dual clip")
    if trainer.beta != 0.0 and args.use_bias_correction_kl:
        problems.append("use_bias_correction_kl=True (TRL's default) with beta != 0: grpo_loss does not weight the KL "
                        "term by the ratio; set use_bias_correction_kl=False")
    if trainer.top_entropy_quantile < 1.0:
        problems.append(f"top_entropy_quantile={trainer.top_entropy_quantile}: the entropy mask needs every token's "
                        "entropy before the loss; use 1.0")
    if trainer.off_policy_mask_threshold is not None:
        problems.append(f"off_policy_mask_threshold={trainer.off_policy_mask_threshold}: use None")
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        problems.append("vllm_importance_sampling_correction=True with use_vllm: per-token IS weights are not "
                        "supported; set it to False")
    if trainer._entropy_bonus_enabled:
        problems.append(f"entropy_coef={args.entropy_coef} / use_adaptive_entropy={args.use_adaptive_entropy}: "
                        "no entropy bonus; use entropy_coef=0")
    if trainer.aux_loss_enabled:
        problems.append("MoE router aux loss (router_aux_loss_coef != 0): not supported")
    if _is_peft(trainer.model):
        problems.append("a PEFT model: the fused head wraps a plain causal LM")
    _raise_if(problems, "FusedGRPOTrainer")
    return {"clip_low": trainer.epsilon_low, "clip_high": trainer.epsilon_high, "dual_clip": args.delta,
            "kl_coef": trainer.beta, "kl_estimator": "k3", "temperature": trainer.temperature,
            "agg": GRPO_AGGS[trainer.loss_type],
            "norm_len": trainer.max_completion_length if trainer.loss_type == "dr_grpo" else None}


class FusedGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with the policy loss computed by `kernels.grpo_loss` from hidden states.

    Same constructor, plus `fused_impl` ("recompute" or "onepass", see `grpo_loss`). Loss, gradients and logged
    `entropy` / `kl` / `clip_ratio/region_mean` match TRL's; TRL's `clip_ratio/low_*` and `high_*` are not logged.
    """

    def __init__(self, *args, fused_impl: str = "recompute", **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_impl = fused_impl
        self._fused_kwargs = grpo_options(self)
        self._undo_heads = [install_head(self.model, temperature=self.temperature, entropy=True, impl=fused_impl)]
        if self.ref_model is not None:
            self._undo_heads.append(install_head(self.ref_model, temperature=self.temperature, impl=fused_impl))

    def _compute_loss(self, model, inputs):
        completion_ids = inputs["completion_ids"]
        mask_BC = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask_BC = mask_BC * inputs["tool_mask"]
        model_inputs = {"input_ids": torch.cat([inputs["prompt_ids"], completion_ids], dim=1),
                        "attention_mask": torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)}
        model_inputs.update({k: inputs[k] for k in _GRPO_MODEL_KEYS if inputs.get(k) is not None})
        with self.accelerator.autocast():
            hidden_BTH = model(**model_inputs, return_last_hidden=True)
        num_completion = completion_ids.size(1)
        sel_BC = mask_BC.bool()
        hidden_NH = hidden_BTH[:, -num_completion - 1:-1][sel_BC]  # position t predicts token t + 1
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
        old, ref = inputs.get("old_per_token_logps"), inputs.get("ref_per_token_logps")
        counts_B = sel_BC.sum(-1)
        cu_seqlens = torch.zeros(counts_B.numel() + 1, dtype=torch.int32, device=counts_B.device)
        cu_seqlens[1:] = counts_B.cumsum(0)
        weight = lm_head_weight(self.accelerator.unwrap_model(model))
        loss, metrics = grpo_loss(
            hidden_NH.to(weight.dtype), weight, completion_ids[sel_BC], advantages.expand_as(mask_BC)[sel_BC],
            None if old is None else old[sel_BC], sel_BC.new_ones(hidden_NH.shape[0]),
            cu_seqlens=cu_seqlens, ref_logprobs=ref[sel_BC] if self.beta != 0.0 else None, return_entropy=True,
            impl=self.fused_impl, **self._fused_kwargs)
        loss = loss * self._grpo_scale(inputs, counts_B)
        self._log_grpo_metrics(metrics, counts_B.sum())
        return loss

    def _grpo_scale(self, inputs, counts_B) -> torch.Tensor | float:
        """The factor from our aggregation to TRL's loss, gradient accumulation included."""
        train = self.model.training
        accum = self.current_gradient_accumulation_steps if train else 1.0
        if self.loss_type == "grpo":  # TRL averages over all sequences, we over those with a response token
            return (counts_B > 0).sum().to(torch.float32) / counts_B.numel() / accum
        if self.loss_type == "dapo":  # TRL divides the token sum by the generation batch's token count
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if train:
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return counts_B.sum().clamp(min=1).to(torch.float32) / normalizer
        return 1.0 / accum

    def _log_grpo_metrics(self, metrics: dict, num_tokens: torch.Tensor) -> None:
        """TRL's token-weighted means over all processes, for the metrics grpo_loss reports."""
        mode = "train" if self.model.training else "eval"
        names = {"entropy": "entropy_mean", "clip_ratio/region_mean": "clip_frac"}
        if self.beta != 0.0:
            names["kl"] = "kl_mean"
        cnt = num_tokens.to(torch.float32)
        for trl_name, ours in names.items():
            totals = self.accelerator.reduce(torch.stack([metrics[ours] * cnt, cnt]), reduction="sum")
            self._metrics[mode][trl_name].append((totals[0] / totals[1].clamp(min=1.0)).item())  # host sync


# ------------------------------------------------------------------------------------------------------- DPO
def dpo_options(trainer: DPOTrainer) -> dict:
    """`dpo_loss` keyword arguments and the overall loss weight for a constructed DPOTrainer; ValueError listing
    every option the fused loss cannot reproduce exactly."""
    problems = []
    weights = dict(zip(trainer.loss_types, trainer.loss_weights, strict=True))
    if not set(weights) <= set(DPO_LOSS_TYPES) or weights.get("sigmoid", 0.0) <= 0:
        problems.append(f"loss_type={trainer.loss_types} (weights {trainer.loss_weights}): supported are ['sigmoid'] "
                        "and ['sigmoid', 'sft'] with a positive sigmoid weight")
    if trainer.f_divergence_type != "reverse_kl":
        problems.append(f"f_divergence_type={trainer.f_divergence_type!r}: only 'reverse_kl'")
    if trainer.ld_alpha is not None:
        problems.append(f"ld_alpha={trainer.ld_alpha}: only None")
    if trainer.use_weighting:
        problems.append("use_weighting=True (WPO): needs sum of squared probabilities, not computed")
    if trainer.aux_loss_enabled:
        problems.append("MoE router aux loss (router_aux_loss_coef != 0): not supported")
    if _is_peft(trainer.model):
        problems.append("a PEFT model: the fused head wraps a plain causal LM")
    _raise_if(problems, "FusedDPOTrainer")
    w_sigmoid = weights["sigmoid"]
    # TRL's "sigmoid" ignores label_smoothing (only robust / exo_pair / aot read it), so it is 0 here too
    return {"beta": trainer.beta, "sft_weight": weights.get("sft", 0.0) / w_sigmoid, "sft_norm": "token-mean",
            "label_smoothing": 0.0, "scale": w_sigmoid}


class FusedDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` with the loss computed by `kernels.dpo_loss` from hidden states (loss_type "sigmoid", or
    ["sigmoid", "sft"]: the SPECS DPO + SFT hybrid).

    Same constructor, plus `fused_impl`. Loss, gradients and logged rewards/* and logps/* match TRL's; TRL's
    `entropy`, `logits/*` and `mean_token_accuracy` need full logits and are not logged.
    """

    def __init__(self, *args, fused_impl: str = "recompute", **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_impl = fused_impl
        self._fused_kwargs = dpo_options(self)
        self._undo_heads = [install_head(self.model, impl=fused_impl)]
        if self.ref_model is not None:
            self._undo_heads.append(install_head(self.ref_model, impl=fused_impl))

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:
            raise ValueError("FusedDPOTrainer cannot return logits (return_outputs=True, e.g. for compute_metrics): "
                             "it never builds them; use trl.DPOTrainer for that evaluation")
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        hidden_BTH = model(**model_kwargs, return_last_hidden=True)
        sel_BT = inputs["completion_mask"][:, 1:].bool()  # position t scores token t + 1
        counts_B = sel_BT.sum(-1)
        num_pairs = counts_B.numel() // 2  # the batch is [chosen..., rejected...]
        cu_seqlens = torch.zeros(counts_B.numel() + 1, dtype=torch.int32, device=counts_B.device)
        cu_seqlens[1:] = counts_B.cumsum(0)
        is_chosen = torch.arange(counts_B.numel(), device=counts_B.device) < num_pairs
        if self.precompute_ref_logps:
            ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # TRL's own reference pass (ref model, or the PEFT base), through the fused head installed above
            ref_c, ref_r = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else model, inputs)
        weight = lm_head_weight(self.accelerator.unwrap_model(model))
        kw = dict(self._fused_kwargs)
        scale = kw.pop("scale")
        hidden_NH = hidden_BTH[:, :-1][sel_BT].to(weight.dtype)
        targets_N = inputs["input_ids"][:, 1:][sel_BT]
        loss, metrics = dpo_loss(hidden_NH, weight, targets_N, sel_BT.new_ones(hidden_NH.shape[0]), cu_seqlens,
                                 is_chosen, ref_c, ref_r, impl=self.fused_impl, **kw)
        self._log_dpo_metrics(metrics)
        return loss * scale

    def _log_dpo_metrics(self, metrics: dict) -> None:
        mode = "train" if self.model.training else "eval"
        names = {"rewards/chosen": "rewards_chosen", "rewards/rejected": "rewards_rejected",
                 "rewards/accuracies": "reward_accuracy", "rewards/margins": "reward_margin",
                 "logps/chosen": "logps_chosen", "logps/rejected": "logps_rejected"}
        for trl_name, ours in names.items():  # per-process means over equal-sized batches: their mean is global
            self._metrics[mode][trl_name].append(self.accelerator.gather(metrics[ours][None]).mean().item())
