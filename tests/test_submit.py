"""`latentforge submit` / `status` and the job classes, without a SLURM cluster: the requeue
policy, light job pickles, the signal take-over, sacct parsing, precompute task layout,
one-line errors, status of a run directory, and (slow) a training job through the
local-processes profile that is preempted, requeues itself and resumes."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from latentforge.launch import jobs, records, status, submit
from latentforge.launch.cli import main
from latentforge.launch.profiles import load_profile

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# Requeue policy.


def test_submitit_counts_every_signal_as_a_timeout_up_to_10_minutes() -> None:
    # submitit's rule: timed out once walltime >= min(0.8 * limit, limit - 10 min).
    assert jobs.submitit_timed_out(1, timeout_min=2) and jobs.submitit_timed_out(0, timeout_min=10)
    assert not jobs.submitit_timed_out(60 * 60, timeout_min=240)  # preempted after 1 h of 4 h
    assert jobs.submitit_timed_out(231 * 60, timeout_min=240)


def test_requeue_keeps_submitits_timeout_countdown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0's requeue after the collective save: submitit's countdown in the re-pickled
    submission, its JobEnvironment._requeue, and a refusal that says why."""
    from submitit.core.utils import DelayedSubmission

    job = jobs.TrainJob(jobs.ConfigSource("tiny", None, (), str(tmp_path)), str(tmp_path / "run"))
    folder = tmp_path / "run" / "slurm" / "77"  # the job folder `submit` gives it, in the run directory
    folder.mkdir(parents=True)
    for k, v in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_FOLDER": str(folder), "SUBMITIT_LOCAL_JOB_ID": "77",
                 "SUBMITIT_LOCAL_GLOBALID": "0", "SUBMITIT_LOCAL_NTASKS": "2"}.items():
        monkeypatch.setenv(k, v)
    pickled = folder / "77_submitted.pkl"
    first = DelayedSubmission(job)
    first.set_timeout(5, 1)  # a 5-minute limit (every signal is a timeout), one timeout left
    first.dump(pickled)
    with pytest.raises(SystemExit) as e:
        job._requeue(step=12, walltime_s=30)
    assert e.value.code == 144  # the local executor's "requeue me": its controller restarts the tasks
    again = DelayedSubmission.load(pickled)
    assert again.function == job and (again._timeout_min, again._timeout_countdown) == (5, 0)
    with pytest.raises(jobs.RequeueRefused, match="not requeued: it reached its time limit more times than the "
                                                  "profile's max_num_timeout allows.*checkpoint at step 20"):
        job._requeue(step=20, walltime_s=30)
    # A preemption an hour into a 4-hour slice is not a timeout: it does not use one up.
    first.set_timeout(240, 0)
    pickled.unlink()
    first.dump(pickled)
    with pytest.raises(SystemExit):
        job._requeue(step=30, walltime_s=3600)
    assert DelayedSubmission.load(pickled)._timeout_countdown == 0


class _FakeStop:
    """The StopFlag interface of training/loop.py, without importing torch."""

    def __init__(self) -> None:
        self.signum = None
        self.installed: tuple[int, ...] = ()

    def install(self, signums: tuple[int, ...]) -> None:
        self.installed = signums

    def set(self, signum: int = signal.SIGUSR2) -> None:
        self.signum = signum


def test_stop_signals_are_only_recorded_then_handed_to_the_loop() -> None:
    old = {s: signal.getsignal(s) for s in jobs.STOP_SIGNALS}
    try:
        jobs._EARLY.clear()
        jobs.take_over_stop_signals()
        os.kill(os.getpid(), signal.SIGUSR2)  # would kill the process (or requeue, under submitit) otherwise
        assert jobs._EARLY == [signal.SIGUSR2]
        stop = _FakeStop()
        jobs.hand_over_to(stop)
        assert stop.installed == (signal.SIGUSR2, signal.SIGTERM) and stop.signum == signal.SIGUSR2
    finally:
        jobs._EARLY.clear()
        for s, h in old.items():
            signal.signal(s, h)


