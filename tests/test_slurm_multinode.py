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

# One rank per node. MASTER_ADDR is the first host of the job's node list and MASTER_PORT a
# function of the job id (as slurm/templates/train.sbatch does); gloo binds to the interface
# the cluster's TaskProlog names in GLOO_SOCKET_IFNAME.
ALL_REDUCE = """
import datetime, json, os, socket, subprocess
import torch, torch.distributed as dist
nodelist = os.environ["SLURM_JOB_NODELIST"]
master = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                        check=True).stdout.split()[0]
port = 15000 + int(os.environ["SLURM_JOB_ID"]) % 15000
rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=30))
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
print(json.dumps(dict(rank=rank, host=socket.gethostname(), master=master, sum=t.item(),
                      ifname=os.environ.get("GLOO_SOCKET_IFNAME"))), flush=True)
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


def test_kill_node_leaves_nothing_running_there_and_restore_brings_it_back(slurm_multinode: SlurmMultiNode) -> None:
    cluster, lost = slurm_multinode, slurm_multinode.nodes[-1]
    cluster.kill_node(lost)
    assert cluster.run(["ip", "netns", "pids", lost]).stdout.split() == []
    assert cluster.run([str(MULTINODE_SH), "status"], check=False).returncode == 3  # its slurmd is down
    cluster.restore()
    assert _node_states(cluster) == [f"{n} idle" for n in cluster.nodes]
