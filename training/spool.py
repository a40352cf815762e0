"""The tracking spool: every record a Tracker logs, on disk in the run directory before it
goes to MLflow, and what the store has acknowledged.

    RUN_DIR/tracking/
      spool-<start ms>-<host>-<pid>-<n>.jsonl    one per process (n: rotated segments); append-only
      spool-....jsonl.cursor                     bytes of it the store acknowledged (rewritten atomically)
      artifacts/<segment>-<seq>/<file>           artifacts copied here when logged, deleted once sent

A segment's first line is a header (the run key, the tracking URI, the experiment, the run
name, when the process started); then one JSON record per line, in the order the process
logged them: metric `m`, param `p`, tag `t`, artifact `a`, the process's standard tags
`job`, the MLflow run it opened `run`, the terminal status `end`. The owning process
appends each call's records in one write and flushes it (a killed process loses nothing
it logged); `sync()` fsyncs (at every checkpoint and at exit), so a node that loses power
loses at most what followed the last checkpoint, which the resumed job logs again.

Delivery is in order: the consumer (the Tracker's background thread) peeks the next unit
(one non-batch record, or a run of m/p/t records within MLflow's per-request limits),
sends it, then acks it: the cursor moves past it. A process that dies between the send and
the ack sends that one unit again next time: a repeat that MLflow's SQL stores absorb
(see training/tracking.py). A segment whose every record is acknowledged is deleted.

Ownership: each process holds an flock on its own segment. Another process (the resumed
job, `latentforge runs sync`) replays only segments it can lock, that is segments whose
process is gone, and only those of its own run key. Where the filesystem has no working
flock (some NFS/Lustre mounts), the lock attempt is treated as granted: replay then relies
on the requeued job starting after the old one ended, which SLURM guarantees.

Two spools share one interface: `DiskSpool` (above) and `MemorySpool`, a bounded deque for
trackers without a directory (a rank's no-op tracker, tests), which drops the oldest
metrics when full, as before there was a spool.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from latentforge.fileio import atomic_write, fsync_dir
from latentforge.log import get_logger

log = get_logger("tracking")

SPOOL_DIR = "tracking"  # RUN_DIR/tracking
SEGMENT_RE = re.compile(r"^spool-(\d{13})-(.+)-(\d+)-(\d{3})\.jsonl$")
FORMAT = 1
ROTATE_BYTES = 8 << 20  # a segment the store has fully acknowledged is replaced beyond this size
READ_BYTES = 2 << 20  # read-ahead of one peek (a unit is at most ~1000 records)
BATCH_KINDS = ("m", "p", "t")  # records that travel together in one log_batch


@dataclass(frozen=True)
class Limits:
    """MLflow's per-request limits for log_batch (mlflow/utils/validation.py)."""

    metrics: int = 1000
    params_tags: int = 100
    total: int = 1000


def encode(records: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, separators=(",", ":"), allow_nan=True).encode() + b"\n" for r in records)


def take_unit(records: Iterable[dict[str, Any]], limits: Limits) -> int:
    """How many of `records` (in order) form the next delivery unit: one record that is not
    a metric/param/tag, or the longest run of those within the limits, with no param or
    tag key twice (MLflow refuses a batch with a key twice)."""
    n = n_m = n_pt = 0
    keys: set[tuple[str, str]] = set()
    for r in records:
        kind = r.get("k")
        if kind not in BATCH_KINDS:
            return n or 1
        if kind == "m":
            if n_m + 1 > limits.metrics or n + 1 > limits.total:
                break
            n_m += 1
        else:
            key = (kind, r["n"])
            # Params and tags share the budget: a changed param goes out as a tag.
            if key in keys or n_pt + 1 > limits.params_tags or n + 1 > limits.total:
                break
            keys.add(key)
            n_pt += 1
        n += 1
    return n


# ---------------------------------------------------------------------------------------
# In memory.


