"""torch.distributed setup: nccl on CUDA, gloo on CPU; torchrun or a single plain process.

A single process still gets a (world size 1) process group so that FSDP2 and DCP run the same code path
everywhere; the rendezvous then uses a free loopback port.
"""

import dataclasses
import logging
import os
import pickle
import socket
import sys
from collections.abc import Callable
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


def exit_process(code: int) -> None:
    """Ends an entry point with `code`. In a torchrun worker (WORLD_SIZE > 1), after logs and output are flushed,
    it leaves with os._exit: the interpreter's own teardown then never runs. Why: after a complete 2-rank run (every
    file written, the process group destroyed) a rank sometimes aborted in that teardown ("terminate called without
    an active exception", exit -6: 2 of ~12 demo-sized runs on 2026-12-02), a C++ thread of the distributed runtime
    destroyed during interpreter finalization; torchrun then reported the whole run as failed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


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


def on_main(fn: Callable[[], object], share: bool = True):
    """`fn()` on rank 0 alone; its result on every rank, or its exception raised on every rank (a collective).
    `share=False` keeps the result on rank 0 (the others get None): for objects that do not pickle, like a client.

    For rank-0-only work (writing a file, reading a record, asking a judge) that the other ranks would otherwise
    pass by into the next collective, where rank 0's error leaves them waiting until its exit closes the connection.
    `fn` must not use collectives itself. Rank 0 re-raises its own exception (with its traceback); the others raise a
    copy with the same type and message (`_portable`), so every rank stops with the same line.
    """
    rank, world = rank_world()
    if world == 1:
        return fn()
    result, failure = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # any error: the other ranks must hear of it, whatever it is
            failure = e
    shared_result, error = broadcast_object((result if share else None, _portable(failure)))
    if failure is not None:
        raise failure
    if error is not None:
        error.add_note("(raised on rank 0; every rank stops with it)")
        raise error
    return result if rank == 0 else shared_result


def together(fn: Callable[[], object]):
    """`fn()` on every rank; if it raised on any rank, every rank raises the lowest failing rank's exception (a
    collective). For work each rank does on its own (reading its files or its shard) where one rank may fail alone.
    `fn` must not use collectives itself (a rank that failed before one would leave the others in it)."""
    if rank_world()[1] == 1:
        return fn()
    result, failure = None, None
    try:
        result = fn()
    except Exception as e:  # any error: the other ranks must hear of it, whatever it is
        failure = e
    failed = [(r, e) for r, e in enumerate(gather_object(_portable(failure))) if e is not None]
    if not failed:
        return result
    first_rank, first = failed[0]
    if failure is not None and (type(first), str(first)) == (type(failure), str(failure)):
        raise failure  # this rank's own error (or the same one), with its traceback
    first.add_note(f"(raised on rank {first_rank}; every rank stops with it)")
    raise first from failure


def _portable(exc: Exception | None) -> Exception | None:
    """`exc` as another rank can unpickle it: a copy of the same type and message, else a RuntimeError that names the
    type (an exception whose constructor does not take its own args cannot be rebuilt from a pickle)."""
    if exc is None:
        return None
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return copy
    except Exception:  # noqa: S110 - any pickling failure: fall back to the message
        pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")


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
