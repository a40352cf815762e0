"""`latentforge submit`: the pipeline's jobs through submitit.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from latentforge.launch import records as jobrec
from latentforge.launch import submitit_compat
from latentforge.launch.jobs import ConfigSource, EvalJob, PrecomputeJob, TrainJob
from latentforge.launch.profiles import Profile, find_profile, load_profile


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
# Submitting.


def _world_check(cfg: Any, prof: Profile, where: str) -> None:
    """The batch split training will do, checked now rather than after the job starts."""
    from latentforge.config import batch_split

    batch_split(cfg, prof.nodes * prof.ntasks_per_node,
                where=f"{where}: {prof.nodes} node(s) x {prof.ntasks_per_node} task(s)")


def _executor(prof: Profile, folder: Path, kind: str, name: str) -> Any:
    ex = prof.make_executor(folder, kind=kind)
    ex.update_parameters(name=name)
    return ex


def _record(kind: str, job: Any, prof: Profile, profile_path: str, folder_pattern: Path, **extra: Any) -> dict:
    jid = str(job.job_id)
    folder = jobrec.job_folder(folder_pattern, jid)
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": kind, "job_id": jid, "cluster": prof.executor,
           "profile": profile_path, "folder": str(folder), "tasks": int(getattr(job, "num_tasks", 1)),
           "stdout": str(jobrec.log_paths(folder, jid)[0]), "stderr": str(jobrec.log_paths(folder, jid)[1])}
    rec.update(extra)
    return rec


def _submit_one(kind: str, fn: Any, prof: Profile, profile_path: str, home: Path, **extra: Any) -> Submission:
    """Submit one job whose logs go to HOME/slurm/<job id> and whose record goes to HOME's jobs file."""
    folder = home / "slurm" / "%j"
    job = _executor(prof, folder, kind, f"lf-{kind}-{home.name}").submit(fn)
    rec = _record(kind, job, prof, profile_path, folder, **extra)
    jobrec.append_record(home / jobrec.JOBS_FILE, rec)
    return Submission(kind, prof, [job], home / jobrec.JOBS_FILE, home, [rec])


def submit_jobs(kind: str, profile: str, preset: str | None = None, config_file: str | None = None,
                overrides: Sequence[str] = (), target: str | None = None, *, num_tasks: int | None = None,
                task_index: int | None = None, resubmit_failed: bool = False) -> Submission:
    """Build the executor from the profile, submit, record. Raises SubmitError/ConfigError/
    ProfileError with one line on bad input. See `submit` for the printing wrapper."""
    from latentforge.config import resolve

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
        if cfg.model.init_from or cfg.resolved_run_dir.is_dir():
            from latentforge.training.loop import preflight

            preflight(cfg)  # model.init_from against the latents, a resume on another latent set
        run_dir = cfg.resolved_run_dir.resolve()
        busy = jobrec.active_jobs(jobrec.read_records(run_dir / jobrec.JOBS_FILE), run_dir)
        if busy:
            jid, st = busy[0]
            raise SubmitError(f"{run_dir}: job {jid} is still {st} in this run directory; two jobs would write the "
                              f"same checkpoints. Wait for it, or scancel it, or choose another run_name")
        return _submit_one("train", TrainJob(source, str(run_dir)), prof, profile_path, run_dir, run_dir=str(run_dir))

    # Precompute: a job array over groups of raw shards (of every source, with data.sources).
    from latentforge.data.sources import sources_of, work_items

    if not cfg.data.raw_shards and not cfg.data.sources:  # the embedded synthetic dataset: made here, once
        from latentforge.data.synth import ensure_synth

        ensure_synth(cfg)
    raw_spec = cfg.resolved_raw_shards
    work = [(s.latent_dir.resolve(), s.raw_shards) for s in sources_of(cfg)]
    n_shards = len(work_items(work))
    latent_dir = cfg.resolved_latent_dir.resolve()
    jobs_dir = Path(cfg.run_root).resolve() / jobrec.PRECOMPUTE_JOBS
    record_file = jobs_dir / jobrec.JOBS_FILE
    previous = [r for r in jobrec.read_records(record_file) if r.get("latent_dir") == str(latent_dir)]
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
        busy = jobrec.active_jobs(previous, jobs_dir)
        if busy:
            raise SubmitError(f"precompute job {busy[0][0]} is still {busy[0][1]}; wait for the array to end "
                              f"before resubmitting its failed tasks")
        indices = jobrec.incomplete_tasks(latent_dir, raw_spec, num_tasks, work)
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
                  folders=[str(jobrec.job_folder(folder, str(j.job_id))) for j in jobs])
    if cfg.data.sources:
        rec["sources"] = [{"latent_dir": str(d), "raw_shards": spec} for d, spec in work]
    rec["job_id"] = str(jobs[0].job_id).split("_")[0] if prof.executor == "slurm" else str(jobs[0].job_id)
    jobrec.append_record(record_file, rec)
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


def _tasks(job: Any) -> list[Any]:
    """The job's tasks (a multi-task job has one sub-job per task; else the job itself)."""
    return [job.task(i) for i in range(job.num_tasks)]


def _result_files(job: Any) -> list[Path]:
    return [t.paths.result_pickle for t in _tasks(job)]


def _terminal(job: Any, state: str) -> bool:
    if all(p.exists() for p in _result_files(job)):
        return True
    if job.__class__.__name__ == "LocalJob":
        return job.done()
    return state not in jobrec.ACTIVE_STATES and state not in ("UNKNOWN", "")


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
                submitit_compat.job_state(job, force=job is pending[0])
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
        msg = job_failure(job, sub.record_file.parent)
        if msg:
            code = 1
            out(f"[submit] job {job.job_id} failed:\n{msg}")
    if code == 0:
        out(f"[submit] {len(sub.jobs)} job(s) finished")
        if sub.kind == "precompute":
            _assemble_if_needed(sub, out)
    return code


def job_failure(job: Any, home: Path) -> str:
    """"" for a job whose every task returned, else the reason (the task's traceback tail,
    or the scheduler state of a job that left no result). `home` holds the job's record;
    a result pickle is read only from the job's own folder under it (records.trusted_pickle)."""
    for sj in _tasks(job):
        if not sj.paths.result_pickle.exists():
            state = sj.state
            tail = jobrec.tail_lines(sj.paths.stderr, 15)
            return f"  task {sj.task_id}: ended {state} without a result\n{tail}"
        try:
            jobrec.trusted_pickle(sj.paths.result_pickle, sj.paths.folder, home)
        except jobrec.UntrustedPickle as e:
            return f"  task {sj.task_id}: {e}"
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

    rec = sub.records[0]
    work = jobrec.precompute_work(rec)
    if all((d / lat.MANIFEST).exists() for d, _ in work):
        out(f"[submit] dataset manifest: {', '.join(str(d / lat.MANIFEST) for d, _ in work)}")
        return
    if jobrec.incomplete_tasks(sub.run_dir, rec["raw_shards"], int(rec["num_tasks"]), work):
        out("[submit] some tasks have unfinished shards; resubmit them with --resubmit-failed")
        return
    groups = jobrec.task_work(work, int(rec["num_tasks"]))
    for d, _ in work:
        if not (d / lat.MANIFEST).exists():
            identity = json.loads((d / "identity.json").read_text())
            lat.assemble_manifest(d, identity, expected_shards=[n for g in groups for dd, n in g if dd == d])
            out(f"[submit] assembled the dataset manifest {d / lat.MANIFEST}")


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
