"""Job records and job states: what `submit` writes and what `submit` and `status` read.

    RUN_DIR/jobs.jsonl                 one JSON line per submitted train/eval job
    RUN_ROOT/precompute_jobs/jobs.jsonl         one line per precompute submission

A job's state comes from sacct (squeue where accounting is missing) for SLURM jobs, and
from the controller's pid and submitit's result files for local ones. No torch here.

submitit's result files are pickles: loading one runs whatever code it names. One is loaded
only from the job's own folder (`trusted_pickle`): inside the folder its record names,
which must lie under the directory that holds the record (the run directory, or
precompute_jobs/), a regular file owned by this user, and neither it nor its folder
writable by every user. Anything else is refused with one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any, Sequence

JOBS_FILE = "jobs.jsonl"
PRECOMPUTE_JOBS = "precompute_jobs"
# States in which a job still holds (or will get) resources.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "PREEMPTED", "READY"}


# ---------------------------------------------------------------------------------------
# Records.


def read_records(path: Path) -> list[dict[str, Any]]:
    """The job records of a jobs.jsonl (bad lines skipped: the file is append-only)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "job_id" in rec:
            out.append(rec)
    return out


def append_record(path: Path, rec: dict[str, Any]) -> None:
    """Append one JSON line, fsynced before it returns.

    An append rather than the atomic rewrite other files get: the line goes out in one
    write(2) on a file opened O_APPEND, so concurrent submitters on one machine never
    interleave (a rewrite would lose one of two concurrent records), and a crash can at
    worst leave the last line torn. `read_records` skips a torn line, and the next append
    starts with a newline so that its record is not glued onto it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(rec, sort_keys=True) + "\n").encode()
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        if os.write(fd, data) != len(data):
            raise OSError(f"{path}: short write appending a job record (disk full?)")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        from latentforge.fileio import fsync_dir

        fsync_dir(path.parent)


def job_folder(folder_pattern: Path, job_id: str) -> Path:
    return Path(str(folder_pattern).replace("%j", job_id))


def log_paths(folder: Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    return folder / f"{job_id}_{task}_log.out", folder / f"{job_id}_{task}_log.err"


# ---------------------------------------------------------------------------------------
# Job states.


def _first_word(state: str) -> str:
    return state.split()[0] if state.strip() else ""


def parse_sacct(text: str) -> dict[str, dict[str, Any]]:
    """`sacct -n -P -X -D -o JobID,State,Elapsed,ExitCode` -> {job_id: {state, elapsed,
    exit_code, attempts}}. With -D every attempt of a requeued job is a line; the last wins."""
    out: dict[str, dict[str, Any]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0]:
            continue
        jid = parts[0]
        prev = out.get(jid, {"attempts": 0})
        out[jid] = {"state": _first_word(parts[1]), "elapsed": parts[2] if len(parts) > 2 else "",
                    "exit_code": parts[3] if len(parts) > 3 else "", "attempts": prev["attempts"] + 1}
    return out


def _slurm_states(job_ids: Sequence[str]) -> tuple[dict[str, dict[str, Any]], str]:
    """States of SLURM jobs from sacct, else squeue (running/pending only). (states, note)."""
    ids = sorted({j.split("_")[0] for j in job_ids})
    if not ids:
        return {}, ""
    if shutil.which("sacct"):
        try:
            res = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", ",".join(ids), "-o",
                                  "JobID,State,Elapsed,ExitCode"], capture_output=True, text=True, timeout=30)
            if res.returncode == 0:
                return parse_sacct(res.stdout), ""
            note = f"sacct failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"
        except (OSError, subprocess.TimeoutExpired) as e:
            note = f"sacct failed: {e}"
    else:
        note = "sacct not found"
    if shutil.which("squeue"):
        try:
            res = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i|%T|%M"], capture_output=True,
                                 text=True, timeout=30)
            if res.returncode == 0:
                states = {p[0]: {"state": p[1], "elapsed": p[2], "exit_code": "", "attempts": 1}
                          for p in (ln.split("|") for ln in res.stdout.splitlines()) if len(p) >= 3}
                return states, f"{note}; states from squeue (jobs that ended are not listed)"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return {}, note


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


class UntrustedPickle(ValueError):
    """A pickle that is not loaded; the message names the file and why."""


def trusted_pickle(path: str | os.PathLike, folder: str | os.PathLike, home: str | os.PathLike) -> Path:
    """`path`, resolved, if a pickle there may be loaded: inside the job's `folder`, which
    lies inside `home` (the directory holding the job's record); a regular file owned by
    this user; neither it nor its folder writable by every user. Else UntrustedPickle."""
    p = Path(path).resolve()
    folder_r, home_r = Path(folder).resolve(), Path(home).resolve()
    if not folder_r.is_relative_to(home_r):
        raise UntrustedPickle(f"{path}: the job folder {folder} is not under {home}; the pickle is not loaded")
    if not p.is_relative_to(folder_r):
        raise UntrustedPickle(f"{path}: not inside the job folder {folder}; the pickle is not loaded")
    uid = os.getuid()
    for q in (p, p.parent):
        st = q.stat()
        if st.st_uid != uid:
            raise UntrustedPickle(f"{q}: owned by uid {st.st_uid}, not by you (uid {uid}); the pickle is not loaded")
        if st.st_mode & stat.S_IWOTH:
            raise UntrustedPickle(f"{q}: writable by every user; the pickle is not loaded")
    if not stat.S_ISREG(p.stat().st_mode):
        raise UntrustedPickle(f"{path}: not a regular file; the pickle is not loaded")
    return p


def _local_state(rec: dict[str, Any], home: Path) -> dict[str, Any]:
    """A local-executor job: its controller's pid, then its result files."""
    jid = str(rec["job_id"])
    if jid.isdigit() and _pid_alive(int(jid)):
        return {"state": "RUNNING", "attempts": 1}
    folder = Path(rec["folder"])
    results = [folder / f"{jid}_{t}_result.pkl" for t in range(int(rec.get("tasks", 1)))]
    if not any(p.is_file() for p in results):
        return {"state": "ENDED (no result file: killed?)", "attempts": 1}
    import pickle

    outcomes = []
    for p in results:
        try:
            with open(trusted_pickle(p, folder, home), "rb") as f:
                outcomes.append(pickle.load(f)[0])
        except UntrustedPickle as e:
            return {"state": "UNKNOWN (result file refused)", "attempts": 1, "note": str(e)}
        except Exception:  # a result pickle we cannot read says nothing about success
            outcomes.append("unreadable")
    return {"state": "COMPLETED" if all(o == "success" for o in outcomes) else "FAILED", "attempts": 1}


def job_states(records: Sequence[dict[str, Any]], home: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """{job_id: state info} for records of either executor (read from the jobs file in
    `home`), and a note on where they came from."""
    slurm_ids = [str(r["job_id"]) for r in records if r.get("cluster") == "slurm"]
    states, note = _slurm_states(slurm_ids)
    for r in records:
        if r.get("cluster") == "local":
            states[str(r["job_id"])] = _local_state(r, Path(home))
    return states, note


def state_of(states: dict[str, dict[str, Any]], job_id: str) -> dict[str, Any]:
    if job_id in states:
        return states[job_id]
    # A pending array element shows as 12_[2-3] until it starts.
    m = re.fullmatch(r"(\d+)_(\d+)", job_id)
    if m:
        for k, v in states.items():
            g = re.fullmatch(rf"{m.group(1)}_\[([^\]%]*)(%\d+)?\]", k)  # sacct: 31_[1-3%2]
            if g and any(_in_range(int(m.group(2)), r) for r in g.group(1).split(",")):
                return v
    return {"state": "UNKNOWN", "attempts": 0}


def _in_range(i: int, spec: str) -> bool:
    lo, _, hi = spec.partition("-")
    try:
        return int(lo) <= i <= int(hi or lo)
    except ValueError:
        return False


def results_written(rec: dict[str, Any], job_id: str) -> bool:
    """Every task of `job_id` wrote its submitit result: its work is over, even while SLURM
    still reports the job RUNNING (it takes a few seconds to tear the steps down)."""
    folders = dict(zip(rec.get("job_ids") or [], rec.get("folders") or []))
    folder = Path(folders.get(job_id) or rec.get("folder", ""))
    tasks = 1 if "job_ids" in rec else int(rec.get("tasks", 1))
    return all((folder / f"{job_id}_{t}_result.pkl").is_file() for t in range(tasks))


def active_jobs(records: Sequence[dict[str, Any]], home: Path) -> list[tuple[str, str]]:
    """(job_id, state) of recorded jobs (from the jobs file in `home`) still pending or running."""
    if not records:
        return []
    states, _ = job_states(records, home)
    out = []
    for r in records:
        for jid in r.get("job_ids") or [str(r["job_id"])]:
            st = state_of(states, jid)["state"]
            if st in ACTIVE_STATES and not results_written(r, jid):
                out.append((jid, st))
    return out


# ---------------------------------------------------------------------------------------
# Precompute: which tasks are unfinished.


def precompute_work(rec: dict[str, Any]) -> list[tuple[Path, str]]:
    """(latent directory, raw shard spec) of every source a precompute record covers, in
    config order (one, unless the config has data.sources)."""
    if rec.get("sources"):
        return [(Path(s["latent_dir"]), s["raw_shards"]) for s in rec["sources"]]
    return [(Path(rec["latent_dir"]), rec["raw_shards"])]


def task_work(work: list[tuple[Path, str]], num_tasks: int) -> list[list[tuple[Path, str]]]:
    """(latent directory, raw shard name) of each task of an array of `num_tasks` over the
    shards of every source (data/precompute.py splits the same list)."""
    from latentforge.data import shards
    from latentforge.data.sources import work_items

    items = work_items(work)
    return [[(d, shards.shard_name(u)) for d, u in shards.split_for_task(items, i, num_tasks)]
            for i in range(num_tasks)]


def task_shards(raw_spec: str, num_tasks: int) -> list[list[str]]:
    """Raw shard names of each task of an array of `num_tasks` (data/shards.split_for_task)."""
    return [[n for _, n in group] for group in task_work([(Path("."), raw_spec)], num_tasks)]


def incomplete_tasks(latent_dir: Path, raw_spec: str, num_tasks: int,
                     work: list[tuple[Path, str]] | None = None) -> list[int]:
    """Tasks with at least one raw shard whose manifest is missing (precompute writes a
    shard's manifest last, so a missing one means the shard is not done). `work`: every
    source's (latent directory, raw spec), when there are several."""
    from latentforge.data import latents as lat

    return [i for i, group in enumerate(task_work(work or [(latent_dir, raw_spec)], num_tasks))
            if any(not lat.shard_manifest_path(d, n).exists() for d, n in group)]


def tail_lines(path: Path, n: int, max_bytes: int = 256_000) -> str:
    """The last `n` lines of a log, reading at most `max_bytes` from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return f"    ({path}: no such log yet)"
    lines = [ln for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join("    " + ln for ln in lines[-n:]) if lines else f"    ({path}: empty)"
