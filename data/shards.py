"""Naming shards: expand a shard spec into URLs, split them over a job array, open one.

A spec is any mix of:
    shards/{00000..01023}.tar     brace notation (the `braceexpand` package)
    dir/*.tar, dir/**/*.tar       globs, sorted by name
    @urls, urls.txt, urls.list    list files: one entry per line (itself any of these),
                                  blank lines and `#` lines ignored, relative paths
                                  resolved against the list file's folder
    pipe:CMD, http(s)://, s3://,  remote URLs: brace-expanded, otherwise passed through
    gs://, ...                    untouched (their existence is checked when read)
A string spec may hold several, separated by commas or whitespace outside braces, or by
`::` (WebDataset's separator); a `pipe:` spec is one command, so it is split only at `::`.
Local paths must exist: a pattern that matches nothing is a ValueError naming it.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO, Sequence

# Schemes webdataset.gopen opens (plus s3, which we read through the AWS CLI).
REMOTE_SCHEMES: tuple[str, ...] = ("pipe", "http", "https", "s3", "gs", "ais", "sftp", "ftps", "scp",
                                   "htgs", "hf")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_LIST_SUFFIXES = (".txt", ".list")
_TAR_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tgz", ".tar")
_MAX_LIST_DEPTH = 8  # list files may name list files; this bounds cycles


def _scheme(url: str) -> str:
    m = _SCHEME_RE.match(url)
    return m.group(1).lower() if m else ""


def is_remote(url: str) -> bool:
    """True for URLs that are opened through a scheme (pipe:, http://, s3://, ...)."""
    return _scheme(url) in REMOTE_SCHEMES


def _local_path(item: str) -> str:
    """`file:` URLs become paths; other schemes with `://` are an error (unknown scheme)."""
    scheme = _scheme(item)
    if scheme == "file":
        return re.sub(r"^file:(//)?", "", item)
    if scheme and item[len(scheme) + 1:].startswith("//"):
        raise ValueError(f"{item}: unsupported URL scheme {scheme!r} "
                         f"(known: file, {', '.join(REMOTE_SCHEMES)})")
    return item


def _split_top_level(text: str) -> list[str]:
    """Split at commas and whitespace that are not inside braces."""
    parts, cur, depth = [], [], 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if depth == 0 and (ch == "," or ch.isspace()):
            if cur:
                parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return parts


def _braces(pattern: str) -> list[str]:
    import braceexpand

    try:
        return list(braceexpand.braceexpand(pattern))
    except Exception as e:  # e.g. unbalanced braces; braceexpand's own errors vary
        raise ValueError(f"{pattern}: bad brace pattern: {e}") from None


def _is_list_file(item: str) -> bool:
    return item.startswith("@") or item.lower().endswith(_LIST_SUFFIXES)


def _read_list(item: str, base: Path | None, depth: int) -> list[str]:
    path = Path(item[1:] if item.startswith("@") else item)
    if base is not None and not path.is_absolute():
        path = base / path
    if depth >= _MAX_LIST_DEPTH:
        raise ValueError(f"{path}: list files nested more than {_MAX_LIST_DEPTH} deep (a cycle?)")
    if not path.is_file():
        raise ValueError(f"{path}: shard list file not found")
    out: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out += _expand_item(line, path.parent, depth + 1)
    if not out:
        raise ValueError(f"{path}: shard list file names no shards")
    return out


def _expand_item(item: str, base: Path | None, depth: int) -> list[str]:
    """One entry (no separators left) -> URLs/paths, in order."""
    if is_remote(item):
        return _braces(item)
    if _is_list_file(item):
        return _read_list(item, base, depth)
    out: list[str] = []
    for pat in _braces(_local_path(item)):
        p = Path(pat)
        if base is not None and not p.is_absolute():
            pat = str(base / p)
        if glob.has_magic(pat):
            hits = sorted(h for h in glob.glob(pat, recursive=True) if os.path.isfile(h))
            if not hits:
                raise ValueError(f"{item}: no shards match {pat}")
            out += hits
        else:
            out.append(pat)
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{item}: {len(missing)} of {len(out)} shard paths do not exist (first: {missing[0]})")
    return out


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Every shard URL or path named by `spec`, in the order given (globs sorted).

    A sequence's items are taken whole (no comma/whitespace splitting, so paths with
    spaces work there). A shard named twice is a ValueError: it would be read twice.
    """
    if isinstance(spec, (str, os.PathLike)):
        items: list[str] = []
        for chunk in str(spec).split("::"):
            chunk = chunk.strip()
            items += [chunk] if chunk.startswith("pipe:") else _split_top_level(chunk)
    else:
        items = [str(s).strip() for s in spec]
    urls: list[str] = []
    for item in items:
        if item:
            urls += _expand_item(item, None, 0)
    if not urls:
        raise ValueError(f"{spec!r}: names no shards")
    seen: set[str] = set()
    for u in urls:
        key = u if is_remote(u) else os.path.abspath(u)
        if key in seen:
            raise ValueError(f"{u}: shard listed twice in {spec!r}")
        seen.add(key)
    return urls


def split_for_task(shards: list[str], task_index: int, num_tasks: int) -> list[str]:
    """Task `task_index`'s contiguous share of `shards` for a job array of `num_tasks`.

    Shares differ by at most one shard (the first len % num_tasks tasks get one more).
    With more tasks than shards, the last tasks get nothing.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks: must be >= 1, got {num_tasks}")
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task_index: must be in 0..{num_tasks - 1}, got {task_index}")
    base, extra = divmod(len(shards), num_tasks)
    start = task_index * base + min(task_index, extra)
    return list(shards[start:start + base + (task_index < extra)])


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def task_from_env() -> tuple[int, int]:
    """(task_index, num_tasks) of this SLURM array task; (0, 1) outside an array.

    Task ids are mapped to 0-based indices through SLURM_ARRAY_TASK_MIN and _STEP, so
    `--array=1-8` and `--array=0-30:10` work. Arrays with irregular ids (`--array=1,4,9`)
    cannot be mapped and raise.
    """
    task_id = _env_int("SLURM_ARRAY_TASK_ID")
    if task_id is None:
        return 0, 1
    lo = _env_int("SLURM_ARRAY_TASK_MIN")
    hi = _env_int("SLURM_ARRAY_TASK_MAX")
    step = _env_int("SLURM_ARRAY_TASK_STEP") or 1
    count = _env_int("SLURM_ARRAY_TASK_COUNT")
    lo = 0 if lo is None else lo
    if count is None:
        if hi is None:
            raise ValueError("SLURM_ARRAY_TASK_COUNT: not set (nor SLURM_ARRAY_TASK_MAX); cannot size the array")
        count = (hi - lo) // step + 1
    index, rem = divmod(task_id - lo, step)
    if rem or not 0 <= index < count:
        raise ValueError(f"SLURM_ARRAY_TASK_ID: {task_id} is not task 0..{count - 1} of an array from {lo} "
                         f"in steps of {step}; use a contiguous --array range")
    return index, count


