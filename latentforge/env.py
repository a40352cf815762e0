"""Rank, world and master discovery: one code path for every way a rank can be started.

`discover()` looks, in this order, at:

1. **explicit variables** (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, optional
   `LOCAL_RANK` ...): set by torchrun, the deepspeed launcher, our own local launcher or a
   previous `apply()`. They are trusted as they are.
2. **submitit** (`SUBMITIT_EXECUTOR` is set): ranks from `submitit.JobEnvironment`, which
   covers both its SLURM and its local executor.
3. **plain SLURM** (`SLURM_PROCID` is set, i.e. a task started by `srun`): ranks from the
   `SLURM_*` variables.
4. **a single process**: rank 0 of 1 on 127.0.0.1 and a free port.

`apply(env)` exports the result under the names torch.distributed and DeepSpeed read, so
everything after discovery (`latentforge.dist.init`) has one input.

Master of a SLURM job: the first host of `SLURM_JOB_NODELIST`, expanded by
`scontrol show hostnames` or, where scontrol is missing, by `expand_nodelist` (the same
grammar in Python). Port: `PORT_BASE + job_id % PORT_SPAN` = 15000-29999. Every rank of a
job computes the same port without talking to the others; the range stays below Linux's
ephemeral ports (32768+), so a port picked by some client's connect() does not collide.
Two jobs sharing a node collide only if their ids differ by a multiple of 15000.
Under SLURM and submitit, MASTER_ADDR / MASTER_PORT exported by the job script (see
slurm/templates/train.sbatch) win over the derived values: a site can override them.

The network of a job that spans nodes (`bind_gloo_interface`). gloo binds every rank to the
address its own hostname resolves to, unless GLOO_SOCKET_IFNAME names an interface. Where
the hostname resolves to something the other nodes cannot reach (Debian's `127.0.1.1
HOSTNAME` line, a management address, no entry at all), gloo falls back to loopback or
binds the wrong address and the first cross-node collective waits until the timeout. So
when the job spans nodes and GLOO_SOCKET_IFNAME is unset, it is set to the interface that
holds this node's address on the route to MASTER_ADDR (resolved here, with a one-line error
if it does not resolve): the network the rendezvous itself uses. NCCL is left to choose its
own interfaces (it prefers InfiniBand and skips loopback and docker bridges; forcing the
route to the master's name could move it onto a slower management network); a site whose
NCCL picks wrongly sets NCCL_SOCKET_IFNAME in its profile's `env`, like any other variable.

This module is imported by launch code and job pickles: no torch here.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping, MutableMapping

PORT_BASE = 15000  # first port a SLURM/submitit job may get
PORT_SPAN = 15000  # ports PORT_BASE .. PORT_BASE + PORT_SPAN - 1


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank, 0 .. world_size - 1
    local_rank: int  # rank on this node; picks the GPU
    world_size: int  # processes in the job, all nodes
    local_world_size: int  # processes on this node
    node_rank: int  # index of this node, 0 .. nodes - 1
    master_addr: str  # host of rank 0 (name or address)
    master_port: int  # TCP port of the rendezvous on master_addr
    source: str  # "env" | "torchrun" | "deepspeed" | "submitit-slurm" | "submitit-local" | "slurm" | "single"


# ---------------------------------------------------------------------------------------
# SLURM string formats.

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _split_top_level(text: str, what: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"{what}: nested brackets in {text!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{what}: unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"{what}: unbalanced '[' in {text!r}")
    parts.append("".join(cur))
    return parts


def _expand_range_list(body: str, text: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'], keeping the zero padding of the lower bound."""
    out: list[str] = []
    for item in body.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"SLURM_JOB_NODELIST: bad range {item!r} in {text!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"SLURM_JOB_NODELIST: descending range {item!r} in {text!r}")
        width = len(lo)  # Slurm pads to the width of the lower bound: node[08-10] -> node08..node10
        out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a compressed Slurm host list, in Slurm's order.

    `node[01-04,07],gpu3` -> node01 node02 node03 node04 node07 gpu3. Several bracket groups
    in one name expand as a product, the last varying fastest (`r[1-2]n[1-2]` -> r1n1 r1n2
    r2n1 r2n2), as `scontrol show hostnames` does.
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("SLURM_JOB_NODELIST: empty node list")
    hosts: list[str] = []
    for part in _split_top_level(text, "SLURM_JOB_NODELIST"):
        part = part.strip()
        if not part:
            raise ValueError(f"SLURM_JOB_NODELIST: empty host name in {text!r}")
        names = [""]
        pos = 0
        for m in _BRACKET.finditer(part):
            literal = part[pos:m.start()]
            choices = _expand_range_list(m.group(1), text)
            names = [n + literal + c for n in names for c in choices]
            pos = m.end()
        names = [n + part[pos:] for n in names]
        hosts.extend(names)
    return hosts


