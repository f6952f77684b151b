"""Resumable checkpoints (torch.distributed.checkpoint) and the Hugging Face export at the end of a stage.

Layout of one stage:
    <stage>/checkpoints/step-000020/   DCP shards of model + optimizer, trainer.json (step, scheduler, data
                                       position, counters), rng-rank<r>.pt (every RNG of every rank)
    <stage>/hf/                        safetensors + config + tokenizer + image processor (from_pretrained loads it)

Both are written under a temporary name and renamed when complete, so a crash never leaves a directory that
looks finished; `latest()` ignores the temporaries.
"""

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from engine import atomic, dcp_safe
from engine.dist import DistInfo, barrier, gather_object, on_main
from engine.log import log0, logger
from engine.sections import CheckpointConfig

TRAINER_FILE = "trainer.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Files of a checkpoint directory that are not weights: tokenizer, chat template, image processor, generation.
_SIDE_FILES = re.compile(r"^(tokenizer.*|vocab\.json|merges\.txt|special_tokens_map\.json|added_tokens\.json|"
                         r"chat_template\.(json|jinja)|preprocessor_config\.json|video_preprocessor_config\.json|"
                         r"generation_config\.json|processor_config\.json)$")
_SHARD_BYTES = 4 * 2**30
SINGLE_WEIGHTS = "model.safetensors"


