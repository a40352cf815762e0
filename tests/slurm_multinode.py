"""pytest fixture for a real several-node SLURM cluster on this one machine
(slurm/local/multinode.sh): each node's slurmd in its own network and UTS namespace, on a
private bridge, with its own hostname and address; one slurmctld and accounting on the host.

`slurm_multinode` (session): installs the Debian packages if they are missing (root, apt),
runs `multinode.sh up --nodes 2 --holder <this pid>` and yields a `SlurmMultiNode`: what
`SlurmCluster` offers (env with SLURM_CONF, `run()`, `wait_job()`) plus the node names,
`kill_node(name)` (SIGKILL everything in that node's namespace: a lost node) and `restore()`
(bring killed nodes back). It skips only when network namespaces cannot be made here (the
script exits 77 with the reason) or the packages cannot be installed; set LF_SLURM_REQUIRE=1
to turn that into a failure. Any other failure to start fails the test.

At the end of the session it runs `multinode.sh down --holder <this pid>`, which tears
everything down (daemons, namespaces, links, bridge, /etc/hosts lines) unless another live
pytest session is still using the cluster. A session killed outright leaves it up until the
next session's teardown or `slurm/local/multinode.sh down`.

The node names resolve (through /etc/hosts), so MASTER_ADDR can be the first host of
`scontrol show hostnames $SLURM_JOB_NODELIST`. Nothing sets GLOO_SOCKET_IFNAME, as on a real
cluster: latentforge derives it (eth0, the namespace's interface, on the route to the master).

Wiring, in tests/conftest.py:

    from slurm_multinode import slurm_multinode  # noqa: F401  (fixture)

and mark tests that use it `@pytest.mark.slurm`.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from slurm_cluster import REPO, SlurmCluster, _tail, _unavailable, parse_exports

MULTINODE_SH = REPO / "slurm" / "local" / "multinode.sh"
NO_NETNS_RC = 77  # multinode.sh: network namespaces cannot be made here (the reason is on stderr)


def multinode_sh(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run slurm/local/multinode.sh (LF_SLURM_MULTI_* knobs come from os.environ)."""
    return subprocess.run([str(MULTINODE_SH), *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class SlurmMultiNode(SlurmCluster):
    nodes: list[str] = field(default_factory=list)  # node names; nodes[0] runs batch scripts and rank 0

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's slurmd and every process in its namespace, as if it were lost.
        slurmctld marks it DOWN after SlurmdTimeout (30 s); `restore()` brings it back."""
        res = multinode_sh("kill-node", name, timeout=60)
        if res.returncode != 0:
            raise AssertionError(f"multinode.sh kill-node {name} exited {res.returncode}:\n{res.stderr}")

    def restore(self) -> None:
        """Restart whatever is not running (killed nodes) and wait until every node is usable."""
        res = multinode_sh("up", "--nodes", str(len(self.nodes)), "--holder", str(os.getpid()))
        if res.returncode != 0:
            raise AssertionError(f"multinode.sh up exited {res.returncode}:\n{_tail(res.stderr)}")


def start_multinode(nodes: int = 2) -> SlurmMultiNode:
    """Install if needed and possible, start (or reuse) the cluster; skip if namespaces cannot be made."""
    if os.geteuid() != 0:
        _unavailable("multi-node cluster: needs root to create network namespaces and a bridge")
    res = multinode_sh("install", timeout=900)
    if res.returncode != 0:
        _unavailable(f"`multinode.sh install` failed:\n{_tail(res.stderr)}")
    res = multinode_sh("up", "--nodes", str(nodes), "--holder", str(os.getpid()))
    if res.returncode == NO_NETNS_RC:
        stop_multinode()  # anything made before the step that failed
        _unavailable(res.stderr.strip().splitlines()[-1])
    if res.returncode != 0:
        stop_multinode()  # whatever it made; bounded, and it keeps a cluster others still use
        pytest.fail(f"`multinode.sh up --nodes {nodes}` failed (exit {res.returncode}):\n{_tail(res.stderr)}",
                    pytrace=False)
    exports = parse_exports(res.stdout)
    conf = Path(exports["SLURM_CONF"])
    names = (conf.parent / "nodes").read_text().split()
    return SlurmMultiNode(prefix=conf.parent.parent, env=exports, node=names[0], nodes=names)


def stop_multinode() -> None:
    res = multinode_sh("down", "--holder", str(os.getpid()), timeout=300)
    if res.returncode != 0:
        raise AssertionError(f"`multinode.sh down` failed (exit {res.returncode}):\n{_tail(res.stderr)}")


@pytest.fixture(scope="session")
def slurm_multinode() -> Iterator[SlurmMultiNode]:
    cluster = start_multinode(nodes=2)
    try:
        yield cluster
    finally:
        stop_multinode()
