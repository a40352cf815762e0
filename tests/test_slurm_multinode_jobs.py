"""`latentforge submit` on two SLURM nodes (slurm/local/multinode.sh: network namespaces on
a private bridge), one gloo rank per node, through the shipped profile `local-multinode`:

- across nodes: the ranks sit on different hosts and meet at the first host of the job's node
  list, gloo on the interface on the route to it (derived: nothing sets GLOO_SOCKET_IFNAME);
- preemption: a USR2 makes every rank checkpoint, rank 0 requeues the job and the requeued
  attempt resumes from that checkpoint;
- a lost node: the second node's slurmd and task are killed (multinode.sh kill-node) after a
  checkpoint. The surviving rank fails at once, well within train.collective_timeout_s, with a
  message that names the lost node, and SLURM requeues the job (NODE_FAIL) to wait for two
  nodes. Cancelled there and resubmitted with the same command, it resumes and ends bitwise
  identical to an uninterrupted run of the same job, in one MLflow run;
- precompute: the job array's tasks spread over both nodes and write the same bytes as a local
  precompute.

The interrupted run is one job history (preempted, requeued, node lost, resubmitted), and the
uninterrupted reference trains while that history waits on the scheduler, so the module pays
for four start-ups on the critical path. The signal and the node loss are placed by events,
not by sleeps: the USR2 goes out once both ranks have logged their start-up line (so it lands
while they load, and the loop stops after its first step); the node is killed while rank 0 is
held with SIGSTOP just after the step-10 checkpoint (so the loss lands mid-run however fast
the machine is, and the hold is far shorter than the collective timeout).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from slurm_multinode import SlurmMultiNode
from submitted import assert_runs_end_bitwise_equal, file_tree, job_log, mlflow_runs, poll, sacct, submitting_to

from latentforge.launch import status, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.long]  # make test-long: 3-4 minutes

PROFILE = "local-multinode"  # slurm/profiles/local-multinode.yaml: 2 nodes x 1 task
STEPS = 40  # optimizer steps of the reference and of the interrupted run (checkpoints every 10)
TIMEOUT_S = 60  # train.collective_timeout_s of both runs
_SUBMITTED: list[str] = []  # job ids this module submitted (cancelled at the end if still there)


# ---------------------------------------------------------------------------------------
# Helpers.


def _state(cluster: SlurmMultiNode, job_id: str) -> str:
    attempts = sacct(cluster, job_id)
    return attempts[-1][1] if attempts else ""


def _attempt(text: str, restart: int) -> str:
    """The part of an appended submitit log written by attempt `restart` (0 = the first)."""
    parts = re.split(r"(?=\S+ \[(?:rank \d+\] \[)?job\] train rank \d+/\d+ )", text)
    for part in parts:
        if re.search(rf"\] train rank \d+/\d+ .*, restart {restart}, ", part.split("\n", 1)[0]):
            return part
    return ""


def _started(run_dir: Path, job_id: str, restart: int) -> bool:
    """Both ranks of attempt `restart` logged their start-up line (their signal handlers are ours)."""
    return all(_attempt(job_log(run_dir, job_id, r), restart) for r in (0, 1))


def _address(cluster: SlurmMultiNode, host: str) -> str:
    return cluster.run(["getent", "hosts", host]).stdout.split()[0]


def _rank0_pid(cluster: SlurmMultiNode, job_id: str) -> int:
    """The process of rank 0 (the task of step 0, not its DataLoader worker) in the first node's namespace."""
    found: dict[int, int] = {}
    for pid in cluster.run(["ip", "netns", "pids", cluster.nodes[0]]).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        env = dict(kv.decode(errors="replace").split("=", 1) for kv in environ if b"=" in kv)
        if env.get("SLURM_JOB_ID") == job_id and env.get("SLURM_STEP_ID") == "0" and env.get("SLURM_PROCID") == "0":
            found[int(pid)] = ppid
    mains = [pid for pid, ppid in found.items() if ppid not in found]
    assert len(mains) == 1, f"rank 0 of job {job_id} in {cluster.nodes[0]}: {found}"
    return mains[0]