class MemorySpool:
    """Records in a deque. Bounded: beyond `max_metrics` metric records (or `max_artifacts`
    artifacts) the oldest not in flight are dropped and counted."""

    durable = False

    def __init__(self, max_metrics: int, max_artifacts: int, limits: Limits = Limits()) -> None:
        self.max = {"m": max_metrics, "a": max_artifacts}
        self.limits = limits
        self._q: collections.deque[dict[str, Any]] = collections.deque()
        self._count = {"m": 0, "a": 0}
        self._unit = 0  # records at the front that are in flight
        self.dropped = {"m": 0, "a": 0}

    def append(self, records: list[dict[str, Any]]) -> None:
        self._q.extend(records)
        for r in records:
            if r["k"] in self._count:
                self._count[r["k"]] += 1
        for kind in ("m", "a"):
            if self._count[kind] > self.max[kind]:
                self._drop(kind, max(self._count[kind] - self.max[kind], self.max[kind] // 10))

    def _drop(self, kind: str, n: int) -> None:
        keep: collections.deque[dict[str, Any]] = collections.deque()
        for i, r in enumerate(self._q):
            if n and i >= self._unit and r["k"] == kind:
                n -= 1
                self._count[kind] -= 1
                self.dropped[kind] += 1
                if kind == "a":
                    shutil.rmtree(Path(r["p"]).parent, ignore_errors=True)
                continue
            keep.append(r)
        self._q = keep

    def peek(self) -> list[dict[str, Any]]:
        self._unit = take_unit(self._q, self.limits) if self._q else 0
        return [self._q[i] for i in range(self._unit)]

    def ack(self) -> None:
        for _ in range(self._unit):
            r = self._q.popleft()
            if r["k"] in self._count:
                self._count[r["k"]] -= 1
        self._unit = 0

    def pending(self) -> int:
        return len(self._q)

    def artifact_path(self, rec: dict[str, Any]) -> Path:
        return Path(rec["p"])


# ---------------------------------------------------------------------------------------
# On disk.


def _lock(fd: int) -> bool:
    """Try to take the segment's lock; False when a live process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True  # no flock on this filesystem: see the module docstring


@dataclass
class Segment:
    path: Path
    header: dict[str, Any]
    own: bool
    fd: int  # read (and lock) descriptor
    offset: int = 0  # bytes acknowledged
    pending: int = 0  # records after `offset` (own: counted as written)
    skip: tuple[str, ...] = ("run",)  # record kinds acknowledged without being sent

    @property
    def cursor(self) -> Path:
        return self.path.with_name(self.path.name + ".cursor")

    def read_cursor(self) -> int:
        try:
            return int(json.loads(self.cursor.read_text())["offset"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0  # none or unreadable: replay from the start (repeats are harmless)


def read_header(path: Path) -> tuple[dict[str, Any], int] | None:
    """(header, its length in bytes) of a segment, or None if it has none."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
        rec = json.loads(line)
    except (OSError, ValueError):
        return None
    return (rec, len(line)) if isinstance(rec, dict) and rec.get("k") == "head" and line.endswith(b"\n") else None


def iter_records(fd: int, start: int) -> Iterable[tuple[int, dict[str, Any] | None]]:
    """(end offset, record or None for a corrupt line) of every complete line from `start`."""
    pos = start
    while True:
        chunk = os.pread(fd, READ_BYTES, pos)
        cut = chunk.rfind(b"\n")
        if cut < 0:
            if len(chunk) == READ_BYTES:  # one line longer than the read-ahead: skip it
                nl = -1
                while nl < 0:
                    pos += len(chunk)
                    chunk = os.pread(fd, READ_BYTES, pos)
                    if not chunk:
                        return
                    nl = chunk.find(b"\n")
                pos += nl + 1
                yield pos, None
                continue
            return
        for line in chunk[:cut + 1].splitlines(keepends=True):
            pos += len(line)
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            yield pos, rec if isinstance(rec, dict) else None


@dataclass
class ReplayScan:
    """What start-up found in earlier processes' segments."""

    segments: int = 0
    records: int = 0  # not yet acknowledged
    busy: list[str] = field(default_factory=list)  # held by a live process
    foreign: list[str] = field(default_factory=list)  # another run key
    beyond: dict[str, int] = field(default_factory=dict)  # key -> highest step logged past the resume step


class DiskSpool:
    """Segments in `directory`: earlier processes' (replayed first, oldest first) and, unless
    `replay_only`, this process's own."""

    durable = True

    def __init__(self, directory: Path, header: dict[str, Any], *, replay_only: bool = False,
                 resume_step: int | None = None, limits: Limits = Limits(), max_unwritten: int = 100_000) -> None:
        self.dir = Path(directory)
        self.header = {"k": "head", "format": FORMAT, **header}
        self.run_key = header.get("run_key")
        self.limits = limits
        self.dir.mkdir(parents=True, exist_ok=True)
        self._queue: list[Segment] = []
        self._unit: list[dict[str, Any]] = []
        self._unit_end = 0  # file offset after the peeked unit
        self._unit_count = 0  # lines it spans (skipped and corrupt ones included)
        self._unit_corrupt = 0
        self._writer: Any = None
        self._written = 0  # bytes of the own segment written
        self._unwritten: list[bytes] = []  # records a failed write left in memory
        self.max_unwritten = max_unwritten
        self._warned_write = False
        self._seq = 0
        self._max_steps: dict[str, int] = dict(header.get("max_steps") or {})
        self.dropped = {"m": 0, "a": 0}
        self.corrupt = 0
        # A resumed job reopens the run itself: an earlier job's terminal status is not sent.
        self.scan = self._scan_earlier(resume_step, skip=("run", "end") if not replay_only else ("run",))
        if not replay_only:
            self._open_own(0)

    # -- earlier processes' segments -----------------------------------------------------

    def _scan_earlier(self, resume_step: int | None, skip: tuple[str, ...]) -> ReplayScan:
        scan = ReplayScan()
        for path in sorted(p for p in self.dir.iterdir() if SEGMENT_RE.match(p.name)):
            found = read_header(path)
            if found is None:
                continue  # a segment whose header never reached the disk holds nothing else
            header, header_len = found
            if header.get("run_key") != self.run_key:
                scan.foreign.append(path.name)
                continue
            fd = os.open(path, os.O_RDONLY)
            if not _lock(fd):
                os.close(fd)
                scan.busy.append(path.name)
                continue
            seg = Segment(path, header, own=False, fd=fd, skip=skip)
            seg.offset = max(seg.read_cursor(), header_len)
            beyond = scan.beyond
            for key, step in (header.get("max_steps") or {}).items():
                if resume_step is not None and step > resume_step:
                    beyond[key] = max(beyond.get(key, step), step)
            for end, rec in iter_records(fd, header_len):
                if end > seg.offset:
                    seg.pending += 1  # lines, a corrupt one included: delivery steps over it
                if rec is not None and rec.get("k") == "m" and resume_step is not None and rec["s"] > resume_step \
                        and not rec["n"].startswith("system/"):
                    beyond[rec["n"]] = max(beyond.get(rec["n"], rec["s"]), rec["s"])
            self._queue.append(seg)
            scan.segments += 1
            scan.records += seg.pending
        return scan

    # -- this process's segment ------------------------------------------------------------

    def _open_own(self, n: int) -> None:
        import time

        h = self.header
        stem = f"spool-{int(h['start_ms']):013d}-{socket.gethostname().split('.')[0]}-{os.getpid()}-{n:03d}"
        path = self.dir / f"{stem}.jsonl"
        head = encode([{**h, "max_steps": dict(self._max_steps), "segment": n, "time": time.time()}])
        self._writer = open(path, "ab")
        fd = os.open(path, os.O_RDONLY)
        _lock(fd)
        self._writer.write(head)
        self._writer.flush()
        self._written = len(head)
        seg = Segment(path, h, own=True, fd=fd, offset=len(head))
        self._queue.append(seg)
        fsync_dir(self.dir)

    @property
    def own(self) -> Segment | None:
        return self._queue[-1] if self._queue and self._queue[-1].own else None

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write `records` to this process's segment in one write, flushed to the OS. A
        failing disk keeps them in memory (bounded) and tries again with the next call."""
        data = encode(records)
        for r in records:
            if r["k"] == "m" and not r["n"].startswith("system/"):
                self._max_steps[r["n"]] = max(self._max_steps.get(r["n"], r["s"]), r["s"])
        own = self.own
        assert own is not None, "a replay-only spool takes no records"
        self._unwritten.append(data)
        try:
            blob = b"".join(self._unwritten)
            self._writer.write(blob)
            self._writer.flush()
        except OSError as e:
            self._writer = open(own.path, "ab")  # a failed flush leaves the buffer in an unknown state
            os.ftruncate(self._writer.fileno(), self._written)  # drop a partial write
            if not self._warned_write:
                self._warned_write = True
                log.warning(f"cannot write the tracking spool {own.path} ({e.strerror}); records are kept in "
                            f"memory until it can be written")
            while len(self._unwritten) > 1 and sum(b.count(b"\n") for b in self._unwritten) > self.max_unwritten:
                self.dropped["m"] += self._unwritten.pop(0).count(b"\n")  # the oldest
            return
        self._written += len(blob)
        own.pending += sum(b.count(b"\n") for b in self._unwritten)
        self._unwritten.clear()

    def sync(self) -> None:
        """fsync this process's segment (at a checkpoint, at exit)."""
        if self._writer is not None:
            try:
                self._writer.flush()
                os.fsync(self._writer.fileno())
            except OSError as e:
                log.warning(f"could not fsync the tracking spool: {e.strerror}")

    # -- delivery (the consumer thread only) -----------------------------------------------

    def peek(self) -> list[dict[str, Any]]:
        """The next unit to deliver ([] when there is none), the same until `ack`."""
        if self._unit:
            return self._unit
        while self._queue:
            seg = self._queue[0]
            records: list[tuple[int, dict[str, Any]]] = []
            for end, rec in iter_records(seg.fd, seg.offset):
                records.append((end, rec if rec is not None else {"k": "corrupt"}))
                if len(records) > self.limits.total:
                    break
            if not records:
                if seg.own:
                    return []
                self._finish_segment()  # every record of an earlier process is delivered
                continue
            n = take_unit((r for _, r in records), self.limits)
            self._unit_end, self._unit_count = records[n - 1][0], n
            unit = [r for _, r in records[:n]]
            self._unit_corrupt = sum(r["k"] == "corrupt" for r in unit)
            if all(r["k"] in seg.skip or r["k"] == "corrupt" for r in unit):
                self._advance(seg)  # nothing to send: e.g. an earlier job's terminal status
                continue
            self._unit = [r for r in unit if r["k"] not in seg.skip and r["k"] != "corrupt"]
            return self._unit
        return []

    def _advance(self, seg: Segment) -> None:
        seg.offset = self._unit_end
        seg.pending -= self._unit_count
        if self._unit_corrupt:
            if not self.corrupt:
                log.warning(f"{seg.path}: a line that is not a record (a disk fault?); skipped")
            self.corrupt += self._unit_corrupt
        try:
            atomic_write(seg.cursor, json.dumps({"offset": seg.offset}))
        except OSError as e:  # the next process replays a little more; repeats are harmless
            log.warning(f"could not write {seg.cursor}: {e.strerror}")

    def ack(self) -> None:
        """The peeked unit reached the store (or was refused by it for good)."""
        if not self._queue:
            return
        seg = self._queue[0]
        for rec in self._unit:
            if rec["k"] == "a":
                shutil.rmtree(self.artifact_path(rec).parent, ignore_errors=True)
        self._unit = []
        self._advance(seg)
        if seg.own and seg.offset == self._written and self._written > ROTATE_BYTES and not self._unwritten:
            self._rotate()

    def _finish_segment(self) -> None:
        seg = self._queue.pop(0)
        for p in (seg.path, seg.cursor):
            p.unlink(missing_ok=True)
        os.close(seg.fd)

    def _rotate(self) -> None:
        """Start a new segment once the store holds everything of a large one."""
        seg = self._queue[-1]
        n = int(SEGMENT_RE.match(seg.path.name).group(4)) + 1
        self._writer.close()
        self._queue.pop()
        for p in (seg.path, seg.cursor):
            p.unlink(missing_ok=True)
        os.close(seg.fd)
        self._open_own(n)

    def pending(self) -> int:
        return sum(s.pending for s in self._queue) + sum(b.count(b"\n") for b in self._unwritten)

    def first_start_ms(self) -> int:
        """When the oldest process with records here started (a run created late starts then)."""
        return min((int(s.header["start_ms"]) for s in self._queue), default=int(self.header["start_ms"]))

    # -- artifacts ----------------------------------------------------------------------------

    def stage_dir(self) -> Path:
        """A new folder for one artifact (its file name is kept: MLflow uses it)."""
        own = self.own
        assert own is not None
        self._seq += 1
        d = self.dir / "artifacts" / f"{own.path.stem}-{self._seq:08d}"
        d.mkdir(parents=True)
        return d

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.dir))

    def artifact_path(self, rec: dict[str, Any]) -> Path:
        return self.dir / rec["p"]

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> int:
        """Flush and fsync; delete this process's segment if the store holds all of it.
        Returns the records still waiting (for the next process or `runs sync`)."""
        own = self.own
        if own is not None:
            self.sync()
            if own.pending == 0 and not self._unwritten:
                self._writer.close()
                self._queue.pop()
                for p in (own.path, own.cursor):
                    p.unlink(missing_ok=True)
                os.close(own.fd)
                self._writer = None
        left = self.pending()
        for seg in self._queue:  # releases the locks
            os.close(seg.fd)
        if self._writer is not None:
            self._writer.close()
        self._queue = []
        artifacts = self.dir / "artifacts"
        if left == 0 and artifacts.is_dir() and not any(artifacts.iterdir()):
            artifacts.rmdir()
        return left


