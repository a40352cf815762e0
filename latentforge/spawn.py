"""Local ranks: start N copies of a `latentforge` subcommand as separate processes.

Each child gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, exactly as
torchrun would set them, so the child takes the same code path as under any launcher.
SIGTERM, SIGUSR1 and SIGUSR2 sent to the parent are forwarded to every child. SIGINT is
not: Ctrl-C reaches every process of the terminal's foreground group, the children
included, and a second copy from here would land in the middle of their orderly stop
(training/control.py). The parent waits for them. To interrupt a launcher that has no
terminal, signal its process group (`kill -INT -PGID`) or send it SIGTERM. If one child
fails, the others get SIGTERM, then SIGKILL after a grace period: a dead rank never leaves
the rest hanging.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from latentforge.env import free_port

REQUEUE_EXIT_CODE = 3  # a rank that checkpointed on a stop signal and wants to be restarted


def under_launcher() -> bool:
    """True when this process is already one rank of a launched job."""
    return ("RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") is not None
            or ("SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1))


def should_spawn(nproc: int) -> bool:
    return nproc > 1 and not under_launcher()


def threads_per_rank(nproc: int) -> int:
    """Torch threads for each of `nproc` ranks sharing this machine's cores."""
    return max(1, (os.cpu_count() or 1) // nproc)


def spawn(argv: list[str], nproc: int, grace_s: float = 30.0, env: dict[str, str] | None = None) -> int:
    """Run `latentforge ARGV` as `nproc` ranks on this machine. Returns the job's exit code:
    0 if all succeed, else the first non-zero code."""
    port = free_port()
    base = dict(os.environ if env is None else env)
    # One thread per rank unless the user says otherwise: ranks share this machine's cores.
    threads = base.get("OMP_NUM_THREADS") or str(threads_per_rank(nproc))
    procs: list[subprocess.Popen] = []
    for r in range(nproc):
        e = dict(base, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=threads)
        procs.append(subprocess.Popen([sys.executable, "-m", "latentforge.launch.cli", *argv], env=e))

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    interrupted: list[int] = []

    def note_interrupt(signum: int, frame: object) -> None:
        if not interrupted:  # the ranks got it too; they save and exit by themselves
            print("latentforge: interrupted; the ranks save a checkpoint and exit", file=sys.stderr, flush=True)
        interrupted.append(signum)

    # SIGUSR1 asks for an on-demand checkpoint; SIGUSR2/SIGTERM for checkpoint-and-stop.
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    old[signal.SIGINT] = signal.signal(signal.SIGINT, note_interrupt)
    try:
        code = 0
        deadline: float | None = None
        while any(p.poll() is None for p in procs):
            for p in procs:
                rc = p.poll()
                if rc not in (None, 0) and code == 0:
                    code = rc
                    deadline = time.monotonic() + grace_s
                    for q in procs:  # one rank failed: stop the others
                        if q.poll() is None:
                            q.terminate()
            if deadline is not None and time.monotonic() > deadline:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
            try:
                procs[0].wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        for p in procs:
            if code == 0 and p.returncode != 0:
                code = p.returncode
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
