"""torch.distributed setup: nccl on CUDA, gloo on CPU; torchrun or a single plain process.

A single process still gets a (world size 1) process group so that FSDP2 and DCP run the same code path
everywhere; the rendezvous then uses a free loopback port.
"""

import dataclasses
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine import hub
from engine.env import env


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group (idempotent) and pick this rank's device."""
    rank, world_size, local_rank = int(env("RANK")), int(env("WORLD_SIZE")), int(env("LOCAL_RANK"))
    use_cuda = torch.cuda.is_available()
    if use_cuda and torch.cuda.device_count() <= local_rank:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible; "
                           "launch at most that many processes per node (torchrun --nproc_per_node)")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # A plain `python engine/train.py` has no torchrun rendezvous: be a world of one on a free loopback port.
        # (Not through os.environ, which child processes would inherit and then collide on.)
        init_method = None if "MASTER_ADDR" in os.environ else f"tcp://127.0.0.1:{_free_port()}"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), device_id=device if use_cuda else None)
    return DistInfo(rank, world_size, local_rank, device, backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce that is a no-op without a process group; returns `t` for chaining."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_object(obj, src: int = 0):
    """Rank `src`'s Python object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj) -> list:
    """Every rank's Python object, in rank order, on every rank (a list of one without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def lockstep(items: list, device: torch.device, filler=None, num: int | None = None) -> list[tuple[object, bool]]:
    """`items` as (item, real) pairs, padded to the longest list over ranks with (items[0] or `filler`, False).

    FSDP2 all-gathers parameters and reduce-scatters gradients inside every forward/backward, so every rank must
    run the same number of passes or the others hang. A padding pass runs a real input; the caller discards its
    output (or weights its loss by zero). `filler` stands in when this rank has no item at all. `num` is the
    longest list when the caller already knows it (e.g. it planned every rank's batches); else the ranks ask
    each other.
    """
    if num is None:
        num = int(all_reduce(torch.tensor([len(items)], device=device), "max").item())  # sync: the longest list
    assert num >= len(items), f"lockstep: num = {num} but this rank has {len(items)} items"
    pad = items[0] if items else filler
    return [(items[i], True) if i < len(items) else (pad, False) for i in range(num)]


def max_and_sum(maxes: list[int], sums: list[int], device: torch.device) -> tuple[list[int], list[int]]:
    """The max over ranks of each of `maxes` and the sum over ranks of each of `sums` (non-negative integers), in
    one all-reduce and one host transfer: each rank writes its sums into its own slot of a MAX all-reduce, and the
    slots are added up on the host (exact: fp64 holds integers up to 2**53)."""
    rank, world = rank_world()
    t = torch.zeros(len(maxes) + world * len(sums), dtype=torch.float64)
    t[: len(maxes)] = torch.tensor(maxes, dtype=torch.float64)
    start = len(maxes) + rank * len(sums)
    t[start : start + len(sums)] = torch.tensor(sums, dtype=torch.float64)
    out = all_reduce(t.to(device), "max").tolist()  # sync: one transfer for both
    slots = out[len(maxes) :]
    return [int(x) for x in out[: len(maxes)]], [int(sum(slots[i :: len(sums)])) for i in range(len(sums))]


def resolve_on_ranks(text: str, key: str, is_main: bool) -> Path:
    """`resolve_model_path` under a process group (collective): rank 0 first, alone, since it downloads what is
    missing; then the others from the cache it filled (or their node's own). A failure on rank 0 raises the same
    ValueError on every rank, so none is left waiting."""
    path, error = None, ""
    if is_main:
        try:
            path = hub.resolve_model_path(text, key)
        except ValueError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise ValueError(error)
    return path if is_main else hub.resolve_model_path(text, key)
