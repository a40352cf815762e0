"""Cluster profiles: where and how a job runs, as a small YAML file.

A profile names the executor (`slurm`, or `local` processes on this machine) and the
resources a job asks for. `slurm/profiles/*.yaml` holds the shipped ones; a profile is
passed by path or by name (`local` -> `slurm/profiles/local.yaml`). The shipped profiles and
the plain sbatch templates (`slurm/templates/*.sbatch`, `find_template`) are package data,
found through importlib.resources: the repository's slurm/ in a checkout or an editable
install (through the latentforge/slurm link), latentforge/slurm/ inside an installed wheel.
`latentforge shipped` lists them with their paths.

```yaml
executor: slurm            # slurm | local
partition: gpu             # "" = the cluster's default partition
account: ""                # --account; "" = the user's default
qos: ""                    # --qos
constraint: ""             # --constraint (node features, e.g. "a100&ib")
nodes: 1
gpus_per_node: 8
tasks_per_node: 0          # 0 = one task per GPU (1 without GPUs)
cpus_per_task: 12
mem_gb: 0                  # 0 = the partition's default
time_min: 240              # wall-time limit
signal_delay_s: 90         # USR2 this long before the limit: time to checkpoint
max_num_timeout: 20        # requeues after a timeout/preemption before giving up
array_tasks: 64            # precompute job arrays: tasks (groups of raw shards); 0 = one per shard
array_parallelism: 16      # precompute job arrays: tasks running at once; 0 = no limit
setup:                     # shell lines run in the job script before the tasks start
  - module load cuda/12.4
env:                       # exported for every task
  NCCL_ASYNC_ERROR_HANDLING: "1"
additional_parameters:     # passed through to sbatch (#SBATCH --key=value)
  requeue: true
```

`Profile.executor_params()` gives the keyword arguments of
`submitit.AutoExecutor.update_parameters` (names checked against submitit 1.5.4);
`executor_init_params()` gives the constructor's (`max_num_timeout` is only accepted there).

No torch, no submitit at import: job pickles and `latentforge --help` stay light.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# Package data (see the module docstring). A wheel installed by pip lies on the filesystem,
# so the resource folder is a real path that sbatch and yaml can read.
SLURM_DIR = Path(str(resources.files("latentforge").joinpath("slurm"))).resolve()
PROFILES_DIR = SLURM_DIR / "profiles"
TEMPLATES_DIR = SLURM_DIR / "templates"

EXECUTORS = ("slurm", "local")
SLURM_ONLY = ("partition", "account", "qos", "constraint", "additional_parameters")


class ProfileError(ValueError):
    """A bad profile key or value. The message names the file and the key."""


@dataclass
class Profile:
    executor: str = "slurm"  # "slurm" (sbatch through submitit) or "local" (processes on this machine)
    partition: str = ""  # SLURM partition; "" = the cluster's default
    account: str = ""  # SLURM account to charge; "" = the user's default
    qos: str = ""  # SLURM quality of service; "" = the account's default
    constraint: str = ""  # SLURM node features, e.g. "a100&ib"; "" = any node
    nodes: int = 1  # nodes per job (local: must be 1)
    gpus_per_node: int = 0  # GPUs per node; 0 = CPU job
    tasks_per_node: int = 0  # ranks per node; 0 = one per GPU, or 1 without GPUs
    cpus_per_task: int = 1  # CPU cores per rank (data workers + 1 is a good start)
    mem_gb: float = 0.0  # memory per node in GB; 0 = the partition's default
    time_min: int = 60  # wall-time limit in minutes
    signal_delay_s: int = 90  # SLURM sends USR2 this long before the limit, to checkpoint
    max_num_timeout: int = 3  # requeues after timeout or preemption before the job is failed
    array_tasks: int = 0  # precompute job arrays: tasks (groups of raw shards); 0 = one per raw shard
    array_parallelism: int = 0  # precompute job arrays: tasks running at once; 0 = no limit
    setup: tuple[str, ...] = ()  # shell lines run before the tasks (module loads, venv activation)
    env: dict[str, str] = field(default_factory=dict)  # variables exported for every task
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # extra sbatch options, verbatim

    @property
    def ntasks_per_node(self) -> int:
        """Ranks per node after resolving `tasks_per_node: 0`."""
        if self.tasks_per_node:
            return self.tasks_per_node
        return self.gpus_per_node or 1

    def setup_lines(self) -> list[str]:
        """`export` lines for `env`, then `setup`: the setup lines may use the variables.

        SLURM jobs also export SRUN_CPUS_PER_TASK = cpus_per_task (unless `env` sets it): from
        Slurm 22.05 to 23.02, srun does not inherit sbatch's --cpus-per-task, so submitit's
        srun would give each rank one core, shared by its data-loader workers."""
        env = dict(self.env)
        if self.executor == "slurm":
            env.setdefault("SRUN_CPUS_PER_TASK", str(self.cpus_per_task))
        exports = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
        return exports + list(self.setup)

    def executor_params(self) -> dict[str, Any]:
        """Keyword arguments for `submitit.AutoExecutor(cluster=...).update_parameters`."""
        p: dict[str, Any] = {
            "timeout_min": self.time_min,
            "nodes": self.nodes,
            "tasks_per_node": self.ntasks_per_node,
        }
        if self.gpus_per_node:
            p["gpus_per_node"] = self.gpus_per_node
        if self.executor == "local":
            # submitit's LocalExecutor ignores cpus, memory and the signal delay; its setup
            # lines run in a shell that starts the tasks.
            if self.setup_lines():
                p["local_setup"] = self.setup_lines()
            return p
        p["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb:
            p["mem_gb"] = self.mem_gb
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name):
                p[f"slurm_{name}"] = getattr(self, name)
        p["slurm_signal_delay_s"] = self.signal_delay_s
        if self.setup_lines():
            p["slurm_setup"] = self.setup_lines()
        if self.additional_parameters:
            p["slurm_additional_parameters"] = dict(self.additional_parameters)
        return p

    def executor_init_params(self) -> dict[str, Any]:
        """Keyword arguments for the `submitit.AutoExecutor` constructor (besides folder)."""
        return {"cluster": self.executor, f"{self.executor}_max_num_timeout": self.max_num_timeout}

    def precompute_executor_params(self) -> dict[str, Any]:
        """`executor_params()` for one task of a precompute job array: one process on one
        node with at most one GPU (an encoder pass does not span GPUs), and without
        `exclusive` (a whole 8-GPU node per array task would waste seven)."""
        one = dataclasses.replace(self, nodes=1, tasks_per_node=1, gpus_per_node=min(self.gpus_per_node, 1),
                                  additional_parameters={k: v for k, v in self.additional_parameters.items()
                                                         if k != "exclusive"})
        p = one.executor_params()
        if self.executor == "slurm" and self.array_parallelism:
            p["slurm_array_parallelism"] = self.array_parallelism
        return p

    def make_executor(self, folder: str | os.PathLike, kind: str = "train") -> Any:
        """A submitit executor for this profile, writing its files under `folder`.
        `kind="precompute"` sizes it for job-array tasks (`precompute_executor_params`)."""
        import submitit  # late: only the submitting process needs it

        ex = submitit.AutoExecutor(folder=folder, **self.executor_init_params())
        ex.update_parameters(**(self.precompute_executor_params() if kind == "precompute"
                                else self.executor_params()))
        return ex


# ---------------------------------------------------------------------------------------
# Loading and validation.

_FIELDS = {f.name: f for f in dataclasses.fields(Profile)}


def _scalar_str(where: str, value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"  # env vars: YAML `true` means the usual "1"
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ProfileError(f"{where}: expected a string or number, got {value!r}")


def _coerce(where: str, name: str, value: Any) -> Any:
    default = getattr(Profile(), name)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ProfileError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"{where}: expected an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if name == "setup":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProfileError(f"{where}: expected a list of shell lines, got {value!r}")
        return tuple(value)
    if name == "env":
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: expected a mapping NAME: value, got {value!r}")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ProfileError(f"{where}.{k}: not a valid environment variable name")
            out[k] = _scalar_str(f"{where}.{k}", v)
        return out
    if name == "additional_parameters":
        if not isinstance(value, dict):
            raise ProfileError(f"{where}: expected a mapping option: value, got {value!r}")
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, (str, int, float, bool)):
                raise ProfileError(f"{where}.{k}: expected option: string/number/true, got {v!r}")
        return dict(value)
    raise ProfileError(f"{where}: unsupported field")  # pragma: no cover (every field is handled above)


def validate(p: Profile, where: str = "profile") -> Profile:
    """Checks across fields. One line per failure, naming the key."""
    if p.executor not in EXECUTORS:
        raise ProfileError(f"{where}: executor: expected one of {', '.join(EXECUTORS)}, got {p.executor!r}")
    for name in ("nodes", "time_min"):
        if getattr(p, name) < 1:
            raise ProfileError(f"{where}: {name}: must be >= 1, got {getattr(p, name)}")
    for name in ("gpus_per_node", "tasks_per_node", "max_num_timeout", "signal_delay_s", "array_tasks",
                 "array_parallelism"):
        if getattr(p, name) < 0:
            raise ProfileError(f"{where}: {name}: must be >= 0, got {getattr(p, name)}")
    if p.cpus_per_task < 1:
        raise ProfileError(f"{where}: cpus_per_task: must be >= 1, got {p.cpus_per_task}")
    if p.mem_gb < 0:
        raise ProfileError(f"{where}: mem_gb: must be >= 0, got {p.mem_gb}")
    if p.signal_delay_s >= p.time_min * 60:
        raise ProfileError(f"{where}: signal_delay_s: {p.signal_delay_s} s leaves no run time within "
                           f"time_min {p.time_min}")
    if p.executor == "local":
        if p.nodes != 1:
            raise ProfileError(f"{where}: nodes: the local executor runs on one node, got {p.nodes}")
        for name in SLURM_ONLY:
            if getattr(p, name):
                raise ProfileError(f"{where}: {name}: only means something with executor: slurm")
    return p


def from_dict(data: dict[str, Any], where: str = "profile") -> Profile:
    """A validated Profile from a plain mapping (the parsed YAML)."""
    if not isinstance(data, dict):
        raise ProfileError(f"{where}: top level must be a mapping")
    kwargs = {}
    for key, value in data.items():
        if key not in _FIELDS:
            raise ProfileError(f"{where}: {key}: unknown key (known: {', '.join(_FIELDS)})")
        kwargs[key] = _coerce(f"{where}: {key}", key, value)
    return validate(Profile(**kwargs), where)


def find_profile(name_or_path: str | os.PathLike) -> Path:
    """A path as given if it exists, else `PROFILES_DIR/<name>.yaml`."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if p.suffix == "" and p.name == str(name_or_path):
        candidate = PROFILES_DIR / f"{p.name}.yaml"
        if candidate.is_file():
            return candidate
        known = ", ".join(sorted(x.stem for x in PROFILES_DIR.glob("*.yaml"))) or "none"
        raise ProfileError(f"profile {str(name_or_path)!r}: no such file, and not a profile in "
                           f"{PROFILES_DIR} (known: {known})")
    raise ProfileError(f"profile file not found: {p}")


def shipped(folder: Path, suffix: str) -> dict[str, Path]:
    """name -> path of the shipped files in `folder` (PROFILES_DIR or TEMPLATES_DIR)."""
    return {p.stem: p for p in sorted(folder.glob(f"*{suffix}"))}


def find_template(name_or_path: str | os.PathLike) -> Path:
    """A path as given if it exists, else the shipped `TEMPLATES_DIR/<name>.sbatch`."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = TEMPLATES_DIR / (p.name if p.suffix == ".sbatch" else f"{p.name}.sbatch")
    if p.name == str(name_or_path) and candidate.is_file():
        return candidate
    known = ", ".join(shipped(TEMPLATES_DIR, ".sbatch")) or "none"
    raise ProfileError(f"sbatch template {str(name_or_path)!r}: no such file, and not a template in {TEMPLATES_DIR} "
                       f"(known: {known})")


def load_profile(path: str | os.PathLike) -> Profile:
    """Read and validate a profile YAML (a path, or a name in `PROFILES_DIR`)."""
    import yaml

    p = find_profile(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{p}: cannot parse: {str(e).splitlines()[0]}") from None
    return from_dict(data, where=str(p))
