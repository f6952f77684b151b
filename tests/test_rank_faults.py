"""An error on one rank stops every rank with the same message: `engine.dist.on_main` / `together` under two gloo
ranks, and whole 2-rank runs of engine/train.py with a fault injected on one rank in each kind of stage (rank-0-only
work, a file only one rank reads, the first step's metrics, the export). Before, the other rank was left in a
collective and died with gloo's "Connection closed by peer" once the failing rank exited."""

import socket
import subprocess
import sys
import time

import pytest

from ._launch import REPO, child_env, kill_tree, start

pytestmark = pytest.mark.subprocess


class UnpicklableError(Exception):
    def __init__(self, code: int):  # takes no message: a pickle cannot rebuild it from its args
        super().__init__(f"code {code}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _helpers_worker(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from engine.dist import on_main, together

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seen = []

    def attempt(fn):
        try:
            seen.append(("ok", fn()))
        except Exception as e:
            seen.append((type(e).__name__, str(e), "".join(getattr(e, "__notes__", []))))

    def boom(exc):
        raise exc

    try:
        attempt(lambda: on_main(lambda: {"rank": dist.get_rank()}))  # rank 0's result everywhere
        attempt(lambda: on_main(lambda: object(), share=False) is not None)  # stays on rank 0
        attempt(lambda: on_main(lambda: boom(ValueError("bad record"))))
        attempt(lambda: together(lambda: dist.get_rank() * 10))  # each rank's own result
        attempt(lambda: together(lambda: boom(OSError(5, "unreadable")) if rank == 1 else 1))
        attempt(lambda: together(lambda: boom(KeyError(f"k{rank}"))))  # both fail: rank 0's error wins
        attempt(lambda: on_main(lambda: boom(UnpicklableError(7))))
        attempt(lambda: on_main(lambda: "still in step"))  # the group is still usable after all that
    finally:
        dist.destroy_process_group()
    out[rank] = seen


def test_on_main_and_together_raise_the_same_error_on_every_rank():
    import torch.multiprocessing as mp

    out = mp.Manager().dict()
    mp.spawn(_helpers_worker, args=(_free_port(), out), nprocs=2, join=True)
    r0, r1 = out[0], out[1]
    assert r0[0] == r1[0] == ("ok", {"rank": 0})
    assert r0[1] == ("ok", True) and r1[1] == ("ok", False)
    assert r0[2][:2] == r1[2][:2] == ("ValueError", "bad record")
    assert "raised on rank 0" in r1[2][2] and not r0[2][2]
    assert r0[3] == ("ok", 0) and r1[3] == ("ok", 10)
    assert r0[4][:2] == r1[4][:2] == ("OSError", "[Errno 5] unreadable")  # rank 1 alone failed
    assert "raised on rank 1" in r0[4][2]
    assert r0[5][:2] == r1[5][:2] == ("KeyError", "'k0'")
    assert r0[6][:2] == ("UnpicklableError", "code 7") and r1[6][:2] == ("RuntimeError", "UnpicklableError: code 7")
    assert r0[7] == r1[7] == ("ok", "still in step")


HEAD = """
[run]
name = "faults"
seed = 0
trackers = []
[model]
path = "{world}/hf"
dtype = "float32"
"""
TOY = """
[[stages]]
name = "world"
kind = "toy"
num_train = 8
num_test = 4
"""
SFT = """
[[stages]]
name = "sft"
kind = "sft"
init = "model"
[stages.data]
train = "{world}/data/sft.parquet"
[stages.train]
steps = 1
batch_size = 4
micro_batch_tokens = 400
"""
DISTILL = """
[[stages]]
name = "distill"
kind = "distill"
policy = "model"
[stages.data]
train = "{world}/data/train.parquet"
[stages.rollout]
n = 2
max_new_tokens = 4
[stages.distill]
num_prompts = 4
"""
EVAL = """
[[stages]]
name = "eval"
kind = "eval"
models = ["model"]
max_new_tokens = 4
[[stages.benchmarks]]
name = "toy_id"
kind = "toy"
path = "{world}/data/test.parquet"
limit = 4
"""

# (stages, where the fault is injected, on which rank, kind): one case per kind of one-rank work.
CASES = {
    "toy-build-rank0": (TOY, "engine.stages.toy:build_toy_world", 0, "value"),
    "sft-data-read-rank1": (SFT, "engine.stages.common:load_rows", 1, "value"),
    "sft-first-step-metrics-rank0": (SFT, "engine.metrics:Metrics.log", 0, "disk"),
    "sft-export-rank0": (SFT, "engine.checkpoint:save_file", 0, "disk"),
    "distill-part-rank0": (DISTILL, "engine.stages.distill:_PartWriter.write", 0, "value"),
    "eval-benchmark-read-rank1": (EVAL, "engine.stages.eval:load_benchmarks", 1, "value"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_fault_on_one_rank_stops_both_with_its_message(case, toy_world, tmp_path):
    stages, target, fault_rank, kind = CASES[case]
    recipe = tmp_path / "recipe.toml"
    recipe.write_text((HEAD + stages).format(world=toy_world))
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, FAULT=target, FAULT_RANK=str(fault_rank), FAULT_KIND=kind)
        cmd = [sys.executable, str(REPO / "tests" / "rank_fault_worker.py"), str(recipe),
               f"--run.out_dir={tmp_path / 'out'}"]
        procs.append(start(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs, ended = [], []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240))
            ended.append(time.monotonic())
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_tree(proc)
                proc.wait()
    error = "DiskFullError" if kind == "disk" else "ValueError"
    message = f"stage failed: {error}: injected fault at {target} on rank {fault_rank}"
    for rank, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        tail = f"rank {rank}:\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
        assert proc.returncode == 1, tail
        assert f"rank {rank} exit 1" in out, tail  # main() returned: no uncaught error on this rank
        assert message in out, tail
        assert "Connection closed by peer" not in out + err, tail
    assert ended[1] - ended[0] < 30, "the second rank stopped long after the first"