class CheckpointDamagedError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the directory, the file and the reason."""


def rng_state() -> dict:
    """Every RNG of this process as tensors and plain Python values (loadable with `weights_only=True`)."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = ("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["gauss"])
    np.random.set_state(numpy_state)  # else the tuple numpy gives, as checkpoints written before held it
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng_file(file: Path) -> dict:
    """An `rng-rank<r>.pt` file, loaded with `weights_only=True`. Numpy's array type is allowed besides tensors
    so that files written before the RNG state was stored as tensors still load; nothing else that could run
    code is (pickle.UnpicklingError)."""
    np_core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core (setup.py allows >= 1.26)
    numpy_arrays = [np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(numpy_arrays):
        state = torch.load(file, weights_only=True)
    if not isinstance(state, dict) or not {"torch", "python", "numpy"} <= state.keys():
        raise ValueError(f"holds {type(state).__name__} without the torch/python/numpy RNG states")
    return state


class Checkpointer:
    def __init__(self, ckpt_dir: Path, cfg: CheckpointConfig, dist_info: DistInfo):
        self.dir = Path(ckpt_dir)
        self.cfg = cfg
        self.dist = dist_info

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name)))

    def path(self, step: int) -> Path:
        return self.dir / f"step-{step:06d}"

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict) -> Path | None:
        """Collective: every rank writes its shards and RNG; rank 0 renames the directory when all are done. A
        failed write on any rank (a full disk: DiskFullError) removes the partial directory and raises the same
        error on every rank. Nothing is saved (None) while `trainer_state["bad_in_a_row"]` > 0: the step was
        skipped as non-finite, and its checkpoint would push the last good one out of `keep`."""
        if trainer_state.get("bad_in_a_row", 0) > 0:
            last = self.steps()
            log0(f"checkpoint: step {step} not saved: its update was skipped as non-finite; the last good checkpoint "
                 f"stays {self.path(last[-1]) if last else 'none'}")
            return None
        final, tmp = self.path(step), self.dir / f"step-{step:06d}.tmp"

        def fresh_tmp() -> None:  # rank 0; an error (a full disk) stops every rank with its message
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash during an earlier save
            tmp.mkdir(parents=True)

        on_main(fresh_tmp)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        failed: BaseException | None = None
        try:
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
            torch.save(rng_state(), tmp / f"rng-rank{self.dist.rank}.pt")
            if self.dist.is_main:
                (tmp / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=1))
        except (Exception, CheckpointException) as e:  # every rank reports below: none is left in a collective
            failed = e
        failure = f"rank {self.dist.rank}: {type(failed).__name__}: {failed}" if failed else ""
        outcomes = gather_object((failure, _state_bytes(model_sd) + _state_bytes(optim_sd)))
        if any(f for f, _ in outcomes):
            self._fail(tmp, [f for f, _ in outcomes if f], sum(n for _, n in outcomes), failed)

        def publish() -> None:  # rank 0, once every rank's part is written
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.steps()[: -self.cfg.keep]:
                shutil.rmtree(self.path(old), ignore_errors=True)

        on_main(publish)
        log0(f"checkpoint: saved step {step} to {final}")
        return final

    def _fail(self, tmp: Path, failures: list[str], needed_bytes: int, own: BaseException | None) -> None:
        """Remove the partial checkpoint; raise DiskFullError if the disk is (nearly) full, else the failure."""
        barrier()
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if atomic.free_bytes(self.dir) < needed_bytes or (own is not None and atomic.is_disk_full(own)):
            raise atomic.disk_full(tmp, needed_bytes) from own
        raise RuntimeError(f"checkpoint save to {tmp} failed: " + "; ".join(failures)) from own

    def problem(self, step: int, keys: tuple[str, ...] = ("step",)) -> str:
        """'' when checkpoint `step` looks complete, else what is wrong with it, naming the file: trainer.json must
        be a JSON object with `keys` (and this step), `.metadata` must unpickle safely, and every shard it points
        into must exist and be long enough. Reads files only, no tensors."""
        path = self.path(step)
        try:
            state = json.loads((path / TRAINER_FILE).read_text())
        except FileNotFoundError:
            return f"{TRAINER_FILE} is missing"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{TRAINER_FILE} is unreadable ({type(e).__name__}: {e})"
        if not isinstance(state, dict) or (missing := [k for k in keys if k not in state]):
            return f"{TRAINER_FILE} lacks {missing if isinstance(state, dict) else list(keys)}"
        if "step" in state and state["step"] != step:
            return f"{TRAINER_FILE} says step {state['step']}, the directory step {step}"
        try:
            metadata = dcp_safe.read_metadata(path / ".metadata")
        except FileNotFoundError:
            return ".metadata is missing"
        except Exception as e:  # a truncated or hostile pickle raises anything from EOFError to UnpicklingError
            return f".metadata is unreadable ({type(e).__name__}: {e})"
        return dcp_safe.missing_data(path, metadata)

    def load(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             keys: tuple[str, ...] = ("step",)) -> dict:
        """Restore model, optimizer and this rank's RNG from `step` (collective); returns the trainer state saved
        with it. Raises CheckpointDamagedError, on every rank alike, when the checkpoint is incomplete or unreadable
        (see `problem`); nothing is unpickled with code execution (engine/dcp_safe.py, `load_rng_file`)."""
        path = self.path(step)
        if not path.is_dir():
            raise ValueError(f"checkpoint step {step}: {path} does not exist (found: {self.steps() or 'none'})")
        problem = self.problem(step, keys) if self.dist.is_main else ""
        rng, rng_problem = _read_rng(path / f"rng-rank{self.dist.rank}.pt")
        problems = [p for p in gather_object(problem or rng_problem) if p]
        if problems:
            raise CheckpointDamagedError(f"{path}: {'; '.join(dict.fromkeys(problems))}")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:  # a read failure on any rank raises CheckpointException on every rank (DCP gathers them)
            dcp.load(state, storage_reader=dcp_safe.SafeReader(path), planner=dcp_safe.SafeLoadPlanner())
        except (Exception, CheckpointException) as e:
            why = f"{type(e).__name__}: {_first_line(e)}"
            raise CheckpointDamagedError(f"{path}: its shards do not load ({why})") from e
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if rng is not None:
            set_rng_state(rng)
        else:  # resumed with a different world size: the data order is still exact, sampling RNG is not
            log0(f"checkpoint: rng-rank{self.dist.rank}.pt missing (world size changed?); RNG not restored")
        return json.loads((path / TRAINER_FILE).read_text())

    def load_latest(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    keys: tuple[str, ...] = ("step",)) -> dict | None:
        """Restore the newest usable checkpoint (collective); returns its trainer state, or None when there is no
        checkpoint at all. A damaged one is reported (file and reason) and the next older one is tried; once one
        loads, the damaged newer ones are moved aside to `step-N.damaged` (kept for inspection, out of `steps()`).
        If none loads, CheckpointDamagedError lists every one tried and all stay where they are."""
        tried, damaged = [], []
        for step in reversed(self.steps()):
            try:
                state = self.load(step, model, optimizer, keys)
            except CheckpointDamagedError as e:  # the same on every rank: load() gathers the ranks' problems
                tried.append(str(e))
                damaged.append(step)
                self._warn(f"checkpoint: cannot resume from {e}; trying the one before")
                continue
            for bad in damaged:
                self._set_aside(bad)
            if damaged:
                self._warn(f"checkpoint: resuming from the older step {step} ({self.path(step)}) because the newer "
                           f"checkpoint(s) are damaged; moved aside to step-*.damaged: {damaged}")
            return state
        if tried:
            raise CheckpointDamagedError(
                f"no usable checkpoint in {self.dir}; tried (newest first):\n  " + "\n  ".join(tried)
                + f"\nTo start the stage over, move {self.dir.parent} aside.")
        return None

    def _warn(self, msg: str) -> None:
        if self.dist.is_main:  # every rank has the same message
            logger.warning(msg)

    def _set_aside(self, step: int) -> None:
        """Rename a damaged checkpoint out of `steps()` without deleting it (rank 0; every rank waits)."""
        barrier()

        def rename() -> None:
            dest, i = self.dir / f"step-{step:06d}.damaged", 2
            while dest.exists():
                dest, i = self.dir / f"step-{step:06d}.damaged-{i}", i + 1
            self.path(step).rename(dest)

        on_main(rename)