def _wait(sub: submit.Submission, run_dir: Path, timeout_s: float = 600) -> None:
    lines: list[str] = []
    code = submit.wait_for(sub, poll_s=1.0, timeout_s=timeout_s, out=lines.append)
    job = sub.jobs[0].job_id
    assert code == 0, "\n".join(lines) + job_log(run_dir, job, ext="err")[-3000:] + job_log(run_dir, job, 1, "err")[-3000:]


# ---------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def cluster(slurm_multinode: SlurmMultiNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmMultiNode]:
    """The cluster, submitted to from a clean environment (no GLOO_SOCKET_IFNAME of ours: the
    jobs derive theirs); this module's jobs cancelled and a killed node restored at the end."""
    with submitting_to(slurm_multinode, tmp_path_factory.mktemp("slurm_multinode_jobs_cwd"), _SUBMITTED) as c:
        yield c
    slurm_multinode.restore()  # a test that failed between kill-node and restore


def _overrides(tiny_data: tuple[Path, list[str]], name: str) -> list[str]:
    return [*tiny_data[1], f"run_name={name}", f"train.max_steps={STEPS}", f"train.collective_timeout_s={TIMEOUT_S}"]


@pytest.fixture(scope="module")
def runs(cluster: SlurmMultiNode, tiny_data: tuple[Path, list[str]]) -> dict:
    """The uninterrupted reference and the interrupted history, submitted together."""
    root = tiny_data[0]
    t0 = time.monotonic()
    ref = submit.submit_jobs("train", PROFILE, "tiny", None, _overrides(tiny_data, "mn-ref"))
    run = submit.submit_jobs("train", PROFILE, "tiny", None, _overrides(tiny_data, "mn-interrupted"))
    _SUBMITTED.extend([ref.jobs[0].job_id, run.jobs[0].job_id])
    job, run_dir = run.jobs[0].job_id, run.run_dir
    out: dict[str, Any] = {"root": root, "ref": ref, "run_dir": run_dir, "job_a": job}

    # 1. Preemption: USR2 to every task while both ranks load; all save at step 1; rank 0 requeues.
    poll(f"both ranks of job {job} to start", lambda: _started(run_dir, job, 0), timeout=300)
    cluster.run(["scancel", "--signal=USR2", job])

    def failed(j: str, expected: str) -> None:
        st = _state(cluster, j)
        if st in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            pytest.fail(f"job {j} ended {st} before {expected}:\n{job_log(run_dir, j)[-3000:]}"
                        f"{job_log(run_dir, j, ext='err')[-3000:]}")

    poll(f"job {job} to requeue itself", lambda: failed(job, "its requeue") or "requeueing job" in job_log(run_dir, job),
          timeout=240)

    # 2. The requeued attempt trains on; just after its step-10 checkpoint the second node is lost
    #    (rank 0 held meanwhile, so the loss lands before the run can end). Everything slow
    #    (sacct, finding rank 0) happens before the checkpoint, so the hold starts one poll after it.
    poll(f"the requeued job {job} to start", lambda: failed(job, "its restart") or _started(run_dir, job, 1),
          timeout=300)
    ref_job = ref.jobs[0].job_id  # nothing else of ours may be on the node that goes
    poll(f"the reference job {ref_job} to end", lambda: _state(cluster, ref_job) in ("COMPLETED", "FAILED"), 300)
    pid = _rank0_pid(cluster, job)
    step10 = run_dir / "checkpoints" / "step_00000010" / "COMPLETE"
    poll(f"the requeued job {job} to checkpoint step 10",
          lambda: step10.exists() or not Path(f"/proc/{pid}").exists() and failed(job, "the node loss"), timeout=300)
    os.kill(pid, signal.SIGSTOP)
    try:
        out["latest_at_loss"] = (run_dir / "checkpoints" / "latest").read_text().strip()
        cluster.kill_node(cluster.nodes[1])
    finally:
        os.kill(pid, signal.SIGCONT)
    t_lost = time.monotonic()
    poll(f"rank 0 of job {job} to report the lost node", lambda: "lost contact with" in job_log(run_dir, job, ext="err"),
          timeout=TIMEOUT_S + 30)
    out["report_s"] = time.monotonic() - t_lost
    poll(f"rank 0 of job {job} to exit", lambda: not Path(f"/proc/{pid}").exists(), timeout=TIMEOUT_S + 30)
    out["exit_s"] = time.monotonic() - t_lost

    # 3. SLURM declares the node dead (SlurmdTimeout) and requeues the job, which waits for two nodes.
    poll(f"job {job} to be requeued after the node failure",
          lambda: [s for _, s, _ in sacct(cluster, job)][-2:] == ["NODE_FAIL", "PENDING"], timeout=120, every=1.0)
    out["attempts_after_loss"] = sacct(cluster, job)
    cluster.run(["scancel", job])
    poll(f"job {job} to be CANCELLED", lambda: _state(cluster, job) == "CANCELLED", timeout=60)
    cluster.restore()

    # 4. Resubmitted with the same command: it resumes from the last checkpoint and finishes.
    again = submit.submit_jobs("train", PROFILE, "tiny", None, _overrides(tiny_data, "mn-interrupted"))
    _SUBMITTED.append(again.jobs[0].job_id)
    _wait(again, run_dir)
    _wait(ref, ref.run_dir)
    out.update(job_b=again.jobs[0].job_id, sub_b=again)
    print(f"[test] reference + interrupted history on 2 nodes: {time.monotonic() - t0:.0f} s; after the node loss "
          f"rank 0 reported it in {out['report_s']:.1f} s and exited in {out['exit_s']:.1f} s")
    return out