def test_checkpoint_only_flags_and_returns_the_same_job() -> None:
    job = jobs.TrainJob(jobs.ConfigSource("tiny", None, ("train.max_steps=5",), "/tmp"), "/tmp/run")
    try:
        delayed = job.checkpoint()
        assert delayed.function == job and delayed.args == () and jobs._EARLY[-1] == signal.SIGUSR2
    finally:
        jobs._EARLY.clear()
    pre = jobs.PrecomputeJob(jobs.ConfigSource(), num_tasks=4)
    assert pre.checkpoint(2).args == (2,)


def test_job_pickles_are_small_and_unpickle_without_torch(tmp_path: Path) -> None:
    import cloudpickle

    src = jobs.ConfigSource("tiny", str(tmp_path / "c.yaml"), ("train.max_steps=5",), str(tmp_path))
    blobs = [cloudpickle.dumps(j) for j in (jobs.TrainJob(src, str(tmp_path / "run")),
                                            jobs.EvalJob(src, str(tmp_path / "run")), jobs.PrecomputeJob(src, 4))]
    assert max(len(b) for b in blobs) < 2000
    (tmp_path / "jobs.pkl").write_bytes(pickle.dumps(blobs))
    code = (f"import pickle, sys; blobs = pickle.load(open({str(tmp_path / 'jobs.pkl')!r}, 'rb')); "
            "objs = [pickle.loads(b) for b in blobs]; "
            "heavy = [m for m in ('torch', 'deepspeed', 'mlflow', 'open_clip', 'diffusers') if m in sys.modules]; "
            "print(type(objs[0]).__name__, heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("TrainJob"), res.stdout + res.stderr


# ---------------------------------------------------------------------------------------
# Job states and records.


def test_parse_sacct_counts_requeued_attempts() -> None:
    text = ("27|REQUEUED|00:00:42|0:0\n27|COMPLETED|00:01:44|0:0\n"
            "31_0|COMPLETED|00:00:11|0:0\n31_[1-3%2]|PENDING|00:00:00|0:0\n40|CANCELLED by 0|00:00:09|0:15\n")
    states = records.parse_sacct(text)
    assert states["27"] == {"state": "COMPLETED", "elapsed": "00:01:44", "exit_code": "0:0", "attempts": 2}
    assert states["40"]["state"] == "CANCELLED"
    assert records.state_of(states, "31_0")["state"] == "COMPLETED"
    assert records.state_of(states, "31_2")["state"] == "PENDING"  # still inside the pending range
    assert records.state_of(states, "31_7")["state"] == "UNKNOWN"


def test_task_ranges_print_compactly() -> None:
    assert submit._ranges([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8" and submit._ranges([3]) == "3"


def test_local_job_state_from_pid_and_result_files(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "slurm" / str(dead.pid)
    folder.mkdir(parents=True)
    rec = {"job_id": str(dead.pid), "cluster": "local", "folder": str(folder), "tasks": 2}
    assert records._local_state(rec, tmp_path)["state"].startswith("ENDED")
    for t, outcome in ((0, "success"), (1, "error")):
        (folder / f"{dead.pid}_{t}_result.pkl").write_bytes(pickle.dumps((outcome, None)))
    assert records._local_state(rec, tmp_path)["state"] == "FAILED"
    rec["job_id"] = str(os.getpid())  # a live process: still running
    assert records._local_state(rec, tmp_path)["state"] == "RUNNING"


def _latent_tree(tmp_path: Path, names: list[str], done: list[str]) -> tuple[Path, str]:
    raw = tmp_path / "raw"
    raw.mkdir()
    for n in names:
        (raw / f"{n}.tar").write_bytes(b"")
    latent = tmp_path / "latents"
    (latent / "shards").mkdir(parents=True)
    for n in done:
        (latent / "shards" / f"{n}.json").write_text("{}")
    return latent, str(raw / "*.tar")


def test_incomplete_tasks_follow_the_array_layout(tmp_path: Path) -> None:
    names = [f"{i:05d}" for i in range(5)]
    latent, spec = _latent_tree(tmp_path, names, done=["00000", "00001", "00002", "00004"])
    # 5 shards in 3 tasks: [0, 1], [2, 3], [4]; only 00003 is missing.
    assert records.task_shards(spec, 3) == [["00000", "00001"], ["00002", "00003"], ["00004"]]
    assert records.incomplete_tasks(latent, spec, 3) == [1]


# ---------------------------------------------------------------------------------------
# Submitting: errors that must come before anything reaches a queue.


def test_precompute_array_tasks_get_one_gpu_and_no_exclusive_node() -> None:
    prof = load_profile("gpu-8x")
    p = prof.precompute_executor_params()
    assert (p["nodes"], p["tasks_per_node"], p["gpus_per_node"]) == (1, 1, 1)
    assert "exclusive" not in p["slurm_additional_parameters"] and p["slurm_additional_parameters"]["requeue"]
    assert p["slurm_array_parallelism"] == prof.array_parallelism
    assert prof.executor_params()["slurm_additional_parameters"]["exclusive"] is True  # training keeps it


@pytest.mark.slow  # two local processes that import torch
def test_wait_reports_a_failed_job_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that fails is not requeued; `--wait` returns 1 with the task's error."""
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SUBMITIT_")) or k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {max_steps: ten}\n")  # passes the submit-time look, fails in the job
    lines: list[str] = []
    sub = submit.submit_jobs("eval", "local-processes", target=str(run))
    assert submit.wait_for(sub, poll_s=0.2, timeout_s=120, out=lines.append) == 1
    text = "\n".join(lines)
    assert f"job {sub.jobs[0].job_id} failed" in text and "train.max_steps: expected int, got 'ten'" in text, text
    assert json.loads((run / "jobs.jsonl").read_text())["kind"] == "eval"
    assert "FAILED" in status.status(run)


@pytest.mark.parametrize("argv, message", [
    (["submit", "eval", "--profile", "local-processes"], "--target RUN_DIR|EXPORT_DIR is required"),
    (["submit", "eval", "--profile", "local-processes", "--target", "/"], "is neither a run directory"),
    (["submit", "train", "--profile", "local-processes", "--task-index", "1"], "are for `submit precompute`"),
    (["submit", "train", "--profile", "no-such-profile"], "known: "),
    # Overrides after options are overrides (argparse alone would call them unrecognized).
    (["submit", "train", "--profile", "local-processes", "--preset", "tiny", "train.global_batch_size=15"],
     "train.global_batch_size: 15 is not divisible by the world size 2"),
    (["submit", "train", "--profile", "local-processes", "train.max_step=3"], "train.max_step: unknown key"),
])
def test_bad_submissions_fail_in_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_train_is_refused_while_a_job_of_the_run_directory_is_alive(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = {"job_id": str(alive.pid), "cluster": "local", "kind": "train", "folder": str(run_dir / "slurm"),
               "tasks": 2, "stdout": "x"}
        (run_dir / "jobs.jsonl").write_text(json.dumps(rec) + "\n")
        with pytest.raises(submit.SubmitError, match=f"job {alive.pid} is still RUNNING"):
            submit.submit_jobs("train", "local-processes", "tiny", None, [f"run_root={tmp_path / 'runs'}",
                                                                          "run_name=busy"])
    finally:
        alive.kill()
        alive.wait()


def test_precompute_task_options_are_checked(tmp_path: Path) -> None:
    latent, spec = _latent_tree(tmp_path, ["a", "b"], done=["a"])
    ov = [f"run_root={tmp_path}", f"data.raw_shards={spec}", f"data.latent_dir={latent}"]
    with pytest.raises(submit.SubmitError, match="no earlier precompute"):
        submit.submit_jobs("precompute", "local-processes", "tiny", None, ov, resubmit_failed=True)
    with pytest.raises(submit.SubmitError, match="--task-index: 5 is outside 0..1"):
        submit.submit_jobs("precompute", "local-processes", "tiny", None, ov, task_index=5, num_tasks=2)
    (tmp_path / "precompute_jobs").mkdir()
    (tmp_path / "precompute_jobs" / "jobs.jsonl").write_text(json.dumps(
        {"job_id": "1", "kind": "precompute", "cluster": "slurm", "latent_dir": str(latent), "num_tasks": 2,
         "job_ids": []}) + "\n")
    with pytest.raises(submit.SubmitError, match="differs from the 2 tasks"):
        submit.submit_jobs("precompute", "local-processes", "tiny", None, ov, resubmit_failed=True, num_tasks=3)


# ---------------------------------------------------------------------------------------
# Status.


def test_submit_prints_job_ids_logs_and_the_run_directory(tmp_path: Path) -> None:
    class _Job:
        job_id = "42"

    prof = load_profile("local")
    rec = {"stdout": str(tmp_path / "run/slurm/42/42_0_log.out")}
    text = submit.describe(submit.Submission("train", prof, [_Job()], tmp_path / "run/jobs.jsonl", tmp_path / "run",
                                             [rec]))
    assert "submitted train job 42 on SLURM (partition debug, 1 node(s) x 2 task(s), 10 min" in text
    assert f"run directory:  {tmp_path / 'run'}" in text and rec["stdout"] in text
    assert f"latentforge status {tmp_path / 'run'}" in text
    rec = {"job_ids": ["7_0", "7_1", "7_3"], "task_indices": [0, 1, 3], "num_tasks": 4,
           "folders": [str(tmp_path / "pj" / j) for j in ("7_0", "7_1", "7_3")]}
    text = submit.describe(submit.Submission("precompute", prof, [], tmp_path / "pj" / "jobs.jsonl",
                                             tmp_path / "latents", [rec]))
    assert "3 task(s) of 4 (tasks 0-1,3) as job(s) 7_0 .. 7_3" in text
    assert str(tmp_path / "pj" / "7_0" / "7_0_0_log.out") in text and f"status {tmp_path / 'pj'}" in text


def test_status_shows_state_step_and_log_tail(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    folder = run_dir / "slurm" / "123"
    folder.mkdir(parents=True)
    (folder / "123_0_log.out").write_text("".join(f"[train] step {s}/50 loss 0.5 lr 1e-3\n" for s in (5, 10, 15))
                                          + "[checkpoint] saved x\n")
    (folder / "123_0_result.pkl").write_bytes(pickle.dumps(("success", {})))
    ck = run_dir / "checkpoints" / "step_00000010"
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text(json.dumps({"step": 10, "world_size": 2, "zero_stage": 2, "time": time.time()}))
    (run_dir / "checkpoints" / "latest").write_text("step_00000010")
    rec = {"job_id": "123", "cluster": "local", "kind": "train", "folder": str(folder), "tasks": 1,
           "stdout": str(folder / "123_0_log.out"), "time": "2030-01-01T00:00:00"}
    (run_dir / "jobs.jsonl").write_text(json.dumps(rec) + "\nnot json\n")
    text = status.status(run_dir)
    assert "123" in text and "COMPLETED" in text
    assert "step 10 (checkpoint step_00000010, world size 2" in text
    assert "last progress line: [train] step 15/50" in text
    assert "(no MLflow run yet" in text and "[checkpoint] saved x" in text


class _Boom:
    """A pickle that runs code when loaded: what a planted result file would do."""

    def __reduce__(self):
        return (os.system, ("touch BOOM",))


def test_result_pickles_are_read_only_from_the_users_own_job_folder(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"  # job id: a number no pid can have (a local job's id is its controller's pid)
    folder = run_dir / "slurm" / "999999999"
    folder.mkdir(parents=True)
    result = folder / "999999999_0_result.pkl"
    result.write_bytes(pickle.dumps(("success", {})))
    rec = {"job_id": "999999999", "cluster": "local", "kind": "train", "folder": str(folder), "tasks": 1}
    assert records.job_states([rec], run_dir)[0]["999999999"]["state"] == "COMPLETED"

    def refused(rec: dict, why: str) -> None:
        state = records.job_states([rec], run_dir)[0]["999999999"]
        assert state["state"] == "UNKNOWN (result file refused)" and why in state["note"], state
        assert "\n" not in state["note"] and not (tmp_path / "BOOM").exists()

    result.write_bytes(pickle.dumps(_Boom()))
    os.chmod(result, 0o666)  # writable by every user
    refused(rec, f"{result}: writable by every user; the pickle is not loaded")
    os.chmod(result, 0o644)
    os.chmod(folder, 0o777)  # anyone may replace it
    refused(rec, f"{folder}: writable by every user")
    os.chmod(folder, 0o755)
    if os.geteuid() == 0:  # giving a file away needs root
        os.chown(result, 4242, -1)
        refused(rec, "owned by uid 4242, not by you (uid 0)")
        os.chown(result, 0, -1)
    # A record pointing outside the run directory (a tampered jobs.jsonl).
    elsewhere = tmp_path / "elsewhere" / "999999999"
    elsewhere.mkdir(parents=True)
    (elsewhere / "999999999_0_result.pkl").write_bytes(pickle.dumps(_Boom()))
    refused({**rec, "folder": str(elsewhere)}, f"the job folder {elsewhere} is not under {run_dir}")
    link = folder / "999999999_0_result.pkl"
    link.unlink()
    link.symlink_to(elsewhere / "999999999_0_result.pkl")  # a link out of the job folder
    refused(rec, "not inside the job folder")


def test_status_summarises_a_big_array(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    states = {f"9_{i}": {"state": "COMPLETED", "attempts": 1} for i in range(10)}
    states["9_3"] = {"state": "FAILED", "attempts": 1}
    states["9_[10-11%4]"] = {"state": "PENDING", "attempts": 1}
    monkeypatch.setattr(records, "job_states", lambda recs, home: (states, ""))
    rec = {"job_id": "9", "kind": "precompute", "cluster": "slurm", "job_ids": [f"9_{i}" for i in range(12)]}
    (line,) = status._job_lines([rec], tmp_path)
    assert "array of 12: 9 COMPLETED, 1 FAILED, 2 PENDING; not completed: 9_3" in line


def test_status_of_a_missing_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["status", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The local-processes profile: the same TrainJob as under SLURM, as two local processes.


def _task_pids(root_pid: int) -> list[int]:
    """The task processes of a local submitit job: the children of its controller (with
    profile setup lines the job's process is a shell that starts the controller)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int(p.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))

    def argv(pid: int) -> list[bytes]:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return []

    controller = root_pid if b"submitit.local._local" in argv(root_pid) else next(
        (c for c in children.get(root_pid, []) if b"submitit.local._local" in argv(c)), None)
    assert controller is not None, f"no submitit controller under pid {root_pid}"
    return [c for c in children.get(controller, []) if b"submitit.core._submit" in argv(c)]


@pytest.mark.slow
def test_local_processes_train_job_is_preempted_requeues_and_resumes(tiny_data, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):  # pytest itself may run under SLURM or torchrun
        if k.startswith(("SLURM_", "SUBMITIT_")) or k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    root, overrides = tiny_data
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    sub = submit.submit_jobs("train", "local-processes", "tiny", None,
                             [*overrides, "run_name=local_preempt", "train.max_steps=15"])
    run_dir = sub.run_dir
    job = sub.jobs[0]
    folder = run_dir / "slurm" / job.job_id
    # USR2 to every task (what SLURM does before the time limit) as soon as both ranks have
    # taken the stop signals over: the flag is set while they load, and the loop stops after
    # its first step whatever the machine's speed.
    deadline = time.monotonic() + 240
    while not all("[job] train rank" in (p.read_text() if p.exists() else "")
                  for p in (folder / f"{job.job_id}_{r}_log.out" for r in (0, 1))):
        assert job.state == "RUNNING", job.stderr()
        assert time.monotonic() < deadline, "the ranks did not start in 240 s"
        time.sleep(0.1)  # polling interval
    tasks = _task_pids(job._process.pid)
    assert len(tasks) == 2
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    assert submit.wait_for(sub, poll_s=0.5, timeout_s=300, out=lines.append) == 0, "\n".join(lines)

    log = (folder / f"{job.job_id}_0_log.out").read_text()
    # A 30-minute limit: a preemption, not a timeout (none of max_num_timeout used up).
    assert "[job] preempted: checkpointed at step 1; requeueing job" in log, log[-3000:]
    assert "[job] rank 1: checkpointed at step 1" in (folder / f"{job.job_id}_1_log.out").read_text()
    assert f"[train] resumed from {run_dir / 'checkpoints' / 'step_00000001'} at step 1" in log
    assert [r["step"] for r in job.results()] == [15, 15]  # both ranks, after the restart
    text = status.status(run_dir)
    assert "COMPLETED" in text and "step 15 (checkpoint step_00000015" in text and "FINISHED" in text
