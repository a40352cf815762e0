"""Cluster profiles (launch/profiles.py, slurm/profiles/*.yaml) against submitit's real API."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from latentforge import env as lfenv
from latentforge.launch.profiles import PROFILES_DIR, Profile, ProfileError, load_profile

SHIPPED = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


@pytest.fixture
def srun_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's SlurmExecutor refuses to exist without `srun` on PATH; it never runs it here."""
    if shutil.which("srun") is None:
        stub = tmp_path / "bin" / "srun"
        stub.parent.mkdir()
        stub.write_text("#!/bin/sh\nexit 1\n")
        stub.chmod(0o755)
        monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")


def test_shipped_profiles_are_all_there() -> None:
    assert {"local", "local-multinode", "gpu-8x", "gpu-account-qos", "local-processes"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_builds_a_submitit_executor(name: str, tmp_path: Path, srun_on_path: None) -> None:
    prof = load_profile(name)
    ex = prof.make_executor(tmp_path / "jobs")  # update_parameters raises on any unknown name
    assert ex.cluster == prof.executor
    if prof.executor == "slurm":
        # The sbatch script submitit would submit: the profile's fields, under sbatch's names.
        text = ex._executor._make_submission_file_text("python -c pass", "uid")
        assert f"#SBATCH --ntasks-per-node={prof.ntasks_per_node}" in text
        assert f"#SBATCH --time={prof.time_min}" in text
        assert f"#SBATCH --signal=USR2@{prof.signal_delay_s}" in text
        assert ex._executor.max_num_timeout == prof.max_num_timeout
        for key in ("partition", "account", "qos"):
            if getattr(prof, key):
                assert f"#SBATCH --{key}={getattr(prof, key)}" in text
        for k, v in prof.env.items():
            assert f"export {k}={v}" in text
        # srun (Slurm 22.05-23.02) does not inherit --cpus-per-task: the tasks get it from here.
        assert text.index(f"export SRUN_CPUS_PER_TASK={prof.cpus_per_task}") < text.index("srun ")


def test_gpu_profile_maps_every_field(tmp_path: Path, srun_on_path: None) -> None:
    prof = load_profile("gpu-account-qos")
    p = prof.executor_params()
    assert p["gpus_per_node"] == 8 and p["tasks_per_node"] == 8  # tasks_per_node: 0 = one per GPU
    assert p["slurm_account"] == "my-project" and p["slurm_qos"] == "normal"
    assert p["mem_gb"] == 480 and p["timeout_min"] == 720 and p["slurm_signal_delay_s"] == 180
    text = prof.make_executor(tmp_path)._executor._make_submission_file_text("cmd", "uid")
    for line in ("--gpus-per-node=8", "--cpus-per-task=10", "--mem=480GB", "--nodes=2", "--requeue",
                 "--partition=gpu"):
        assert f"#SBATCH {line}" in text
    # env exports come before the setup lines, so setup may use them.
    assert text.index("export NCCL_ASYNC_ERROR_HANDLING=1") < text.index("nvidia-smi -L || true")


def test_srun_cpus_per_task_reaches_every_slurm_submission(tmp_path: Path, srun_on_path: None) -> None:
    """Train and precompute-array submissions export SRUN_CPUS_PER_TASK before srun; an
    explicit env value wins; the local executor has no srun and gets none; and the plain
    sbatch templates export it from the job's own --cpus-per-task before their srun."""
    prof = load_profile("gpu-8x")
    for kind in ("train", "precompute"):
        text = prof.make_executor(tmp_path / kind, kind=kind)._executor._make_submission_file_text("cmd", "uid")
        assert "#SBATCH --cpus-per-task=12" in text
        assert text.index("export SRUN_CPUS_PER_TASK=12") < text.index("srun ")
    own = Profile(cpus_per_task=4, env={"SRUN_CPUS_PER_TASK": "3"})
    assert [line for line in own.setup_lines() if "SRUN_CPUS" in line] == ["export SRUN_CPUS_PER_TASK=3"]
    assert not [line for line in Profile(executor="local").setup_lines() if "SRUN_CPUS" in line]
    templates = sorted((PROFILES_DIR.parent / "templates").glob("*.sbatch"))
    assert {t.stem for t in templates} == {"train", "eval", "precompute_array"}
    for t in templates:
        body = t.read_text()
        assert body.index("export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}") < body.index("\nsrun "), t.name


def test_constructor_only_parameters_stay_out_of_update_parameters() -> None:
    prof = Profile(max_num_timeout=7)
    assert "max_num_timeout" not in str(prof.executor_params())
    assert prof.executor_init_params() == {"cluster": "slurm", "slurm_max_num_timeout": 7}


def test_unknown_key_is_one_line_naming_it(tmp_path: Path) -> None:
    p = _write(tmp_path, "executor: slurm\ngpus_per_nod: 8\n")
    with pytest.raises(ProfileError) as e:
        load_profile(p)
    msg = str(e.value)
    assert "gpus_per_nod: unknown key" in msg and str(p) in msg and "\n" not in msg


@pytest.mark.parametrize("text, key", [
    ("nodes: two\n", "nodes"),
    ("mem_gb: lots\n", "mem_gb"),
    ("nodes: 0\n", "nodes"),
    ("executor: kubernetes\n", "executor"),
    ("setup: {a: 1}\n", "setup"),
    ("env: [A, B]\n", "env"),
    ("env: {1BAD: x}\n", "1BAD"),
    ("additional_parameters: {mail-type: [END]}\n", "mail-type"),
    ("time_min: 1\nsignal_delay_s: 90\n", "signal_delay_s"),
    ("executor: local\npartition: gpu\n", "partition"),
    ("executor: local\nnodes: 2\n", "nodes"),
    ("- a\n- b\n", "top level"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ProfileError, match=key):
        load_profile(_write(tmp_path, text))


def test_unknown_profile_name_lists_known_ones() -> None:
    with pytest.raises(ProfileError, match="gpu-8x"):
        load_profile("no-such-profile")


def test_env_values_are_strings(tmp_path: Path) -> None:
    prof = load_profile(_write(tmp_path, "env: {A: 1, B: true, C: 'x y'}\nsetup: module load cuda\n"))
    assert prof.env == {"A": "1", "B": "1", "C": "x y"}
    assert prof.setup_lines() == ["export A=1", "export B=1", "export C='x y'", "export SRUN_CPUS_PER_TASK=1",
                                  "module load cuda"]


def test_local_processes_profile_runs_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through submitit's LocalExecutor: two processes, ranks 0 and 1."""
    for k in list(os.environ):  # pytest itself may run under SLURM or torchrun
        if k.startswith(("SLURM_", "SUBMITIT_")) or k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    prof = load_profile("local-processes")
    job = prof.make_executor(tmp_path).submit(lfenv.discover)
    deadline = time.monotonic() + 120
    while not job.done():
        assert time.monotonic() < deadline, "local job did not finish in 120 s"
        time.sleep(0.2)  # polling interval
    results = job.results()
    assert sorted(r.rank for r in results) == [0, 1]
    assert {(r.world_size, r.local_world_size, r.source, r.master_addr) for r in results} == {
        (2, 2, "submitit-local", "127.0.0.1")}
    assert len({r.master_port for r in results}) == 1  # both ranks derive the same rendezvous
