"""Periodic eval during training and the Evaluator on a trained checkpoint: FID and CLIP
score under the right names (random init vs real local weight files), the logged
protocol, and the reference-statistics cache.

The trained run is the session fixture `tiny_eval_run` (tests/conftest.py): 10 steps on
one rank, eval at steps 5 and 10 with FID on 4 held-out captions and no weight files.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentforge.eval import fid
from latentforge.eval.images import fid_noise


def _mlflow(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _training_run(client, name: str = "evalrun"):
    exp = client.get_experiment_by_name("latentforge")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _history(client, run_id: str, name: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, name)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------
# Cheap checks (no training).


def test_fid_noise_is_a_pure_function_of_seed_and_index() -> None:
    a = fid_noise(1234, 3, (4, 8, 8))
    assert torch.equal(a, fid_noise(1234, 3, (4, 8, 8)))  # any rank, any eval
    assert not torch.equal(a, fid_noise(1234, 4, (4, 8, 8)))
    assert not torch.equal(a, fid_noise(1235, 3, (4, 8, 8)))
    assert abs(float(a.std()) - 1.0) < 0.25  # unit Gaussian


def test_frechet_distance_on_singular_covariances_equals_the_full_formulation() -> None:
    """The low-rank shortcut (fewer images than features) against the D x D formulation."""
    import scipy.linalg

    rng = np.random.default_rng(0)
    for n1, n2, d in [(5, 7, 64), (30, 20, 256), (300, 300, 64)]:
        x = rng.normal(size=(n1, d)) + 0.3
        y = rng.normal(size=(n2, d)) * 1.3
        m1, s1 = x.mean(0), np.cov(x, rowvar=False)
        m2, s2 = y.mean(0), np.cov(y, rowvar=False)
        w, v = scipy.linalg.eigh(s1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^(1/2), (D, D)
        ev = scipy.linalg.eigvalsh(root @ s2 @ root)
        want = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev, 0, None)).sum()
        got = fid.frechet_distance(m1, s1, m2, s2)
        # fp64, the same formula through another eigensolver; with n < d the covariances are
        # singular and the square roots lose digits (~1e-10 left of 1e-16): rel 1e-6.
        assert got == pytest.approx(want, rel=1e-6), (n1, n2, d)


# ---------------------------------------------------------------------------------------
# Periodic eval in a real training run.


@pytest.mark.slow
def test_periodic_eval_logs_randinit_names_and_the_protocol(tiny_eval_run) -> None:
    root, run_dir, _, stdout = tiny_eval_run
    client = _mlflow(root)
    run = _training_run(client)
    rid = run.info.run_id

    # Without weight files: the distinct names, at both evals; never the real names.
    fids = _history(client, rid, "eval/fid_randinit")
    clips = _history(client, rid, "eval/clip_score_randinit")
    assert sorted(fids) == sorted(clips) == [5, 10]
    assert all(np.isfinite(v) and v > 0 for v in fids.values())
    assert all(0.0 <= v <= 100.0 for v in clips.values())
    assert "eval/fid" not in run.data.metrics and "eval/clip_score" not in run.data.metrics
    assert sorted(_history(client, rid, "eval/time_s")) == [5, 10]
    assert sorted(_history(client, rid, "eval/loss_t250")) == [5, 10]
    assert "eval/shape_adherence" in run.data.metrics
    # One line each says why the names carry _randinit.
    assert "eval.inception_path is empty" in stdout and "eval.clip_pretrained is empty" in stdout

    # The protocol of each eval: on disk, as an artifact, and its stable parts as params.
    arts = {a.path for a in client.list_artifacts(rid, "eval")}
    assert {"eval/protocol_step_00000005.json", "eval/protocol_step_00000010.json"} <= arts
    p5 = json.loads((run_dir / "eval" / "protocol_step_00000005.json").read_text())
    p10 = json.loads((run_dir / "eval" / "protocol_step_00000010.json").read_text())
    assert p10["sampling"] == {"sampler": "ddim", "steps": 4, "cfg_scale": 3.0, "seed": 1234,
                               "objective": "ddpm", "prediction": "eps"}
    f = p10["fid"]
    assert (f["metric"], f["count"], f["resolution"]) == ("eval/fid_randinit", 4, 32)
    # The same double written to the protocol JSON and to MLflow (both keep doubles).
    assert f["value"] == pytest.approx(fids[10], rel=1e-9)
    assert f["inception"]["random_init"] is True and f["inception"]["weights"] is None
    assert f["inception"]["weights_sha256"] == fid.load_inception(None, "cpu").weights_sha256
    c = p10["clip_score"]
    assert (c["metric"], c["pairs"], c["random_init"]) == ("eval/clip_score_randinit", 4, True)
    assert c["value"] == pytest.approx(clips[10], rel=1e-9)
    params = run.data.params
    assert params["eval_protocol/fid_metric"] == "eval/fid_randinit"
    assert params["eval_protocol/fid_count"] == "4" and params["eval_protocol/fid_resolution"] == "32"
    assert params["eval_protocol/inception_sha256"] == f["inception"]["weights_sha256"]
    assert params["eval_protocol/clip_sha256"] == c["weights_sha256"]

    # Reference statistics: computed at the first eval and written to the cache under a
    # key of what shaped them; the second eval reuses them.
    ref5, ref10 = p5["fid"]["reference"], p10["fid"]["reference"]
    assert ref5["hit"] is False and "reused_in_process" not in ref5
    assert ref10["key"] == ref5["key"] == params["eval_protocol/fid_reference_key"]
    assert ref10.get("reused_in_process") is True
    assert Path(ref5["file"]).parent == root / "fid_cache" and Path(ref5["file"]).is_file()
    sidecar = json.loads(Path(ref5["file"]).with_suffix(".json").read_text())
    kp = sidecar["key_parts"]
    assert (kp["resolution"], kp["num_images"], sidecar["count"]) == (32, 4, 4)
    assert kp["inception"] == f["inception"]["weights_sha256"]
    assert kp["dataset"]["parts"][0]["sha256"] == _sha256(root / "latents" / kp["dataset"]["parts"][0]["file"])


# ---------------------------------------------------------------------------------------
# The Evaluator on the checkpoint with real local weight files.


def _save_tiny_open_clip(folder: Path) -> Path:
    """A tiny open_clip CLIP saved as open_clip's save_for_hf does (config JSON from
    save_config_for_hf + the state dict under open_clip's weights file name)."""
    import open_clip
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf
    from open_clip.transform import PreprocessCfg

    from latentforge.eval import clip_score as cs

    torch.manual_seed(5)
    model = open_clip.CLIP(**copy.deepcopy(cs.TINY_CLIP_CONFIG)).eval()
    open_clip.set_model_preprocess_cfg(model, {**dataclasses.asdict(PreprocessCfg()), "size": 32})
    folder.mkdir(parents=True)
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=copy.deepcopy(cs.TINY_CLIP_CONFIG))
    torch.save(model.state_dict(), folder / HF_WEIGHTS_NAME)
    return folder / HF_WEIGHTS_NAME


