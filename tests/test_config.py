"""Typed config: presets, files, overrides and one-line errors that name the key."""

from __future__ import annotations

import subprocess
import sys

import pytest

from latentforge import config as C


def test_presets_resolve_and_validate():
    for name in C.PRESETS:
        cfg = C.resolve(name)
        assert cfg.preset == name
    sd2 = C.resolve("sd2-base-256")
    assert sd2.model.block_out_channels == (320, 640, 1280, 1280)
    assert sd2.text.model == "ViT-H-14" and sd2.text.layer == "penultimate"
    assert sd2.codec.kind == "vae" and sd2.data.resolution == 256


def test_overrides_are_typed():
    cfg = C.resolve("tiny", None, ["train.max_steps=7", "optim.lr=3e-4", "model.block_out_channels=[32, 64]",
                                   "ema.enabled=false", "eval.prompts=a red circle,a blue square",
                                   "optim.betas=[0.9, 0.95]"])
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.lr == 3e-4
    assert cfg.model.block_out_channels == (32, 64)
    assert cfg.ema.enabled is False
    assert cfg.eval.prompts == ("a red circle", "a blue square")
    assert cfg.optim.betas == (0.9, 0.95)


@pytest.mark.parametrize("item,needle", [
    ("train.max_stepz=3", "train.max_stepz: unknown key"),
    ("trian.max_steps=3", "trian: unknown key"),
    ("train.max_steps=ten", "train.max_steps: expected int, got 'ten'"),
    ("optim.lr=fast", "optim.lr: expected float"),
    ("ema.enabled=maybe", "ema.enabled: expected bool"),
    ("model.block_out_channels=[32, x]", "model.block_out_channels[1]: expected int"),
    ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
    ("train.zero_stage=5", "train.zero_stage: expected 0-3"),
    ("codec.patch=3", "codec.patch: 3 does not divide data.resolution"),
    ("train", "overrides look like section.field=value"),
    ("train=3", "train: expected a mapping"),
])
def test_bad_overrides_fail_with_one_line_naming_the_key(item, needle):
    with pytest.raises(C.ConfigError) as e:
        C.resolve("tiny", None, [item])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_and_toml_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: tiny\ntrain:\n  max_steps: 12\nmodel:\n  block_out_channels: [32, 64]\n")
    t = tmp_path / "c.toml"
    t.write_text("[train]\nmax_steps = 13\n[data]\nresolution = 16\n")
    assert C.resolve(None, y).train.max_steps == 12
    cfg = C.resolve(None, t, ["train.max_steps=14"])  # overrides win over the file
    assert cfg.train.max_steps == 14 and cfg.data.resolution == 16


def test_toml_without_tomllib_reads_with_tomli(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib; the config then reads TOML with the tomli backport (the
    same parser, declared for Python < 3.11). Here tomllib is hidden and stands in as tomli."""
    import tomllib

    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now fails as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    t = tmp_path / "c.toml"
    t.write_text("[train]\nmax_steps = 13\n")
    assert C.resolve(None, t).train.max_steps == 13
    monkeypatch.setitem(sys.modules, "tomli", None)  # neither: one line that says what is missing
    with pytest.raises(C.ConfigError, match="c.toml: TOML configs need Python 3.11\\+ or the tomli package"):
        C.resolve(None, t)


def test_file_errors_name_the_file_or_key(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.resolve(None, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1, 2\n")
    with pytest.raises(C.ConfigError, match="bad.yaml: cannot parse"):
        C.resolve(None, bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  lr: 1\n")
    with pytest.raises(C.ConfigError, match="train.lr: unknown key"):
        C.resolve(None, unknown)
    with pytest.raises(C.ConfigError, match="preset: unknown preset 'huge'"):
        C.resolve("huge")


def test_saved_config_round_trips(tmp_path):
    cfg = C.resolve("sd2-base-256", None, ["train.max_steps=5"])
    C.save(cfg, tmp_path / "config.yaml")
    again = C.load_resolved(tmp_path / "config.yaml")
    assert again == cfg
    assert C.flatten(again)["train.max_steps"] == 5
    assert C.config_hash(again) == C.config_hash(cfg)
    assert C.config_hash(C.resolve("tiny")) != C.config_hash(cfg)


def test_every_field_has_a_default_and_a_comment():
    import dataclasses
    import inspect

    for cls in (C.SynthConfig, C.DataConfig, C.CodecConfig, C.TextConfig, C.ModelConfig, C.DiffusionConfig,
                C.OptimConfig, C.TrainConfig, C.EMAConfig, C.EvalConfig, C.TrackingConfig, C.Config):
        lines = inspect.getsource(cls).splitlines()
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            line = next(l for l in lines if l.strip().startswith(f"{f.name}:"))
            assert "#" in line or "default_factory" in line, f"{cls.__name__}.{f.name} has no comment"


@pytest.mark.parametrize("cmd", [[], ["train"], ["precompute"], ["data", "synth"], ["eval"], ["export"], ["submit"],
                                 ["demo"], ["sample"], ["status"]])
def test_help_is_fast(cmd):
    """--help imports none of the heavy packages (they are imported late), so it answers at once."""
    r = subprocess.run([sys.executable, "-m", "latentforge.launch.cli", *cmd, "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "usage: latentforge" in r.stdout
    probe = subprocess.run([sys.executable, "-X", "importtime", "-m", "latentforge.launch.cli", *cmd, "--help"],
                           capture_output=True, text=True, timeout=60)
    heavy = [m for m in ("torch", "deepspeed", "mlflow", "open_clip", "diffusers", "submitit")
             if f"| {m}\n" in probe.stderr or f"|   {m}\n" in probe.stderr]
    assert not heavy, f"--help imported {heavy}"


def test_cli_reports_config_errors_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "latentforge.launch.cli", "train", "train.max_stepz=1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "latentforge: config error: train.max_stepz: unknown key (did you mean " \
                               "max_nonfinite_steps, max_steps?)"