def _read_rng(file: Path) -> tuple[dict | None, str]:
    """(state, '') from an RNG file; (None, '') when it is missing; (None, why) when it exists but does not load."""
    if not file.is_file():
        return None, ""
    try:
        return load_rng_file(file), ""
    except Exception as e:  # an unreadable or refused file: the checkpoint is damaged
        return None, f"{file.name} does not load ({type(e).__name__}: {_first_line(e)})"


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:limit]


def _state_bytes(state: dict) -> int:
    """Bytes of this rank's tensors in a (nested) state dict: its share of a checkpoint's size."""
    total = 0
    for value in state.values():
        if isinstance(value, dict):
            total += _state_bytes(value)
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()
    return total


def export_hf(model: nn.Module, hf_model: nn.Module, src_dir: Path, out_dir: Path, dist_info: DistInfo,
              prefix: str = "hf.", max_shard_bytes: int = _SHARD_BYTES) -> None:
    """Write a Hugging Face directory of `model`'s full weights that `from_pretrained` and vLLM load (collective).

    Streams: one tensor at a time is cast to the export dtype on its rank's shard, all-gathered, and (on rank 0)
    added to the current safetensors file, which is written once complete (`max_shard_bytes`, 4 GiB by default,
    with the index file when there are several); rank 0 holds at most one
    shard plus one tensor, never the model. Tokenizer, chat template and processor files are copied from
    `src_dir`, the checkpoint the stage started from. Written under a .tmp name and renamed when complete.
    """
    out_dir = Path(out_dir)
    sd = {k.removeprefix(prefix): v for k, v in model.state_dict().items()}  # this rank's shards: no gather yet
    if getattr(hf_model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied to the input embeddings; safetensors rejects shared storage
    dtype = _export_dtype(src_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")

    def fresh_tmp() -> None:  # rank 0; an error stops every rank with its message
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    on_main(fresh_tmp)

    def fetch(name: str) -> torch.Tensor | None:
        # Cast before gathering (half the traffic for bf16); every rank gathers every tensor in the same order.
        t = sd[name].detach().to(dtype)
        t = t.full_tensor() if isinstance(t, DTensor) else t
        return t.cpu().contiguous() if dist_info.is_main else None

    # Rank 0 writes while every rank gathers: a write error (a full disk) is raised on every rank at the end.
    failure = _write_shards({k: v.numel() * dtype.itemsize for k, v in sd.items()}, fetch, tmp,
                            write=dist_info.is_main, max_bytes=max_shard_bytes, keep_going=True)

    def finish() -> None:
        if failure is not None:
            raise failure
        _finish_hf_dir(tmp, hf_model, src_dir, out_dir)
        log0(f"export: {len(sd)} tensors ({dtype}) to {out_dir}")

    on_main(finish)


def _write_hf_dir(full_sd: dict, hf_model: nn.Module, src_dir: Path, out_dir: Path,
                  prefix: str) -> tuple[int, torch.dtype]:
    """Write `full_sd` (full tensors, names with `prefix`) as a Hugging Face directory in `src_dir`'s dtype,
    atomically (a .tmp sibling, then rename); one process, no collectives."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k.removeprefix(prefix): v for k, v in full_sd.items()}
    if getattr(hf_model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    dtype = _export_dtype(src_dir)
    _write_shards({k: v.numel() * dtype.itemsize for k, v in sd.items()},
                  lambda k: sd[k].to(dtype).contiguous(), tmp, write=True)
    _finish_hf_dir(tmp, hf_model, src_dir, out_dir)
    return len(sd), dtype


def _finish_hf_dir(tmp: Path, hf_model: nn.Module, src_dir: Path, out_dir: Path) -> None:
    """Add the config and `src_dir`'s tokenizer/processor/chat-template files to `tmp`, then rename it to
    `out_dir` (replacing an older export)."""
    hf_model.config.save_pretrained(tmp)
    # The config records the dtype the model was built in (fp32 masters); record the one written instead, which the
    # next stage's export and `dtype="auto"` loads read.
    config_file = tmp / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(_export_dtype(src_dir)).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in Path(src_dir).iterdir():
        if f.is_file() and _SIDE_FILES.match(f.name):
            shutil.copy2(f, tmp / f.name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def _export_dtype(src_dir: Path) -> torch.dtype:
    """Export in the dtype the source checkpoint was stored in (bf16 for released Qwen models, fp32 for the toy)."""
    config = json.loads((Path(src_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def shard_groups(sizes: dict[str, int], max_bytes: int = _SHARD_BYTES) -> list[list[str]]:
    """Tensor names in safetensors files of at most `max_bytes` (a larger tensor gets a file of its own), in order."""
    shards, current, size = [], [], 0
    for name, nbytes in sizes.items():
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    return shards


def _write_shards(sizes: dict[str, int], fetch, out_dir: Path, *, write: bool,
                  max_bytes: int = _SHARD_BYTES, keep_going: bool = False) -> Exception | None:
    """Write the tensors `fetch(name)` returns as safetensors files of at most ~`max_bytes`, with the index file
    transformers expects when there are several. The file layout is planned from `sizes` first, so each file is
    written (and freed) as soon as its tensors are fetched. `fetch` runs for every name on every caller (it may be
    a collective); only with `write` are files written. A write error is raised, or with `keep_going` returned
    after every tensor was fetched (so the other ranks are not left in a collective)."""
    groups = shard_groups(sizes, max_bytes)
    weight_map, failure = {}, None
    for i, names in enumerate(groups):
        file = SINGLE_WEIGHTS if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {name: fetch(name) for name in names}
        if write and failure is None:
            try:
                save_file(shard, out_dir / file, metadata={"format": "pt"})
            except Exception as e:  # e.g. a full disk: stop writing, keep fetching
                if not keep_going:
                    raise
                failure = e
        weight_map.update(dict.fromkeys(names, file))
        del shard
    if write and failure is None and len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return failure


def checkpoint_to_hf(ckpt: Path, stage_hf: Path, out_dir: Path, prefix: str = "hf.") -> Path:
    """A Hugging Face directory of the model weights in training checkpoint `ckpt` (one process, no collectives).

    `stage_hf` is the stage's exported model: it gives the architecture, the dtype to write and the tokenizer and
    image-processor files. The optimizer state in the checkpoint is not read.
    """
    from engine.model import Policy, load_hf_model

    hf_model = load_hf_model(stage_hf, attn_implementation="sdpa")
    policy = Policy(hf_model)
    state = {"model": get_model_state_dict(policy)}
    dcp.load(state, storage_reader=dcp_safe.SafeReader(ckpt), planner=dcp_safe.SafeLoadPlanner(), no_dist=True)
    _write_hf_dir(state["model"], hf_model, stage_hf, out_dir, prefix)
    return out_dir