def _tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE '2(x3),1' -> [2, 2, 2, 1]."""
    out: list[int] = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not m:
            raise ValueError(f"SLURM_TASKS_PER_NODE: cannot parse {spec!r}")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: scontrol's answer, else our own parser's."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            res = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=False)
            lines = res.stdout.split()
            if res.returncode == 0 and lines:
                return lines[0]
        except (OSError, subprocess.TimeoutExpired):
            pass  # a missing or hung scontrol is why the pure-Python parser exists
    return expand_nodelist(nodelist)[0]


def port_for_job(job_id: str | int) -> int:
    """Rendezvous port every rank of a job derives alone from the job id."""
    digits = re.match(r"\d+", str(job_id))
    if not digits:
        raise ValueError(f"SLURM_JOB_ID: expected a number, got {job_id!r}")
    return PORT_BASE + int(digits.group(0)) % PORT_SPAN


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process may take it before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------
# The sources, most explicit first.


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {value!r}") from None


def _check(env: DistEnv) -> DistEnv:
    """Reject impossible layouts now; they would otherwise hang in the rendezvous."""
    if env.world_size < 1:
        raise ValueError(f"world_size: must be >= 1, got {env.world_size} (from {env.source})")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"rank: {env.rank} is outside 0..{env.world_size - 1} (from {env.source})")
    if not 1 <= env.local_world_size <= env.world_size:
        raise ValueError(f"local_world_size: {env.local_world_size} is outside 1..{env.world_size} "
                         f"(from {env.source})")
    if not 0 <= env.local_rank < env.local_world_size:
        raise ValueError(f"local_rank: {env.local_rank} is outside 0..{env.local_world_size - 1} "
                         f"(from {env.source})")
    if not 0 < env.master_port < 65536:
        raise ValueError(f"master_port: {env.master_port} is not a TCP port (from {env.source})")
    if not env.master_addr:
        raise ValueError(f"master_addr: empty (from {env.source})")
    return env


def _from_explicit(environ: Mapping[str, str]) -> DistEnv:
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
    if missing:
        # A half-set environment is a launcher bug; guessing the rest would hang or split the job.
        raise ValueError(f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: "
                         "set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT or none")
    if "TORCHELASTIC_RUN_ID" in environ:
        source = "torchrun"
    elif "CROSS_RANK" in environ or "LOCAL_SIZE" in environ:
        source = "deepspeed"
    else:
        source = "env"
    rank = _int(environ, "RANK")
    world = _int(environ, "WORLD_SIZE")
    # Without LOCAL_* the launcher is a one-node one (ours): local == global.
    local_rank = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    if "LOCAL_WORLD_SIZE" in environ:  # torchrun, apply()
        local_world = _int(environ, "LOCAL_WORLD_SIZE")
    elif "LOCAL_SIZE" in environ:  # deepspeed launcher
        local_world = _int(environ, "LOCAL_SIZE")
    else:
        local_world = world
    for name in ("NODE_RANK", "GROUP_RANK", "CROSS_RANK"):  # apply(), torchrun, deepspeed
        if name in environ:
            node_rank = _int(environ, name)
            break
    else:
        node_rank = rank // local_world if local_world > 0 else 0  # _check() rejects local_world < 1
    return DistEnv(rank, local_rank, world, local_world, node_rank, environ["MASTER_ADDR"],
                   _int(environ, "MASTER_PORT"), source)


def _local_world_from_slurm(environ: Mapping[str, str], node: int, ntasks: int, nnodes: int) -> int:
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(name):
            counts = _tasks_per_node(environ[name])
            if node < len(counts):
                return counts[node]
    if environ.get("SLURM_NTASKS_PER_NODE"):
        return _int(environ, "SLURM_NTASKS_PER_NODE")
    return max(1, ntasks // max(1, nnodes))


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    ntasks_name = "SLURM_NTASKS" if "SLURM_NTASKS" in environ else "SLURM_NPROCS"
    if ntasks_name not in environ:
        raise ValueError("SLURM_PROCID is set but SLURM_NTASKS is not")
    world = _int(environ, ntasks_name)
    if "SLURM_STEP_ID" not in environ and world > 1:
        # The batch script of a multi-task job also carries SLURM_PROCID=0 and SLURM_NTASKS=N,
        # but it is one process: rank 0 would wait forever for N - 1 peers that never start.
        raise ValueError(f"SLURM_STEP_ID: not set, so this is the batch script of a {world}-task job, "
                         "not one of its tasks; start the command with `srun`")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get(
        "SLURM_NODELIST")
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST: not set inside a SLURM task")
    node = _int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
    nnodes = len(expand_nodelist(nodelist))
    local_world = _local_world_from_slurm(environ, node, world, nnodes)
    return DistEnv(
        rank=_int(environ, "SLURM_PROCID"),
        local_rank=_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
        world_size=world,
        local_world_size=local_world,
        node_rank=node,
        master_addr=environ.get("MASTER_ADDR") or first_host(nodelist),
        master_port=(_int(environ, "MASTER_PORT") if environ.get("MASTER_PORT")
                     else port_for_job(environ.get("SLURM_JOB_ID") or environ.get("SLURM_JOBID") or "")),
        source="slurm",
    )


def _from_submitit(environ: Mapping[str, str]) -> DistEnv:
    import submitit  # late: heavy-ish, and only inside submitit jobs

    job = submitit.JobEnvironment()
    world = job.num_tasks
    nodes = max(1, job.num_nodes)
    if job.cluster == "slurm":
        local_world = _local_world_from_slurm(environ, job.node, world, nodes)
        nodelist = environ.get("SLURM_JOB_NODELIST", "")
        master = first_host(nodelist) if nodelist else job.hostnames[0]
        port = port_for_job(job.raw_job_id)
    else:
        # The local executor runs every task on this machine; its job id is the pid of the
        # process that spawned them, the same for every task.
        local_world = max(1, world // nodes)
        master = "127.0.0.1"
        port = port_for_job(job.raw_job_id)
    master = environ.get("MASTER_ADDR") or master
    port = _int(environ, "MASTER_PORT") if environ.get("MASTER_PORT") else port
    return DistEnv(job.global_rank, job.local_rank, world, local_world, job.node, master, port,
                   f"submitit-{job.cluster}")


def discover() -> DistEnv:
    """Where this process sits in the job, from os.environ (see the module docstring)."""
    environ = os.environ
    if "RANK" in environ:
        return _check(_from_explicit(environ))
    if environ.get("SUBMITIT_EXECUTOR"):
        return _check(_from_submitit(environ))
    if "SLURM_PROCID" in environ:
        return _check(_from_slurm(environ))
    return DistEnv(0, 0, 1, 1, 0, "127.0.0.1", free_port(), "single")


def apply(env: DistEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Export `env` under the names torch.distributed (env://) and DeepSpeed read.

    After this, `discover()` in this process or its children returns `env` again (source
    "env"), so DataLoader workers and re-imports agree with the launcher.
    """
    target = os.environ if environ is None else environ
    target.update({
        "RANK": str(env.rank),
        "WORLD_SIZE": str(env.world_size),
        "LOCAL_RANK": str(env.local_rank),
        "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "NODE_RANK": str(env.node_rank),
        "MASTER_ADDR": env.master_addr,
        "MASTER_PORT": str(env.master_port),
    })


