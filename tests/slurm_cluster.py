"""pytest fixtures for a real one-node SLURM cluster on loopback (slurm/local/cluster.sh).

`slurm_cluster` (session): installs the Debian packages if they are missing and this is
root with apt, runs `cluster.sh up` (a no-op when the cluster is already up), and yields a
`SlurmCluster`. It skips only when the cluster truly cannot start (not root, no apt, a
daemon fails), with the reason and the last lines of the failing daemon's log; set
LF_SLURM_REQUIRE=1 to turn that skip into a failure (CI where the cluster must work).
The cluster is left running after the session: the next session reuses it in ~0.1 s.
Stop it with `slurm/local/cluster.sh down [--wipe]`.

`slurm_env` (function): the same object, with SLURM_CONF exported into os.environ for
this test only, for code that calls sbatch/sacct itself (submitit).

Wiring, in tests/conftest.py:

    from slurm_cluster import slurm_cluster, slurm_env  # noqa: F401  (fixtures)

and mark tests that use them `@pytest.mark.slurm`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local" / "cluster.sh"
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE")


@dataclass
class SlurmCluster:
    prefix: Path  # where cluster.sh keeps config, logs, state and the database
    env: dict[str, str]  # what a client needs on top of os.environ (SLURM_CONF)
    partition: str = "debug"  # the only partition; also the default
    account: str = "latentforge"  # registered in accounting
    node: str = field(default_factory=lambda: os.uname().nodename.split(".")[0])  # hostname -s
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)  # CPUs of the one node

    @property
    def conf(self) -> Path:
        return Path(self.env["SLURM_CONF"])

    def environ(self, **extra: str) -> dict[str, str]:
        """os.environ plus the cluster's variables (plus `extra`)."""
        return {**os.environ, **self.env, **extra}

    def run(self, cmd: str | Sequence[str], *, check: bool = True, timeout: float = 120,
            cwd: str | os.PathLike | None = None, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """Run a client command (a shell string or an argv list) against this cluster.

        With `check`, a non-zero exit raises AssertionError with stdout and stderr in it.
        """
        res = subprocess.run(cmd, shell=isinstance(cmd, str), env=self.environ(**extra_env), cwd=cwd,
                             capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"{cmd!r} exited {res.returncode}\n--- stdout\n{res.stdout}\n"
                                 f"--- stderr\n{res.stderr}")
        return res

    def job_state(self, job_id: str | int) -> str:
        """The job's state in accounting ("" until slurmctld has reported it to slurmdbd)."""
        out = self.run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], check=False).stdout
        return out.strip().split("\n")[0].split(" ")[0] if out.strip() else ""

    def wait_job(self, job_id: str | int, timeout: float = 60) -> str:
        """Poll accounting until the job reaches a terminal state; return it."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in TERMINAL_STATES:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {state or 'unknown to sacct'} after {timeout}s")
            time.sleep(0.25)  # polling interval, not a wait for an event we could observe


def _tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def _unavailable(reason: str) -> None:
    if os.environ.get("LF_SLURM_REQUIRE") == "1":
        pytest.fail(f"local SLURM cluster required (LF_SLURM_REQUIRE=1) but unavailable: {reason}",
                    pytrace=False)
    pytest.skip(f"local SLURM cluster unavailable: {reason}")


def parse_exports(stdout: str) -> dict[str, str]:
    """The `export KEY=VALUE` lines a cluster script prints on stdout, as a dict."""
    exports = {}
    for line in stdout.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, _, value = words[1].partition("=")
            exports[key] = value
    return exports


def start_cluster(prefix: str | None = None) -> SlurmCluster:
    """Install if needed and possible, start (or reuse) the cluster; skip if it cannot run."""
    if os.geteuid() != 0:
        _unavailable("needs root (daemons run as root, munge and mysql)")
    env = dict(os.environ)
    if prefix:
        env["LF_SLURM_PREFIX"] = prefix
    # A no-op when the packages are there; otherwise apt-get (needs root and apt).
    res = subprocess.run([str(CLUSTER_SH), "install"], env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        _unavailable(f"`cluster.sh install` failed:\n{_tail(res.stderr)}")
    res = subprocess.run([str(CLUSTER_SH), "up"], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        # cluster.sh prints the failing daemon's log tail on stderr.
        _unavailable(f"`cluster.sh up` failed:\n{_tail(res.stderr)}")
    exports = parse_exports(res.stdout)
    if "SLURM_CONF" not in exports:
        _unavailable(f"`cluster.sh up` printed no SLURM_CONF:\n{res.stdout}")
    return SlurmCluster(prefix=Path(exports["SLURM_CONF"]).parent.parent, env=exports)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    yield start_cluster(os.environ.get("LF_SLURM_PREFIX"))


@pytest.fixture
def slurm_env(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    for key, value in slurm_cluster.env.items():
        monkeypatch.setenv(key, value)
    return slurm_cluster
