"""Evaluate any models in one command, with the eval stage's code and report (engine/stages/eval.py).

    python -m engine.eval --model Qwen/Qwen2.5-VL-7B-Instruct --model runs/specs/specs/hf \\
        --benchmarks mathvista=data/benchmarks/mathvista,mmmu=data/benchmarks/mmmu [--out runs/eval]
    torchrun --nproc_per_node 8 -m engine.eval ...                  # several GPUs: each takes a share of a chunk

A model is a Hugging Face directory or a hub id (resolved like `model.path`); the first is the base the gains and
the GF are measured against (or `--base NAME`). A benchmark is `kind=DIR` with kind one of mathvista, mathverse,
mathvision, mmmu, megabench, toy, or `name:kind:group=DIR` to name it and set its group; by default MathVista,
MathVerse and MathVision are in-distribution and MMMU and MEGA-Bench out-of-distribution, as in the paper. Any eval
stage setting is a `--key=value` (`--max_new_tokens=2048`, `--judge.enabled=true`; engine/stages/config.py).
Sampled evaluation (the paper's pass@k analysis): `--samples K` responses a prompt besides the greedy one, drawn with
`--temperature` and `--top-p`, and pass@k for `--pass-k 1,8,64` (default: powers of 2 up to K, and K); the report
then adds each model's sampled accuracy, sampled format and pass@k.
Output: `<out>/eval/` (report.md, scores.json, predictions/); a rerun resumes, and a rerun that would mix settings
or models stops, as engine/train.py does. Exit codes: 0 done, 1 failed, 2 bad arguments, 128 + N on signal N.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from engine.config import Config, ConfigError, ModelConfig, RunConfig, parse_stage
from engine.hub import is_hub_id, resolve_model_path
from engine.stage_record import HASH, RECORD, differing_keys, record_hash, record_text
from engine.stages import StageContext

GROUPS = {"mathvista": "id", "mathverse": "id", "mathvision": "id", "mmmu": "ood", "megabench": "ood", "toy": "none"}
NAMES = {"mathvista": "MathVista", "mathverse": "MathVerse", "mathvision": "MathVision", "mmmu": "MMMU",
         "megabench": "MEGA-Bench", "toy": "toy"}


@dataclasses.dataclass
class ExternalModels(StageContext):
    """A stage context whose models are named directories instead of the base model and earlier stages."""

    paths: dict[str, Path] = dataclasses.field(default_factory=dict)

    def model_dir(self, ref: str) -> Path:
        return self.paths[ref]


def model_names(models: list[str]) -> dict[str, str]:
    """A short, unique report name per model: the id's or directory's last part (`hf/` exports: the stage's)."""
    out: dict[str, str] = {}
    for m in models:
        p = Path(m.rstrip("/"))
        name = p.parent.name if p.name == "hf" and p.parent.name else p.name
        name = name.replace("@", "_") or "model"
        unique, i = name, 2
        while unique in out:
            unique, i = f"{name}-{i}", i + 1
        out[unique] = m
    return out


def parse_benchmarks(text: str) -> list[dict]:
    """`kind=DIR,...` or `name:kind:group=DIR,...` -> benchmark tables."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        spec, sep, path = item.partition("=")
        parts = spec.split(":")
        if not sep or not path or len(parts) not in (1, 3):
            raise ValueError(f"--benchmarks: {item!r} is not kind=DIR or name:kind:group=DIR")
        name, kind, group = (NAMES.get(parts[0], parts[0]), parts[0], None) if len(parts) == 1 else parts
        out.append({"name": name, "kind": kind, "path": path, "group": group or GROUPS.get(kind, "none")})
    return out


def _check_record(stage_dir: Path, text: str) -> None:
    """The settings and models of a rerun must be what `stage_dir` ran with (see engine/stage_record.py)."""
    record = stage_dir / RECORD
    if record.is_file() and (diff := differing_keys(record.read_text(), text, "eval")):
        out = stage_dir.parent
        raise ValueError(f"{stage_dir} was evaluated with other settings:\n    " + "\n    ".join(diff)
                         + f"\nWrite to a new directory (--out {out}-2), or move {stage_dir} away to start over")
    stage_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(text)
    (stage_dir / HASH).write_text(record_hash(text) + "\n")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Any other --key=value sets an eval stage setting.")
    parser.add_argument("--model", action="append", required=True, help="a model directory or hub id (repeat)")
    parser.add_argument("--benchmarks", required=True, help="kind=DIR,... or name:kind:group=DIR,...")
    parser.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    parser.add_argument("--base", default="", help="the base model's report name (default: the first --model)")
    # Sampled evaluation; unset keeps the eval stage's defaults (greedy only), so the stage record is unchanged.
    parser.add_argument("--samples", type=int, metavar="K", help="sampled responses a prompt besides the greedy "
                        "one (default 0: greedy only); the paper's pass@64 needs 64")
    parser.add_argument("--temperature", type=float, help="temperature of the sampled responses (default 1.0)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling of the sampled responses (default 1.0: off)")
    parser.add_argument("--pass-k", metavar="K,...", help="k of the pass@k columns, each in [1, K] (default: "
                        "1, 2, 4, ... up to K, and K)")
    return parser


def sampling_settings(args: argparse.Namespace) -> dict:
    """The eval stage's samples / temperature / top_p / pass_k from the command line, only those given."""
    out = {key: value for key, value in (("samples", args.samples), ("temperature", args.temperature),
                                         ("top_p", args.top_p)) if value is not None}
    if args.pass_k is not None:
        try:
            out["pass_k"] = [int(k) for k in args.pass_k.split(",") if k.strip()]
        except ValueError:
            raise ValueError(f"--pass-k: {args.pass_k!r} is not a comma-separated list of integers "
                             f"(e.g. 1,8,64)") from None
    sampling_only = [flag for flag, key in (("--temperature", "temperature"), ("--top-p", "top_p"),
                                            ("--pass-k", "pass_k")) if key in out]
    if sampling_only and not out.get("samples"):
        raise ValueError(f"{', '.join(sampling_only)} only apply to sampled responses: add --samples K (K >= 1)")
    return out


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parser().parse_known_args(argv)
    names = model_names(args.model)
    try:
        table = {"name": "eval", "kind": "eval", "models": list(names), "base": args.base,
                 "benchmarks": parse_benchmarks(args.benchmarks), **sampling_settings(args)}
        stage = parse_stage(table, overrides, source="engine.eval")
        missing = [m for m in args.model if not Path(m).is_dir() and not is_hub_id(m)]
        if missing:
            raise ValueError(f"--model: {missing} are neither directories nor Hugging Face ids (org/name)")
    except (ConfigError, ValueError) as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    return _run(stage, names, Path(args.out))


def _run(stage, names: dict[str, str], out: Path) -> int:
    from engine import preempt, tracking
    from engine.console import quiet_third_party
    from engine.dist import broadcast_object, destroy_distributed, init_distributed
    from engine.log import log0, logger, setup_logging
    from engine.stages.eval import run

    dist_info = init_distributed()
    setup_logging(dist_info.rank)
    quiet_third_party(dist_info.rank)
    preempt.install()
    cfg = Config(run=RunConfig(name="eval", out_dir=str(out)), model=ModelConfig(), stages=[stage])
    try:
        text = record_text(cfg, stage) + "\n[models]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in names.items())
        error = ""
        if dist_info.is_main:  # first, alone: it checks the record and downloads what is missing
            try:
                _check_record(out / "eval", text)
                for v in names.values():
                    resolve_model_path(v, f"--model {v}")
            except ValueError as e:
                error = str(e)
        error = broadcast_object(error)
        if error:
            if dist_info.is_main:  # every rank has the same message
                logger.error(f"error: {error}")
            return 2
        paths = {k: resolve_model_path(v) for k, v in names.items()}  # every rank, from the cache rank 0 filled
        log0("eval: models " + ", ".join(f"{k} = {v}" for k, v in paths.items()))
        ctx = ExternalModels(cfg.run, cfg.model, dist_info, out, out / "eval", paths=paths)
        tracking.start(cfg.run, out, text, dist_info.is_main)  # scores, report and plots, when installed
        run(stage, ctx)
        return 0
    except preempt.Preempted as e:
        if dist_info.is_main:
            logger.warning(f"stopped: {e.where}; run the same command again to continue")
        return 128 + e.signum
    except ValueError as e:
        logger.error(f"eval failed: {e}")
        return 1
    finally:
        tracking.finish()
        preempt.uninstall()
        destroy_distributed()


def cli(argv: list[str] | None = None) -> None:
    """`main`, then the process exit that torchrun workers need (engine.dist.exit_process): the `specs-eval` command
    and `python -m engine.eval`."""
    from engine.dist import exit_process

    exit_process(main(argv))


if __name__ == "__main__":
    cli()
