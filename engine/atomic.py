"""File writes that survive a crash or a full disk.

- Whole files (`write_text`, `write_bytes`, or `replacing` for any writer, e.g. torch.save): written to a temporary
  sibling, fsynced, then renamed over the target: a crash leaves the old file or none, never part of one.
- Append-only logs (`append_text`): a failed append is cut back to where it started; `read_jsonl` trims a last
  line that a crash cut short (saying so) and names the file and line of any other unreadable line.
- A full disk (ENOSPC, or a quota: EDQUOT) becomes `DiskFullError`: "disk full: N MiB needed under DIR (M MiB
  free)", with the temporary file removed, so nothing is left that blocks a rerun once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from engine.log import logger

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(RuntimeError):
    """No space left where a file was being written."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is ENOSPC/EDQUOT."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: Path) -> int:
    """Free space on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(path: Path, needed_bytes: int) -> DiskFullError:
    """The error for a write of `needed_bytes` under `path`'s folder that did not fit."""
    folder = Path(path).parent
    return DiskFullError(f"disk full: {_mib(needed_bytes)} MiB needed under {folder} "
                         f"({_mib(free_bytes(folder))} MiB free): free space there and rerun "
                         "(nothing half-written was left behind)")


def _mib(num_bytes: int) -> str:
    mib = num_bytes / 2**20
    return f"{mib:.1f}" if mib >= 0.1 or mib == 0 else f"{mib:.4f}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on a clean exit it is fsynced and renamed over `path`, on an
    exception removed. A full disk raises DiskFullError (`needed_bytes`: the size to report, else the size written
    before the disk filled)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) or (isinstance(e, RuntimeError) and _looks_full(path, written)):
            raise disk_full(path, needed_bytes or written) from e
        raise


def _looks_full(path: Path, written: int) -> bool:
    """torch.save's writer reports a short write as "unexpected pos", without errno: call it a full disk when the
    folder has (nearly) no space left once our partial file is gone."""
    return free_bytes(path.parent) < max(written, 1 << 20)


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path, len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def append_text(path: Path, text: str) -> None:
    """Append `text` durably; if the write fails the file is cut back to its old length (a full disk raises
    DiskFullError)."""
    path = Path(path)
    data = text.encode("utf-8")
    # Unbuffered: a buffered file would retry its unwritten tail on close, after we cut the file back.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if is_disk_full(e):
                raise disk_full(path, len(data)) from e
            raise
    finally:
        os.close(fd)


def read_jsonl(path: Path, repair: bool = True) -> list[dict]:
    """The objects of a JSON-lines file. A last line cut short (a crash or a full disk mid-append) is skipped with a
    warning, and trimmed from the file if `repair`; an unreadable line elsewhere raises ValueError naming the file
    and line."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    complete, last = lines[:-1], lines[-1]  # `last` is "" when the file ends with a newline
    rows = []
    for num, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if num == len(complete) and not last:
                last = line  # the final line, newline and all, is unreadable: a torn write too
                complete = complete[:-1]
                break
            raise ValueError(f"{path}: line {num} is not JSON ({e.msg}); the file is damaged: repair or delete it "
                             "(and the stage's checkpoints) and rerun") from None
    if last:
        logger.warning(f"{path}: {'trimming' if repair else 'skipping'} an incomplete last line ({len(last)} chars), "
                       "left by an interrupted write")
        if repair:
            write_text(path, "".join(line + "\n" for line in complete))
    return rows
