"""`latentforge submit` and `latentforge status`: the pipeline's jobs through submitit.

    latentforge submit train --profile local [--config C] [k=v ...] [--wait]
    latentforge submit precompute --profile local [--num-tasks N] [k=v ...]
    latentforge submit precompute --profile local --resubmit-failed [k=v ...]   # only unfinished tasks
    latentforge submit precompute --profile local --task-index 3 --num-tasks 8  # one task, alone
    latentforge submit eval --profile local --target RUN_DIR|EXPORT
    latentforge status RUN_DIR | RUN_ROOT/precompute_jobs

A profile (launch/profiles.py) says where and how: SLURM through sbatch, or local processes
(submitit's LocalExecutor) with the same job objects (launch/jobs.py).

Where things go:

    RUN_DIR/jobs.jsonl                 one JSON line per submitted train/eval job
    RUN_DIR/slurm/<job>/               submitit's files: <job>_<rank>_log.out/.err, pickles
    RUN_ROOT/precompute_jobs/jobs.jsonl         one line per precompute submission
    RUN_ROOT/precompute_jobs/<array>_<task>/    one folder per array task

`status` reads jobs.jsonl, asks sacct (squeue where accounting is missing) for the states,
the checkpoint's COMPLETE record for the step, MLflow (found through the run key in
RUN_DIR/mlflow_run_key, without loading a checkpoint) for the last metrics, and prints the
tail of the newest log.

No torch here: submitting and `status` stay fast, and so do the job pickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from latentforge.launch.jobs import ConfigSource, EvalJob, PrecomputeJob, TrainJob
from latentforge.launch.profiles import Profile, find_profile, load_profile

JOBS_FILE = "jobs.jsonl"
PRECOMPUTE_JOBS = "precompute_jobs"
# States in which a job still holds (or will get) resources.
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING", "PREEMPTED", "READY"}


class SubmitError(ValueError):
    """A submission that cannot go ahead; one line that says why."""


@dataclass
class Submission:
    kind: str  # train | eval | precompute
    profile: Profile
    jobs: list[Any]  # submitit Job objects (one per array task for precompute)
    record_file: Path  # the jobs.jsonl the submission was recorded in
    run_dir: Path  # train/eval: the run directory; precompute: the latent directory
    records: list[dict[str, Any]] = field(default_factory=list)


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


def _append_record(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write per line: concurrent submitters do not interleave
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def _job_folder(folder_pattern: Path, job_id: str) -> Path:
    return Path(str(folder_pattern).replace("%j", job_id))


def _log_paths(folder: Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
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


def _local_state(rec: dict[str, Any]) -> dict[str, Any]:
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
            with open(p, "rb") as f:
                outcomes.append(pickle.load(f)[0])
        except Exception:  # a result pickle we cannot read says nothing about success
            outcomes.append("unreadable")
    return {"state": "COMPLETED" if all(o == "success" for o in outcomes) else "FAILED", "attempts": 1}


def job_states(records: Sequence[dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], str]:
    """{job_id: state info} for records of either executor, and a note on where they came from."""
    slurm_ids = [str(r["job_id"]) for r in records if r.get("cluster") == "slurm"]
    states, note = _slurm_states(slurm_ids)
    for r in records:
        if r.get("cluster") == "local":
            states[str(r["job_id"])] = _local_state(r)
    return states, note


def _state_of(states: dict[str, dict[str, Any]], job_id: str) -> dict[str, Any]:
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


def _results_written(rec: dict[str, Any], job_id: str) -> bool:
    """Every task of `job_id` wrote its submitit result: its work is over, even while SLURM
    still reports the job RUNNING (it takes a few seconds to tear the steps down)."""
    folders = dict(zip(rec.get("job_ids") or [], rec.get("folders") or []))
    folder = Path(folders.get(job_id) or rec.get("folder", ""))
    tasks = 1 if "job_ids" in rec else int(rec.get("tasks", 1))
    return all((folder / f"{job_id}_{t}_result.pkl").is_file() for t in range(tasks))


def active_jobs(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(job_id, state) of recorded jobs that are still pending or running."""
    if not records:
        return []
    states, _ = job_states(records)
    out = []
    for r in records:
        for jid in r.get("job_ids") or [str(r["job_id"])]:
            st = _state_of(states, jid)["state"]
            if st in ACTIVE_STATES and not _results_written(r, jid):
                out.append((jid, st))
    return out