@pytest.mark.slow
def test_real_weight_files_give_the_real_names_and_their_hashes(tiny_eval_run, tmp_path: Path) -> None:
    from latentforge.eval import standalone

    root, run_dir, _, _ = tiny_eval_run
    inception_file = tmp_path / "inception.pth"
    torch.save(fid.load_inception(None, "cpu", random_init_seed=7).state_dict(), inception_file)
    clip_weights = _save_tiny_open_clip(tmp_path / "tiny_clip")

    target = standalone.inspect_target(run_dir)
    cfg = standalone.resolve_eval_config(target, overrides=[
        f"eval.inception_path={inception_file}", f"eval.clip_pretrained=local-dir:{clip_weights.parent}",
        "eval.fid_num_images=4"])
    result = standalone.evaluate_target(target, cfg)

    (row,) = result.rows
    assert (result.fid_metric, result.clip_metric) == ("eval/fid", "eval/clip_score")
    assert not [k for k in row if "randinit" in k]
    assert np.isfinite(row["eval/fid"]) and row["eval/fid"] > 0 and 0 <= row["eval/clip_score"] <= 100

    client = _mlflow(root)
    run = client.get_run(result.run_id)
    assert "eval/fid" in run.data.metrics and "eval/clip_score" in run.data.metrics
    assert not [k for k in run.data.metrics if "randinit" in k]
    assert run.data.params["eval_protocol/inception_sha256"] == _sha256(inception_file)
    assert run.data.params["eval_protocol/clip_sha256"] == _sha256(clip_weights)
    assert run.data.tags["mlflow.parentRunId"] == _training_run(client).info.run_id

    protocol = json.loads((result.out_dir / "eval" / "protocol_step_00000010_cfg_3.json").read_text())
    assert protocol["fid"]["inception"]["random_init"] is False
    assert protocol["fid"]["inception"]["weights"] == str(inception_file)
    assert protocol["clip_score"]["random_init"] is False
    assert protocol["clip_score"]["weights"] == f"local-dir:{clip_weights.parent}"
    # Other Inception weights: another reference key, so the cache misses and computes.
    ref = protocol["fid"]["reference"]
    assert ref["hit"] is False
    assert ref["key"] != json.loads((run_dir / "eval" / "protocol_step_00000005.json").read_text())[
        "fid"]["reference"]["key"]
    assert "eval/protocol_step_00000010_cfg_3.json" in {a.path for a in client.list_artifacts(result.run_id, "eval")}


@pytest.mark.slow
def test_missing_weight_file_fails_at_start_naming_the_path(tiny_eval_run, tmp_path: Path, capsys) -> None:
    from latentforge.launch.cli import main

    root, run_dir, _, _ = tiny_eval_run
    client = _mlflow(root)
    exp = client.get_experiment_by_name("latentforge")
    before = len(client.search_runs([exp.experiment_id]))
    missing = tmp_path / "nowhere" / fid.INCEPTION_WEIGHTS_FILE
    assert main(["eval", str(run_dir), f"eval.inception_path={missing}", "eval.fid_num_images=4"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "eval.inception_path" in err
    # Refused before any sampling or MLflow run.
    assert len(client.search_runs([exp.experiment_id])) == before
