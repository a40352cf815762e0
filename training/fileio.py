"""Whole-or-absent file writes (standard library only, so every package can import it)."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never half of
    one: write a temporary name in the same directory, then os.replace. With `fsync` the
    bytes and the rename are on disk before this returns (for markers such as a
    checkpoint's COMPLETE and `latest`, which must survive a crash)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