# ---------------------------------------------------------------------------------------
# Precompute: which tasks are unfinished.


def task_shards(raw_spec: str, num_tasks: int) -> list[list[str]]:
    """Raw shard names of each task of an array of `num_tasks` (data/shards.split_for_task)."""
    from latentforge.data import shards

    urls = shards.expand_shards(raw_spec)
    return [[shards.shard_name(u) for u in shards.split_for_task(urls, i, num_tasks)] for i in range(num_tasks)]


def incomplete_tasks(latent_dir: Path, raw_spec: str, num_tasks: int) -> list[int]:
    """Tasks with at least one raw shard whose manifest is missing (precompute writes a
    shard's manifest last, so a missing one means the shard is not done)."""
    from latentforge.data import latents as lat

    return [i for i, names in enumerate(task_shards(raw_spec, num_tasks))
            if any(not lat.shard_manifest_path(latent_dir, n).exists() for n in names)]


# ---------------------------------------------------------------------------------------
# Submitting.


def _world_check(cfg: Any, prof: Profile, where: str) -> None:
    """The batch split training will do, checked now rather than after the job starts."""
    from latentforge.training.config import ConfigError

    world = prof.nodes * prof.ntasks_per_node
    g = cfg.train.global_batch_size
    if g % world:
        raise ConfigError(f"train.global_batch_size: {g} is not divisible by the world size {world} "
                          f"({where}: {prof.nodes} node(s) x {prof.ntasks_per_node} task(s))")
    micro = cfg.train.micro_batch_size or g // world
    if (g // world) % micro:
        raise ConfigError(f"train.micro_batch_size: {micro} does not divide the per-rank batch {g // world} "
                          f"({where}: world size {world})")


def _executor(prof: Profile, folder: Path, kind: str, name: str) -> Any:
    ex = prof.make_executor(folder, kind=kind)
    ex.update_parameters(name=name)
    return ex


def _record(kind: str, job: Any, prof: Profile, profile_path: str, folder_pattern: Path, **extra: Any) -> dict:
    jid = str(job.job_id)
    folder = _job_folder(folder_pattern, jid)
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind, "job_id": jid, "cluster": prof.executor,
           "profile": profile_path, "folder": str(folder), "tasks": int(getattr(job, "num_tasks", 1)),
           "stdout": str(_log_paths(folder, jid)[0]), "stderr": str(_log_paths(folder, jid)[1])}
    rec.update(extra)
    return rec


def _submit_one(kind: str, fn: Any, prof: Profile, profile_path: str, home: Path, **extra: Any) -> Submission:
    """Submit one job whose logs go to HOME/slurm/<job id> and whose record goes to HOME's jobs file."""
    folder = home / "slurm" / "%j"
    job = _executor(prof, folder, kind, f"lf-{kind}-{home.name}").submit(fn)
    rec = _record(kind, job, prof, profile_path, folder, **extra)
    _append_record(home / JOBS_FILE, rec)
    return Submission(kind, prof, [job], home / JOBS_FILE, home, [rec])


