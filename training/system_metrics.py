"""System metrics (CPU, memory, disk, network, and GPU with nvidia-ml-py) for `system/*`.

MLflow's own samplers, the ones behind `log_system_metrics` (training/mlflow_compat.py),
read here and fed into the tracker's buffer: mlflow's SystemMetricsMonitor needs a run that
exists and stops for good at its first failed request, so it does not survive an outage.
"""

from __future__ import annotations

import math
from typing import Any

from latentforge.training import mlflow_compat


class SystemSampler:
    """`sample()` -> {name: value} of every sampler, one reading each."""

    def __init__(self) -> None:
        self._monitors: list[Any] | None = None

    def sample(self) -> dict[str, float]:
        """One reading. Raises if a sampler fails (the caller turns system metrics off)."""
        if self._monitors is None:
            self._monitors = mlflow_compat.system_monitors()
        values: dict[str, float] = {}
        for m in self._monitors:
            m.collect_metrics()
            values.update(m.aggregate_metrics())
            m.clear_metrics()
        return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not math.isnan(float(v))}

    @staticmethod
    def prime() -> None:
        """psutil's first CPU reading is meaningless; take it early."""
        try:
            import psutil

            psutil.cpu_percent()
        except Exception:
            pass
