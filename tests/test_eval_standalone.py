"""`latentforge eval RUN_DIR|EXPORT`: an export of the tiny trained run, a CFG sweep logged
to MLflow as a child of the training run with the FID-versus-CLIP plot, the same numbers
on 2 ranks, the grid fallback for CLIP score, and the config rules."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from latentforge.config import ConfigError
from latentforge.eval import standalone

pytestmark = pytest.mark.slow


def _mlflow(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _run_id_of(client, name: str) -> str:
    exp = client.get_experiment_by_name("latentforge")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1
    return runs[0].info.run_id


@pytest.fixture(scope="module")
def export_dir(tiny_eval_run, tmp_path_factory) -> Path:
    from latentforge.training.export import export

    _, run_dir, _, _ = tiny_eval_run
    return export(run_dir, tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def one_rank_sweep(tiny_eval_run, export_dir):
    """`latentforge eval EXPORT eval.cfg_sweep=[1,5]` on one rank, in this process."""
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = standalone.main(str(export_dir), None, None, ["eval.cfg_sweep=[1, 5]"])
    assert code == 0
    sweep = json.loads((export_dir / "eval" / "step_00000010" / "sweep.json").read_text())
    return sweep, buf.getvalue()


def test_sweep_on_an_export_logs_a_nested_run_with_the_curve(tiny_eval_run, export_dir, one_rank_sweep) -> None:
    root, run_dir, _, _ = tiny_eval_run
    sweep, stdout = one_rank_sweep
    client = _mlflow(root)
    training_id = _run_id_of(client, "evalrun")

    assert [r["cfg_scale"] for r in sweep["rows"]] == [1.0, 3.0, 5.0]  # eval.cfg_scale joins the sweep
    assert (sweep["kind"], sweep["step"], sweep["weights"]) == ("export", 10, "ema")
    assert (sweep["fid_metric"], sweep["clip_metric"]) == ("eval/fid_randinit", "eval/clip_score_randinit")

    # A child of the training run, at the checkpoint's step.
    run = client.get_run(sweep["mlflow_run_id"])
    assert run.info.run_name == "evalrun-eval-step10"
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == training_id == sweep["training_run_id"]
    assert run.data.tags["eval_target_kind"] == "export"
    rid = run.info.run_id
    for s in ("1", "3", "5"):
        for name in ("fid_randinit", "clip_score_randinit", "shape_adherence", "time_s"):
            hist = client.get_metric_history(rid, f"eval_sweep/cfg_{s}/{name}")
            assert [m.step for m in hist] == [10], (s, name)
    assert "eval/fid" not in run.data.metrics and "eval/clip_score" not in run.data.metrics
    assert {"eval/loss_t250", "eval/loss_t750"} <= set(run.data.metrics)

    # At eval.cfg_scale the EMA export reproduces the training run's final periodic eval:
    # same weights, same fixed noise, same reference statistics.
    trained = client.get_run(training_id).data.metrics
    # The same images through fp32 networks in other batches (Inception: ~50 layers, ~1e-5
    # relative), then fp64 statistics: rel 1e-4.
    for name in ("eval/fid_randinit", "eval/clip_score_randinit"):
        assert run.data.metrics[name] == pytest.approx(trained[name], rel=1e-4), name

    # The curve, the table and one grid and protocol per scale, as artifacts and on disk.
    arts = {a.path for a in client.list_artifacts(rid, "eval")}
    assert {"eval/fid_vs_clip.png", "eval/sweep.json", "eval/protocol_step_00000010_cfg_1.json",
            "eval/protocol_step_00000010_cfg_5.json"} <= arts
    grids = {a.path for a in client.list_artifacts(rid, "samples")}
    assert grids == {f"samples/step_00000010_cfg_{s}.png" for s in ("1", "3", "5")}
    from PIL import Image

    with Image.open(export_dir / "eval" / "step_00000010" / "fid_vs_clip.png") as im:
        assert im.format == "PNG" and im.size[0] > 300
    # The reference statistics the training run cached are reused from disk.
    p = json.loads((export_dir / "eval" / "step_00000010" / "eval" / "protocol_step_00000010_cfg_3.json").read_text())
    trained_p = json.loads((run_dir / "eval" / "protocol_step_00000010.json").read_text())
    assert p["fid"]["reference"]["hit"] is True
    assert p["fid"]["reference"]["key"] == trained_p["fid"]["reference"]["key"]
    assert p["sampling"]["cfg_scale"] == 3.0 and p["weights"] == "ema"

    # The printed summary: a row per scale.
    lines = [ln.split() for ln in stdout.splitlines()]
    header = next(ln for ln in lines if ln[:1] == ["cfg"])
    assert header[1:3] == ["fid_randinit", "clip_score_randinit"]
    rows = [ln for ln in lines if ln and ln[0] in ("1", "3", "5") and len(ln) == len(header)]
    assert [r[0] for r in rows] == ["1", "3", "5"]


def test_two_ranks_give_the_one_rank_numbers(tiny_eval_run, export_dir, one_rank_sweep) -> None:
    """Images dealt over 2 ranks, Inception statistics and CLIP sums all-reduced: the same
    FID and CLIP score as one rank (fixed noise per image, whoever draws it)."""
    root, _, _, _ = tiny_eval_run
    single = {r["cfg_scale"]: r for r in one_rank_sweep[0]["rows"]}
    assert standalone.main(str(export_dir), None, None, ["nproc=2", "eval.cfg_sweep=[]"]) == 0
    sweep = json.loads((export_dir / "eval" / "step_00000010" / "sweep.json").read_text())
    assert sweep["world_size"] == 2
    (row,) = sweep["rows"]
    assert row["cfg_scale"] == 3.0
    # Two ranks instead of one: the same samples, fp32 features in other batches, fp64
    # statistics reduced across ranks: rel 1e-4 (as above).
    for name in ("eval/fid_randinit", "eval/clip_score_randinit", "eval/shape_adherence"):
        assert row[name] == pytest.approx(single[3.0][name], rel=1e-4), name
    # (The held-out loss draws its noise per rank, so it depends on the layout: not compared.)
    run = _mlflow(root).get_run(sweep["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["world_size"] == "2"
    # The same double in sweep.json and in MLflow.
    assert run.data.metrics["eval/fid_randinit"] == pytest.approx(row["eval/fid_randinit"], rel=1e-12)


def test_without_fid_clip_score_comes_from_the_grid(tiny_eval_run) -> None:
    _, run_dir, _, _ = tiny_eval_run
    target = standalone.inspect_target(run_dir)
    cfg = standalone.resolve_eval_config(target, overrides=["eval.fid_num_images=0", "tracking.enabled=false"])
    result = standalone.evaluate_target(target, cfg)
    (row,) = result.rows
    assert result.fid_metric is None and result.clip_metric == "eval/clip_score_randinit"
    assert not [k for k in row if "fid" in k]
    assert result.plot is None and any("FID is off" in n for n in result.notes)
    assert result.run_id is None  # tracking off: nothing logged
    protocol = json.loads((result.out_dir / "eval" / "protocol_step_00000010_cfg_3.json").read_text())
    assert protocol["fid"] == {"skipped": "eval.fid_num_images=0"}
    assert protocol["clip_score"]["set"].startswith("sample grid") and protocol["clip_score"]["pairs"] == 2
    assert protocol["clip_score"]["value"] == pytest.approx(row["eval/clip_score_randinit"])  # one double, twice
    assert "eval/loss_t250" in result.heldout


def test_config_rules(tiny_eval_run, tmp_path: Path) -> None:
    root, run_dir, _, _ = tiny_eval_run
    target = standalone.inspect_target(run_dir)
    assert target.kind == "run"
    with pytest.raises(ConfigError, match="model"):
        standalone.resolve_eval_config(target, overrides=["model.block_out_channels=[64, 128]"])
    with pytest.raises(ConfigError, match="preset"):
        standalone.resolve_eval_config(target, preset="sd2-base-256")
    cfg = standalone.resolve_eval_config(target, preset="tiny", overrides=["eval.cfg_sweep=[7.5, 1]"])
    assert standalone.sweep_scales(cfg) == [1.0, 3.0, 7.5]
    with pytest.raises(FileNotFoundError, match="neither an export"):
        standalone.inspect_target(tmp_path)
    # A run directory moved elsewhere: its new parent becomes run_root (latents, FID cache
    # and MLflow store are found relative to it), unless run_root is given.
    moved = tmp_path / "elsewhere" / "evalrun"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("checkpoints", "samples", "eval"))
    (moved / "checkpoints").mkdir()
    cfg = standalone.resolve_eval_config(standalone.inspect_target(moved))
    assert Path(cfg.run_root) == (tmp_path / "elsewhere").resolve()
    cfg = standalone.resolve_eval_config(standalone.inspect_target(moved), overrides=[f"run_root={root}"])
    assert Path(cfg.run_root) == root
