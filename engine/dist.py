"""torch.distributed setup: nccl on CUDA, gloo on CPU; torchrun or a single plain process.

A single process still gets a (world size 1) process group so that FSDP2 and DCP run the same code path
everywhere; the rendezvous then uses a free loopback port.
"""

import dataclasses
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

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


def lockstep(items: list, device: torch.device, filler=None) -> list[tuple[object, bool]]:
    """`items` as (item, real) pairs, padded to the longest list over ranks with (items[0] or `filler`, False).

    FSDP2 all-gathers parameters and reduce-scatters gradients inside every forward/backward, so every rank must
    run the same number of passes or the others hang. A padding pass runs a real input; the caller discards its
    output (or weights its loss by zero). `filler` stands in when this rank has no item at all.
    """
    num = int(all_reduce(torch.tensor([len(items)], device=device), "max").item())  # sync: the longest list
    pad = items[0] if items else filler
    return [(items[i], True) if i < len(items) else (pad, False) for i in range(num)]
