"""One rank of a 2-rank `engine/train.py` run with a fault injected on one rank (tests/test_rank_faults.py).

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
    FAULT=module:attr[.attr] FAULT_RANK=0 [FAULT_KIND=disk] python tests/rank_fault_worker.py RECIPE [--k=v ...]

On rank FAULT_RANK the attribute is replaced by a function that raises ValueError (or, with FAULT_KIND=disk,
atomic.DiskFullError) naming the attribute and the rank; then `engine.train.main` runs and the exit code is
printed as "rank R exit N", so the test sees each rank's own outcome (a rank that died of an uncaught error
prints a traceback instead).
"""

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import atomic, train  # noqa: E402


def inject(target: str, rank: int, kind: str) -> None:
    module_name, _, attr = target.partition(":")
    owner = importlib.import_module(module_name)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    assert hasattr(owner, name), f"{target}: no such attribute to inject a fault into"

    def fail(*args, **kwargs):
        message = f"injected fault at {target} on rank {rank}"
        raise atomic.DiskFullError(message) if kind == "disk" else ValueError(message)

    setattr(owner, name, fail)


if __name__ == "__main__":
    rank, fault_rank = int(os.environ["RANK"]), int(os.environ["FAULT_RANK"])
    if rank == fault_rank:
        inject(os.environ["FAULT"], rank, os.environ.get("FAULT_KIND", "value"))
    rc = train.main(sys.argv[1:])
    print(f"rank {rank} exit {rc}", flush=True)
    sys.exit(rc)