def spool_dirs(directory: Path) -> list[Path]:
    """The spools under a run directory: RUN_DIR/tracking and the stand-alone evals'
    RUN_DIR/eval/step_*/tracking (or `directory` itself if it is a spool)."""
    directory = Path(directory)
    if any(SEGMENT_RE.match(p.name) for p in directory.iterdir()) and directory.name == SPOOL_DIR:
        return [directory]
    found = [directory / SPOOL_DIR] if (directory / SPOOL_DIR).is_dir() else []
    found += sorted(p for p in directory.glob(f"eval/*/{SPOOL_DIR}") if p.is_dir())
    return found


def run_keys(directory: Path) -> dict[str, dict[str, Any]]:
    """{run key: the newest header of its segments} in one spool directory."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in Path(directory).iterdir() if SEGMENT_RE.match(p.name)):
        found = read_header(path)
        if found is not None and found[0].get("run_key"):
            out[found[0]["run_key"]] = found[0]
    return out


def last_run_id(directory: Path, run_key: str) -> str | None:
    """The MLflow run id the newest process of `run_key` opened (its `run` record), if any."""
    run_id = None
    for path in sorted(p for p in Path(directory).iterdir() if SEGMENT_RE.match(p.name)):
        found = read_header(path)
        if found is None or found[0].get("run_key") != run_key:
            continue
        h = found[0]
        run_id = h.get("resume_id") or run_id
        fd = os.open(path, os.O_RDONLY)
        try:
            for _, rec in iter_records(fd, 0):
                if rec is not None and rec.get("k") == "run":
                    run_id = rec["id"]
        finally:
            os.close(fd)
    return run_id
