"""Content hashes: of files (weights, shards), of file sets, of a module's state.

One implementation of each, so an identity recorded by one stage (precompute's manifest,
a checkpoint's eval protocol) is recomputed the same way by every other.

Two kinds: sha256 names an identity (weights, latents: what made a number), and the fast
hash (xxh3-128, FAST_HASH) checks a checkpoint's files for damage (truncation, bit rot, a
failed copy). The fast one is not cryptographic: it catches accidents, not an attacker
who can write the checkpoint and its COMPLETE record (docs/checkpoints.md). It was
chosen by measurement (benchmarks/bench_ckpt_hash.py): on a 300M-parameter checkpoint
sha256 costs a large fraction of the save time, xxh3-128 a few percent.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_HASH_CACHE: dict[tuple[str, int, int, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 16 << 20, *, cache: bool = True) -> str:
    """Hex sha256 of a file's bytes, read in chunks (weights run to gigabytes).

    With `cache`, remembered per process by (real path, size, mtime, ctime, inode), so
    asking an encoder's identity repeatedly costs one read; a rewritten file gets a new key
    and is re-read. Pass cache=False to check what is on disk now (verification).
    """
    p = os.path.realpath(path)
    st = os.stat(p)
    key = (p, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if cache:
        with _HASH_LOCK:
            if key in _HASH_CACHE:
                return _HASH_CACHE[key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    digest = h.hexdigest()
    if cache:
        with _HASH_LOCK:
            _HASH_CACHE[key] = digest
    return digest


def sha256_files(paths: list[Path], root: Path) -> str:
    """One digest over several files (a sharded checkpoint): sha256 of "relpath digest" lines.
    A single file's digest is its own sha256."""
    lines = [f"{p.relative_to(root).as_posix()} {sha256_file(p)}" for p in sorted(paths)]
    return lines[0].split(" ", 1)[1] if len(lines) == 1 else hashlib.sha256("\n".join(lines).encode()).hexdigest()


FAST_HASH = "xxh3_128"  # the name recorded beside each fast digest (a checkpoint's COMPLETE)


def fast_hasher() -> Any:
    """A new incremental fast hash (`.update(bytes)`, `.hexdigest()`)."""
    import xxhash  # late: only checkpoint code needs it

    return xxhash.xxh3_128()


def fast_file_hash(path: str | os.PathLike, chunk_bytes: int = 8 << 20) -> str:
    """Hex fast hash of a file's bytes, read now (no cache: this checks what is on disk)."""
    h = fast_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


class HashingWriter:
    """A write-only file that hashes its bytes as they are written: `torch.save(obj,
    HashingWriter(path))` costs no second read. `close()` flushes and fsyncs, then `size`
    and `hexdigest()` describe exactly what is on disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._h = fast_hasher()
        self.size = 0

    def write(self, data: Any) -> int:
        self._h.update(data)
        n = self._f.write(data)
        self.size += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._f.close()


def state_dict_sha256(module: "torch.nn.Module") -> str:
    """sha256 over the names and raw bytes of a module's state (any dtype, bf16 included):
    the identity of weights that exist only in memory, such as a seeded random init."""
    import torch  # late: config and launch import this module and stay torch-free

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_sha256(obj: Any, length: int = 16, compact: bool = False) -> str:
    """Short hex digest of a JSON-able object, independent of key order. `compact` drops the
    spaces after separators (a different canonical form, kept for keys made with it)."""
    seps = (",", ":") if compact else None
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=seps).encode()).hexdigest()[:length]
