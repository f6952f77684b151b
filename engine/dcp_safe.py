"""Loading torch.distributed.checkpoint (DCP) directories without running code from them.

DCP as shipped unpickles a checkpoint's `.metadata` with plain `pickle.load` and its non-tensor items (optimizer
hyperparameters) with `torch.load(weights_only=False)`: a crafted checkpoint directory runs arbitrary code on
load. `SafeReader` reads `.metadata` with an unpickler that builds only DCP's own metadata records, torch dtypes,
layouts, sizes and paths; `SafeLoadPlanner` loads the non-tensor items with `torch.load(weights_only=True)`
(they are floats, tuples, bools and lists of ints). Tensors DCP already loads with `weights_only=True`.

Use both for every `dcp.load`: `dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner())`.
"""

import dataclasses
import enum
import io
import pathlib
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.planner import ReadItem

_RECORD_MODULES = {dcp_metadata.__name__: dcp_metadata, dcp_filesystem.__name__: dcp_filesystem}
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
_PATHS = {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what a DCP `.metadata` holds; any other global is refused before it is imported or called."""

    def find_class(self, module: str, name: str):
        if module in _RECORD_MODULES:
            obj = getattr(_RECORD_MODULES[module], name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, _TORCH_VALUES):
                return obj
        elif module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout  # maps a layout's name to torch's own layout object
        elif module in ("pathlib", "pathlib._local") and name in _PATHS:  # pathlib._local: Python 3.13's module
            return getattr(pathlib, name)
        elif module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: not part of a DCP checkpoint's metadata")


def read_metadata(file: Path) -> dcp_metadata.Metadata:
    """DCP metadata file `file` (a checkpoint's `.metadata`), unpickled safely: pickle.UnpicklingError for any
    other content."""
    with open(file, "rb") as f:
        metadata = _MetadataUnpickler(f).load()
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f"holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with `.metadata` unpickled by `read_metadata` instead of plain pickle."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        metadata = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with non-tensor items loaded by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def missing_data(path: Path, metadata: dcp_metadata.Metadata) -> str:
    """'' when every data file `metadata` points into exists and is long enough; else the first shortfall (a
    truncated or missing shard), named."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = Path(path) / name
        if not file.is_file():
            return f"{file.name} is missing"
        if (size := file.stat().st_size) < end:
            return f"{file.name} is truncated ({size:,} bytes, the metadata says at least {end:,})"
    return ""