# ---------------------------------------------------------------------------------------
# Scenarios.


def test_precompute_array_spreads_over_both_nodes_and_matches_local(
        cluster: SlurmMultiNode, tiny_data: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, overrides = tiny_data
    latent = tmp_path / "latents"
    # One task per raw shard (4), one CPU each, no decoding workers: two tasks fill each node.
    ov = [*overrides, f"data.latent_dir={latent}", "data.precompute_workers=0"]
    sub = submit.submit_jobs("precompute", PROFILE, "tiny", None, ov)
    _SUBMITTED.extend(j.job_id for j in sub.jobs)
    lines: list[str] = []
    assert submit.wait_for(sub, poll_s=1.0, timeout_s=300, out=lines.append) == 0, "\n".join(lines)
    array = sub.records[0]["job_id"]
    nodes = {n for _, _, n in sacct(cluster, array)}
    assert nodes == set(cluster.nodes), sacct(cluster, array)
    local = file_tree(root / "latents")
    assert len([k for k in local if k.endswith(".tar")]) == 4
    assert file_tree(latent) == local  # parts, per-shard and dataset manifests, null text: byte for byte
    text = status.status(root / "precompute_jobs")
    assert "raw shards done: 4/4; tasks finished: 4/4" in text and "dataset manifest: assembled" in text


def test_ranks_on_two_nodes_meet_at_the_first_host_of_the_node_list(runs: dict, cluster: SlurmMultiNode) -> None:
    from latentforge.env import port_for_job
    from latentforge.training import checkpoint

    ref = runs["ref"]
    run_dir, job = ref.run_dir, ref.jobs[0].job_id
    first, second = cluster.nodes
    (_, state, nodelist), = sacct(cluster, job)
    assert state == "COMPLETED" and cluster.run(["scontrol", "show", "hostnames", nodelist]).stdout.split() == [
        first, second]
    for rank, host in enumerate(cluster.nodes):
        log = job_log(run_dir, job, rank)
        assert f"hostname={host}," in log  # submitit's own start-up line: this rank ran on that node
        assert f"[job] train rank {rank}/2 (submitit-slurm, master {first}:{port_for_job(job)})" in log, log[-2000:]
    a1, a2 = _address(cluster, first), _address(cluster, second)
    log0 = job_log(run_dir, job)
    # gloo binds to the interface on the route to the master (rank 0: its own address), derived.
    assert f"[train] gloo on eth0 ({a1}), the interface on the route to {first} ({a1})" in log0
    assert f"[train] 2 ranks on 2 node(s): 0 {first} {a1}; 1 {second} {a2}" in log0
    assert f"[train] step {STEPS}/{STEPS}" in log0
    assert {(r["rank"], r["step"], r["preempted"]) for r in ref.jobs[0].results()} == {(0, STEPS, False),
                                                                                         (1, STEPS, False)}
    tag = checkpoint.latest_tag(run_dir)
    assert tag == f"step_{STEPS:08d}" and checkpoint.meta(run_dir, tag)["world_size"] == 2
    assert {p.name for p in (run_dir / "checkpoints" / tag).glob("rank_*.pt")} == {"rank_00000.pt", "rank_00001.pt"}


def test_preemption_checkpoints_on_every_rank_and_the_requeued_job_resumes(runs: dict,
                                                                           cluster: SlurmMultiNode) -> None:
    run_dir, job = runs["run_dir"], runs["job_a"]
    assert [s for _, s, _ in runs["attempts_after_loss"]][:1] == ["REQUEUED"], runs["attempts_after_loss"]
    first0, first1 = _attempt(job_log(run_dir, job), 0), _attempt(job_log(run_dir, job, 1), 0)
    assert "[train] stop signal 12: checkpointed at step 1, exiting for requeue" in first0, first0[-3000:]
    assert re.search(r"\[job\] timed out: checkpointed at step 1; requeueing job \d+ \(2 timeout\(s\) left\)", first0)
    assert "[job] rank 1: checkpointed at step 1; rank 0 decides the requeue" in first1, first1[-3000:]
    second = _attempt(job_log(run_dir, job), 1)
    assert ", restart 1, resuming from step 1" in second.splitlines()[0]
    assert f"[train] resumed from {run_dir / 'checkpoints' / 'step_00000001'} at step 1" in second


def test_lost_node_is_named_by_the_surviving_rank_within_the_collective_timeout(runs: dict,
                                                                                 cluster: SlurmMultiNode) -> None:
    run_dir, job = runs["run_dir"], runs["job_a"]
    first, second = cluster.nodes
    nodelist = runs["attempts_after_loss"][1][2]  # the attempt the node was lost in
    err0 = job_log(run_dir, job, ext="err")
    m = re.search(r"PeerLostError: (lost contact with .*)", err0)
    assert m, err0[-3000:]
    # kill-node leaves the namespace's network up, so the dead rank's port refuses at once.
    assert m.group(1).startswith(
        f"lost contact with {second}: rank 1 on {second} ({_address(cluster, second)}) stopped answering (connection "
        f"refused: its process is gone); nodes of job {job}: {nodelist}; rank 0 on {first} "
        f"({_address(cluster, first)}) gives up: "), m.group(1)
    assert "Connection reset by peer" in m.group(1) or "Connection closed by peer" in m.group(1)  # gloo's own words
    # gloo saw the peer's connection reset at once; the bound is the collective timeout either way.
    assert runs["report_s"] < TIMEOUT_S and runs["exit_s"] < TIMEOUT_S, (runs["report_s"], runs["exit_s"])
    # SLURM failed the attempt on the node and requeued the job; the test then cancelled it.
    assert [s for _, s, _ in runs["attempts_after_loss"]] == ["REQUEUED", "NODE_FAIL", "PENDING"]
    # Lost mid-run: after the step-10 checkpoint (rank 0 was held one poll later), before the end.
    assert runs["latest_at_loss"] in [f"step_{k:08d}" for k in range(10, STEPS, 10)], runs["latest_at_loss"]


def test_resubmitted_run_resumes_and_ends_bitwise_identical_to_the_uninterrupted_one(runs: dict) -> None:
    run_dir, job_b = runs["run_dir"], runs["job_b"]
    log_b = job_log(run_dir, job_b)
    tag = runs["latest_at_loss"]  # the last checkpoint before the node was lost
    assert f"[train] resumed from {run_dir / 'checkpoints' / tag} at step {int(tag[5:])}" in log_b, log_b[-3000:]
    assert f"[train] step {STEPS}/{STEPS}" in log_b
    assert_runs_end_bitwise_equal(runs["ref"].run_dir, run_dir, STEPS)
    # One MLflow run across three attempts and two jobs: reopened by id, never created anew.
    client, found = mlflow_runs(runs["root"], "mn-interrupted")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    assert found[0].data.tags["slurm_job_ids"].split(",") == [runs["job_a"], job_b]
    steps = sorted({m.step for m in client.get_metric_history(found[0].info.run_id, "train/loss")})
    assert steps[0] == 5 and steps[-1] == STEPS