def shard_name(url: str) -> str:
    """A short, stable name for a shard: its file name without the tar extension.

    `s3://b/x/00017.tar` -> `00017`. For a `pipe:` command, the last word that looks like
    a tar file names it; failing that, a hash of the command. Characters outside
    [A-Za-z0-9._-] become `_`, so the name is safe as a file name. Different folders can
    hold equal names: callers that write per-shard outputs must check for collisions.
    """
    target = url
    if url.startswith("pipe:"):
        words = [w.strip("'\"") for w in url[5:].split()]
        tars = [w for w in words if any(w.split("?")[0].lower().endswith(s) for s in _TAR_SUFFIXES)]
        if not tars:
            return "pipe-" + hashlib.sha1(url.encode()).hexdigest()[:12]
        target = tars[-1]
    target = target.split("?")[0].split("#")[0].rstrip("/")
    base = target.rsplit("/", 1)[-1]
    low = base.lower()
    for suffix in _TAR_SUFFIXES:
        if low.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    else:
        base = os.path.splitext(base)[0] or base
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)


class _ProcReader:
    """A subprocess's stdout (from webdataset's Pipe) that keeps every byte it read.

    webdataset's Pipe checks the exit status after each read and raises, discarding the
    bytes of that read; a shard whose download fails at the end would lose its last
    samples. Here the status is checked once, at close, and only when the output was
    read to its end; a reader that stops early kills the command instead of waiting.
    """

    def __init__(self, pipe: object) -> None:
        self.pipe = pipe
        self.stream = pipe.stream  # type: ignore[attr-defined]
        self.proc = pipe.proc  # type: ignore[attr-defined]
        self.eof = False
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        b = self.stream.read(n)
        if n != 0 and not b:
            self.eof = True
        return b

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stream.close()
        if not self.eof:
            self.proc.kill()
            self.proc.wait()
            return
        status = self.proc.wait()
        self.pipe.status = status  # so Pipe.__del__ does not wait again  # type: ignore[attr-defined]
        if status not in self.pipe.ignore_status:  # type: ignore[attr-defined]
            raise OSError(f"{self.proc.args!r} exited with status {status}")

    def __enter__(self) -> _ProcReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_shard(url: str) -> BinaryIO:
    """A readable binary stream for a local path or a URL webdataset's gopen supports.

    `s3://` goes through `aws s3 cp URL -` (webdataset has no s3 handler of its own).
    Commands (pipe:, and curl/gsutil behind http(s)://, gs://) report a failed exit
    status as an OSError from close(), once their output was read to the end.
    """
    scheme = _scheme(url)
    if scheme not in REMOTE_SCHEMES:
        return open(_local_path(url), "rb")
    from webdataset.gopen import Pipe, gopen

    if scheme == "s3":
        import shlex

        url = f"pipe:aws s3 cp {shlex.quote(url)} -"
    f = gopen(url, "rb")
    return _ProcReader(f) if isinstance(f, Pipe) else f  # type: ignore[return-value]
