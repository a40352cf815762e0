"""`latentforge` commands as jobs a test can signal: each in a session of its own (so the
test can signal the whole job, as a terminal signals its foreground process group), with
stdout and stderr in one log that the test polls."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def start_job(argv: list[str], log: Path) -> subprocess.Popen:
    """`latentforge ARGV` in a new session, appending to `log`. pytest's own rank variables
    (it may run under SLURM or torchrun) are not passed on."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "-m", "latentforge.launch.cli", *argv], env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 900) -> float:
    """Poll `log` until it holds `text` (the log is the only signal a job gives); fail if
    the job ends first or after `timeout` seconds. Returns time.monotonic() at the match."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"ended ({proc.returncode}) before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout:.0f} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.1)  # polling interval
    return time.monotonic()
