"""`latentforge submit` on the real one-node SLURM cluster (slurm/local/cluster.sh):

- a 2-task training job finishes with a checkpoint and an MLflow run;
- a job whose time limit is shorter than its training gets SLURM's pre-timeout USR2, every
  rank checkpoints, it requeues itself and resumes; later it is cancelled (scancel) in the
  middle of a step, resubmitted with the same command, resumes again, and ends bitwise
  identical to the uninterrupted run, in one MLflow run;
- a precompute job array over 4 raw shards writes the same bytes as a local precompute, and a
  task whose output went missing is resubmitted alone.

Runs are shared between assertions through module fixtures, and the interrupted run is one
job history (time-limit requeue, then cancel, then resubmission) so that the suite pays for
three start-ups instead of five.

The pre-timeout signal. slurmctld checks time limits every 30 s (PERIODIC_TIMEOUT) and sends
`--signal=USR2@W` at the first check where the job has at most W + 30 s left, so with a
2-minute limit and W = 90 s the signal arrives at the first check after the job starts:
anywhere in its first 30 s. A tiny CPU run can be over by then on an idle machine. So the
test learns when those checks happen (a probe job that reports its own pre-timeout signal,
run while the reference trains) and submits the job 7 s before one: the signal then lands
while the ranks are loading, whatever the machine's speed, and the loop stops after its
first step. After the requeue the test gives the job a 10-minute limit (`scontrol update`)
so that the requeued attempt runs on instead of being stopped again at its first check.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from slurm_cluster import SlurmCluster
from submitted import assert_runs_end_bitwise_equal, file_tree, job_log, mlflow_runs, poll, sacct, submitting_to

from latentforge.launch import status, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 40  # optimizer steps of the reference and of the interrupted run
_SUBMITTED: list[str] = []  # job ids this module submitted (cancelled at the end if still there)
SIGNAL_LEAD_S = 7.0  # submit this long before a time-limit check: the USR2 lands while the ranks load


# ---------------------------------------------------------------------------------------
# Helpers.


def _write_profile(path: Path, **changes: Any) -> Path:
    """slurm/profiles/local.yaml with some fields changed."""
    import yaml

    from latentforge.launch.profiles import PROFILES_DIR

    data = yaml.safe_load((PROFILES_DIR / "local.yaml").read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


# ---------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def cluster(slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """The cluster, submitted to from a clean environment; this module's jobs cancelled at the end."""
    with submitting_to(slurm_cluster, tmp_path_factory.mktemp("slurm_jobs_cwd"), _SUBMITTED) as c:
        yield c


