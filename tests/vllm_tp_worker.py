"""One torchrun rank of the vLLM tensor-parallel test (tests/test_vllm_backend.py::test_torchrun_tensor_parallel).

    torchrun --nproc_per_node 2 tests/vllm_tp_worker.py MODEL_DIR PROCESSOR_DIR OUT_DIR

Both ranks build one engine together (`tensor_parallel_size=2`, external launcher, the trainer's gloo group) and
call `generate` with different prompt lists, one of them empty at one point (a distill stage's last chunk). Each
rank checks that it gets back exactly its own prompts' completions, equal to a builtin backend's greedy ones on
the same rank, and that a rank with no prompts still takes part (the other's call would hang otherwise) and gets
nothing back. Writes OUT_DIR/rank{r}.json; any failed check raises.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

QUESTIONS = ("What is two plus three?", "Name a color.", "Count the dots in the picture, then add four to it.",
             "Which shape is larger: the red square or the blue circle? Think step by step before answering.")


def main(model_dir: str, processor_dir: str, out_dir: str) -> None:
    from engine.data import Processor
    from engine.rollout import BuiltinBackend, SamplingParams
    from engine.rollout.vllm_backend import VLLMBackend

    Path(out_dir, f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    processor = Processor.from_pretrained(processor_dir)
    builtin = BuiltinBackend(model_dir, device="cpu", processor=processor)
    engine = VLLMBackend(model_dir, device="cpu", dtype=torch.float32, processor=processor, max_model_len=512,
                         enforce_eager=True, seed=0, tensor_parallel_size=2)
    from vllm.distributed.parallel_state import get_tp_group

    result = {"rank": rank, "tp_size": get_tp_group().world_size}
    # Rank 0 sends 3 prompts, rank 1 one: pooled, each gets its own back.
    mine = [processor.encode(q + "!" * (rank + 1), [], row_id=f"r{rank}q{i}")
            for i, q in enumerate(QUESTIONS[:3] if rank == 0 else QUESTIONS[3:])]
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    got, ref = engine.generate(mine, 1, greedy), builtin.generate(mine, 1, greedy)
    if [[c.token_ids for c in g] for g in got] != [[c.token_ids for c in g] for g in ref]:
        raise AssertionError(f"rank {rank}: TP greedy {got} != builtin {ref}")
    if [c.prompt_index for (c,) in got] != list(range(len(mine))):
        raise AssertionError(f"rank {rank}: prompt indices {[c.prompt_index for (c,) in got]}")
    # One rank has nothing to sample (a last, short chunk): it still takes part and gets nothing back.
    empty = engine.generate(mine if rank == 0 else [], 2, SamplingParams(temperature=1.0, max_new_tokens=8, seed=rank))
    if (len(empty), [len(g) for g in empty]) != ((3, [2, 2, 2]) if rank == 0 else (0, [])):
        raise AssertionError(f"rank {rank}: got {len(empty)} groups with an empty-rank partner")
    result["num_tokens"] = sum(len(c.token_ids) for g in (*got, *empty) for c in g)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    engine.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 4 or "RANK" not in os.environ:
        sys.exit(f"usage: torchrun --nproc_per_node 2 {sys.argv[0]} MODEL_DIR PROCESSOR_DIR OUT_DIR")
    main(*sys.argv[1:])