# ---------------------------------------------------------------------------------------
# The network of a job that spans nodes.


@dataclass(frozen=True)
class Route:
    """How this node reaches the job's rendezvous."""

    peer: str  # the host routed to: MASTER_ADDR, or another node of the job (see `route_to_job`)
    peer_ip: str  # its address, resolved on this node
    local_ip: str  # this node's address on the way there: what the other nodes reach this rank at
    ifname: str  # the interface holding local_ip


def resolve_host(host: str, what: str = "MASTER_ADDR") -> list[str]:
    """The addresses `host` resolves to on this node, IPv4 first; one line naming `what` if none."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"{what}: {host!r} does not resolve on {socket.gethostname()} "
                         f"({getattr(e, 'strerror', None) or e}); every node of the job must resolve the node names "
                         f"(DNS or /etc/hosts), or the profile's env must set {what} to an address") from None
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    v6 = [i[4][0] for i in infos if i[0] == socket.AF_INET6]
    return list(dict.fromkeys(v4 + v6))


def source_address(ip: str) -> str:
    """The local address a connection to `ip` would leave from (a UDP connect only picks
    the route; nothing is sent)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((ip, 9))
        return str(s.getsockname()[0])


def interface_of(address: str) -> str:
    """The name of the interface that holds `address`."""
    import psutil  # late: only jobs that span nodes need it

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    raise ValueError(f"GLOO_SOCKET_IFNAME: no interface of {socket.gethostname()} holds {address}, the address on "
                     f"the route to the job's master; set GLOO_SOCKET_IFNAME in the profile's env")


