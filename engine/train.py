"""Entry point: run a recipe's stages in order.

    torchrun --nproc_per_node 2 engine/train.py recipes/tiny.toml [--section.key=value ...]
    python engine/train.py recipes/tiny.toml                       # a single process works too

Each stage writes `<run.out_dir>/<stage>/`, starting with `config.toml`, the settings it runs with. On a rerun a
finished stage with the same settings is skipped and an unfinished one resumes from its newest checkpoint; a stage
whose settings changed stops the run before any work (engine/stage_record.py), unless `--rerun STAGE` or `--force`
says to run it and every later stage again. SIGTERM or Ctrl-C stops the run after the current optimizer step (with
a checkpoint) or distill/eval chunk; rerunning the same command resumes there (engine/preempt.py).
Exit codes: 0 done, 1 a stage failed, 2 the recipe is invalid or asks a finished stage for other settings (nothing
ran), 128 + N stopped by signal N (143: SIGTERM, 130: Ctrl-C).
"""

import sys
from pathlib import Path

# torchrun puts engine/ first on sys.path; the repo root must win so `engine` and `kernels` import as packages.
_ROOT = Path(__file__).resolve().parents[1]
sys.path = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "engine"]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine import atomic, preempt, tracking  # noqa: E402
from engine.config import Config, ConfigError, load_config, to_toml  # noqa: E402
from engine.console import quiet_third_party  # noqa: E402
from engine.dist import (  # noqa: E402
    barrier,
    destroy_distributed,
    exit_process,
    init_distributed,
    on_main,
    resolve_on_ranks,
)
from engine.log import log0, logger, setup_logging  # noqa: E402
from engine.plan import check_at_startup  # noqa: E402
from engine.runlock import acquire_on_main  # noqa: E402
from engine.stage_record import Plan, RerunError, move_aside, plan_stages, write_record  # noqa: E402
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


def _local_model(cfg: Config, plan: Plan, is_main: bool):
    """[model] with `path` a local directory: a Hugging Face id is resolved through the cache (rank 0 downloads it
    when it is missing and the hub is reachable, then the other ranks resolve it from their cache). Only when a
    stage that runs uses the base model."""
    uses_base = any(plan.actions[s.name] != "skip" and "model" in s.model_inputs().values() for s in cfg.stages)
    if not (cfg.model.path and uses_base):
        return cfg.model
    path = str(resolve_on_ranks(cfg.model.path, "model.path", is_main))
    if path != cfg.model.path:
        log0(f"model: {cfg.model.path} -> {path}")
    return dataclasses.replace(cfg.model, path=path)


