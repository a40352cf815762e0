"""Compare the runs of an MLflow experiment: `latentforge runs compare EXPERIMENT`.

A text table, one row per run: name, id prefix, status, start time, the params that
differ between the runs (plus any asked for), and for each main metric its last value and
its best one (lowest for losses and FID, highest for CLIP score and adherence). With
`--plot out.png`, train/loss against optimizer step for every run in one PNG.
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import sys
from typing import Any, Sequence

MAIN_METRICS = ("train/loss", "eval/fid", "eval/clip_score", "eval/shape_adherence")
LOSS_T_RE = re.compile(r"^eval/loss_t")
HIGHER_IS_BETTER = ("clip_score", "adherence")
# Params that name the run rather than configure it; the name column already shows them.
IDENTITY_PARAMS = ("run_name", "run_dir")
CELL_WIDTH = 28


def higher_is_better(metric: str) -> bool:
    return any(s in metric for s in HIGHER_IS_BETTER)


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    return f"{v:.4g}"


def _cell(v: Any) -> str:
    s = "-" if v is None else str(v)
    return s if len(s) <= CELL_WIDTH else s[: CELL_WIDTH - 3] + "..."


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _search_all(client: Any, experiment_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, order_by=["attributes.start_time ASC"],
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def compare(experiment: str, uri: str, keys: list[str] | None = None, metrics: list[str] | None = None,
            plot: str | None = None) -> str:
    """The comparison table of `experiment` at tracking `uri` as text; writes the
    train/loss plot to `plot` (a PNG path) when given."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"experiment: no experiment named {experiment!r} at {uri}")
    runs = _search_all(client, exp.experiment_id)
    if not runs:
        return f"experiment {experiment!r} has no runs"

    # Params: those whose value is not the same in every run, then the ones asked for.
    all_keys = sorted({k for r in runs for k in r.data.params})
    differing = [k for k in all_keys if k not in IDENTITY_PARAMS and k.rsplit(".", 1)[-1] not in IDENTITY_PARAMS
                 and len({r.data.params.get(k) for r in runs}) > 1]
    param_cols = differing + [k for k in (keys or []) if k not in differing]

    if metrics is None:
        loss_t = sorted({k for r in runs for k in r.data.metrics if LOSS_T_RE.match(k)})
        metrics = [*MAIN_METRICS, *loss_t]
    # Only the metrics some run has, so a training-only experiment stays narrow.
    metric_cols = [m for m in metrics if any(m in r.data.metrics for r in runs)]

    histories: dict[tuple[str, str], list[Any]] = {}
    rows = []
    for r in runs:
        start = datetime.datetime.fromtimestamp(r.info.start_time / 1000).strftime("%Y-%m-%d %H:%M") \
            if r.info.start_time else "-"
        row = [_cell(r.info.run_name or "-"), r.info.run_id[:8], r.info.status, start]
        row += [_cell(r.data.params.get(k)) for k in param_cols]
        for m in metric_cols:
            if m not in r.data.metrics:
                row.append("-")
                continue
            hist = client.get_metric_history(r.info.run_id, m)
            histories[(r.info.run_id, m)] = hist
            last = max(hist, key=lambda x: (x.step, x.timestamp)).value
            finite = [x.value for x in hist if not math.isnan(x.value)]
            best = (max if higher_is_better(m) else min)(finite) if finite else None
            row.append(f"{_fmt(last)} / {_fmt(best)}")
        rows.append(row)
    header = ["run", "id", "status", "start", *param_cols, *(f"{m} last / best" for m in metric_cols)]
    text = _table(header, rows)

    if plot:
        _plot_loss(client, runs, histories, plot)
    return text


def _plot_loss(client: Any, runs: list[Any], histories: dict[tuple[str, str], list[Any]], path: str) -> None:
    # The object API with the Agg canvas: no pyplot, so no global backend is switched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for r in runs:
        hist = histories.get((r.info.run_id, "train/loss"))
        if hist is None and "train/loss" in r.data.metrics:
            hist = client.get_metric_history(r.info.run_id, "train/loss")
        if not hist:
            continue
        pts = sorted((x.step, x.value) for x in hist)
        ax.plot([s for s, _ in pts], [v for _, v in pts], label=f"{r.info.run_name or '-'} ({r.info.run_id[:8]})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train/loss")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    from latentforge.fileio import atomic_open

    with atomic_open(path) as f:
        fig.savefig(f, format="png", dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    """`latentforge runs compare EXPERIMENT [--uri URI] [--keys a,b] [--metrics m,n] [--plot out.png]`.

    `argv` is what follows `runs compare` (how launch/cli.py calls it); a leading
    "compare" is also accepted, so `main(["compare", "EXP"])` works too.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "compare" and not argv[1].startswith("-"):
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="latentforge runs compare",
                                description="Table of an experiment's runs: differing params, last/best metrics.")
    p.add_argument("experiment", help="MLflow experiment name")
    p.add_argument("--uri", default="", help="tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                              "sqlite:///<run_root>/mlflow.db of the default config)")
    p.add_argument("--keys", default="", help="comma-separated params to show besides the differing ones")
    p.add_argument("--metrics", default="", help="comma-separated metrics (default: the main ones)")
    p.add_argument("--plot", default=None, help="write train/loss against step for every run to this PNG")
    args = p.parse_args(argv)

    uri = args.uri
    if not uri:
        from latentforge.config import Config

        uri = Config().resolved_tracking_uri
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    try:
        text = compare(args.experiment, uri, keys=split(args.keys), metrics=split(args.metrics) or None,
                       plot=args.plot)
    except ValueError as e:
        p.exit(2, f"latentforge runs compare: error: {e}\n")
    print(text)
    if args.plot:
        print(f"wrote {args.plot}")
    return 0
