"""Whole-or-absent file writes (standard library only, so every layer can import it).

A reader sees the old file or the new one, never half of one: everything is written to a
temporary name in the same directory, then renamed over the target. With `fsync` the bytes
and the rename are on disk before the call returns (markers such as a checkpoint's COMPLETE
and `latest`, which must survive a crash).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any, Iterator


def tmp_name(path: str | os.PathLike) -> Path:
    """The temporary sibling a whole-or-absent write of `path` goes through: hidden, and
    unique per process, so concurrent writers never share one."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or creation inside directory `path` durable."""
    fsync_path(path)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a directory's) data and metadata to disk, whoever wrote it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = False) -> Iterator[IO[Any]]:
    """`with atomic_open(p) as f: torch.save(obj, f)`: the file appears under `path` only when
    the block ends without an error; on an error the temporary file is removed."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if fsync:
        fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> None:
    """Write `data` (bytes, or text as UTF-8) to `path` whole or not at all."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj: Any, *, fsync: bool = False) -> None:
    """`obj` as indented JSON with sorted keys (equal objects give equal bytes), atomically."""
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n", fsync=fsync)
