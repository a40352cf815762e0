"""The local SLURM cluster (slurm/local/cluster.sh) runs real multi-task jobs, keeps
accounting, and works with submitit, our rank discovery, profiles and sbatch templates."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import REPO, SlurmCluster

from latentforge import env as lfenv

pytestmark = pytest.mark.slurm

# Each rank prints what latentforge/env.py discovers, as one JSON line.
PROBE = ("import dataclasses, json, os; from latentforge import env; "
         "print(json.dumps(dict(dataclasses.asdict(env.discover()), procid=os.environ['SLURM_PROCID'])))")


def _ranks(text: str) -> list[dict]:
    return sorted((json.loads(line[line.index("{"):]) for line in text.splitlines() if "{" in line),
                  key=lambda r: r["rank"])


def _executor(folder: Path, cluster: SlurmCluster, tasks: int):
    import submitit

    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    # SLURM may deliver the pre-timeout USR2 up to ~60 s early: with 2 minutes and the default
    # 90 s delay it can arrive at once and fail the job as "timed-out". 5 min - 30 s is safe.
    ex.update_parameters(slurm_partition=cluster.partition, tasks_per_node=tasks, cpus_per_task=1,
                         timeout_min=5, slurm_signal_delay_s=30)
    return ex


def _wait_done(job, timeout: float) -> None:
    """Poll a submitit job (forcing a fresh sacct each time) until it is done."""
    deadline = time.monotonic() + timeout
    while not job.done(force_check=True):
        assert time.monotonic() < deadline, f"job {job.job_id} not done after {timeout}s (state {job.state})"
        time.sleep(0.5)  # polling interval


def test_srun_two_tasks(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run(["srun", "-n2", "-p", slurm_cluster.partition, "bash", "-c",
                             "echo $SLURM_PROCID $SLURM_NTASKS"], timeout=60).stdout
    assert sorted(out.split("\n")[:2]) == ["0 2", "1 2"]


def test_sbatch_two_tasks_sacct_completes_and_ranks_are_discovered(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --cpus-per-task=1\n#SBATCH --time=2\n"
                      f"#SBATCH --output={tmp_path}/out-%j.txt\n"
                      f"srun {sys.executable} -c \"{PROBE}\"\n")
    # (Not `sbatch --wait`: it polls with a back-off and adds up to 10 s.)
    job_id = slurm_cluster.run(["sbatch", "--parsable", str(script)], cwd=tmp_path).stdout.strip().split(";")[0]
    assert slurm_cluster.wait_job(job_id, timeout=120) == "COMPLETED"
    ranks = _ranks((tmp_path / f"out-{job_id}.txt").read_text())
    assert [(r["rank"], r["procid"]) for r in ranks] == [(0, "0"), (1, "1")]
    for r in ranks:
        assert (r["world_size"], r["local_world_size"], r["node_rank"], r["source"]) == (2, 2, 0, "slurm")
        assert (r["master_addr"], r["master_port"]) == (slurm_cluster.node, lfenv.port_for_job(job_id))


def test_impossible_request_is_rejected_not_queued(slurm_cluster: SlurmCluster) -> None:
    # EnforcePartLimits=ALL: more tasks than the node has CPUs fails at submit time.
    res = slurm_cluster.run(["sbatch", f"--ntasks={slurm_cluster.cpus + 1}", "--wrap", "true"], check=False)
    assert res.returncode != 0 and "More processors requested than permitted" in res.stderr


def test_submitit_two_tasks_return_results(slurm_env: SlurmCluster, tmp_path: Path) -> None:
    job = _executor(tmp_path, slurm_env, tasks=2).submit(lfenv.discover)  # every task returns its own DistEnv
    _wait_done(job, timeout=120)
    results = job.results()
    assert sorted(r.rank for r in results) == [0, 1]
    assert {(r.world_size, r.source, r.master_addr, r.master_port) for r in results} == {
        (2, "submitit-slurm", slurm_env.node, lfenv.port_for_job(job.job_id))}
    assert slurm_env.wait_job(job.job_id) == "COMPLETED"


def test_local_profile_submits_to_this_cluster(slurm_env: SlurmCluster, tmp_path: Path) -> None:
    from latentforge.launch.profiles import load_profile

    prof = load_profile("local")  # partition, account, 2 tasks, env exported by setup lines
    job = prof.make_executor(tmp_path).submit(os.environ.get, "OMP_NUM_THREADS")
    _wait_done(job, timeout=120)
    assert job.results() == [prof.env["OMP_NUM_THREADS"]] * prof.tasks_per_node
    # The result file can land before slurmctld has sent the final record to slurmdbd.
    assert slurm_env.wait_job(job.job_id) == "COMPLETED"
    # The account came from the profile (root's default account is "root"). (Partition is not
    # checked here: sacct fills it in a few seconds after the job ends, and it is the default.)
    account = slurm_env.run(["sacct", "-n", "-X", "-P", "-j", job.job_id, "-o", "Account"]).stdout.strip()
    assert account == prof.account


def test_train_template_rendezvous_matches_discover(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """slurm/templates/train.sbatch, shrunk to this node, with a probe in place of the CLI."""
    probe = tmp_path / "probe"
    probe.write_text(f"#!/bin/sh\n# called as: probe train --config CONFIG\nexec {sys.executable} -c \"{PROBE}\"\n")
    probe.chmod(0o755)
    res = slurm_cluster.run(
        ["sbatch", "--parsable", "--oversubscribe", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=2", f"--output={tmp_path}/train-%j.out",
         str(REPO / "slurm" / "templates" / "train.sbatch"), "cfg.yaml"],
        cwd=tmp_path, timeout=120, LATENTFORGE=str(probe))
    job_id = res.stdout.strip().split(";")[0]
    assert slurm_cluster.wait_job(job_id, timeout=120) == "COMPLETED"
    log = (tmp_path / f"train-{job_id}.out").read_text()
    ranks = _ranks(log)
    assert [r["rank"] for r in ranks] == [0, 1], log
    # The template exports MASTER_*; discover() takes them, and they equal its own derivation.
    assert {(r["master_addr"], r["master_port"]) for r in ranks} == {
        (slurm_cluster.node, lfenv.port_for_job(job_id))}


def test_precompute_array_template_runs_every_part(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """slurm/templates/precompute_array.sbatch as a 2-part array, a probe in place of the CLI."""
    probe = tmp_path / "probe"
    probe.write_text('#!/bin/sh\necho "PART $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT ARGS $*"\n')
    probe.chmod(0o755)
    res = slurm_cluster.run(
        ["sbatch", "--parsable", "--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=2",
         f"--output={tmp_path}/pre-%A_%a.out", str(REPO / "slurm" / "templates" / "precompute_array.sbatch"),
         "cfg.yaml", "data.resolution=64"],
        cwd=tmp_path, timeout=120, LATENTFORGE=str(probe))
    job_id = res.stdout.strip().split(";")[0]
    for part in (0, 1):
        assert slurm_cluster.wait_job(f"{job_id}_{part}", timeout=120) == "COMPLETED"
        log = (tmp_path / f"pre-{job_id}_{part}.out").read_text()
        assert f"PART {part}/2 ARGS precompute --config cfg.yaml data.resolution=64" in log, log


def test_cancelled_submitit_job_is_seen_as_finished(slurm_env: SlurmCluster, tmp_path: Path) -> None:
    """Without accounting, submitit reads a cancelled job as UNKNOWN forever and result() hangs."""
    import submitit

    job = _executor(tmp_path, slurm_env, tasks=1).submit(time.sleep, 300)
    deadline = time.monotonic() + 60
    while (state := job.watcher.get_state(job.job_id, mode="force")) != "RUNNING":
        assert state in ("PENDING", "UNKNOWN", "READY", "CONFIGURING"), f"state {state}: {job.stderr()}"
        assert time.monotonic() < deadline, f"job not running after 60 s (state {state})"
        time.sleep(0.25)  # polling interval
    job.cancel(check=True)
    _wait_done(job, timeout=90)
    assert job.state.startswith("CANCELLED")
    # result() first waits _results_timeout_s (15 s) for a result file a slow NFS might still
    # be delivering; on local disk a cancelled job has none, so do not wait.
    job._results_timeout_s = 0
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job.result()
