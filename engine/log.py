"""Logging for the engine: `logger`, `log0` (rank 0 only) and `warn_once`.

Only rank 0 prints progress unless ENGINE_LOG_ALL_RANKS=1; warnings and errors print on every rank so a
problem on rank 3 is never hidden.
"""

import logging
import sys

from engine.env import env, env_flag

logger = logging.getLogger("engine")
_rank = 0
_warned: set[str] = set()


def setup_logging(rank: int = 0) -> None:
    """Configure the `engine` logger once per process; later calls only update the rank."""
    global _rank
    _rank = rank
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        prefix = f"[rank{rank}] " if env_flag("ENGINE_LOG_ALL_RANKS") else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname).1s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(env("ENGINE_LOG_LEVEL").upper())
    if rank != 0 and not env_flag("ENGINE_LOG_ALL_RANKS"):
        logger.setLevel(logging.WARNING)


def log0(msg: str, *args) -> None:
    """Info on rank 0 only."""
    if _rank == 0:
        logger.info(msg, *args)


def warn_once(msg: str) -> None:
    """A warning that prints once per process, e.g. for a config option with no effect on this path."""
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)
