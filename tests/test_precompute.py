"""Precompute with a tiny real AutoencoderKL and a tiny real open_clip model, each saved with
its library's own save call and loaded through the user's config path
(`codec.kind=vae codec.path=DIR text.model=tiny text.pretrained=FILE`).

Covers: the round trip's shapes, dtypes and values (and the loader's finalize); a
SIGKILLed run re-run equals a clean run byte for byte; messy inputs with exact accounting;
NaN/inf encoder outputs rejected and counted; a 2-task job array equals 1 task, assembles
only when complete, and --verify catches missing and corrupted parts; the trainer refuses
latents made with another codec, encoder or resolution.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.config import resolve
from latentforge.data import latents as lat
from latentforge.data import synth
from latentforge.data.encoders import build_encoders
from latentforge.launch.cli import main

R = 16  # resolution: the tiny VAE (2 levels, f2) gives 4 x 8 x 8 latents
BATCH = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny AutoencoderKL (and a second one with other weights) saved with save_pretrained,
    and a tiny open_clip CLIP saved as open_clip_train saves checkpoints."""
    import open_clip
    from diffusers import AutoencoderKL

    from latentforge.data.text import TINY_OPEN_CLIP_NAME, register_tiny

    root = tmp_path_factory.mktemp("models")
    for name, seed in (("vae", 0), ("vae_other", 1)):
        torch.manual_seed(seed)
        AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                      sample_size=R, scaling_factor=0.18215).save_pretrained(root / name)
    register_tiny()
    torch.manual_seed(123)
    clip = open_clip.create_model(TINY_OPEN_CLIP_NAME)
    torch.save({"epoch": 1, "name": "tiny", "state_dict": clip.state_dict()}, root / "clip.pt")
    return {"vae": root / "vae", "vae_other": root / "vae_other", "clip": root / "clip.pt"}


def vae_overrides(root: Path, raw: str, latent_dir: Path, models: dict[str, Path], *extra: str) -> list[str]:
    return [f"run_root={root}", f"data.raw_shards={raw}", f"data.latent_dir={latent_dir}", f"data.resolution={R}",
            "data.latent_samples_per_shard=4", f"data.precompute_batch_size={BATCH}", "data.precompute_workers=2",
            "codec.kind=vae", f"codec.path={models['vae']}", "text.model=tiny", f"text.pretrained={models['clip']}",
            *extra]