def _prepare(cfg: Config, args, overrides: list[str]) -> Plan:
    """Check the stage records, move stages to rerun aside, write the resolved config; the plan of each stage."""
    # Rank 0 compares the stage records with the recipe; every rank gets the same plan or the same error.
    plan = on_main(lambda: plan_stages(cfg, cfg.out_dir, rerun=args.rerun, force=args.force))
    out_dir = cfg.out_dir

    def write() -> None:  # rank 0; a failure (e.g. a full disk) stops every rank with its message
        for note in plan.notes:
            logger.warning(note)
        moved = move_aside(out_dir, plan.move_aside)
        if moved:
            log0(f"--{'rerun' if args.rerun else 'force'}: moved {', '.join(plan.move_aside)} to {moved}")
        out_dir.mkdir(parents=True, exist_ok=True)
        # Written only after the stage records agree with it: it never claims settings a stage did not run with.
        atomic.write_text(out_dir / "config.resolved.toml", to_toml(cfg))

    on_main(write)
    if args.print_config:
        log0("resolved config:\n" + to_toml(cfg))
    log0(f"config: {args.recipe}" + (f" with {' '.join(overrides)}" if overrides else "")
         + f" -> {out_dir / 'config.resolved.toml'} (every default filled in; --print-config shows it here)")
    return plan


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Any other --section.key=value overrides a recipe value.")
    parser.add_argument("recipe", help="recipe TOML file, e.g. recipes/tiny.toml")
    parser.add_argument("--ignore-memory-plan", action="store_true", help="start even if the memory plan says a "
                        "stage does not fit the GPU")
    parser.add_argument("--rerun", metavar="STAGE", help="run STAGE and every later stage again (their old "
                        "directories move to <out_dir>/replaced/<time>/)")
    parser.add_argument("--force", action="store_true", help="run again from the first stage whose settings "
                        "differ from what it ran with (old directories move aside as with --rerun)")
    parser.add_argument("--print-config", action="store_true", help="also print the resolved config on the "
                        "console (it is always written to <out_dir>/config.resolved.toml)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    try:
        cfg = load_config(args.recipe, overrides)
    except ConfigError as e:  # user input: a clear message, no traceback, nothing started
        sys.stderr.write(f"error: {e}\n")
        return 2

    dist_info = init_distributed()
    preempt.install()  # SIGTERM / SIGINT: stop after the current step with a checkpoint (engine/preempt.py)
    setup_logging(dist_info.rank, progress_every_s=cfg.run.progress_every_s)
    quiet_third_party(dist_info.rank)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True)
    out_dir = cfg.out_dir
    lock = None
    try:
        lock = acquire_on_main(out_dir, dist_info.is_main)  # one run per out_dir, before anything is written
        plan = _prepare(cfg, args, overrides)
        _startup_block(cfg, dist_info)
        check_at_startup(cfg, dist_info.world_size, dist_info.device, allow_oversize=args.ignore_memory_plan)
        tracking.start(cfg.run, out_dir, to_toml(cfg), dist_info.is_main)
        model = _local_model(cfg, plan, dist_info.is_main)  # the records keep the id as written in the recipe
        for index, stage in enumerate(cfg.stages):
            stage_dir = out_dir / stage.name
            action = plan.actions[stage.name]
            if action == "skip":
                log0(f"stage {stage.name} ({stage.kind}): finished earlier with these settings, skipped")
                continue
            if preempt.agreed(dist_info.device):  # a signal during the previous stage's last part: stop here
                raise preempt.Preempted(f"before stage {stage.name} (every earlier stage finished)")
            log0(f"stage {stage.name} ({stage.kind}): {'resume' if action == 'resume' else 'start'}")
            start_s = time.perf_counter()
            if action == "run":  # before any work, so a resume is checked against it too (rank 0 writes it)
                on_main(functools.partial(write_record, cfg, stage, stage_dir))
            _seed_everything(cfg.run.seed + index)  # per stage, so skipping earlier stages changes nothing
            run_stage(stage, StageContext(cfg.run, model, dist_info, out_dir, stage_dir))
            barrier()
            tracking.flush()
            elapsed_s = time.perf_counter() - start_s
            done = {"stage": stage.name, "kind": stage.kind, "elapsed_s": round(elapsed_s, 2),
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            on_main(functools.partial(atomic.write_text, stage_dir / DONE_MARKER, json.dumps(done) + "\n"))
            log0(f"stage {stage.name} ({stage.kind}): done in {elapsed_s:.1f} s -> {stage_dir}")
        log0(f"all stages done: {out_dir}")
        return 0
    except RerunError as e:  # the recipe asks a finished stage for other settings: nothing ran
        if dist_info.is_main:  # every rank has the same message
            logger.error(f"error: {e}")
        return 2
    except preempt.Preempted as e:
        if dist_info.is_main:
            logger.warning(f"stopped by {signal.Signals(e.signum).name}: {e.where}. To resume, run the same command "
                           f"again: finished stages are skipped and this one continues from where it stopped")
        return 128 + e.signum
    except (ValueError, NonFiniteError, atomic.DiskFullError) as e:
        # Bad data, bad settings found at run time, or a diverged run: say what and where, keep what is written.
        # Anything else is a bug and keeps its traceback.
        logger.error(f"stage failed: {type(e).__name__}: {e}")
        logger.debug("traceback", exc_info=True)
        return 1
    finally:
        tracking.finish()
        preempt.uninstall()
        if lock is not None:
            lock.release()
        destroy_distributed()


def cli(argv: list[str] | None = None) -> None:
    """`main`, then the process exit that torchrun workers need (engine.dist.exit_process): the `specs-train` command
    and `python engine/train.py`."""
    exit_process(main(argv))


if __name__ == "__main__":
    cli()