@pytest.fixture(scope="module")
def tick_probe(cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Callable[[], float]:
    """Submit a probe now; the returned function gives the wall-clock time of one of
    slurmctld's time-limit checks (when the probe got its pre-timeout USR2)."""
    d = tmp_path_factory.mktemp("tick")
    out = d / "tick.txt"
    script = d / "probe.sh"
    script.write_text(
        "#!/bin/bash\n#SBATCH --job-name=lf-tick-probe\n#SBATCH --time=1\n#SBATCH --signal=USR2@30\n"
        f"#SBATCH --ntasks=1\n#SBATCH --cpus-per-task=1\n#SBATCH --output={d}/probe-%j.log\n"
        # 1-minute limit, USR2 30 s before: due at once, so sent at the first check after the start.
        f"srun bash -c 'trap \"date +%s.%N > {out}.tmp; mv {out}.tmp {out}; exit 0\" USR2; "
        "while true; do sleep 0.1; done'\n")
    _SUBMITTED.append(cluster.run(["sbatch", "--parsable", str(script)], cwd=d).stdout.strip().split(";")[0])
    return lambda: float(poll("the probe's pre-timeout signal", lambda: out.exists() and out.read_text(), 120))


@pytest.fixture(scope="module")
def ref_run(cluster: SlurmCluster, tiny_data: tuple[Path, list[str]], tick_probe: Callable[[], float]) -> dict:
    """The uninterrupted 2-task run (while the probe waits for its signal)."""
    root, overrides = tiny_data
    t0 = time.monotonic()
    sub = submit.submit_jobs("train", "local", "tiny", None, [*overrides, "run_name=ref", f"train.max_steps={STEPS}"])
    _SUBMITTED.append(sub.jobs[0].job_id)
    lines: list[str] = []
    code = submit.wait_for(sub, poll_s=1.0, timeout_s=600, out=lines.append)
    assert code == 0, "\n".join(lines) + job_log(sub.run_dir, sub.jobs[0].job_id, ext="err")[-3000:]
    print(f"[test] reference run: {time.monotonic() - t0:.0f} s")
    return {"root": root, "sub": sub, "run_dir": sub.run_dir, "job_id": sub.jobs[0].job_id}


@pytest.fixture(scope="module")
def interrupted(cluster: SlurmCluster, tiny_data: tuple[Path, list[str]], tick_probe: Callable[[], float],
                ref_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One job history: time-limit requeue, then scancel mid-run, then resubmission."""
    root, overrides = tiny_data
    ov = [*overrides, "run_name=interrupted", f"train.max_steps={STEPS}"]
    # 2-minute limit, USR2 90 s before it: due at once, sent at the first time-limit check.
    profile = _write_profile(tmp_path_factory.mktemp("profiles") / "short.yaml", time_min=2, signal_delay_s=90)
    t0 = time.monotonic()

    # 1. Submit 7 s before a time-limit check.
    tick = tick_probe()
    now = time.time()
    target = tick + 30 * math.ceil((now + SIGNAL_LEAD_S + 2 - tick) / 30)
    time.sleep(max(0.0, target - SIGNAL_LEAD_S - time.time()))  # aligning to slurmctld's 30 s check, not a race
    sub_a = submit.submit_jobs("train", str(profile), "tiny", None, ov)
    job_a = sub_a.jobs[0].job_id
    _SUBMITTED.append(job_a)
    run_dir = sub_a.run_dir

    # 2. SLURM signals it; every rank saves; rank 0 requeues. Then a longer limit for the rest.
    def requeued() -> bool:
        attempts = sacct(cluster, job_a)
        if attempts and attempts[-1][1] in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"):
            pytest.fail(f"job {job_a} ended {attempts[-1][1]} without a time-limit requeue (check at {target:.1f}, "
                        f"submitted {target - SIGNAL_LEAD_S:.1f}):\n{job_log(run_dir, job_a)[-3000:]}"
                        f"{job_log(run_dir, job_a, ext='err')[-3000:]}")
        return "requeueing job" in job_log(run_dir, job_a)

    poll(f"job {job_a} to requeue itself", requeued, timeout=240)
    cluster.run(["scontrol", "update", f"JobId={job_a}", "TimeLimit=10"])

    # 3. When the requeued attempt is training, cancel it (SIGTERM: save, no self-requeue).
    def training_again() -> bool:
        text = job_log(run_dir, job_a)
        return "restart 1" in text and "[train] step " in text.split("restart 1", 1)[1]

    poll(f"the requeued job {job_a} to train", training_again, timeout=240)
    cluster.run(["scancel", job_a])
    poll(f"job {job_a} to be CANCELLED", lambda: (sacct(cluster, job_a) or [("", "", "")])[-1][1] == "CANCELLED", 60)

    # 4. Resubmit the same training (with the ordinary profile); it resumes and finishes.
    sub_b = submit.submit_jobs("train", "local", "tiny", None, ov)
    _SUBMITTED.append(sub_b.jobs[0].job_id)
    lines: list[str] = []
    code = submit.wait_for(sub_b, poll_s=1.0, timeout_s=600, out=lines.append)
    job_b = sub_b.jobs[0].job_id
    assert code == 0, "\n".join(lines) + job_log(run_dir, job_b, ext="err")[-3000:]
    print(f"[test] interrupted run (requeue + cancel + resubmit): {time.monotonic() - t0:.0f} s")
    return {"root": root, "run_dir": run_dir, "job_a": job_a, "job_b": job_b, "sub_b": sub_b}


# ---------------------------------------------------------------------------------------
# Scenarios.


def test_two_task_job_finishes_with_checkpoint_and_mlflow_run(ref_run: dict, cluster: SlurmCluster) -> None:
    run_dir, job_id = ref_run["run_dir"], ref_run["job_id"]
    results = ref_run["sub"].jobs[0].results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert {(r["step"], r["preempted"]) for r in results} == {(STEPS, False)}
    assert cluster.wait_job(job_id, timeout=60) == "COMPLETED"
    from latentforge.training import checkpoint

    tag = checkpoint.latest_tag(run_dir)
    assert tag == f"step_{STEPS:08d}" and checkpoint.meta(run_dir, tag)["world_size"] == 2
    assert {p.name for p in (run_dir / "checkpoints" / tag).glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}
    client, runs = mlflow_runs(ref_run["root"], "ref")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert results[0]["mlflow_run_id"] == run.info.run_id
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(5, STEPS + 1, 5))
    assert run.data.tags["world_size"] == "2" and run.data.tags["slurm_job_ids"] == job_id
    # The rank discovery of both tasks: submitit under SLURM, master = the node, port from the job id.
    from latentforge.env import port_for_job

    for rank in (0, 1):
        assert f"[job] train rank {rank}/2 (submitit-slurm, master {cluster.node}:{port_for_job(job_id)})" in \
            job_log(run_dir, job_id, rank)
    text = status.status(run_dir)
    assert re.search(rf"{job_id}\s+train\s+COMPLETED", text), text
    assert f"step {STEPS} (checkpoint {tag}" in text and f"run {run.info.run_id} (FINISHED)" in text
    assert re.search(rf"last progress line: (\d\d:\d\d:\d\d )?\[train\] step {STEPS}/{STEPS}", text), text


def test_time_limit_requeues_after_every_rank_checkpointed(interrupted: dict, cluster: SlurmCluster) -> None:
    run_dir, job_a = interrupted["run_dir"], interrupted["job_a"]
    attempts = sacct(cluster, job_a)
    assert [s for _, s, _ in attempts] == ["REQUEUED", "CANCELLED"], attempts
    log0, log1 = job_log(run_dir, job_a, 0), job_log(run_dir, job_a, 1)
    # SLURM's pre-timeout USR2 (submitit counts it as a timeout: limit <= 10 min), every rank saved.
    m = re.search(r"\[job\] timed out: checkpointed at step (\d+); requeueing job \d+ \(2 timeout\(s\) left\)", log0)
    assert m, log0[-3000:]
    k = int(m.group(1))
    assert f"[train] stop signal 12: checkpointed at step {k}, exiting for requeue" in log0
    assert f"[job] rank 1: checkpointed at step {k}; rank 0 decides the requeue" in log1
    # The requeued attempt (same job id, restart 1) resumed from that checkpoint.
    second = log0.split("restart 1", 1)[1]
    assert f"resuming from step {k}" in second.splitlines()[0]
    assert f"[train] resumed from {run_dir / 'checkpoints' / f'step_{k:08d}'} at step {k}" in second


def test_cancelled_job_resubmitted_resumes_in_the_same_mlflow_run(interrupted: dict, cluster: SlurmCluster) -> None:
    run_dir, job_a, job_b = interrupted["run_dir"], interrupted["job_a"], interrupted["job_b"]
    log_a = job_log(run_dir, job_a)
    # scancel sends SIGTERM: every rank saved at a step boundary, and the job did not requeue itself.
    m = re.findall(r"\[train\] stop signal 15: checkpointed at step (\d+)", log_a)
    assert m, log_a[-3000:]
    j = int(m[-1])
    assert "so the job does not requeue itself" in job_log(run_dir, job_a, ext="err")  # rank 0 says why
    log_b = job_log(run_dir, job_b)
    assert f"[train] resumed from {run_dir / 'checkpoints' / f'step_{j:08d}'} at step {j}" in log_b
    assert f"[train] step {STEPS}/{STEPS}" in log_b
    # One MLflow run across three attempts and two jobs: reopened by id, never created anew.
    client, runs = mlflow_runs(interrupted["root"], "interrupted")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.tags["slurm_job_ids"].split(",") == [job_a, job_b]
    results = interrupted["sub_b"].jobs[0].results()
    assert {r["mlflow_run_id"] for r in results if r["rank"] == 0} == {run.info.run_id}
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "train/loss")})
    assert steps[0] == 5 and steps[-1] == STEPS and len(steps) == STEPS // 5


def test_interrupted_run_ends_bitwise_identical_to_the_uninterrupted_one(interrupted: dict, ref_run: dict) -> None:
    assert_runs_end_bitwise_equal(ref_run["run_dir"], interrupted["run_dir"], STEPS)


def test_precompute_array_matches_local_precompute(cluster: SlurmCluster, tiny_data: tuple[Path, list[str]],
                                                   tmp_path: Path) -> None:
    root, overrides = tiny_data
    latent = tmp_path / "latents"
    # 4 raw shards in 2 array tasks of 2 shards; no decoding workers (1 CPU per task).
    ov = [*overrides, f"data.latent_dir={latent}", "data.precompute_workers=0"]
    sub = submit.submit_jobs("precompute", "local", "tiny", None, ov, num_tasks=2)
    _SUBMITTED.extend(j.job_id for j in sub.jobs)
    assert [j.job_id for j in sub.jobs] == [f"{sub.records[0]['job_id']}_{i}" for i in (0, 1)]
    lines: list[str] = []
    assert submit.wait_for(sub, poll_s=1.0, timeout_s=300, out=lines.append) == 0, "\n".join(lines)
    local = file_tree(root / "latents")
    assert len([k for k in local if k.endswith(".tar")]) == 4
    assert file_tree(latent) == local  # parts, per-shard and dataset manifests, null text: byte for byte
    text = status.status(root / "precompute_jobs")
    assert "raw shards done: 4/4; tasks finished: 2/2" in text and "dataset manifest: assembled" in text

    # Task 1's output goes missing (as after a failed task): only task 1 is resubmitted.
    for name in ("00002", "00003"):
        for p in (latent / "shards").glob(f"{name}*"):
            p.unlink()
    (latent / "manifest.json").unlink()
    assert "unfinished tasks: 1" in status.status(root / "precompute_jobs")
    sub = submit.submit_jobs("precompute", "local", "tiny", None, ov, resubmit_failed=True)
    _SUBMITTED.extend(j.job_id for j in sub.jobs)
    assert sub.records[0]["task_indices"] == [1] and len(sub.jobs) == 1
    assert submit.wait_for(sub, poll_s=1.0, timeout_s=300, out=lines.append) == 0, "\n".join(lines)
    assert file_tree(latent) == local
    assert "[precompute] dataset: 256 written" in sub.jobs[0].stdout()  # the last task assembled it


def test_precompute_array_over_sources_with_buckets_filters_and_captions(cluster: SlurmCluster, tmp_path: Path) -> None:
    """Web-scale data through the same job array: two sources of non-square images with
    aspect-ratio buckets, a metadata filter and two captions, 3 array tasks over their 5 raw
    shards. Each source's latents equal a local precompute's byte for byte, each manifest is
    assembled by the task that finished its source, and a task whose output went missing
    is resubmitted alone."""
    from latentforge.config import resolve
    from latentforge.data import precompute, synth

    synth.write_shards(tmp_path / "rawA", 36, 12, 32, seed=0, max_aspect=2.0, captions=2, metadata=True)
    synth.write_shards(tmp_path / "rawB", 16, 8, 32, seed=1, max_aspect=2.0, captions=2, metadata=True)

    def overrides(out: str) -> list[str]:
        return [f"run_root={tmp_path / out}", f"data.latent_dir={tmp_path / out / 'latents'}",
                "data.precompute_workers=0", "data.latent_samples_per_shard=8", "data.bucket_max_ratio=2",
                "data.filter_min_aesthetic=4", "data.caption_fields=[captions]",
                f"data.sources=[{{name: a, raw_shards: '{tmp_path}/rawA/*.tar'}}, "
                f"{{name: b, raw_shards: '{tmp_path}/rawB/*.tar'}}]"]

    precompute.run(resolve("tiny", None, overrides("local")))
    local = {s: file_tree(tmp_path / "local" / "latents" / s) for s in ("a", "b")}
    assert b"filtered_aesthetic" in local["a"]["manifest.json"] and b'"buckets"' in local["b"]["identity.json"]
    ov = overrides("slurm")
    sub = submit.submit_jobs("precompute", "local", "tiny", None, ov, num_tasks=3)
    _SUBMITTED.extend(j.job_id for j in sub.jobs)
    assert len(sub.records[0]["sources"]) == 2
    lines: list[str] = []
    assert submit.wait_for(sub, poll_s=1.0, timeout_s=400, out=lines.append) == 0, "\n".join(lines)
    latents = tmp_path / "slurm" / "latents"
    assert {s: file_tree(latents / s) for s in ("a", "b")} == local
    text = status.status(tmp_path / "slurm" / "precompute_jobs")
    assert "raw shards done: 5/5; tasks finished: 3/3" in text and "assembled (2/2 sources)" in text

    # Task 1 (shard 00002 of source a, shard 00000 of b) loses its output: only it is resubmitted.
    for p in [*(latents / "a" / "shards").glob("00002*"), *(latents / "b" / "shards").glob("00000*"),
              latents / "a" / "manifest.json", latents / "b" / "manifest.json"]:
        p.unlink()
    assert "unfinished tasks: 1" in status.status(tmp_path / "slurm" / "precompute_jobs")
    sub = submit.submit_jobs("precompute", "local", "tiny", None, ov, resubmit_failed=True)
    _SUBMITTED.extend(j.job_id for j in sub.jobs)
    assert sub.records[0]["task_indices"] == [1]
    assert submit.wait_for(sub, poll_s=1.0, timeout_s=400, out=lines.append) == 0, "\n".join(lines)
    assert {s: file_tree(latents / s) for s in ("a", "b")} == local
