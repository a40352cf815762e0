"""Export of a ZeRO-3 run: the diffusers U-Nets load with from_pretrained and hold exactly
the trainer's EMA weights and the zero_to_fp32 consolidation of the raw weights; the
metadata names text encoder, codec and scale; `latentforge sample` writes an image."""

from __future__ import annotations

import json

import pytest
import torch
from test_trainer import ZERO_RUNS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(train_run, tmp_path_factory):
    from latentforge.launch.cli import main

    run_dir, _ = train_run(*ZERO_RUNS[3])  # ZeRO-3: every rank holds only a partition of each weight
    out = tmp_path_factory.mktemp("export") / "model"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return run_dir, out


def test_exported_unets_hold_ema_and_consolidated_raw_weights(exported):
    from diffusers import UNet2DConditionModel

    from latentforge.training import checkpoint
    from latentforge.training.engine import consolidated_state_dict

    run_dir, out = exported
    tag = checkpoint.latest_tag(run_dir)
    client = checkpoint.client_state(run_dir, tag)
    raw = consolidated_state_dict(checkpoint.ckpt_dir(run_dir), tag)  # DeepSpeed's zero_to_fp32

    ema_unet = UNet2DConditionModel.from_pretrained(out / "unet_ema", local_files_only=True)
    raw_unet = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True)
    ema_sd, raw_sd = ema_unet.state_dict(), raw_unet.state_dict()
    shadow = client.ema["shadow"]
    assert set(shadow) == set(raw) and set(raw) <= set(ema_sd)
    for name in raw:
        assert torch.equal(ema_sd[name], shadow[name]), name
        assert torch.equal(raw_sd[name], raw[name]), name
    assert sum(not torch.equal(ema_sd[k], raw_sd[k]) for k in raw) > len(raw) // 2
    assert ema_unet.config.sample_size == client.shapes["latent"][1]
    assert ema_unet.config.cross_attention_dim == client.shapes["text"][-1]


def test_export_metadata_names_text_encoder_codec_and_scale(exported):
    from latentforge.training import checkpoint

    run_dir, out = exported
    client = checkpoint.client_state(run_dir)
    meta = json.loads((out / "latentforge.json").read_text())
    assert meta["checkpoint"] == checkpoint.latest_tag(run_dir) and meta["step"] == 16 and meta["ema"] is True
    assert meta["text_encoder"]["model"] == "tiny" and meta["text_encoder"]["layer"] == "penultimate"
    assert meta["codec"]["kind"] == "pixel"
    assert meta["scale"] == client.scale and meta["shift"] == client.shift
    assert meta["shapes"] == client.shapes
    assert (out / "config.yaml").is_file() and (out / "null_text.npz").is_file()


def test_sample_writes_an_image(exported, tmp_path):
    from PIL import Image

    from latentforge.launch.cli import main

    run_dir, out = exported
    png = tmp_path / "grid.png"
    assert main(["sample", "--model", str(out), "--prompt", "a red circle", "--prompt", "a blue square",
                 "--n", "2", "--steps", "3", "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.width > 0 and im.height > 0 and len(set(im.convert("L").getdata())) > 1


def test_export_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    from latentforge.launch.cli import main

    (tmp_path / "run").mkdir()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "x")]) == 2
    assert "latentforge:" in capsys.readouterr().err


def test_export_refuses_the_run_and_its_root_and_replaces_an_earlier_export_atomically(exported, monkeypatch,
                                                                                        capsys):
    from test_outputs import Crash, _fail_at, _tree

    from latentforge.launch.cli import main
    from latentforge.training.export import export

    run_dir, out = exported
    run_before = _tree(run_dir)
    for target in (run_dir, run_dir.parent, run_dir / "export"):  # the issue's `--out runs/demo` and `--out runs`
        assert main(["export", str(run_dir), "--out", str(target)]) == 2
        assert f"refusing to write {target}: it " in capsys.readouterr().err
    assert _tree(run_dir) == run_before

    export_before = _tree(out)
    with monkeypatch.context() as m:  # the process dies between moving the old export aside and the new one in
        _fail_at(m, out, "in", Crash)
        with pytest.raises(Crash):
            export(run_dir, out)
    assert not out.exists()
    assert export(run_dir, out) == out  # the next export puts the old one back, then replaces it
    after = _tree(out)
    assert after.keys() == export_before.keys()  # a whole export (np.savez stamps null_text.npz with the time)
    assert after["latentforge.json"] == export_before["latentforge.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # nothing left aside
