"""The adapters around other libraries' private APIs: each accepts the installed (tested)
version, refuses any other with one line, and its entry points check before they reach in."""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from latentforge import compat

ADAPTERS = {  # adapter module -> the distribution it checks
    "latentforge.torch_compat": "torch",
    "latentforge.data.open_clip_compat": "open_clip_torch",
    "latentforge.training.mlflow_compat": "mlflow",
    "latentforge.launch.submitit_compat": "submitit",
}


@pytest.mark.parametrize("module", sorted(ADAPTERS))
def test_adapter_accepts_the_installed_version_and_refuses_another_with_one_line(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.DIST == ADAPTERS[module]
    assert mod.check_version() == compat.installed_version(mod.DIST)  # the locked version is tested
    with pytest.raises(compat.UntestedVersionError) as e:
        mod.check_version("99.0.0")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{mod.DIST} 99.0.0 is not a version latentforge was tested with ({mod.DIST}{mod.TESTED}")
    assert compat.ALLOW_ENV in msg


def test_local_version_labels_and_missing_or_odd_versions() -> None:
    assert compat.check_tested("torch", ">=2.14,<2.15", "x", "2.14.1+cu124") == "2.14.1+cu124"
    for bad in ("2.15.0", "2.13.9", "not-a-version"):
        with pytest.raises(compat.UntestedVersionError, match=f"^torch {bad} is not"):
            compat.check_tested("torch", ">=2.14,<2.15", "x", bad)
    with pytest.raises(compat.UntestedVersionError, match=r"^no-such-dist \(not installed\) is not"):
        compat.check_tested("no-such-dist", ">=1", "x")


def test_allow_untested_warns_once_instead(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from latentforge.launch import submitit_compat

    monkeypatch.setenv(compat.ALLOW_ENV, "1")
    monkeypatch.setattr(compat, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        assert submitit_compat.check_version("1.6.0") == "1.6.0"
        assert submitit_compat.check_version("1.6.0") == "1.6.0"
    warnings = [r.getMessage() for r in caplog.records if "submitit 1.6.0" in r.getMessage()]
    assert len(warnings) == 1 and "trying it anyway" in warnings[0]


@pytest.fixture
def faked_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every library reports a version that was never tested."""
    monkeypatch.delenv(compat.ALLOW_ENV, raising=False)
    monkeypatch.setattr(compat, "installed_version", lambda dist: "99.0.0")


def test_entry_points_refuse_an_untested_version(faked_versions: None, tmp_path) -> None:
    from latentforge import torch_compat
    from latentforge.data import open_clip_compat
    from latentforge.launch import submitit_compat
    from latentforge.training.system_metrics import SystemSampler

    calls = {
        "torch": lambda: torch_compat.new_shared((2, 3), torch.float16),
        "open_clip_torch": lambda: open_clip_compat.find_checkpoint_in_dir(tmp_path),
        "mlflow": lambda: SystemSampler().sample(),
        "submitit": lambda: submitit_compat.submitted_timeout(tmp_path / "1_submitted.pkl"),
    }
    for dist, call in calls.items():
        with pytest.raises(compat.UntestedVersionError, match=f"^{dist} 99.0.0 is not a version"):
            call()


def test_the_adapters_work_on_the_tested_versions(tmp_path) -> None:
    """What each adapter reaches into is there, and does what the callers rely on."""
    from submitit.core.utils import DelayedSubmission

    from latentforge import torch_compat
    from latentforge.data import open_clip_compat
    from latentforge.launch import submitit_compat
    from latentforge.training import mlflow_compat

    t = torch_compat.new_shared((2, 3), torch.float16)
    assert t.shape == (2, 3) and t.dtype == torch.float16 and t.is_shared()

    assert open_clip_compat.find_checkpoint_in_dir(tmp_path) is None
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    assert open_clip_compat.find_checkpoint_in_dir(tmp_path) == tmp_path / "open_clip_model.safetensors"

    readings: dict[str, float] = {}
    for m in mlflow_compat.system_monitors():
        m.collect_metrics()
        readings.update(m.aggregate_metrics())
    assert "cpu_utilization_percentage" in readings and "disk_usage_percentage" in readings

    pickled = tmp_path / "7_submitted.pkl"
    first = DelayedSubmission(print, "x")
    first.set_timeout(30, 3)
    first.dump(pickled)
    assert submitit_compat.submitted_timeout(pickled) == (30, 3)
    submitit_compat.rewrite_submission(pickled, print, 30, 2)
    again = DelayedSubmission.load(pickled)
    assert again.function is print and submitit_compat.submitted_timeout(pickled) == (30, 2)
    assert not pickled.with_suffix(".pkl.save_tmp").exists()
