"""Logging for the engine: `logger`, `log0` (rank 0 only), `warn_once` and `Progress` for long loops.

Only rank 0 prints progress unless ENGINE_LOG_ALL_RANKS=1; warnings and errors of the `engine` logger print on
every rank so a problem on rank 3 is never hidden. Third-party output is quieted by engine/console.py (kept apart
so that reading a recipe imports neither transformers nor datasets).
"""

import logging
import sys
import time

from engine.env import env, env_flag

logger = logging.getLogger("engine")
_rank = 0
_warned: set[str] = set()
_progress_every_s = 30.0


class _StdoutHandler(logging.StreamHandler):
    """Writes to `sys.stdout` as it is when a line is logged, not as it was when logging was set up (a stream
    replaced later, e.g. by a test's capture or a notebook, still gets the lines)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns one; the property always answers sys.stdout
        pass


def setup_logging(rank: int = 0, progress_every_s: float | None = None) -> None:
    """Configure the `engine` logger once per process; later calls only update the rank (and the interval
    between `Progress` lines, in seconds)."""
    global _rank, _progress_every_s
    _rank = rank
    if progress_every_s is not None:
        _progress_every_s = progress_every_s
    if not logger.handlers:
        handler = _StdoutHandler()
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


class Progress:
    """Progress of a long loop (a rollout, eval or distill chunks) as a log line on rank 0, at most once every
    `run.progress_every_s` seconds, so a short loop prints nothing and a long one never goes quiet:
        rollout: 384/2,048 samples (18.8%) | 1,203,112 tokens, 2,874 tok/s | 419 s, eta 30.3m | decode step 4,096/10,240
    Lines instead of a redrawn bar: they read the same in a terminal, a scheduler's log file and under torchrun.
    """

    def __init__(self, what: str, total: int, unit: str, every_s: float | None = None):
        self.what, self.total, self.unit = what, total, unit
        self.every_s = _progress_every_s if every_s is None else every_s
        self.start_s = self.last_s = time.perf_counter()
        self.done, self.tokens = 0, 0

    def update(self, num: int = 0, *, tokens: int = 0, detail: str = "") -> None:
        """Count `num` more units and `tokens` more tokens done; print a line if `every_s` passed since the last."""
        self.done += num
        self.tokens += tokens
        now = time.perf_counter()
        if _rank != 0 or now - self.last_s < self.every_s:
            return
        self.last_s = now
        logger.info(self.line(now, detail))

    def line(self, now: float, detail: str = "") -> str:
        elapsed_s = max(now - self.start_s, 1e-9)
        parts = [f"{self.what}: {self.done:,}/{self.total:,} {self.unit} ({100 * self.done / max(self.total, 1):.1f}%)"]
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens, {self.tokens / elapsed_s:,.0f} tok/s")
        eta = f"{elapsed_s * (self.total - self.done) / self.done / 60:.1f}m" if self.done else "-"
        parts.append(f"{elapsed_s:.0f} s, eta {eta}")
        if detail:
            parts.append(detail)
        return " | ".join(parts)
