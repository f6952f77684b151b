"""Experiment tracking: every value of every stage's metrics.jsonl also goes to TensorBoard and/or Weights & Biases.

    [run]
    trackers = ["tensorboard"]          # the default; ["tensorboard", "wandb"], ["wandb"] or [] (none)

- tensorboard: event files in `<out_dir>/tensorboard/` (view: `tensorboard --logdir runs/tiny/tensorboard`), written
  with `torch.utils.tensorboard` when the `tensorboard` package is installed, else with `tensorboardX`; with neither,
  one line says how to get it and the run goes on.
- wandb: when the `wandb` package is installed. `run.wandb_mode = "auto"` logs online when an API key is configured
  (WANDB_API_KEY or `wandb login`) and offline otherwise (`wandb sync <dir>` uploads it later); never a prompt.
A value is logged as `<stage>/<key>` (`grpo_zero/rollout/reward`) at the stage's optimizer step. The eval stage adds
its scores (`eval/<benchmark>/<model>`, `eval/gf/<model>`; with `samples` also `eval/sampled/<benchmark>/<model>`,
`eval/sampled/gf/<model>` and `eval/pass_at_<k>/<benchmark>/<model>`), the report text and its plots. Only rank 0
tracks, and nothing is imported unless its tracker is on.
"""

from __future__ import annotations

import importlib.util
import netrc
from pathlib import Path

from engine.env import env
from engine.log import log0, warn_once

_active: list = []  # the open trackers of this process (rank 0 only)


class TensorBoard:
    def __init__(self, log_dir: Path):
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
        else:
            from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(str(log_dir))
        log0(f"tracking: TensorBoard event files in {log_dir} (view: tensorboard --logdir {log_dir})")

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    def image(self, tag: str, path: Path) -> None:
        import numpy as np
        from PIL import Image

        self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), 0, dataformats="HWC")

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, run, out_dir: Path, config_toml: str):
        import tomllib

        import wandb

        mode = run.wandb_mode if run.wandb_mode != "auto" else ("online" if _wandb_key_configured() else "offline")
        self.wandb = wandb
        self.run = wandb.init(project=run.wandb_project, name=run.name, dir=str(out_dir), mode=mode,
                              config=tomllib.loads(config_toml), resume="allow")
        how = "" if mode == "online" else f" (offline: upload later with `wandb sync {out_dir / 'wandb'}`)"
        log0(f"tracking: Weights & Biases project {run.wandb_project!r}, run {run.name!r}, {mode}{how}")

    def log(self, values: dict[str, float], step: int) -> None:
        # Each stage counts its own steps from 1: W&B's own step must only grow, so the stage step is a value.
        stage = next(iter(values)).split("/", 1)[0]
        self.run.log({**values, f"{stage}/step": step})

    def text(self, tag: str, text: str) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{text}</pre>")})

    def image(self, tag: str, path: Path) -> None:
        self.run.log({tag: self.wandb.Image(str(path))})

    def flush(self) -> None:
        pass  # wandb sends in the background

    def close(self) -> None:
        self.run.finish()


def _wandb_key_configured() -> bool:
    if env("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None  # what `wandb login` writes
    except (OSError, netrc.NetrcParseError):
        return False


_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def start(run, out_dir: Path, config_toml: str, is_main: bool) -> None:
    """Open the trackers `run.trackers` names (rank 0). A tracker whose package is missing is skipped with a line
    naming the pip command (a warning for wandb, which is never on by default); tracking never stops a run."""
    if not is_main:
        return
    for name in run.trackers:
        if not any(importlib.util.find_spec(p) for p in _PACKAGES[name]):
            note = (f"tracking: {name} is not installed (`pip install {_PACKAGES[name][0]}` turns it on; "
                    f"run.trackers = [] turns this note off); every value is in <stage>/metrics.jsonl")
            if name == "tensorboard":  # on by default: a note, not an alarm
                log0(note)
            else:
                warn_once(note)
            continue
        try:
            _active.append(TensorBoard(out_dir / "tensorboard") if name == "tensorboard"
                           else WandB(run, out_dir, config_toml))
        except Exception as e:  # a tracker's own failure (login, disk, version) must not cost the run
            warn_once(f"tracking: {name} could not start ({type(e).__name__}: {e}); the run goes on without it")


def log_metrics(stage: str, step: int, record: dict) -> None:
    """One metrics.jsonl record of `stage` at optimizer `step`: numbers only, each as `<stage>/<key>`."""
    if not _active:
        return
    values = {f"{stage}/{k}": float(v) for k, v in record.items()
              if k != "step" and isinstance(v, (int, float))}  # bool is an int: skipped steps count as 0/1
    for tracker in _active:
        tracker.log(values, step)


def eval_values(scores: dict) -> dict[str, float]:
    """scores.json (engine/report.py) as tracker values: greedy score (percent) per benchmark and model, GF per model;
    with samples, the sampled accuracy (percent), its GF and pass@k (percent) likewise."""
    values = {}
    for model, r in scores["models"].items():
        for bench, b in r["benchmarks"].items():
            values[f"eval/{bench}/{model}"] = b["score"]
            if "sampled" in b:
                values[f"eval/sampled/{bench}/{model}"] = b["sampled"]["score"]
                for k, v in b["sampled"]["pass_at_k"].items():  # not "pass@k": TensorBoard turns '@' into '_'
                    values[f"eval/pass_at_{k}/{bench}/{model}"] = v
        if r.get("gf") is not None:
            values[f"eval/gf/{model}"] = r["gf"]
        if r.get("sampled", {}).get("gf") is not None:
            values[f"eval/sampled/gf/{model}"] = r["sampled"]["gf"]
    return values


def log_eval(scores: dict, report: Path) -> None:
    """The eval stage's scores (`eval_values`), its report text and its plots."""
    if not _active:
        return
    values = eval_values(scores)
    for tracker in _active:
        tracker.log(values, 0)
        tracker.text("eval/report", report.read_text())
        for png in sorted(report.parent.glob("*.png")):
            tracker.image(f"eval/{png.stem}", png)
        tracker.flush()


def flush() -> None:
    for tracker in _active:
        tracker.flush()


def finish() -> None:
    """Close every tracker (in `finally`: a failed run keeps what it logged)."""
    while _active:
        _active.pop().close()
