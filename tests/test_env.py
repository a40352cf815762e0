"""Rank discovery (latentforge/env.py) for every launcher, with monkeypatched environments."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys

import pytest

from latentforge import env
from latentforge.env import DistEnv, apply, bind_gloo_interface, discover, expand_nodelist

# `clean_env` (tests/conftest.py): the test's monkeypatch, with every launcher variable removed.


def _set(mp: pytest.MonkeyPatch, **values: object) -> None:
    for k, v in values.items():
        mp.setenv(k, str(v))


def _no_scontrol(mp: pytest.MonkeyPatch, tmp_path) -> None:
    """Hide scontrol so the pure-Python node-list parser is the one answering."""
    mp.setenv("PATH", str(tmp_path))


# ---------------------------------------------------------------------------------------
# Node lists.


@pytest.mark.parametrize("nodelist, hosts", [
    ("vm", ["vm"]),
    ("node[01-04,07],gpu3", ["node01", "node02", "node03", "node04", "node07", "gpu3"]),
    ("node[08-10]", ["node08", "node09", "node10"]),  # padding follows the lower bound
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("gpu-a100-[3,5]", ["gpu-a100-3", "gpu-a100-5"]),
])
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[1-", "node1]", "node[3-1]", "node[a-b]", "a,,b", "n[[1]]"])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol not installed")
def test_expand_nodelist_agrees_with_scontrol(tmp_path) -> None:
    # scontrol needs some slurm.conf even to expand a host list; a minimal one will do.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=ALL\n")
    nodelist = "node[01-04,07],gpu3,rack[1-2]-n[08-10],x[9-11]"
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         timeout=30, check=True, env={**os.environ, "SLURM_CONF": str(conf)}).stdout.split()
    assert expand_nodelist(nodelist) == out


def test_tasks_per_node_format() -> None:
    assert env._tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert env._tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        env._tasks_per_node("2(x)")


def test_port_for_job_range_and_errors() -> None:
    assert env.port_for_job("123456") == env.PORT_BASE + 123456 % env.PORT_SPAN
    ports = {env.port_for_job(j) for j in range(1, 100_000, 7)}
    assert min(ports) >= 15000 and max(ports) < 30000  # below Linux's ephemeral ports (32768+)
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        env.port_for_job("")


# ---------------------------------------------------------------------------------------
# Explicit variables: torchrun, the deepspeed launcher, our local launcher.


def test_torchrun(clean_env: pytest.MonkeyPatch) -> None:
    _set(clean_env, RANK=6, WORLD_SIZE=8, LOCAL_RANK=2, LOCAL_WORLD_SIZE=4, GROUP_RANK=1,
         MASTER_ADDR="node01", MASTER_PORT=29500, TORCHELASTIC_RUN_ID="abc")
    assert discover() == DistEnv(6, 2, 8, 4, 1, "node01", 29500, "torchrun")


def test_deepspeed_launcher(clean_env: pytest.MonkeyPatch) -> None:
    _set(clean_env, RANK=5, WORLD_SIZE=8, LOCAL_RANK=1, LOCAL_SIZE=4, CROSS_RANK=1, CROSS_SIZE=2,
         MASTER_ADDR="10.0.0.1", MASTER_PORT=29501)
    assert discover() == DistEnv(5, 1, 8, 4, 1, "10.0.0.1", 29501, "deepspeed")


def test_local_launcher_variables(clean_env: pytest.MonkeyPatch) -> None:
    # latentforge/spawn.py sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_*.
    _set(clean_env, RANK=1, LOCAL_RANK=1, WORLD_SIZE=2, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
         MASTER_PORT=12345)
    assert discover() == DistEnv(1, 1, 2, 2, 0, "127.0.0.1", 12345, "env")


def test_minimal_explicit_variables_mean_one_node(clean_env: pytest.MonkeyPatch) -> None:
    _set(clean_env, RANK=3, WORLD_SIZE=4, MASTER_ADDR="h", MASTER_PORT=1234)
    assert discover() == DistEnv(3, 3, 4, 4, 0, "h", 1234, "env")


def test_explicit_variables_win_over_slurm(clean_env: pytest.MonkeyPatch) -> None:
    # torchrun started inside an srun task: the torchrun ranks are the real ones.
    _set(clean_env, SLURM_PROCID=0, SLURM_NTASKS=1, SLURM_STEP_ID=0, SLURM_JOB_NODELIST="n1", SLURM_JOB_ID=9,
         RANK=3, WORLD_SIZE=4, LOCAL_RANK=3, LOCAL_WORLD_SIZE=4, MASTER_ADDR="n1", MASTER_PORT=2000,
         TORCHELASTIC_RUN_ID="x")
    assert discover().source == "torchrun"
    assert discover().rank == 3


def test_half_set_explicit_variables_are_an_error(clean_env: pytest.MonkeyPatch) -> None:
    _set(clean_env, RANK=0, WORLD_SIZE=2, MASTER_ADDR="h")
    with pytest.raises(ValueError, match="MASTER_PORT"):
        discover()


@pytest.mark.parametrize("values, field", [
    (dict(RANK=2, WORLD_SIZE=2), "rank"),
    (dict(RANK=0, WORLD_SIZE=0), "world_size"),
    (dict(RANK=0, WORLD_SIZE=2, LOCAL_RANK=2, LOCAL_WORLD_SIZE=2), "local_rank"),
    (dict(RANK="zero", WORLD_SIZE=2), "RANK"),
])
def test_impossible_layouts_are_rejected(clean_env: pytest.MonkeyPatch, values: dict, field: str) -> None:
    _set(clean_env, MASTER_ADDR="h", MASTER_PORT=1234, **values)
    with pytest.raises(ValueError, match=field):
        discover()


# ---------------------------------------------------------------------------------------
# Plain SLURM (srun).


def _srun_task(mp: pytest.MonkeyPatch, **overrides: object) -> None:
    """Task 5 of an 8-task srun step on gpu[07-08] (4 per node), as SLURM 22.05 sets it."""
    values = dict(SLURM_JOB_ID=123456, SLURM_JOBID=123456, SLURM_PROCID=5, SLURM_LOCALID=1, SLURM_NODEID=1,
                  SLURM_NTASKS=8, SLURM_NPROCS=8, SLURM_STEP_ID=0, SLURM_JOB_NODELIST="gpu[07-08]",
                  SLURM_STEP_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES=2, SLURM_TASKS_PER_NODE="4(x2)",
                  SLURM_STEP_TASKS_PER_NODE="4(x2)")
    values.update(overrides)
    _set(mp, **{k: v for k, v in values.items() if v is not None})


def test_slurm_srun_task(clean_env: pytest.MonkeyPatch) -> None:
    _srun_task(clean_env)
    # scontrol (when installed) and the parser agree on the first host.
    assert discover() == DistEnv(5, 1, 8, 4, 1, "gpu07", 15000 + 123456 % 15000, "slurm")


def test_slurm_without_scontrol_uses_the_parser(clean_env: pytest.MonkeyPatch, tmp_path) -> None:
    _no_scontrol(clean_env, tmp_path)
    _srun_task(clean_env, SLURM_JOB_NODELIST="node[03-04,07],gpu3", SLURM_STEP_NODELIST="node[03-04,07],gpu3",
               SLURM_JOB_NUM_NODES=4, SLURM_TASKS_PER_NODE="2(x4)", SLURM_STEP_TASKS_PER_NODE="2(x4)",
               SLURM_NODEID=2, SLURM_LOCALID=1)
    got = discover()
    assert (got.master_addr, got.local_world_size, got.node_rank) == ("node03", 2, 2)


def test_slurm_uneven_tasks_per_node(clean_env: pytest.MonkeyPatch) -> None:
    _srun_task(clean_env, SLURM_NTASKS=4, SLURM_NPROCS=4, SLURM_PROCID=3, SLURM_LOCALID=0, SLURM_NODEID=1,
               SLURM_TASKS_PER_NODE="3,1", SLURM_STEP_TASKS_PER_NODE="3,1")
    got = discover()
    assert (got.rank, got.world_size, got.local_world_size, got.local_rank) == (3, 4, 1, 0)


def test_slurm_master_from_the_job_script_wins(clean_env: pytest.MonkeyPatch) -> None:
    _srun_task(clean_env, MASTER_ADDR="gpu08-ib", MASTER_PORT=23456)
    got = discover()
    assert (got.master_addr, got.master_port, got.source) == ("gpu08-ib", 23456, "slurm")


def test_slurm_batch_script_of_multi_task_job_is_an_error(clean_env: pytest.MonkeyPatch) -> None:
    # The batch step carries SLURM_PROCID=0 and SLURM_NTASKS=2 but no SLURM_STEP_ID.
    _srun_task(clean_env, SLURM_STEP_ID=None, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0, SLURM_NTASKS=2)
    clean_env.delenv("SLURM_STEP_ID", raising=False)
    with pytest.raises(ValueError, match="srun"):
        discover()


def test_slurm_single_task_batch_script_is_rank_0_of_1(clean_env: pytest.MonkeyPatch) -> None:
    _set(clean_env, SLURM_JOB_ID=77, SLURM_PROCID=0, SLURM_LOCALID=0, SLURM_NODEID=0, SLURM_NTASKS=1,
         SLURM_JOB_NODELIST="cpu12", SLURM_TASKS_PER_NODE="1")
    assert discover() == DistEnv(0, 0, 1, 1, 0, "cpu12", 15077, "slurm")


# ---------------------------------------------------------------------------------------
# submitit.


def test_submitit_slurm_job(clean_env: pytest.MonkeyPatch) -> None:
    _srun_task(clean_env, SUBMITIT_EXECUTOR="slurm", SUBMITIT_FOLDER="/tmp/x")
    assert discover() == DistEnv(5, 1, 8, 4, 1, "gpu07", 15000 + 123456 % 15000, "submitit-slurm")


def test_submitit_local_job(clean_env: pytest.MonkeyPatch) -> None:
    # What submitit's LocalExecutor controller gives task 1 of 2 (latentforge/spawn.py is not involved).
    _set(clean_env, SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID=4242, SUBMITIT_LOCAL_NTASKS=2,
         SUBMITIT_LOCAL_GLOBALID=1, SUBMITIT_LOCAL_LOCALID=1, SUBMITIT_LOCAL_NODEID=0,
         SUBMITIT_LOCAL_JOB_NUM_NODES=1)
    assert discover() == DistEnv(1, 1, 2, 2, 0, "127.0.0.1", 15000 + 4242, "submitit-local")


# ---------------------------------------------------------------------------------------
# One process, and apply().


def test_single_process(clean_env: pytest.MonkeyPatch) -> None:
    got = discover()
    assert (got.rank, got.local_rank, got.world_size, got.local_world_size, got.node_rank, got.master_addr,
            got.source) == (0, 0, 1, 1, 0, "127.0.0.1", "single")
    with socket.socket() as s:  # the port was free a moment ago; nothing of ours holds it
        s.bind(("127.0.0.1", got.master_port))


def test_apply_round_trips_through_discover(clean_env: pytest.MonkeyPatch) -> None:
    _srun_task(clean_env)
    found = discover()
    # monkeypatch restores only keys it has touched: touch the ones apply() writes.
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        clean_env.setenv(k, "placeholder")
        clean_env.delenv(k)
    apply(found)
    assert os.environ["RANK"] == "5" and os.environ["MASTER_ADDR"] == "gpu07"
    again = discover()
    assert again == DistEnv(**{**found.__dict__, "source": "env"})


def test_apply_to_a_given_mapping() -> None:
    target: dict[str, str] = {}
    apply(DistEnv(1, 0, 2, 1, 1, "h", 2345, "slurm"), target)
    assert target == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                      "NODE_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "2345"}


# ---------------------------------------------------------------------------------------
# The gloo interface of a job that spans nodes (real name resolution, real routes).


def _an_address() -> tuple[str, str]:
    """(interface, address): a non-loopback IPv4 address of this machine."""
    import psutil

    for name, addrs in sorted(psutil.net_if_addrs().items()):
        for a in addrs:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return name, a.address
    pytest.skip("this machine has no non-loopback IPv4 address to route to")


def test_gloo_interface_is_left_alone_on_one_node_and_when_set() -> None:
    one_node = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid"}
    assert bind_gloo_interface(one_node) == "" and "GLOO_SOCKET_IFNAME" not in one_node
    by_hand = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "no-such-host.invalid",
               "GLOO_SOCKET_IFNAME": "ib0"}
    assert bind_gloo_interface(by_hand) == "gloo on ib0 (GLOO_SOCKET_IFNAME as set)"
    assert by_hand["GLOO_SOCKET_IFNAME"] == "ib0"


def test_gloo_interface_across_nodes_is_the_one_on_the_route_to_the_master() -> None:
    ifname, address = _an_address()
    environ = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": address}
    got = bind_gloo_interface(environ)
    assert got == f"gloo on {ifname} ({address}), the interface on the route to {address} ({address})"
    assert environ["GLOO_SOCKET_IFNAME"] == ifname


def test_master_resolving_to_loopback_routes_through_another_node_of_the_job() -> None:
    # Debian maps a machine's own name to 127.0.1.1: on the master's node its name says nothing
    # about the network the nodes share; another node of the job does.
    ifname, address = _an_address()
    environ = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "localhost",
               "SLURM_JOB_NODELIST": f"localhost,{address}"}
    assert bind_gloo_interface(environ) == (f"gloo on {ifname} ({address}), the interface on the route to "
                                            f"{address} ({address})")
    alone = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "localhost", "SLURM_JOB_NODELIST": "localhost"}
    with pytest.raises(ValueError, match=r"^GLOO_SOCKET_IFNAME: cannot tell which interface the nodes share: "
                                         r"MASTER_ADDR 'localhost' resolves only to loopback"):
        bind_gloo_interface(alone)
    assert "GLOO_SOCKET_IFNAME" not in alone


def test_unresolvable_master_is_one_line_naming_it() -> None:
    environ = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "no-such-host.invalid"}
    with pytest.raises(ValueError, match=r"^MASTER_ADDR: 'no-such-host.invalid' does not resolve on .*/etc/hosts"):
        bind_gloo_interface(environ)


def test_launch_modules_stay_light() -> None:
    # Job pickles and `latentforge --help` import these; torch and submitit must stay out.
    code = ("import sys; import latentforge.env, latentforge.launch.profiles; "
            "heavy = [m for m in ('torch', 'submitit', 'deepspeed', 'yaml') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