def submit_jobs(kind: str, profile: str, preset: str | None = None, config_file: str | None = None,
                overrides: Sequence[str] = (), target: str | None = None, *, num_tasks: int | None = None,
                task_index: int | None = None, resubmit_failed: bool = False) -> Submission:
    """Build the executor from the profile, submit, record. Raises SubmitError/ConfigError/
    ProfileError with one line on bad input. See `submit` for the printing wrapper."""
    from latentforge.training.config import resolve

    if kind not in ("train", "eval", "precompute"):
        raise SubmitError(f"submit: unknown kind {kind!r} (train, eval or precompute)")
    profile_path = str(find_profile(profile).resolve())
    prof = load_profile(profile_path)
    where = f"profile {Path(profile_path).stem}"
    if config_file:
        config_file = str(Path(config_file).resolve())
    source = ConfigSource(preset, config_file, tuple(overrides), os.getcwd())
    if kind != "precompute" and (task_index is not None or num_tasks is not None or resubmit_failed):
        raise SubmitError("--task-index, --num-tasks and --resubmit-failed are for `submit precompute`")

    if kind == "eval":
        if not target:
            raise SubmitError("submit eval: --target RUN_DIR|EXPORT_DIR is required")
        tgt = Path(target).resolve()
        if not tgt.is_dir():
            raise SubmitError(f"--target: {tgt} is not a directory (a run directory or an export)")
        # The same test as eval/standalone.inspect_target, without importing torch here.
        if not ((tgt / "config.yaml").is_file() and (tgt / "checkpoints").is_dir()) and \
                not (tgt / "latentforge.json").is_file():
            raise SubmitError(f"--target: {tgt} is neither a run directory (config.yaml and checkpoints/) nor an "
                              f"export (latentforge.json)")
        return _submit_one("eval", EvalJob(source, str(tgt)), prof, profile_path, tgt, target=str(tgt))

    cfg = resolve(preset, config_file, list(overrides))  # a bad config fails here, not in the queue

    if kind == "train":
        if target:
            raise SubmitError("--target is for `submit eval`")
        _world_check(cfg, prof, where)
        run_dir = cfg.resolved_run_dir.resolve()
        busy = active_jobs(read_records(run_dir / JOBS_FILE))
        if busy:
            jid, st = busy[0]
            raise SubmitError(f"{run_dir}: job {jid} is still {st} in this run directory; two jobs would write the "
                              f"same checkpoints. Wait for it, or scancel it, or choose another run_name")
        return _submit_one("train", TrainJob(source, str(run_dir)), prof, profile_path, run_dir, run_dir=str(run_dir))

    # Precompute: a job array over groups of raw shards.
    from latentforge.data import shards

    if not cfg.data.raw_shards:  # the embedded synthetic dataset: made here, once, before the array starts
        from latentforge.launch.cli import ensure_synth

        ensure_synth(cfg)
    raw_spec = cfg.resolved_raw_shards
    n_shards = len(shards.expand_shards(raw_spec))
    latent_dir = cfg.resolved_latent_dir.resolve()
    jobs_dir = Path(cfg.run_root).resolve() / PRECOMPUTE_JOBS
    record_file = jobs_dir / JOBS_FILE
    previous = [r for r in read_records(record_file) if r.get("latent_dir") == str(latent_dir)]
    if resubmit_failed or (task_index is not None and num_tasks is None):
        if not previous:
            raise SubmitError(f"{record_file}: no earlier precompute of {latent_dir} to take the task layout from; "
                              f"give --num-tasks")
        recorded = int(previous[-1]["num_tasks"])
        if num_tasks is not None and num_tasks != recorded:
            raise SubmitError(f"--num-tasks: {num_tasks} differs from the {recorded} tasks of the earlier submission; "
                              f"task i covers different shards in a different layout")
        num_tasks = recorded
    if num_tasks is None:
        num_tasks = prof.array_tasks or n_shards
    if num_tasks < 1:
        raise SubmitError(f"--num-tasks: must be >= 1, got {num_tasks}")
    num_tasks = min(num_tasks, max(1, n_shards))  # more tasks than shards would leave tasks with nothing to do
    if task_index is not None:
        if not 0 <= task_index < num_tasks:
            raise SubmitError(f"--task-index: {task_index} is outside 0..{num_tasks - 1}")
        indices = [task_index]
    elif resubmit_failed:
        busy = active_jobs(previous)
        if busy:
            raise SubmitError(f"precompute job {busy[0][0]} is still {busy[0][1]}; wait for the array to end "
                              f"before resubmitting its failed tasks")
        indices = incomplete_tasks(latent_dir, raw_spec, num_tasks)
        if not indices:
            raise SubmitError(f"every task of the {num_tasks}-task precompute of {latent_dir} has finished; "
                              f"nothing to resubmit (`latentforge precompute --assemble` writes the manifest "
                              f"if it is missing)")
    else:
        indices = list(range(num_tasks))
    folder = jobs_dir / "%j"
    ex = _executor(prof, folder, "precompute", f"lf-precompute-{latent_dir.name}")
    job_obj = PrecomputeJob(source, num_tasks)
    jobs = ex.map_array(job_obj, indices) if len(indices) > 1 else [ex.submit(job_obj, indices[0])]
    rec = _record("precompute", jobs[0], prof, profile_path, folder, latent_dir=str(latent_dir), raw_shards=raw_spec,
                  num_tasks=num_tasks, task_indices=indices, job_ids=[str(j.job_id) for j in jobs],
                  folders=[str(_job_folder(folder, str(j.job_id))) for j in jobs])
    rec["job_id"] = str(jobs[0].job_id).split("_")[0] if prof.executor == "slurm" else str(jobs[0].job_id)
    _append_record(record_file, rec)
    return Submission("precompute", prof, jobs, record_file, latent_dir, [rec])


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def describe(sub: Submission) -> str:
    """What `submit` prints: job ids, log paths, the run directory, how to follow."""
    p = sub.profile
    rec = sub.records[0]
    where = (f"SLURM (partition {p.partition or 'default'}, {p.nodes} node(s) x {p.ntasks_per_node} task(s), "
             f"{p.time_min} min, USR2 {p.signal_delay_s} s before the limit, up to {p.max_num_timeout} timeout "
             f"requeue(s))" if p.executor == "slurm" else "local processes (submitit LocalExecutor)")
    if sub.kind == "precompute":
        ids = rec["job_ids"]
        lines = [f"submitted precompute: {len(ids)} task(s) of {rec['num_tasks']} "
                 f"(tasks {_ranges(rec['task_indices'])}) as job(s) {ids[0]}"
                 f"{' .. ' + ids[-1] if len(ids) > 1 else ''} on {where}",
                 f"  latent directory: {sub.run_dir}",
                 f"  logs:             {Path(rec['folders'][0]) / (ids[0] + '_0_log.out')}"
                 f"{'  (one folder per task)' if len(ids) > 1 else ''}",
                 f"  status:           latentforge status {sub.record_file.parent}",
                 "  the last task to finish assembles the dataset manifest; a failed task is resubmitted alone "
                 "with --resubmit-failed"]
        return "\n".join(lines)
    job = sub.jobs[0]
    label = "run directory" if sub.kind == "train" else "target"
    return "\n".join([
        f"submitted {sub.kind} job {job.job_id} on {where}",
        f"  {label}:{' ' * (15 - len(label))}{sub.run_dir}",
        f"  logs:           {rec['stdout']}  (rank 0; .err beside it, one pair per rank)",
        f"  status:         latentforge status {sub.run_dir}",
    ])


