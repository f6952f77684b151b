"""The console: progress lines for long loops (rank 0, throttled), third-party bars and warnings quiet."""

import logging
import warnings

import pytest

from engine import log
from engine.console import quiet_third_party
from engine.log import Progress, setup_logging


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def lines():
    handler = _Lines()
    log.logger.addHandler(handler)
    yield handler.lines
    log.logger.removeHandler(handler)


@pytest.fixture
def restore_logging():
    import datasets
    import transformers

    level, rank, every = log.logger.level, log._rank, log._progress_every_s
    with warnings.catch_warnings():
        yield
    log._rank, log._progress_every_s = rank, every
    log.logger.setLevel(level)
    transformers.utils.logging.enable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    datasets.enable_progress_bars()
    datasets.logging.set_verbosity_warning()


def test_progress_line_counts_rate_and_eta(lines, restore_logging):
    setup_logging(0, progress_every_s=0.0)
    p = Progress("rollout", 8, "samples")
    p.start_s -= 10.0  # as if 10 s had passed
    p.update(2, tokens=1000, detail="decode step 5/64")
    (line,) = lines
    assert line.startswith("rollout: 2/8 samples (25.0%) | 1,000 tokens, 100 tok/s | 10 s, eta 0.5m")
    assert line.endswith("| decode step 5/64")


def test_progress_is_throttled_and_rank0_only(lines, restore_logging):
    setup_logging(0, progress_every_s=3600.0)
    p = Progress("eval", 4, "prompts")
    for _ in range(4):
        p.update(1)
    assert p.done == 4 and not lines  # a short loop prints nothing
    setup_logging(1, progress_every_s=0.0)
    Progress("eval", 4, "prompts").update(1)
    assert not lines


def test_other_ranks_quiet_third_party(restore_logging):
    import datasets
    import transformers

    setup_logging(1)
    quiet_third_party(1)
    assert not transformers.utils.logging.is_progress_bar_enabled()
    assert not datasets.is_progress_bar_enabled()
    assert transformers.utils.logging.get_verbosity() == logging.ERROR
    assert log.logger.level == logging.WARNING  # the engine's own warnings still print on every rank
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_party(1)  # installs the filter again inside this block
        warnings.warn("a library warning", UserWarning, stacklevel=1)
    assert not seen


def test_rank0_keeps_library_warnings_but_not_the_known_harmless_one(restore_logging):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_party(0)
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        warnings.warn("torch.distributed is disabled, unavailable or uninitialized, assuming ...", UserWarning,
                      stacklevel=1)
    assert [str(w.message) for w in seen] == ["a library warning"]