def spans_nodes(environ: Mapping[str, str]) -> bool:
    """Whether the ranks described by `environ` (after `apply`) sit on more than one node."""
    world = int(environ.get("WORLD_SIZE") or 1)
    return world > int(environ.get("LOCAL_WORLD_SIZE") or world)


def route_to_job(environ: Mapping[str, str]) -> Route:
    """This node's way to the rendezvous: the route to MASTER_ADDR. On the master's own node
    the name may resolve to loopback (Debian maps its own hostname to 127.0.1.1); the route
    to another node of the SLURM job then says which interface the nodes share."""
    master = environ.get("MASTER_ADDR", "")
    if not master:
        raise ValueError("MASTER_ADDR: not set; `apply(discover())` exports it before the process group starts")
    me = {socket.gethostname(), socket.gethostname().split(".")[0], environ.get("SLURMD_NODENAME", "")}
    nodelist = environ.get("SLURM_JOB_NODELIST", "")
    others = [h for h in (expand_nodelist(nodelist) if nodelist else []) if h not in me and h != master]
    for i, host in enumerate([master, *others]):
        try:
            ips = resolve_host(host, "MASTER_ADDR" if i == 0 else "SLURM_JOB_NODELIST")
        except ValueError:
            if i == 0:
                raise
            continue  # another node's name is only a fallback
        for ip in ips:
            if not ipaddress.ip_address(ip.split("%")[0]).is_loopback:
                local = source_address(ip)
                return Route(host, ip, local, interface_of(local))
    raise ValueError(f"GLOO_SOCKET_IFNAME: cannot tell which interface the nodes share: MASTER_ADDR {master!r} "
                     f"resolves only to loopback on {socket.gethostname()} and no other node of the job resolves; "
                     f"set GLOO_SOCKET_IFNAME in the profile's env")


def bind_gloo_interface(environ: MutableMapping[str, str] | None = None) -> str:
    """Set GLOO_SOCKET_IFNAME for a job that spans nodes, unless it is set (see the module
    docstring). Returns what was decided, for the log ("" for a job on one node)."""
    target = os.environ if environ is None else environ
    if target.get("GLOO_SOCKET_IFNAME"):
        return f"gloo on {target['GLOO_SOCKET_IFNAME']} (GLOO_SOCKET_IFNAME as set)"
    if not spans_nodes(target):
        return ""
    route = route_to_job(target)
    target["GLOO_SOCKET_IFNAME"] = route.ifname
    return f"gloo on {route.ifname} ({route.local_ip}), the interface on the route to {route.peer} ({route.peer_ip})"
