"""`latentforge demo`: the whole pipeline on the embedded defaults (demo preset, CPU).

synthetic shapes -> precompute (pixel codec + tiny open_clip) -> train (DeepSpeed, the
preset's ZeRO stage, 2 local ranks, gloo) with periodic eval -> export -> a sample grid from the export.
Everything lands under RUN_ROOT, with the MLflow store at RUN_ROOT/mlflow.db.
"""

from __future__ import annotations

import time
from pathlib import Path

from latentforge.log import get_logger

log = get_logger("demo")
PRESET = "demo"  # latentforge/config.py: the tiny preset's sizes, tuned for the pictures (docs/demo.md)


def demo(run_root: str = "runs", overrides: list[str] | None = None) -> int:
    from latentforge import spawn
    from latentforge.config import resolve
    from latentforge.data.synth import ensure_synth

    t0 = time.monotonic()
    base = [f"run_root={run_root}", "run_name=demo", "nproc=2", *_fid_overrides(), *(overrides or [])]
    cfg = resolve(PRESET, None, base)

    log.info("1/4 synthetic data")
    ensure_synth(cfg)

    log.info("2/4 precompute")
    from latentforge.data import precompute

    precompute.run(cfg)

    log.info(f"3/4 train ({cfg.nproc} local ranks, DeepSpeed ZeRO-{cfg.train.zero_stage})")
    code = spawn.spawn(["train", "--preset", PRESET, *base], cfg.nproc)
    if code != 0:
        log.error(f"training failed with exit code {code}")
        return code

    log.info("4/4 export and sample")
    from latentforge.eval.sample import sample_from_export
    from latentforge.training.export import export

    run_dir = cfg.resolved_run_dir
    out = export(run_dir, Path(run_root) / "exports" / "demo")  # not inside the run: exports never are
    prompts = ["a large red circle in the center on a white background",
               "a small blue square in the top left on a black background",
               "a large green triangle in the bottom right on a gray background"]
    sample_path = sample_from_export(out, prompts, Path(run_root) / "exports" / "demo_samples.png", n=4)

    grids = sorted((run_dir / "samples").glob("step_*.png"))
    run_id = _run_id(out)
    uri = cfg.resolved_tracking_uri
    print()
    print(f"demo finished in {(time.monotonic() - t0) / 60:.1f} min")
    print(f"  run directory:      {run_dir}")
    print(f"  eval sample grids:  {grids[-1] if grids else '(none)'}")
    print(f"  export:             {out}")
    print(f"  export samples:     {sample_path}")
    print("  open the MLflow UI on this run:")
    print(f"    .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000")
    print(f"    then browse {run_url('http://127.0.0.1:5000', uri, cfg.tracking.experiment, run_id)}")
    return 0


def _fid_overrides() -> list[str]:
    """Real FID on held-out images in the final eval only (the periodic ones skip it: a
    minute or more each on a CPU) when `make fid-weights` has stored the Inception (make
    demo does it first); without it, eval/fid_randinit, said once."""
    from latentforge.eval.fid import DEFAULT_WEIGHTS

    fid = [f"eval.fid_num_images={DEMO_FID_IMAGES}", "eval.fid_final_only=true"]
    if not Path(DEFAULT_WEIGHTS).is_file():
        log.info(f"{DEFAULT_WEIGHTS} is absent (`make fid-weights` stores it): FID with a random Inception, "
                 f"logged as eval/fid_randinit")
        return fid
    return [f"eval.inception_path={DEFAULT_WEIGHTS}", *fid]


DEMO_FID_IMAGES = 128  # held-out captions sampled for the final eval's FID (Inception at 299 px on a CPU: ~1 min)


def run_url(ui: str, uri: str, experiment: str, run_id: str | None) -> str:
    """The MLflow UI address of a run (or of the experiment when the run id is unknown)."""
    try:
        from mlflow.tracking import MlflowClient

        exp = MlflowClient(uri).get_experiment_by_name(experiment)
    except Exception:  # the store is unreadable: point at the UI's front page
        return ui
    if exp is None:
        return ui
    return f"{ui}/#/experiments/{exp.experiment_id}" + (f"/runs/{run_id}" if run_id else "")


def _run_id(export_dir: Path) -> str | None:
    import json

    meta = json.loads((export_dir / "latentforge.json").read_text())
    return meta.get("mlflow_run_id")
