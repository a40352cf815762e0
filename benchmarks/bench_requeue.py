"""What one preemption costs on SLURM: signal -> every rank saved -> requeued -> running
again -> training again, for a 2-task tiny run submitted with `latentforge submit`.

    eval "$(slurm/local/cluster.sh up)"
    .venv/bin/python benchmarks/bench_requeue.py [--profile local] [--steps 60] [--run-root DIR]

Makes a tiny synthetic latent dataset (the test suite's TINY_OVERRIDES), submits a training
job through the profile, waits for its first checkpoint, sends SIGUSR2 to every task (what
SLURM's `--signal` does before the time limit, and `job._interrupt()` in submitit), then
times each phase from the job's own log, sacct and the checkpoint files:

  save            signal -> the preemption checkpoint is COMPLETE (all ranks saved)
  requeue         signal -> rank 0 logs that it requeues (every rank saved; countdown updated)
  pending         requeue -> the same job id running again (sacct Start, 1 s resolution;
                  cred_expire + a scheduler pass)
  restart         running again -> "[train] resumed from" (imports, DeepSpeed init, load)
  lost            signal -> resumed: wall time one preemption costs
  start-up split  rank 0's own account of the resumed attempt, process start -> first step
                  ("[train] start-up: ..."): imports, process group, encoders, engine,
                  checkpoint load, MLflow, evaluator, the loader workers' first batch
  first attempt   its start -> its step-10 checkpoint (start-up + 10 steps), for comparison

On the local cluster, cred_expire=10 s and sched_interval=5 s (slurm/local/cluster.sh) make
`pending` ~12-15 s; on a production cluster it is whatever the queue makes it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import Report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _wait(what: str, cond, timeout: float = 600.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_requeue: gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)  # polling interval: the job's files and sacct have no events
    return got


def _attempts(job_id: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", job_id, "-o", "State,Start,End"],
                         capture_output=True, text=True, check=False).stdout
    return [ln.split("|") for ln in out.splitlines() if "|" in ln]


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="local", help="cluster profile (default: the local test cluster)")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps of the run")
    ap.add_argument("--run-root", default=None, help="where the data and the run go (default: a temp dir)")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_OVERRIDES  # the test suite's tiny model and data

    from latentforge.config import resolve
    from latentforge.data import precompute
    from latentforge.data.synth import ensure_synth
    from latentforge.launch import submit

    root = Path(args.run_root or tempfile.mkdtemp(prefix="bench_requeue_")).resolve()
    overrides = [f"run_root={root}", *TINY_OVERRIDES]
    cfg = resolve("tiny", None, overrides)
    print(f"[bench] tiny dataset in {root}", flush=True)
    ensure_synth(cfg)
    if not (cfg.resolved_latent_dir / "manifest.json").exists():
        precompute.run(cfg)

    name = f"bench_{int(time.time())}"
    sub = submit.submit_jobs("train", args.profile, "tiny", None,
                             [*overrides, f"run_name={name}", f"train.max_steps={args.steps}"])
    job = sub.jobs[0]
    run_dir = sub.run_dir
    log = run_dir / "slurm" / job.job_id / f"{job.job_id}_0_log.out"
    print(submit.describe(sub), flush=True)

    first = run_dir / "checkpoints" / "step_00000010" / "COMPLETE"
    _wait("the first checkpoint", first.is_file)
    first_ckpt = first.stat().st_mtime  # read now: later saves prune it
    t_signal = time.time()
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    print(f"[bench] USR2 sent to job {job.job_id}", flush=True)
    text = _wait("the requeue", lambda: (t := log.read_text()) and "requeueing job" in t and t)
    t_requeued = time.time()  # rank 0 logs this line just before `scontrol requeue` (0.1 s polling)
    k = int(re.search(r"checkpointed at step (\d+); requeueing", text).group(1))
    complete = run_dir / "checkpoints" / f"step_{k:08d}" / "COMPLETE"
    t_saved = complete.stat().st_mtime
    rows = _wait("the job to run again", lambda: (a := _attempts(job.job_id)) and len(a) >= 2
                 and a[-1][1] not in ("Unknown", "None", "") and a)
    t_running = _ts(rows[-1][1])
    _wait("training to resume", lambda: "[train] resumed from" in log.read_text())
    t_resumed = time.time()
    first_start = _ts(rows[0][1])
    print("[bench] resumed; waiting for the job to finish", flush=True)
    lines: list[str] = []
    code = submit.wait_for(sub, poll_s=1.0, timeout_s=900, out=lines.append)
    if code:
        print("\n".join(lines))
        return code
    rep = Report("one preemption of a 2-task tiny training job, local SLURM cluster")
    rep.add("stopped at step", k)
    rep.add("save (signal -> checkpoint COMPLETE)", t_saved - t_signal, "s", "{:.2f}")
    rep.add("requeue (signal -> requeueing)", t_requeued - t_signal, "s", "{:.1f}")
    rep.add("pending (requeueing -> running)", t_running - t_requeued, "s", "{:.0f}")
    rep.add("restart (running -> resumed)", t_resumed - t_running, "s", "{:.1f}")
    rep.add("lost (signal -> resumed)", t_resumed - t_signal, "s", "{:.1f}")
    rep.add("first attempt: start -> step 10 saved", first_ckpt - first_start, "s", "{:.1f}")
    startups = re.findall(r"\[train\] start-up: ([\d.]+) s from process start: (.*)", log.read_text())
    if startups:
        total, phases = startups[-1]  # the resumed attempt
        rep.add("resumed attempt: process start -> first step", float(total), "s", "{:.1f}")
        for name, secs in re.findall(r"([a-z][a-z ]*?) ([\d.]+) s", phases):
            rep.add(f"  {name}", float(secs), "s", "{:.1f}")
    rep.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