def _result_files(job: Any) -> list[Path]:
    subs = getattr(job, "_sub_jobs", None) or [job]
    return [s.paths.result_pickle for s in subs]


def _terminal(job: Any, state: str) -> bool:
    if all(p.exists() for p in _result_files(job)):
        return True
    if job.__class__.__name__ == "LocalJob":
        return job.done()
    return state not in ACTIVE_STATES and state not in ("UNKNOWN", "")


def wait_for(sub: Submission, poll_s: float = 2.0, timeout_s: float | None = None,
         out: Callable[[str], None] = print) -> int:
    """Block until every job of `sub` has ended; print state changes and, for a failure,
    why. Returns 0 if all succeeded, else 1."""
    last: dict[str, str] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(sub.jobs)
    while pending:
        still = []
        for job in pending:
            state = job.state if job.__class__.__name__ == "LocalJob" else \
                job.watcher.get_state(job.job_id, mode="force" if job is pending[0] else "cache")
            if last.get(job.job_id) != state and state != "UNKNOWN":  # UNKNOWN: sacct has not seen it yet
                out(f"[submit] job {job.job_id}: {state}")
                last[job.job_id] = state
            if not _terminal(job, state):
                still.append(job)
        pending = still
        if pending:
            if deadline is not None and time.monotonic() > deadline:
                out(f"[submit] gave up waiting after {timeout_s:.0f} s; jobs still running: "
                    f"{', '.join(j.job_id for j in pending)}")
                return 1
            time.sleep(poll_s)  # polling interval: sacct has no way to notify us
    code = 0
    for job in sub.jobs:
        msg = job_failure(job)
        if msg:
            code = 1
            out(f"[submit] job {job.job_id} failed:\n{msg}")
    if code == 0:
        out(f"[submit] {len(sub.jobs)} job(s) finished")
        if sub.kind == "precompute":
            _assemble_if_needed(sub, out)
    return code


def job_failure(job: Any) -> str:
    """"" for a job whose every task returned, else the reason (the task's traceback tail,
    or the scheduler state of a job that left no result)."""
    for sj in getattr(job, "_sub_jobs", None) or [job]:
        if not sj.paths.result_pickle.exists():
            state = sj.state
            tail = _tail_lines(sj.paths.stderr, 15)
            return f"  task {sj.task_id}: ended {state} without a result\n{tail}"
        exc = sj.exception()
        if exc is not None:
            lines = str(exc).strip().splitlines()
            trace = [ln for ln in lines if ln.strip() and not ln.startswith("---")]
            return "\n".join("  " + ln for ln in trace[-12:])
    return ""


