"""The local multi-node cluster (slurm/local/multinode.sh): nodes in their own network
namespaces, and a gloo all-reduce across them the way a training job rendezvouses."""

from __future__ import annotations

import json
import sys

import pytest
from slurm_multinode import MULTINODE_SH, SlurmMultiNode

pytestmark = pytest.mark.slurm


def _node_states(cluster: SlurmMultiNode) -> list[str]:
    """ "NAME STATE" per node, sorted."""
    return sorted(s for s in cluster.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split("\n") if s)

# One rank per node, discovered as a training job does (latentforge/env.py): ranks from the
# SLURM_* variables, MASTER_ADDR the first host of the job's node list, MASTER_PORT a function
# of the job id; gloo binds to the interface on the route to the master (nothing in the
# cluster sets GLOO_SOCKET_IFNAME).
ALL_REDUCE = """
import datetime, json, os, socket
import torch, torch.distributed as dist
from latentforge.env import apply, bind_gloo_interface, discover
env = discover()
apply(env)
network = bind_gloo_interface()
dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size, timeout=datetime.timedelta(seconds=30))
t = torch.tensor([float(env.rank + 1)])
dist.all_reduce(t)
print(json.dumps(dict(rank=env.rank, host=socket.gethostname(), master=env.master_addr, sum=t.item(),
                      ifname=os.environ.get("GLOO_SOCKET_IFNAME"), network=network)), flush=True)
dist.destroy_process_group()
"""


def test_two_idle_nodes_and_gloo_all_reduce_across_namespaces(slurm_multinode: SlurmMultiNode) -> None:
    cluster = slurm_multinode
    assert _node_states(cluster) == [f"{n} idle" for n in cluster.nodes] and len(cluster.nodes) == 2

    # --time bounds the job itself should the rendezvous hang (the timeout below only stops srun).
    out = cluster.run(["srun", "-N2", "-n2", "--time=1", sys.executable, "-c", ALL_REDUCE], timeout=90).stdout
    ranks = sorted((json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1], out
    assert [r["host"] for r in ranks] == cluster.nodes  # one rank in each namespace, with its hostname
    assert {(r["master"], r["sum"], r["ifname"]) for r in ranks} == {(cluster.nodes[0], 3.0, "eth0")}
    # Each rank's own address on the bridge, on the route to the master (its own address for rank 0).
    master_ip = cluster.run(["getent", "hosts", cluster.nodes[0]]).stdout.split()[0]
    for r in ranks:
        own = cluster.run(["getent", "hosts", r["host"]]).stdout.split()[0]
        assert r["network"] == f"gloo on eth0 ({own}), the interface on the route to {cluster.nodes[0]} ({master_ip})"


def test_kill_node_leaves_nothing_running_there_and_restore_brings_it_back(slurm_multinode: SlurmMultiNode) -> None:
    cluster, lost = slurm_multinode, slurm_multinode.nodes[-1]
    cluster.kill_node(lost)
    assert cluster.run(["ip", "netns", "pids", lost]).stdout.split() == []
    assert cluster.run([str(MULTINODE_SH), "status"], check=False).returncode == 3  # its slurmd is down
    cluster.restore()
    assert _node_states(cluster) == [f"{n} idle" for n in cluster.nodes]
