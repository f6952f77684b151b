"""Preemption: on SIGTERM (what a cluster scheduler sends before it kills a job) or SIGINT (Ctrl-C), stop at the
next safe point with everything written, instead of dying mid-step.

`install()` (engine/train.py, every rank) turns the first signal into a request; a second one stops at once, the
default way. Safe points: a training stage after its current optimizer step (it saves a checkpoint there), the
distill and eval stages after their current chunk (already written). Ranks may see the signal at different
moments, so each safe point agrees over all ranks: the trainer sums `stat()` into the step's one all-reduce, the
chunk loops call `agreed()` (one small all-reduce a chunk). All ranks then raise `Preempted` together, and
train.py prints where the run stopped and how to resume, and exits with 128 + the signal number (143 for SIGTERM).
"""

from __future__ import annotations

import signal

import torch

from engine.log import logger

KEY = "preempt/requested"
"""The stat a training step carries: > 0 when any rank got a signal."""

_requested: int = 0  # the signal number, 0 for none


class Preempted(Exception):  # noqa: N818 - a request, not an error
    """A signal asked the run to stop; raised at a safe point on every rank alike."""

    def __init__(self, where: str):
        self.where = where
        self.signum = _requested or signal.SIGTERM
        super().__init__(where)


def _handle(signum, frame) -> None:
    global _requested
    if _requested:  # the second signal: stop now, as if no handler were installed
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)
        return
    _requested = signum
    logger.warning(f"{signal.Signals(signum).name}: stopping at the next safe point (after this optimizer step, or "
                   f"this distill/eval chunk), with a checkpoint; send it again to stop at once")


def install() -> None:
    """Handle SIGTERM and SIGINT in this process (main thread only)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _handle)


def uninstall() -> None:
    global _requested
    _requested = 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)


def requested() -> bool:
    """This process got a signal (this rank only: use `stat()` / `agreed()` to decide together)."""
    return bool(_requested)


def stat() -> dict[str, torch.Tensor]:
    """This rank's request as a step stat; summed over ranks with the step's other stats."""
    return {KEY: torch.tensor(float(bool(_requested)))}


def agreed(device: torch.device) -> bool:
    """Whether any rank got a signal (a collective: every rank calls it at the same point)."""
    from engine.dist import all_reduce

    flag = torch.tensor([float(bool(_requested))], device=device)
    all_reduce(flag)  # sync: one float a chunk
    return flag.item() > 0