def _assemble_if_needed(sub: Submission, out: Callable[[str], None]) -> None:
    """Belt and braces for `--wait`: the last task assembles the manifest; if two tasks
    finished together on a filesystem that hid one's files from the other, do it here."""
    from latentforge.data import latents as lat

    if (sub.run_dir / lat.MANIFEST).exists():
        out(f"[submit] dataset manifest: {sub.run_dir / lat.MANIFEST}")
        return
    rec = sub.records[0]
    if incomplete_tasks(sub.run_dir, rec["raw_shards"], int(rec["num_tasks"])):
        out("[submit] some tasks have unfinished shards; resubmit them with --resubmit-failed")
        return
    identity = json.loads((sub.run_dir / "identity.json").read_text())
    names = [n for group in task_shards(rec["raw_shards"], int(rec["num_tasks"])) for n in group]
    lat.assemble_manifest(sub.run_dir, identity, expected_shards=names)
    out(f"[submit] assembled the dataset manifest {sub.run_dir / lat.MANIFEST}")


def submit(kind: str, profile: str, preset: str | None = None, config_file: str | None = None,
           overrides: Sequence[str] = (), target: str | None = None, wait: bool = False, *,
           num_tasks: int | None = None, task_index: int | None = None, resubmit_failed: bool = False,
           out: Callable[[str], None] = print) -> int:
    """`latentforge submit`: submit, print ids/logs/run directory; with `wait`, block and
    return non-zero on failure."""
    sub = submit_jobs(kind, profile, preset, config_file, overrides, target, num_tasks=num_tasks,
                      task_index=task_index, resubmit_failed=resubmit_failed)
    out(describe(sub))
    if not wait:
        return 0
    return wait_for(sub, out=out)


# ---------------------------------------------------------------------------------------
# Status.


def _tail_lines(path: Path, n: int, max_bytes: int = 256_000) -> str:
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


def _last_match(path: Path, pattern: str, max_bytes: int = 1_000_000) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    hits = [ln.strip() for ln in text.splitlines() if pattern in ln]
    return hits[-1] if hits else None


def _step_line(run_dir: Path) -> str:
    """The step of the newest complete checkpoint (its COMPLETE record: a few bytes)."""
    d = run_dir / "checkpoints"
    tag = None
    latest = d / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
    if not tag or not (d / tag / "COMPLETE").is_file():
        tags = sorted(p.name for p in d.glob("step_*") if (p / "COMPLETE").is_file()
                      and not p.name.endswith("_universal")) if d.is_dir() else []
        tag = tags[-1] if tags else None
    if not tag:
        return "no checkpoint yet"
    try:
        meta = json.loads((d / tag / "COMPLETE").read_text())
    except (OSError, json.JSONDecodeError):
        return f"checkpoint {tag} (COMPLETE unreadable)"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.get("time", 0)))
    return f"step {meta.get('step')} (checkpoint {tag}, world size {meta.get('world_size')}, written {when})"


