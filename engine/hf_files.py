"""The safetensors files of a Hugging Face checkpoint directory: index, name mapping, checks, and slice reads.

Each rank reads only the rows of its own FSDP2 shards, straight from the memory-mapped files, and casts them slice
by slice (a bf16 checkpoint becomes fp32 master shards without a full bf16 or fp32 copy of the model in memory).
Why safetensors slicing rather than torch.distributed.checkpoint's Hugging Face reader: FSDP2 shards dim 0 into
contiguous row ranges, which `safe_open(...).get_slice(name)[start:end]` reads directly with no planner, no
resharding metadata and no extra dependency; the checkpoint's tensor names (which differ from the model's, see
`checkpoint_names`) and the dtype cast stay in one small, testable place.

Every check runs on every rank from the file headers alone, before any collective, so a bad checkpoint stops all
ranks with the same message and none is left waiting.
"""

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Shard

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_LISTED = 8  # problems listed in one error message


class CheckpointFiles:
    """The tensors of checkpoint directory `path`: name -> (file, shape, dtype), read from the headers only.

    Raises:
        ValueError: no weights file, an index naming a missing file, or an index entry its file lacks.
    """

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise ValueError(f"checkpoint {self.dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found; expected a "
                             "Hugging Face directory written by save_pretrained (safetensors weights)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        missing = [f for f in files if not (self.dir / f).is_file()]
        if missing:
            names = [k for k, f in weight_map.items() if f == missing[0]]
            raise ValueError(f"checkpoint {self.dir}: {INDEX_FILE} names {len(missing)} missing file(s) {missing}; "
                             f"{missing[0]} should hold {len(names)} tensor(s) such as {names[0]!r}. Copy the "
                             "whole directory again")
        self.tensors: dict[str, tuple[str, tuple[int, ...], str]] = {}
        for f in files:
            with safe_open(self.dir / f, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sl = handle.get_slice(name)
                    self.tensors[name] = (f, tuple(sl.get_shape()), sl.get_dtype())
        if weight_map:
            absent = [(k, f) for k, f in weight_map.items() if k not in self.tensors]
            if absent:
                raise ValueError(f"checkpoint {self.dir}: {len(absent)} tensor(s) listed in {INDEX_FILE} are not in "
                                 f"their file, e.g. {absent[0][0]!r} in {absent[0][1]}: the file is truncated or "
                                 "from another checkpoint")

    def total_bytes(self) -> int:
        """Bytes of all tensors as stored."""
        sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1, "I8": 1}
        return sum(_numel(shape) * sizes.get(dtype, 4) for _, shape, dtype in self.tensors.values())


def checkpoint_names(model_name: str) -> list[str]:
    """Names a model tensor may have in a checkpoint, preferred first.

    Qwen2.5-VL checkpoints (the released ones, and what transformers' save_pretrained writes) keep the pre-5.0
    layout: `model.layers.*` for `model.language_model.layers.*` and `visual.*` for `model.visual.*`.
    """
    names = [model_name]
    if model_name.startswith("model.language_model."):
        names.append("model." + model_name.removeprefix("model.language_model."))
    elif model_name.startswith("model.visual."):
        names.append(model_name.removeprefix("model."))
    return names


def model_tensors(model: nn.Module) -> dict[str, list[str]]:
    """The tensors a checkpoint must provide: first name -> every name of the same tensor (tied weights share one
    parameter, e.g. lm_head.weight and the input embeddings). Parameters and persistent buffers."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    out = {names[0]: names for names in aliases.values()}
    persistent = set(model.state_dict().keys())
    for name, _ in model.named_buffers():
        if name in persistent:
            out[name] = [name]
    return out


def match_tensors(files: CheckpointFiles, model: nn.Module) -> dict[str, str]:
    """Model tensor name -> checkpoint tensor name, for every parameter and persistent buffer of `model`.

    Raises:
        ValueError: listing every model tensor the checkpoint lacks and every shape mismatch (file, tensor, shapes).
    """
    params = dict(model.named_parameters())
    params.update(model.named_buffers())
    found, problems = {}, []
    for name, aliases in model_tensors(model).items():
        candidates = [c for a in aliases for c in checkpoint_names(a)]
        hit = next((c for c in candidates if c in files.tensors), None)
        if hit is None:
            problems.append(f"{name}: missing (looked for {', '.join(candidates)})")
            continue
        file, shape, _ = files.tensors[hit]
        expected = tuple(params[name].shape)
        if shape != expected:
            problems.append(f"{hit} in {file}: shape {list(shape)}, the model (config.json) expects {list(expected)}")
            continue
        found[name] = hit
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(f"checkpoint {files.dir} does not match its config.json: {len(problems)} problem(s)\n  "
                         + "\n  ".join(problems[:_MAX_LISTED]) + more)
    return found


def unused_tensors(files: CheckpointFiles, found: dict[str, str], model: nn.Module) -> list[str]:
    """Checkpoint tensors the model does not read (a tied lm_head stored anyway is not counted)."""
    used = set(found.values())
    tied_names = {c for aliases in model_tensors(model).values() if len(aliases) > 1 for a in aliases
                  for c in checkpoint_names(a)}
    return sorted(k for k in files.tensors if k not in used and k not in tied_names)


def shard_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(local tensor, first global row) of a parameter: an FSDP2 DTensor sharded on dim 0, or a plain tensor."""
    if not isinstance(tensor, DTensor):
        return tensor.data, 0
    assert tensor.placements == (Shard(0),), f"expected FSDP2's Shard(0) placement, got {tensor.placements}"
    local = tensor.to_local()
    mesh = tensor.device_mesh
    # FSDP2 splits dim 0 like torch.chunk: ceil(rows / world) rows per rank, the last ranks get fewer or none.
    rows, world, rank = tensor.shape[0], mesh.size(), mesh.get_local_rank()
    per_rank = -(-rows // world)
    start = min(rows, rank * per_rank)
    assert local.shape[0] == min(rows, start + per_rank) - start, (tensor.shape, local.shape, rank, world)
    return local, start


@torch.no_grad()
def load_into(files: CheckpointFiles, model: nn.Module, found: dict[str, str]) -> int:
    """Copy each tensor's local rows from the checkpoint into `model` (materialised, possibly FSDP2-sharded),
    casting slice by slice to the parameter's dtype. Returns the bytes read on this rank."""
    targets = dict(model.named_parameters())
    targets.update(model.named_buffers())
    num_bytes = 0
    with ExitStack() as stack:
        handles = {}
        for name, ckpt_name in found.items():
            file = files.tensors[ckpt_name][0]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(files.dir / file, framework="pt"))
            local, start = shard_rows(targets[name])
            if local.numel() == 0:
                continue
            if local.dim():
                part = handles[file].get_slice(ckpt_name)[start:start + local.shape[0]]
            else:
                part = handles[file].get_tensor(ckpt_name)
            local.copy_(part.view(local.shape))  # copy_ casts (bf16 -> fp32 is exact) and moves to the device
            num_bytes += part.numel() * part.element_size()
            del part
    return num_bytes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
