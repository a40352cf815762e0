"""Image codecs: the exact pixel codec and a tiny real AutoencoderKL saved at test time."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from latentforge.config import CodecConfig
from latentforge.data.codecs import CodecWeightsNotFound, PixelCodec, build_codec
from latentforge.hashing import sha256_file


def _uint8_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def _to_unit(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]


# ---------------------------------------------------------------------------------------
# Pixel codec.


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_pixel_round_trip_is_bitwise_exact(patch: int) -> None:
    u8 = _uint8_images(3, 8, 16)
    x = _to_unit(u8)
    codec = build_codec(CodecConfig(kind="pixel", patch=patch))
    mean, std = codec.encode(x)
    assert std is None and codec.deterministic
    assert mean.shape == (3, 3 * patch * patch, 8 // patch, 16 // patch) and mean.dtype == torch.float32
    assert codec.latent_channels == mean.shape[1] and codec.downsample == patch
    assert torch.equal(codec.decode(mean), x)
    # A latent cell holds exactly its p x p patch: channel c*p*p + i*p + j is pixel (i, j) of channel c.
    assert torch.equal(mean[:, 0, 0, 0], x[:, 0, 0, 0])
    if patch > 1:
        assert torch.equal(mean[:, 1, 0, 0], x[:, 0, 0, 1])


def test_pixel_round_trip_survives_fp16_storage() -> None:
    u8 = _uint8_images(4, 16, 16, seed=1)
    codec = PixelCodec(2)
    mean, _ = codec.encode(_to_unit(u8))
    stored = mean.half()  # what precompute writes
    back = codec.decode(stored.float())
    assert torch.equal(torch.round((back + 1.0) * 127.5).to(torch.uint8), u8)


def test_pixel_scale_shift_and_identity() -> None:
    codec = build_codec(CodecConfig(kind="pixel", patch=2))
    assert (codec.scale, codec.shift) == (1.0, 0.0)
    codec = build_codec(CodecConfig(kind="pixel", patch=4, scale=0.5, shift=0.25))
    assert (codec.scale, codec.shift) == (0.5, 0.25)
    ident = codec.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["kind"] == "pixel" and ident["patch"] == 4 and ident["scale"] == 0.5 and ident["shift"] == 0.25
    assert PixelCodec(2).identity() != PixelCodec(4).identity()


def test_pixel_rejects_bad_input() -> None:
    codec = PixelCodec(2)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        codec.encode(_uint8_images(1, 8, 8).float())  # [0, 255] instead of [-1, 1]
    with pytest.raises(ValueError, match="multiple"):
        codec.encode(torch.zeros(1, 3, 7, 8))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        codec.encode(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.zeros(1, 5, 4, 4))
    with pytest.raises(ValueError, match="codec.patch"):
        PixelCodec(0)
    with pytest.raises(ValueError, match="codec.kind"):
        build_codec(CodecConfig(kind="jpeg"))


# ---------------------------------------------------------------------------------------
# A tiny real AutoencoderKL, saved with diffusers' own save_pretrained.


def _tiny_vae(seed: int, scaling_factor: float = 0.18215, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                         sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vae")
    _tiny_vae(seed=0).save_pretrained(d)
    return d


def test_vae_encode_decode_shapes_and_values(vae_dir: Path) -> None:
    from diffusers import AutoencoderKL

    codec = build_codec(CodecConfig(kind="vae", path=str(vae_dir)))
    assert (codec.latent_channels, codec.downsample, codec.deterministic) == (4, 2, False)
    x = _to_unit(_uint8_images(2, 16, 24))
    mean, std = codec.encode(x)
    assert mean.shape == std.shape == (2, 4, 8, 12)
    assert mean.dtype == std.dtype == torch.float32
    assert bool((std > 0).all())
    # The same numbers as diffusers' own posterior from an independent load of the files.
    ref = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        dec = ref.decode(post.mean).sample
    # The same fp32 ops on the same machine: the mean and decode are bitwise equal. std is
    # exp(0.5 logvar) here and diffusers' own exp of the same values: at most a few ulps apart.
    torch.testing.assert_close(mean, post.mean, rtol=0, atol=0)
    torch.testing.assert_close(std, post.std, rtol=1e-6, atol=1e-7)
    out = codec.decode(mean)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(out, dec.clamp(-1, 1), rtol=0, atol=0)


def test_vae_scale_shift_from_config_or_vae(tmp_path: Path, vae_dir: Path) -> None:
    codec = build_codec(CodecConfig(kind="vae", path=str(vae_dir)))
    # Config values read back (decimal -> float): approx's default 1e-6 relative.
    assert (codec.scale, codec.shift) == (pytest.approx(0.18215), 0.0)  # SD VAE: shift_factor None -> 0
    codec = build_codec(CodecConfig(kind="vae", path=str(vae_dir), scale=0.5, shift=0.1))
    assert (codec.scale, codec.shift) == (0.5, 0.1)
    _tiny_vae(seed=0, scaling_factor=0.3611, shift_factor=0.1159).save_pretrained(tmp_path / "flux_like")
    codec = build_codec(CodecConfig(kind="vae", path=str(tmp_path / "flux_like")))
    assert (codec.scale, codec.shift) == (pytest.approx(0.3611), pytest.approx(0.1159))
    assert codec.identity()["scale"] == pytest.approx(0.3611)


def test_vae_identity_hash_is_stable_and_tracks_weights(tmp_path: Path, vae_dir: Path) -> None:
    a = build_codec(CodecConfig(kind="vae", path=str(vae_dir))).identity()
    b = build_codec(CodecConfig(kind="vae", path=str(vae_dir))).identity()
    assert a == b and json.loads(json.dumps(a)) == a
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    assert a["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert a["config"]["latent_channels"] == 4 and a["config"]["scaling_factor"] == pytest.approx(0.18215)
    assert a["dtype"] == "fp32" and a["kind"] == "vae"

    # The same files elsewhere are the same codec: the path is not part of the identity.
    shutil.copytree(vae_dir, tmp_path / "moved")
    assert build_codec(CodecConfig(kind="vae", path=str(tmp_path / "moved"))).identity() == a

    # Different weights (same architecture) change the hash; dtype changes the identity too.
    _tiny_vae(seed=1).save_pretrained(tmp_path / "other")
    c = build_codec(CodecConfig(kind="vae", path=str(tmp_path / "other"))).identity()
    assert c["weights_sha256"] != a["weights_sha256"] and c["config"] == a["config"]
    assert build_codec(CodecConfig(kind="vae", path=str(vae_dir), dtype="bf16")).identity()["dtype"] == "bf16"


def test_sha256_file_sees_a_rewritten_file(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    first = sha256_file(f)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest() == sha256_file(f)
    f.unlink()
    f.write_bytes(b"b" * 1001)  # a new file (new inode and size): never served from the cache
    assert sha256_file(f) == hashlib.sha256(b"b" * 1001).hexdigest()


def test_vae_missing_path_names_path_and_key(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_vae"
    with pytest.raises(FileNotFoundError, match="codec.path") as e:
        build_codec(CodecConfig(kind="vae", path=str(missing)))
    assert str(missing) in str(e.value) and isinstance(e.value, CodecWeightsNotFound)
    with pytest.raises(FileNotFoundError, match="codec.path"):
        build_codec(CodecConfig(kind="vae", path=""))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_codec(CodecConfig(kind="vae", path=str(tmp_path / "empty")))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(FileNotFoundError, match="no VAE weights"):
        build_codec(CodecConfig(kind="vae", path=str(tmp_path / "noweights")))


def test_vae_from_pipeline_dir_and_hf_cache(tmp_path: Path, vae_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    want = build_codec(CodecConfig(kind="vae", path=str(vae_dir))).identity()

    # A full pipeline directory: model_index.json plus a vae/ subfolder.
    pipe = tmp_path / "pipeline"
    shutil.copytree(vae_dir, pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert build_codec(CodecConfig(kind="vae", path=str(pipe))).identity() == want

    # A repo id that is already in the local Hugging Face cache (the layout hf_hub_download leaves).
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--lf-test--tiny-pipeline"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(pipe, repo / "snapshots" / "0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert build_codec(CodecConfig(kind="vae", path="lf-test/tiny-pipeline")).identity() == want
    # ... and one that is not cached is a clear error, not a download.
    with pytest.raises(FileNotFoundError, match="lf-test/not-cached"):
        build_codec(CodecConfig(kind="vae", path="lf-test/not-cached"))


def test_vae_bf16_compute_on_cpu(vae_dir: Path) -> None:
    x = _to_unit(_uint8_images(2, 16, 16, seed=3))
    fp32 = build_codec(CodecConfig(kind="vae", path=str(vae_dir)))
    bf16 = build_codec(CodecConfig(kind="vae", path=str(vae_dir), dtype="bf16"))
    assert next(bf16.vae.parameters()).dtype == torch.bfloat16
    m32, s32 = fp32.encode(x)
    m16, s16 = bf16.encode(x)
    assert m16.dtype == s16.dtype == torch.float32
    # bf16 keeps ~3 significant digits (rounding 4e-3 relative) through a few conv layers:
    # close to fp32 (5 %), but not equal (it really ran in bf16).
    torch.testing.assert_close(m16, m32, rtol=0.05, atol=0.05)
    torch.testing.assert_close(s16, s32, rtol=0.05, atol=0.05)
    assert not torch.equal(m16, m32)
    out = bf16.decode(m16)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert float(out.abs().max()) <= 1.0