def _mlflow_lines(run_dir: Path) -> list[str]:
    """Last metrics of the run's MLflow run, found by the run key the tracker keeps in the
    run directory (no checkpoint is loaded). Never hangs on a dead server: no retries,
    short timeouts."""
    key_file = run_dir / "mlflow_run_key"
    cfg_file = run_dir / "config.yaml"
    if not key_file.is_file() or not cfg_file.is_file():
        return ["  (no MLflow run yet: the run has not started tracking)"]
    try:
        from latentforge.training.config import load_resolved

        cfg = load_resolved(cfg_file)
        if not cfg.tracking.enabled:
            return ["  (tracking.enabled is false)"]
        uri = cfg.resolved_tracking_uri
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            return [f"  (experiment {cfg.tracking.experiment!r} not in {uri})"]
        key = key_file.read_text().strip()
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`latentforge.run_key` = '{key}'",
                                  max_results=1, order_by=["attributes.start_time ASC"])
        if not runs:
            return [f"  (no run with run key {key} in {uri} yet)"]
        run = runs[0]
        lines = [f"  run {run.info.run_id} ({run.info.status}) in {uri}, experiment {cfg.tracking.experiment!r}"]
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith(("train/", "eval/"))}
        step = ""
        if "train/loss" in metrics:
            hist = client.get_metric_history(run.info.run_id, "train/loss")
            step = f" at step {max(m.step for m in hist)}" if hist else ""
        if metrics:
            lines.append(f"  last metrics{step}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
        return lines
    except Exception as e:  # status must answer even when the store is unreachable
        return [f"  (MLflow unavailable: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"]


def _job_lines(records: list[dict[str, Any]], limit: int = 10) -> list[str]:
    states, note = job_states(records[-limit:])
    lines = []
    for r in records[-limit:]:
        ids = r.get("job_ids") or [str(r["job_id"])]
        if len(ids) > 8:  # a big array: one line of counts per state, failed tasks named
            by_state: dict[str, list[str]] = {}
            for jid in ids:
                by_state.setdefault(_state_of(states, jid)["state"], []).append(jid)
            counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_state.items()))
            bad = [j for k, v in by_state.items() if k not in ACTIVE_STATES | {"COMPLETED"} for j in v]
            lines.append(f"  {r['job_id']:<12} {r['kind']:<10} array of {len(ids)}: {counts}"
                         f"{'; not completed: ' + ', '.join(bad[:10]) if bad else ''}"
                         f"  (submitted {r.get('time', '?')}, {r.get('cluster')})")
            continue
        for jid in ids:
            s = _state_of(states, jid)
            extra = []
            if s.get("attempts", 0) > 1:
                extra.append(f"{s['attempts'] - 1} requeue(s)")
            if s.get("elapsed"):
                extra.append(f"elapsed {s['elapsed']}")
            if s.get("exit_code") and s["state"] not in ACTIVE_STATES:
                extra.append(f"exit {s['exit_code']}")
            lines.append(f"  {jid:<12} {r['kind']:<10} {s['state']:<12} {', '.join(extra)}"
                         f"  (submitted {r.get('time', '?')}, {r.get('cluster')})")
    if note:
        lines.append(f"  ({note})")
    return lines


def _precompute_status(folder: Path, records: list[dict[str, Any]]) -> list[str]:
    from latentforge.data import latents as lat

    rec = records[-1]
    latent_dir = Path(rec["latent_dir"])
    lines = [f"latent directory {latent_dir}"]
    try:
        groups = task_shards(rec["raw_shards"], int(rec["num_tasks"]))
    except (OSError, ValueError) as e:
        return lines + [f"  (cannot list the raw shards: {e})"]
    done = [sum(lat.shard_manifest_path(latent_dir, n).exists() for n in g) for g in groups]
    total = sum(len(g) for g in groups)
    lines.append(f"  raw shards done: {sum(done)}/{total}; tasks finished: "
                 f"{sum(d == len(g) for d, g in zip(done, groups))}/{len(groups)}")
    unfinished = [i for i, (d, g) in enumerate(zip(done, groups)) if d < len(g)]
    if unfinished:
        lines.append(f"  unfinished tasks: {', '.join(map(str, unfinished))}")
    manifest = latent_dir / lat.MANIFEST
    lines.append(f"  dataset manifest: {'assembled' if manifest.exists() else 'not assembled yet'}")
    return lines


def status(run_dir: str | os.PathLike) -> str:
    """`latentforge status RUN_DIR`: job states, step, last metrics, log tail. Also takes
    RUN_ROOT/precompute_jobs (array task states and shard progress)."""
    d = Path(run_dir).resolve()
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no such run directory")
    records = read_records(d / JOBS_FILE)
    out = [f"run directory {d}"]
    if records:
        out.append("jobs (newest last):")
        out += _job_lines(records)
    else:
        out.append(f"jobs: none recorded in {d / JOBS_FILE} (submitted without `latentforge submit`?)")
    if records and all(r.get("kind") == "precompute" for r in records):
        out += _precompute_status(d, records)
    else:
        out.append(f"step: {_step_line(d)}")
        out.append("MLflow:")
        out += _mlflow_lines(d)
    if records:
        last = records[-1]
        logs = [Path(f) / f"{Path(f).name}_0_log.out" for f in last.get("folders", [])] or [Path(last["stdout"])]
        log = max((p for p in logs if p.exists()), key=lambda p: p.stat().st_mtime, default=logs[0])
        progress = _last_match(log, "[train] step ") or _last_match(log, "[precompute]")
        if progress:
            out.append(f"last progress line: {progress}")
        out.append(f"log tail ({log}):")
        out.append(_tail_lines(log, 12))
        err = log.with_name(log.name[:-len(".out")] + ".err") if log.name.endswith(".out") else None
        if err is not None and err.exists() and err.stat().st_size:
            out.append(f"stderr tail ({err}):")
            out.append(_tail_lines(err, 6))
    return "\n".join(out)
