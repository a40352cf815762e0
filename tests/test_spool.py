"""The tracking spool (training/spool.py) without MLflow: units within MLflow's limits,
delivery in order with a cursor, replay of a dead process's segment (and not of a live
one's, or another run's), torn and corrupt lines, rotation, and steps past a resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from latentforge.training import spool as sp

LIM = sp.Limits(metrics=4, params_tags=2, total=5)


def _m(step: int, key: str = "train/loss") -> dict:
    return {"k": "m", "n": key, "v": float(step), "t": 1000 + step, "s": step}


def _header(key: str = "K", start_ms: int = 1) -> dict:
    return {"run_key": key, "uri": "sqlite:///x.db", "experiment": "e", "run_name": "r", "start_ms": start_ms}


def _drain(s: sp.DiskSpool | sp.MemorySpool) -> list[list[dict]]:
    units = []
    while unit := s.peek():
        units.append(unit)
        s.ack()
    return units


def test_units_respect_mlflows_limits_and_never_repeat_a_key() -> None:
    p = lambda n, v="1": {"k": "p", "n": n, "v": v}  # noqa: E731
    t = lambda n: {"k": "t", "n": n, "v": "x"}  # noqa: E731
    a = {"k": "a", "p": "f", "d": None}
    assert sp.take_unit([_m(i) for i in range(9)], LIM) == 4  # metrics per request
    assert sp.take_unit([p("a"), t("b"), p("c")], LIM) == 2  # params and tags share their budget
    assert sp.take_unit([p("a"), p("a", "2")], LIM) == 1  # a key twice: the second goes next time
    assert sp.take_unit([_m(1), _m(2), _m(3), p("a"), t("b"), _m(4)], LIM) == 5  # entities per request
    assert sp.take_unit([_m(1), a, _m(2)], LIM) == 1 and sp.take_unit([a, _m(2)], LIM) == 1


def test_memory_spool_drops_the_oldest_metrics_but_not_what_is_in_flight() -> None:
    s = sp.MemorySpool(max_metrics=3, max_artifacts=10, limits=LIM)
    s.append([{"k": "p", "n": "lr", "v": "1"}, _m(1), _m(2)])
    assert [r.get("s") for r in s.peek()] == [None, 1, 2]  # in flight
    s.append([_m(3), _m(4), _m(5)])
    assert s.dropped["m"] == 2 and [r.get("s") for r in s._q] == [None, 1, 2, 5]
    s.ack()
    assert [[r["s"] for r in u] for u in _drain(s)] == [[5]] and s.pending() == 0


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from latentforge.training import spool as sp
    s = sp.DiskSpool(Path(sys.argv[1]), {"run_key": "K", "uri": "u", "experiment": "e", "run_name": "r",
                                         "start_ms": 5}, limits=sp.Limits(metrics=4, params_tags=2, total=5))
    s.append([{"k": "job", "tags": {"host": "h"}, "slurm_job_id": "7"}])
    for step in range(1, 8):
        s.append([{"k": "m", "n": "train/loss", "v": float(step), "t": 1000 + step, "s": step}])
    s.append([{"k": "m", "n": "system/cpu", "v": 1.0, "t": 2000, "s": 99}])
    unit = s.peek(); s.ack()  # the job record reached the store
    unit = s.peek()  # steps 1-4 are sent; the process dies before the answer comes
    print(len(unit), flush=True)
    if sys.argv[2] == "wait":
        sys.stdin.readline()  # alive, holding its segment, until told
    s.append([{"k": "end", "v": "KILLED", "t": 3000}])
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_dead_processs_segment_is_replayed_from_its_cursor(tmp_path: Path) -> None:
    d = tmp_path / "tracking"
    live = subprocess.Popen([sys.executable, "-c", CHILD, str(d), "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert live.stdout.readline().strip() == "4"
    # While it lives, its segment is its own: a second process leaves it alone.
    other = sp.DiskSpool(d, _header(), resume_step=3)
    assert len(other.scan.busy) == 1 and other.scan.records == 0
    other.close()
    live.stdin.write("\n")
    live.stdin.flush()
    assert live.wait(60) == -9

    (seg,) = [p for p in d.iterdir() if sp.SEGMENT_RE.match(p.name)]
    with open(seg, "ab") as f:
        f.write(b'{"k":"m","n":"train/lo')  # a torn last line: the kill came mid-write
    foreign = sp.DiskSpool(d, _header(key="OTHER"))  # another run's spool in the same folder
    assert foreign.scan.foreign == [seg.name] and foreign.scan.records == 0
    foreign.close()

    s = sp.DiskSpool(d, _header(start_ms=9), resume_step=3, limits=LIM)
    # 7 metrics + 1 system metric + the status after the cursor (the job record was acknowledged).
    assert s.scan.segments == 1 and s.scan.records == 9
    assert s.scan.beyond == {"train/loss": 7}  # what the resumed job must not log again; system/* is time
    s.append([_m(8)])
    units = _drain(s)
    # The unit in flight at the kill comes again (harmless, see training/tracking.py); the
    # earlier job's terminal status is not sent (this job reopened the run); then this job's own.
    assert [[r["s"] for r in u] for u in units] == [[1, 2, 3, 4], [5, 6, 7, 99], [8]]
    assert not seg.exists() and not seg.with_name(seg.name + ".cursor").exists()  # delivered: gone
    assert s.close() == 0
    assert not any(sp.SEGMENT_RE.match(p.name) for p in d.iterdir())


def test_the_cursor_survives_a_restart_and_a_corrupt_line_is_skipped(tmp_path: Path) -> None:
    d = tmp_path / "tracking"
    s = sp.DiskSpool(d, _header(), limits=LIM)
    s.append([_m(i) for i in range(1, 7)])
    s.ack() if s.peek() else None  # the job's first unit: steps 1-4
    s.sync()
    own = s.own.path
    left = s.close()
    assert left == 2 and own.exists()  # kept for the next process
    with open(own, "ab") as f:
        f.write(b"not json\n")
        f.write(json.dumps(_m(7)).encode() + b"\n")
    r = sp.DiskSpool(d, _header(start_ms=2), replay_only=True, limits=LIM)
    assert r.scan.records == 4 and r.own is None  # 5, 6, the corrupt line, 7
    units = _drain(r)
    assert [[x["s"] for x in u] for u in units] == [[5, 6], [7]] and r.corrupt == 1
    assert r.close() == 0 and not own.exists()


def test_a_large_delivered_segment_is_rotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sp, "ROTATE_BYTES", 300)
    s = sp.DiskSpool(tmp_path / "t", _header())
    s.append([_m(i) for i in range(10)])
    first = s.own.path
    assert len(_drain(s)) == 1
    assert not first.exists() and s.own.path.name.endswith("-001.jsonl")
    s.append([_m(10)])
    header, _ = sp.read_header(s.own.path)
    assert header["max_steps"] == {"train/loss": 9}  # the steps logged before survive the rotation
    assert s.close() == 1 and s.own is None


def test_a_failing_disk_keeps_records_in_memory_until_it_can_write(tmp_path: Path) -> None:
    s = sp.DiskSpool(tmp_path / "t", _header(), max_unwritten=3)

    class Full:
        def write(self, data: bytes) -> None:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return os.open(os.devnull, os.O_WRONLY)

    real = s._writer
    s._writer = Full()
    s.append([_m(1), _m(2)])
    s._writer = Full()
    s.append([_m(3), _m(4)])  # beyond max_unwritten: the oldest are dropped and counted
    assert s.dropped["m"] == 2 and s.pending() == 2
    s._writer = real
    s.append([_m(5)])
    assert [r["s"] for u in _drain(s) for r in u] == [3, 4, 5]
    s.close()
