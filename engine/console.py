"""Quiet third-party output for a readable console: progress bars of transformers ("Loading weights") and datasets
("Generating split") off on every rank, since the engine logs what it loaded in one line; on ranks other than 0,
library warnings and third-party info off too (rank 0 prints the same ones). ENGINE_LOG_LEVEL=DEBUG keeps them all.
"""

import warnings

from engine.env import env, env_flag


def quiet_third_party(rank: int) -> None:
    """Call once per process, after `setup_logging`."""
    if env("ENGINE_LOG_LEVEL").upper() == "DEBUG":
        return
    others = rank != 0 and not env_flag("ENGINE_LOG_ALL_RANKS")
    if others:
        warnings.filterwarnings("ignore")  # library warnings: rank 0 prints the same ones
    # Known harmless: the eval stage converts a training checkpoint in one process on purpose
    # (engine/checkpoint.py, dcp.load(no_dist=True)), and torch warns about exactly that.
    warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if others:
        transformers.utils.logging.set_verbosity_error()
    try:
        import datasets
    except ImportError:  # the lent GPU machine has no `datasets`
        return
    datasets.disable_progress_bars()
    if others:
        datasets.logging.set_verbosity_error()
