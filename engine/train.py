"""Entry point: run a recipe's stages in order.

    torchrun --nproc_per_node 2 engine/train.py recipes/tiny.toml [--section.key=value ...]
    python engine/train.py recipes/tiny.toml                       # a single process works too

Each stage writes `<run.out_dir>/<stage>/`; a stage with a DONE marker is skipped, an unfinished one resumes
from its newest checkpoint. Exit codes: 0 done, 1 a stage failed, 2 the recipe is invalid (nothing ran).
"""

import sys
from pathlib import Path

# torchrun puts engine/ first on sys.path; the repo root must win so `engine` and `kernels` import as packages.
_ROOT = Path(__file__).resolve().parents[1]
sys.path = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "engine"]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import atomic  # noqa: E402
from engine.config import Config, ConfigError, load_config, to_toml  # noqa: E402
from engine.dist import barrier, destroy_distributed, init_distributed  # noqa: E402
from engine.log import log0, logger, setup_logging  # noqa: E402
from engine.plan import check_at_startup  # noqa: E402
from engine.runlock import acquire_on_main  # noqa: E402
from engine.stages import DONE_MARKER, StageContext, run_stage  # noqa: E402
from engine.trainer import NonFiniteError  # noqa: E402


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _startup_block(cfg: Config, dist_info) -> None:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import transformers
    cuda = f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no CUDA"
    log0(f"run {cfg.run.name!r} | git {_git_sha()} | python {platform.python_version()} | torch {torch.__version__} "
         f"| triton {triton_version} | transformers {transformers.__version__} | {cuda}")
    log0(f"world: {dist_info.world_size} process(es), backend {dist_info.backend}, device {dist_info.device.type} | "
         f"out_dir {cfg.out_dir} | stages: {' -> '.join(f'{s.name} ({s.kind})' for s in cfg.stages)}")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe TOML file, e.g. recipes/tiny.toml")
    parser.add_argument("--ignore-memory-plan", action="store_true", help="start even if the memory plan says a "
                        "stage does not fit the GPU")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.recipe, overrides)
    except ConfigError as e:  # user input: a clear message, no traceback, nothing started
        sys.stderr.write(f"error: {e}\n")
        return 2

    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = cfg.out_dir
    lock = None
    try:
        lock = acquire_on_main(out_dir, dist_info.is_main)  # one run per out_dir, before anything is written
        if dist_info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(out_dir / "config.resolved.toml", to_toml(cfg))
            log0("resolved config:\n" + to_toml(cfg))
        _startup_block(cfg, dist_info)
        check_at_startup(cfg, dist_info.world_size, dist_info.device, allow_oversize=args.ignore_memory_plan)
        for index, stage in enumerate(cfg.stages):
            stage_dir = out_dir / stage.name
            if (stage_dir / DONE_MARKER).is_file():
                log0(f"stage {stage.name} ({stage.kind}): finished earlier, skipped")
                continue
            log0(f"stage {stage.name} ({stage.kind}): start")
            start_s = time.perf_counter()
            if dist_info.is_main:
                stage_dir.mkdir(parents=True, exist_ok=True)
            barrier()
            _seed_everything(cfg.run.seed + index)  # per stage, so skipping earlier stages changes nothing
            run_stage(stage, StageContext(cfg.run, cfg.model, dist_info, out_dir, stage_dir))
            barrier()
            elapsed_s = time.perf_counter() - start_s
            if dist_info.is_main:
                done = {"stage": stage.name, "kind": stage.kind, "elapsed_s": round(elapsed_s, 2),
                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
                atomic.write_text(stage_dir / DONE_MARKER, json.dumps(done) + "\n")
            log0(f"stage {stage.name} ({stage.kind}): done in {elapsed_s:.1f} s -> {stage_dir}")
        log0(f"all stages done: {out_dir}")
        return 0
    except (ValueError, NonFiniteError, atomic.DiskFullError) as e:
        # Bad data, bad settings found at run time, or a diverged run: say what and where, keep what is written.
        # Anything else is a bug and keeps its traceback.
        logger.error(f"stage failed: {type(e).__name__}: {e}")
        logger.debug("traceback", exc_info=True)
        return 1
    finally:
        if lock is not None:
            lock.release()
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
