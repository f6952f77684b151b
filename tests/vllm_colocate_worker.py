"""One torchrun rank of the vLLM colocation test (tests/test_vllm_backend.py::test_torchrun_colocation).

    torchrun --nproc_per_node 2 tests/vllm_colocate_worker.py MODEL_DIR PROCESSOR_DIR OUT_DIR

Does what the trainer does with a vllm backend: a gloo process group first, then on every rank an engine inside it
(world size 2: `distributed_executor_backend="external_launcher"`). Each rank checks that

1. its engine is its own (TP = 1, in a vLLM world of both ranks) and generates greedily on the rank's own prompts
   exactly as a builtin backend on the same rank; the ranks decode different numbers of steps, so a per-step
   collective between the engines would hang (the test's timeout catches that);
2. after `update_weights` with the rank's own perturbed weights, outputs still equal the builtin's, and changed;
3. dropping the backend (as a stage does when it ends) frees the engine and keeps the trainer's process group
   usable, and a new engine then works (the next stage);
4. destroying the process group before exit, as engine/train.py does, leaves nothing for vLLM to trip over at exit
   (the test fails on any traceback in the output).

Writes OUT_DIR/rank{r}.json with the numbers; any failed check raises, and the exit code says so.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import weakref
from pathlib import Path

import torch
import torch.distributed as dist

QUESTIONS = ("What is two plus three?", "Name a color.", "Count the dots in the picture, then add four to it.",
             "Which shape is larger: the red square or the blue circle? Think step by step before answering.")


def _check_same(got, ref, what: str) -> float:
    """Raise unless tokens, text and finish reasons are equal and log-probs within 1e-4; return the largest
    log-prob difference."""
    got_tokens, ref_tokens = ([[c.token_ids for c in g] for g in x] for x in (got, ref))
    if got_tokens != ref_tokens:
        raise AssertionError(f"{what}: vllm tokens {got_tokens} != builtin tokens {ref_tokens}")
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        for c, d in zip(g, r, strict=True):
            if (c.text, c.finish_reason) != (d.text, d.finish_reason):
                raise AssertionError(f"{what}: vllm {(c.text, c.finish_reason)} != builtin {(d.text, d.finish_reason)}")
            worst = max([worst, *(abs(a - b) for a, b in zip(c.logprobs, d.logprobs, strict=True))])
    if worst > 1e-4:
        raise AssertionError(f"{what}: log-probs differ by {worst:.2e} > 1e-4")
    return worst


def _parallel_layout(backend) -> dict:
    from vllm.distributed.parallel_state import get_tp_group, get_world_group

    pc = backend.llm.llm_engine.vllm_config.parallel_config
    return {"executor": pc.distributed_executor_backend, "engine_world_size": pc.world_size,
            "tp_size": get_tp_group().world_size, "vllm_world_size": get_world_group().world_size}


def main(model_dir: str, processor_dir: str, out_dir: str) -> None:
    from engine.data import Processor
    from engine.rollout import BuiltinBackend, SamplingParams
    from engine.rollout.vllm_backend import VLLMBackend

    def build() -> VLLMBackend:
        return VLLMBackend(model_dir, device="cpu", dtype=torch.float32, processor=processor, max_model_len=512,
                           enforce_eager=True, seed=0)

    # torchrun starts each worker in a session of its own: the test kills this pid's group if it outlives it.
    Path(out_dir, f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    processor = Processor.from_pretrained(processor_dir)
    builtin = BuiltinBackend(model_dir, device="cpu", processor=processor)
    t0 = time.perf_counter()
    engine = build()
    result = {"rank": rank, "world_size": world, "build_s": time.perf_counter() - t0, **_parallel_layout(engine)}

    # 1. Rank-specific prompts (rank r adds r + 1 exclamation marks) and lengths.
    prompts = [processor.encode(q + "!" * (rank + 1), [], row_id=f"r{rank}q{i}") for i, q in enumerate(QUESTIONS)]
    greedy = SamplingParams(temperature=0, max_new_tokens=16 + 8 * rank)
    before = engine.generate(prompts, 1, greedy)
    diff_before = _check_same(before, builtin.generate(prompts, 1, greedy), f"rank {rank} before the update")

    # 2. Each rank its own weights: the engines are independent.
    gen = torch.Generator().manual_seed(100 + rank)
    weights = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in builtin.model.state_dict().items()}
    t0 = time.perf_counter()
    engine.update_weights(weights.items())
    result["update_s"] = time.perf_counter() - t0
    builtin.update_weights(weights.items())
    after = engine.generate(prompts, 1, greedy)
    diff_after = _check_same(after, builtin.generate(prompts, 1, greedy), f"rank {rank} after the update")
    if [c.token_ids for (c,) in after] == [c.token_ids for (c,) in before]:
        raise AssertionError(f"rank {rank}: the weight update changed no output")
    everyone = [None] * world
    dist.all_gather_object(everyone, [c.token_ids for (c,) in after])

    # 3. A stage ends: its backend goes, the process group stays; the next stage builds a new engine.
    alive = weakref.ref(engine)
    del engine
    gc.collect()
    if alive() is not None:
        raise AssertionError(f"rank {rank}: the dropped vllm backend was not freed")
    if not dist.is_initialized():
        raise AssertionError(f"rank {rank}: dropping the vllm backend destroyed the trainer's process group")
    dist.barrier()
    engine = build()
    _check_same(engine.generate(prompts, 1, greedy), before, f"rank {rank}, second engine (original weights)")
    # 3b. close(): the stages' explicit release, also without losing the process group.
    llm_alive = weakref.ref(engine.llm)
    engine.close()
    gc.collect()
    if llm_alive() is not None:
        raise AssertionError(f"rank {rank}: close() left the vLLM engine alive")
    if not dist.is_initialized():
        raise AssertionError(f"rank {rank}: close() destroyed the trainer's process group")
    dist.barrier()

    result.update(max_logprob_diff=max(diff_before, diff_after), tokens_after=everyone[rank],
                  same_as_other_ranks=[r for r in range(world) if r != rank and everyone[r] == everyone[rank]],
                  num_tokens=sum(len(c.token_ids) for g in (*before, *after) for c in g))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    # 4. engine/train.py's order: the process group goes first, the engine at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 4 or "RANK" not in os.environ:
        sys.exit(f"usage: torchrun --nproc_per_node N {sys.argv[0]} MODEL_DIR PROCESSOR_DIR OUT_DIR")
    main(*sys.argv[1:])