@pytest.fixture(scope="module")
def raw4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 raw synthetic shards of 6 images (24 px: resized to 16)."""
    d = tmp_path_factory.mktemp("raw4")
    synth.write_shards(d, 24, 6, 24, seed=0)
    return d


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory: pytest.TempPathFactory, raw4: Path, models: dict[str, Path]) -> dict:
    """One clean single-task precompute through the CLI, shared by several tests."""
    root = tmp_path_factory.mktemp("vae_run")
    ov = vae_overrides(root, f"{raw4}/*.tar", root / "latents", models)
    assert main(["precompute", *ov]) == 0
    return {"root": root, "latents": root / "latents", "overrides": ov}


def dir_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------
# Round trip.


def test_vae_round_trip_shapes_dtypes_values_and_finalize(vae_run: dict, raw4: Path, models: dict[str, Path]) -> None:
    import open_clip
    from diffusers import AutoencoderKL

    from latentforge.data import raw
    from latentforge.data.loader import LatentLoader, _eps_generator
    from latentforge.data.text import TINY_OPEN_CLIP_NAME

    d = vae_run["latents"]
    m = lat.load_manifest(d)
    assert (m["seen"], m["written"], m["rejected"]) == (24, 24, {})
    assert m["shapes"] == {"latent": [4, 8, 8], "text": [77, 64], "pooled": [64]}
    assert [p["count"] for p in m["parts"]] == [4, 2] * 4  # 6 samples per raw shard, 4 per part
    ident = m["identity"]
    weights = (models["vae"] / "diffusion_pytorch_model.safetensors").read_bytes()
    assert ident["codec"]["kind"] == "vae" and ident["codec"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert ident["text"]["weights_sha256"] == hashlib.sha256(models["clip"].read_bytes()).hexdigest()
    assert ident["codec"]["dtype"] == ident["text"]["dtype"] == "fp32"  # "auto" on a CPU (GPUs: test_gpu_paths.py)
    assert ident["resolution"] == R and ident["storage_dtype"] == "fp16"

    # Stored records: fp16 arrays of the manifest's shapes, std present and positive.
    records = {r.key: r for p in m["parts"] for r in lat.read_part(d / p["file"])}
    assert len(records) == 24
    for r in records.values():
        assert r.mean.dtype == r.std.dtype == r.text.dtype == r.pooled.dtype == np.float16
        assert r.mean.shape == r.std.shape == (4, 8, 8) and r.text.shape == (77, 64) and r.pooled.shape == (64,)
        assert (r.std > 0).all() and 2 <= r.meta["text_len"] <= 77

    # The numbers: an independent load of the same files, through diffusers and open_clip.
    vae = AutoencoderKL.from_pretrained(models["vae"], local_files_only=True).eval()
    clip = open_clip.create_model(TINY_OPEN_CLIP_NAME, pretrained=str(models["clip"])).eval()
    tok = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)
    samples = [s for u in sorted(raw4.glob("*.tar")) for s in raw.iter_shard(str(u), raw.RawConfig(resolution=R))]
    x = torch.stack([raw.to_tensor(s.image) for s in samples])
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        pooled = clip.encode_text(tok([s.caption for s in samples]), normalize=False)
    # Stored in fp16 from fp32 computed in other batches: values a few fp32 ulps apart can
    # round to neighbouring fp16 values (one fp16 ulp is 1e-3 relative): 2e-3 is two of them.
    for i, s in enumerate(samples):
        r = records[s.key]
        assert r.caption == s.caption
        torch.testing.assert_close(torch.from_numpy(r.mean).float(), post.mean[i].half().float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(r.std).float(), post.std[i].half().float(), atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(torch.from_numpy(r.pooled).float(), pooled[i].half().float(), atol=2e-3, rtol=2e-3)

    # The loader finalises just in time: (mean + std * eps - shift) * scale, eps from (seed, epoch, part, index).
    files = [p["file"] for p in m["parts"]]
    loader = LatentLoader(d, m["parts"], micro_batch=5, seed=3, rank=0, world_size=1, num_workers=0,
                          scale=0.18215, shift=0.0, shapes=m["shapes"])
    batch = next(iter(loader))
    assert batch["latents"].shape == (5, 4, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["text"].shape == (5, 77, 64) and batch["text"].dtype == torch.float16  # as stored
    for i in range(5):
        part, index = int(batch["part"][i]), int(batch["index"][i])
        rec = lat.read_part(d / files[part])[index]
        eps = torch.randn((4, 8, 8), generator=_eps_generator(3, 0, part, index))
        want = (torch.from_numpy(rec.mean).float() + torch.from_numpy(rec.std).float() * eps - 0.0) * 0.18215
        assert torch.equal(batch["latents"][i], want)
        assert torch.equal(batch["text"][i], torch.from_numpy(rec.text))
        assert int(batch["text_len"][i]) == rec.meta["text_len"]


def test_progress_line_and_rerun_does_nothing(vae_run: dict, capsys: pytest.CaptureFixture) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (vae_run["latents"] / lat.SHARDS).iterdir()}
    assert main(["precompute", *vae_run["overrides"]]) == 0
    out = capsys.readouterr().out
    assert "4 raw shards, 4 already done, 0 to do" in out
    assert {p.name: p.stat().st_mtime_ns for p in (vae_run["latents"] / lat.SHARDS).iterdir()} == before
    # A fresh run prints samples/s, the ETA and which shard it is in.
    root = vae_run["root"]
    ov = [o for o in vae_run["overrides"] if not o.startswith("data.latent_dir=")] + [f"data.latent_dir={root / 'p2'}"]
    assert main(["precompute", *ov]) == 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "ETA" in out and "shard 00002 done: 6 written" in out


# ---------------------------------------------------------------------------------------
# SIGKILL part way, re-run, compare with a clean run.


def _slow_shard_list(d: Path, n_shards: int, blocked: int, cut_after: int, go: Path) -> Path:
    """A list file of `pipe:` shard URLs; shard `blocked` streams its first `cut_after`
    samples, then waits (bounded) until `go` exists before streaming the rest."""
    paths = synth.write_shards(d, n_shards * 10, 10, 24, seed=1)
    lines = []
    for i, p in enumerate(paths):
        if i != blocked:
            lines.append(f"pipe:cat {p}")
            continue
        with tarfile.open(p) as t:
            cut = t.getmembers()[3 * cut_after].offset  # 3 members (json, png, txt) per sample
        wait = f"i=0; while [ ! -e {go} ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done"
        lines.append(f"pipe:head -c {cut} {p}; {wait}; tail -c +{cut + 1} {p}")
    lst = d / "urls.txt"
    lst.write_text("\n".join(lines) + "\n")
    return lst


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_then_rerun_equals_a_clean_run(tmp_path: Path, models: dict[str, Path]) -> None:
    go = tmp_path / "GO"
    lst = _slow_shard_list(tmp_path / "raw", n_shards=5, blocked=2, cut_after=7, go=go)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def cmd(latent_dir: Path) -> list[str]:
        ov = vae_overrides(tmp_path, str(lst), latent_dir, models, "data.latent_samples_per_shard=3",
                           "data.precompute_batch_size=2")
        return [sys.executable, "-m", "latentforge.launch.cli", "precompute", *ov]

    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(cmd(killed), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Wait (bounded) until shard 00002 has a complete part on disk and its stream is held.
        deadline = time.monotonic() + 180
        shard_dir = killed / lat.SHARDS
        while not (shard_dir / "00002-000.tar").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "precompute never reached shard 00002"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert (shard_dir / "00000.json").exists() and not (shard_dir / "00002.json").exists()
    assert not (killed / lat.MANIFEST).exists()
    left = sorted(p.name for p in shard_dir.iterdir())
    done_before = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("00000*")}
    go.touch()  # from now on every shard streams straight through

    rerun = subprocess.run(cmd(killed), env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "already done" in rerun.stdout and "removed" in rerun.stdout, (left, rerun.stdout)
    assert {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("00000*")} == done_before  # not redone

    clean = tmp_path / "clean"
    run = subprocess.run(cmd(clean), env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    a, b = dir_bytes(killed), dir_bytes(clean)
    assert sorted(a) == sorted(b)  # no stale parts or temporaries left behind
    assert [k for k in a if a[k] != b[k]] == []  # every part, manifest, the identity and the null text
    assert lat.load_manifest(clean)["written"] == 50


# ---------------------------------------------------------------------------------------
# Messy inputs: exact accounting.


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _good(key: str, size=(24, 24), colour=(200, 30, 30), caption=b"a good caption") -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", _enc(Image.new("RGB", size, colour), "JPEG")), (f"{key}.txt", caption)]


def write_messy_shards(d: Path) -> dict[str, str]:
    """Raw shards with every kind of trouble. Returns {key: expected outcome} for messy.tar."""
    d.mkdir(parents=True, exist_ok=True)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    rgba = Image.new("RGBA", (24, 24), (200, 0, 0, 0))
    pal = Image.new("P", (24, 24), 1)
    pal.putpalette([0, 0, 255, 10, 200, 10] + [0] * 762)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: stored 32 x 16 becomes 16 x 32
    members = [
        *_good("000"),
        ("001.jpg", b"\xff\xd8\xff\xe0 not really a jpeg"), ("001.txt", b"corrupt"),
        ("002.png", _enc(noise, "PNG")[:60]), ("002.txt", b"truncated png"),
        ("003.png", _enc(rgba, "PNG")), ("003.txt", b"rgba"),
        ("004.jpg", _enc(Image.new("CMYK", (24, 24), (255, 0, 0, 0)), "JPEG")), ("004.txt", b"cmyk"),
        ("005.png", _enc(Image.fromarray(np.full((24, 24), 40000, np.uint16)), "PNG")), ("005.txt", b"16-bit"),
        ("006.png", _enc(pal, "PNG", transparency=1)), ("006.txt", b"palette"),
        ("007.jpg", _enc(Image.new("RGB", (32, 16), "blue"), "JPEG", exif=exif.tobytes())), ("007.txt", b"exif"),
        ("008.png", _enc(noise, "PNG")),  # no caption
        ("009.txt", b"no image"),
        ("010.webp", _enc(noise, "WEBP")), ("010.json", json.dumps({"caption": "from json"}).encode()),
        *_good("011", size=(4, 4)),  # below min_size
        *_good("000", caption=b"the same key again"),  # not consecutive: a duplicate
    ]
    _tar(d / "messy.tar", members)
    cut = _tar(d / "cut.tar.full", [m for i in range(4) for m in _good(f"c{i}")])
    with tarfile.open(cut) as t:
        txt2 = t.getmembers()[5]  # c2.txt: c2's image is whole, its caption is cut
    (d / "cut.tar").write_bytes(cut.read_bytes()[:txt2.offset_data + 3])
    cut.unlink()
    _tar(d / "empty.tar", [])
    (d / "junk.tar").write_bytes(b"this is not a tar file at all " * 50)
    return {"000": "ok", "001": "corrupt_image", "002": "corrupt_image", "003": "ok", "004": "ok", "005": "ok",
            "006": "ok", "007": "ok", "008": "missing_caption", "009": "missing_image", "010": "ok",
            "011": "too_small"}


def test_messy_inputs_exact_accounting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    expect = write_messy_shards(tmp_path / "raw")
    d = tmp_path / "latents"
    ov = [f"run_root={tmp_path}", f"data.raw_shards={tmp_path / 'raw'}/*.tar", f"data.latent_dir={d}",
          f"data.resolution={R}", "data.min_size=8", "data.precompute_batch_size=3", "data.latent_samples_per_shard=4",
          "data.precompute_workers=2", "codec.patch=2"]
    assert main(["precompute", *ov]) == 0
    m = lat.load_manifest(d)
    assert m["seen"] == 13 + 3 + 0 + 0
    assert m["rejected"] == {"corrupt_image": 2, "duplicate_key": 1, "missing_caption": 1, "missing_image": 1,
                             "too_small": 1, "truncated_sample": 1}
    assert m["written"] == 7 + 2 == m["seen"] - sum(m["rejected"].values())
    assert sorted(m["shard_errors"]) == ["cut", "junk"]
    assert m["shard_errors"]["cut"][0].startswith("truncated_shard:")
    assert m["shard_errors"]["junk"][0].startswith("not_a_tar:")

    shard = json.loads(lat.shard_manifest_path(d, "messy").read_text())
    written = [r.key for p in shard["parts"] for r in lat.read_part(d / lat.SHARDS / p["file"])]
    assert written == [k for k, v in expect.items() if v == "ok"]
    assert [(r["key"], r["reason"]) for r in shard["rejections"]] == (
        [(k, v) for k, v in expect.items() if v != "ok"] + [("000", "duplicate_key")])
    recs = {r.key: r for p in shard["parts"] for r in lat.read_part(d / lat.SHARDS / p["file"])}
    assert (recs["007"].meta["orig_width"], recs["007"].meta["orig_height"]) == (16, 32)  # EXIF applied
    assert recs["010"].caption == "from json"
    assert json.loads(lat.shard_manifest_path(d, "empty").read_text())["notes"] == ["empty_shard"]
    cut = json.loads(lat.shard_manifest_path(d, "cut").read_text())
    assert (cut["seen"], cut["written"], cut["rejected"]) == (3, 2, {"truncated_sample": 1})

    capsys.readouterr()
    assert main(["data", "inspect", str(d)]) == 0
    out = capsys.readouterr().out
    rows = {w[0]: int(w[1]) for w in (line.split() for line in out.splitlines()) if len(w) == 2 and w[1].isdigit()}
    assert rows == {"seen": 16, "written": 9, "rejected": 7, "corrupt_image": 2, "duplicate_key": 1,
                    "missing_caption": 1, "missing_image": 1, "too_small": 1, "truncated_sample": 1,
                    "not_a_tar": 1, "truncated_shard": 1}, out
    assert "shard notes: empty_shard 1" in out and "check: written + rejected == seen" in out


# ---------------------------------------------------------------------------------------
# NaN / inf encoder outputs.


def test_nonfinite_outputs_are_rejected_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from latentforge.data.codecs import PixelCodec
    from latentforge.data.text import TextEncoder

    real_encode, real_text = PixelCodec.encode, TextEncoder.encode

    def bad_codec(self, images):  # row 1: NaN; row 2: 1e6, finite in fp32 but inf in fp16
        mean, std = real_encode(self, images)
        mean = mean.clone()
        if len(mean) > 1:
            mean[1, 0, 0, 0] = float("nan")
        if len(mean) > 2:
            mean[2, 1, 0, 0] = 1e6
        return mean, std

    def bad_text(self, captions):  # row 3: inf in the pooled embedding
        t = real_text(self, captions)
        pooled = t.pooled.clone()
        if len(captions) > 3:
            pooled[3, 5] = float("inf")
        return t._replace(pooled=pooled)

    monkeypatch.setattr(PixelCodec, "encode", bad_codec)
    monkeypatch.setattr(TextEncoder, "encode", bad_text)
    synth.write_shards(tmp_path / "raw", 6, 6, 16, seed=0)
    d = tmp_path / "latents"
    assert main(["precompute", f"run_root={tmp_path}", f"data.raw_shards={tmp_path / 'raw'}/*.tar",
                 f"data.latent_dir={d}", f"data.resolution={R}", "data.precompute_batch_size=4"]) == 0
    m = lat.load_manifest(d)
    # Batches [0 1 2 3] [4 5]: rows 1, 2 of the first and row 1 of the second are bad latents.
    assert (m["seen"], m["written"]) == (6, 2)
    assert m["rejected"] == {"nonfinite_latent": 3, "nonfinite_text": 1}
    shard = json.loads(lat.shard_manifest_path(d, "00000").read_text())
    assert [(r["key"], r["reason"]) for r in shard["rejections"]] == [
        ("000000001", "nonfinite_latent"), ("000000002", "nonfinite_latent"), ("000000003", "nonfinite_text"),
        ("000000005", "nonfinite_latent")]
    kept = [r for p in m["parts"] for r in lat.read_part(d / p["file"])]
    assert [r.key for r in kept] == ["000000000", "000000004"]
    assert all(np.isfinite(r.mean).all() and np.isfinite(r.pooled).all() for r in kept)


# ---------------------------------------------------------------------------------------
# A job array: 2 tasks == 1 task; assembled when complete; --verify.


def test_two_tasks_equal_one_and_verify(tmp_path: Path, vae_run: dict, raw4: Path, models: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    d = tmp_path / "latents"
    ov = vae_overrides(tmp_path, f"{raw4}/*.tar", d, models)
    assert main(["precompute", *ov, "--task-index", "0", "--num-tasks", "2"]) == 0
    assert (lat.shard_manifest_path(d, "00000").exists() and lat.shard_manifest_path(d, "00001").exists()
            and not lat.shard_manifest_path(d, "00002").exists())
    assert not (d / lat.MANIFEST).exists()  # not assembled while task 1 has not run
    capsys.readouterr()
    assert main(["precompute", *ov, "--assemble"]) == 2  # refused, with the reason
    assert "2 of 4 raw shard(s) not done yet" in capsys.readouterr().err
    assert main(["precompute", *ov, "--verify"]) == 1

    # Task 1 from SLURM's array variables (--array=1-2 has ids 1 and 2): it finishes last and assembles.
    for k, v in {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "2",
                 "SLURM_ARRAY_TASK_COUNT": "2"}.items():
        monkeypatch.setenv(k, v)
    assert main(["precompute", *ov]) == 0
    assert (d / lat.MANIFEST).exists()
    a, b = dir_bytes(d), dir_bytes(vae_run["latents"])
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []  # byte-identical to one task

    capsys.readouterr()
    assert main(["precompute", *ov, "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    part = d / lat.SHARDS / "00001-001.tar"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, somewhere in the file
    part.write_bytes(bytes(data))
    (d / lat.SHARDS / "00003-000.tar").unlink()
    assert main(["precompute", *ov, "--verify"]) == 1
    out = capsys.readouterr().out
    assert "00001: 00001-001.tar is corrupt (sha256" in out and "00003: missing part" in out


# ---------------------------------------------------------------------------------------
# The trainer refuses latents that do not match its config.


def test_trainer_refuses_latents_from_another_codec_encoder_or_resolution(vae_run: dict,
                                                                        models: dict[str, Path]) -> None:
    from latentforge.training.loop import build_loader, open_latents

    def data_for(*extra: str):
        cfg = resolve("tiny", None, [*vae_run["overrides"], *extra])
        encoders = build_encoders(cfg)
        return build_loader(cfg, open_latents(cfg, encoders), encoders.codec, None, micro_batch=4)

    loader = data_for()
    batch = next(iter(loader))
    assert batch["latents"].shape == (4, 4, 8, 8)
    with pytest.raises(ValueError, match=r"codec\.weights_sha256: latents have '[0-9a-f]{64}', config gives"):
        data_for(f"codec.path={models['vae_other']}")
    with pytest.raises(ValueError, match="resolution: latents have 16, config gives 32"):
        data_for("data.resolution=32")
    with pytest.raises(ValueError, match="text.layer: latents have 'penultimate', config gives 'last'"):
        data_for("text.layer=last")
    with pytest.raises(ValueError, match=r"codec\.(kind|latent_channels|name)"):
        data_for("codec.kind=pixel", "codec.patch=2")
