"""MLflow's private APIs, in one place, behind a version check (see latentforge/compat.py).

`system_monitors()`: the samplers behind MLflow's `log_system_metrics`
(`mlflow.system_metrics.metrics.*Monitor`, undocumented). latentforge reads them itself and
feeds the readings into its own buffer (training/system_metrics.py), because MLflow's
`SystemMetricsMonitor` needs a run that exists and stops for good at its first failed
request. On an untested MLflow the tracker turns system metrics off with one warning line;
everything else MLflow does for latentforge goes through its public client.
"""

from __future__ import annotations

from typing import Any

from latentforge.compat import check_tested

DIST = "mlflow"
TESTED = ">=3.17,<3.18"  # requirements/lock.txt: 3.17.2
USES = "undocumented system-metrics samplers (mlflow.system_metrics.metrics.*Monitor)"


def check_version(version: str | None = None) -> str:
    """The installed MLflow version if it is tested, else UntestedVersionError (one line)."""
    return check_tested(DIST, TESTED, USES, version)


def system_monitors() -> list[Any]:
    """CPU, disk and network monitors, and the GPU one where nvidia-ml-py and a driver are
    there. Each has `collect_metrics()`, `aggregate_metrics() -> {name: value}` and
    `clear_metrics()`."""
    check_version()
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:  # needs nvidia-ml-py and a driver
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception:
        pass
    return monitors
