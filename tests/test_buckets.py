"""Aspect-ratio buckets (table, assignment, resize and crop), the identity they add, and
SD-XL's micro-conditioning through a real diffusers U-Net."""

from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.config import ModelConfig, resolve
from latentforge.data import raw
from latentforge.data.buckets import (
    bucket_table,
    nearest_bucket,
    nominal_bucket,
    sample_time_ids,
    table_from_config,
    time_ids,
)


@pytest.mark.parametrize("area,multiple,ratio", [(256 ** 2, 64, 4.0), (1024 ** 2, 64, 2.0), (32 ** 2, 8, 2.0),
                                                 (512 ** 2, 32, 3.0)])
def test_table_sides_area_ratio_symmetry_and_order(area, multiple, ratio):
    table = bucket_table(area, multiple, ratio)
    assert table
    for h, w in table:
        assert h % multiple == 0 and w % multiple == 0 and h * w <= area
        assert max(h, w) <= ratio * min(h, w)
        assert (w, h) in table  # a portrait bucket for every landscape one
    ratios = [w / h for h, w in table]
    assert ratios == sorted(ratios) and len(set(table)) == len(table)


def test_the_issue_example_and_the_square_only_table():
    assert bucket_table(256 ** 2, 64, 4.0) == ((512, 128), (320, 192), (256, 256), (192, 320), (128, 512))
    assert bucket_table(1024, 8, 1.0) == ((32, 32),)
    cfg = resolve("tiny", None, [])
    assert table_from_config(cfg.data) == ()  # bucket_max_ratio 1: no table, today's centre crop
    cfg = resolve("tiny", None, ["data.bucket_max_ratio=2"])
    assert table_from_config(cfg.data) == ((40, 24), (32, 32), (24, 40))
    assert nominal_bucket(table_from_config(cfg.data), 32) == (32, 32) and nominal_bucket((), 32) == (32, 32)


def test_nearest_bucket_is_nearest_in_log_aspect_ratio():
    table = bucket_table(256 ** 2, 64, 4.0)
    assert nearest_bucket(640, 480, table) == (192, 320)  # 4:3 -> 5:3 is nearer than 1:1 in log ratio
    assert nearest_bucket(480, 640, table) == (320, 192)
    assert nearest_bucket(5000, 100, table) == (128, 512)  # beyond the range: the widest
    assert nearest_bucket(300, 300, table) == (256, 256)
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(1, 3000, 2))
        b = nearest_bucket(w, h, table)
        d = abs(math.log(b[1] / b[0]) - math.log(w / h))
        assert all(d <= abs(math.log(c[1] / c[0]) - math.log(w / h)) + 1e-12 for c in table)


def test_resize_crop_covers_the_bucket_and_centres_the_crop():
    rng = np.random.default_rng(1)
    for _ in range(100):
        w, h = (int(v) for v in rng.integers(1, 200, 2))
        tw, th = (int(v) for v in rng.integers(1, 90, 2))
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        out, top, left = raw.resize_crop(im, tw, th)
        assert out.size == (tw, th)
        scale = max(tw / w, th / h)  # resized to cover: one side fits, the other is cropped evenly
        assert top == (max(th, round(h * scale)) - th) // 2 or top == (max(th, round(h * tw / w)) - th) // 2
        assert 0 <= top and 0 <= left and (top == 0 or left == 0)
    # A picture that already has the bucket's size is not resampled.
    im = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    out, top, left = raw.resize_crop(im, 40, 24)
    assert out is im and (top, left) == (0, 0)


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _shard(path, sizes):
    with tarfile.open(path, "w") as tar:
        for i, (w, h) in enumerate(sizes):
            for ext, data in (("png", _png(w, h)), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_raw_samples_go_to_their_bucket_with_size_and_crop_recorded(tmp_path):
    _shard(tmp_path / "a.tar", [(64, 64), (90, 40), (40, 90), (33, 31)])
    table = ((40, 24), (32, 32), (24, 40))
    got = [s for s in raw.iter_shard(str(tmp_path / "a.tar"), raw.RawConfig(resolution=32, buckets=table))]
    assert [(s.image.height, s.image.width) for s in got] == [(32, 32), (24, 40), (40, 24), (32, 32)]
    for s, (w, h) in zip(got, [(64, 64), (90, 40), (40, 90), (33, 31)]):
        assert (s.meta["orig_width"], s.meta["orig_height"]) == (w, h)
        assert (s.meta["target_height"], s.meta["target_width"]) == (s.image.height, s.image.width)
    assert got[1].meta["crop_top"] == 0 and got[1].meta["crop_left"] == (54 - 40) // 2  # 90x40 -> 54x24
    # Without a table: today's square centre crop, and no target keys.
    square = list(raw.iter_shard(str(tmp_path / "a.tar"), raw.RawConfig(resolution=32)))
    assert all(s.image.size == (32, 32) and "target_height" not in s.meta for s in square)
    ref = raw.resize_center_crop(Image.open(io.BytesIO(_png(90, 40))).convert("RGB"), 32)
    assert np.array_equal(np.asarray(square[1].image), np.asarray(ref[0]))


def test_identity_adds_buckets_only_when_on():
    from latentforge.data.encoders import Encoders

    class Fake:
        def identity(self):
            return {"x": 1}

    enc = Encoders(codec=Fake(), text=Fake())  # type: ignore[arg-type]
    square = enc.identity(resolve("tiny", None, []))
    assert set(square) == {"codec", "text", "resolution", "crop", "storage_dtype", "min_size", "max_aspect"}
    assert square["crop"] == raw.CROP_POLICY
    bucketed = enc.identity(resolve("tiny", None, ["data.bucket_max_ratio=2"]))
    assert bucketed["buckets"] == [[40, 24], [32, 32], [24, 40]] and bucketed["crop"] == raw.BUCKET_CROP_POLICY
    other = enc.identity(resolve("tiny", None, ["data.bucket_max_ratio=2", "data.bucket_area=2048"]))
    assert other["buckets"] != bucketed["buckets"]


def test_time_ids_order_and_original_size_from_img2dataset():
    assert time_ids((480, 640), (3, 5), (192, 320)) == [480.0, 640.0, 3.0, 5.0, 192.0, 320.0]
    meta = {"orig_width": 37, "orig_height": 27, "crop_top": 2, "crop_left": 0, "target_height": 24,
            "target_width": 40}
    assert sample_time_ids(meta, (32, 32)) == [27, 37, 2, 0, 24, 40]
    meta["json"] = {"original_width": 740, "original_height": 540, "width": 37}
    assert sample_time_ids(meta, (32, 32)) == [540, 740, 2, 0, 24, 40]  # before img2dataset's own resize
    assert sample_time_ids({"orig_width": 50, "orig_height": 40, "crop_top": 0, "crop_left": 5},
                           (32, 32)) == [40, 50, 0, 5, 32, 32]


def test_micro_conditioning_feeds_size_and_crop_through_text_time():
    from latentforge.eval.sampling import sample_geometry
    from latentforge.training.unet import build_unet, unet_forward, unet_kwargs

    cfg = ModelConfig(block_out_channels=(32, 64), micro_conditioning=True, micro_conditioning_dim=8)
    kw = unet_kwargs(cfg, 4, 8, 16, 12)
    assert kw["addition_embed_type"] == "text_time" and kw["projection_class_embeddings_input_dim"] == 12 + 6 * 8
    torch.manual_seed(0)
    unet = build_unet(cfg, 4, 8, 16, 12).eval()
    x, t = torch.randn(2, 4, 6, 10), torch.tensor([10, 500])
    cond = {"text": torch.randn(2, 5, 16), "pooled": torch.randn(2, 12)}
    (shape, ids) = sample_geometry(4, 4, (24, 40))
    assert shape == (4, 6, 10) and ids == [24.0, 40.0, 0.0, 0.0, 24.0, 40.0]
    with torch.no_grad():
        a = unet_forward(unet, x, t, {**cond, "time_ids": torch.tensor([ids, ids])})
        b = unet_forward(unet, x, t, {**cond, "time_ids": torch.tensor([ids, [96.0, 160.0, 8.0, 0.0, 24.0, 40.0]])})
    assert a.shape == x.shape
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])  # row 1's size/crop changed its output
    with pytest.raises(ValueError, match="time_ids"):
        unet_forward(unet, x, t, cond)
    with pytest.raises(ValueError, match="--size"):
        sample_geometry(4, 4, (25, 40), key="--size")


def test_a_wrapped_micro_conditioned_unet_gets_time_ids_and_export_refuses_the_pipeline():
    """Under a wrapper that holds the U-Net as `.module` (the training engine) the size/crop
    numbers still reach it; a micro-conditioned VAE run is exported as U-Nets, with the
    reason in one line (StableDiffusionPipeline passes no time_ids)."""
    import dataclasses

    from latentforge.training.export import pipeline_reason
    from latentforge.training.state import TrainState
    from latentforge.training.unet import build_unet, unet_forward

    mc = ModelConfig(block_out_channels=(32, 64), micro_conditioning=True, micro_conditioning_dim=8)
    torch.manual_seed(0)
    unet = build_unet(mc, 4, 8, 16, 12).eval()
    x, t = torch.randn(2, 4, 6, 10), torch.tensor([10, 500])
    cond = {"text": torch.randn(2, 5, 16), "pooled": torch.randn(2, 12),
            "time_ids": torch.tensor([[24.0, 40.0, 0.0, 0.0, 24.0, 40.0]] * 2)}

    class Wrapper(torch.nn.Module):  # no .config, the model as .module: like the engine
        def __init__(self, m: torch.nn.Module) -> None:
            super().__init__()
            self.module = m

        def forward(self, *a, **k):
            return self.module(*a, **k)

    with torch.no_grad():
        assert torch.equal(unet_forward(Wrapper(unet), x, t, cond), unet_forward(unet, x, t, cond))
    with pytest.raises(ValueError, match="time_ids"):
        unet_forward(Wrapper(unet), x, t, {k: v for k, v in cond.items() if k != "time_ids"})
    cfg = resolve("tiny", None, ["codec.kind=vae", "model.micro_conditioning=true"])
    reason = pipeline_reason(cfg, TrainState())
    assert reason is not None and "model.micro_conditioning" in reason and "\n" not in reason
    off = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, micro_conditioning=False))
    assert pipeline_reason(off, TrainState()) is None


def test_init_from_adopts_micro_conditioning_from_a_unet_config():
    """model.init_from's architecture adoption reads SD-XL's text_time from a U-Net's
    config.json (and refuses another added embedding in one line)."""
    from latentforge.config import ConfigError
    from latentforge.sources import unet_config_to_model
    from latentforge.training.unet import unet_kwargs

    mc = ModelConfig(block_out_channels=(32, 64), micro_conditioning=True, micro_conditioning_dim=8)
    arch = unet_config_to_model(unet_kwargs(mc, 4, 8, 16, 12), "unet/config.json")
    assert arch["micro_conditioning"] is True and arch["micro_conditioning_dim"] == 8
    plain = unet_config_to_model(unet_kwargs(ModelConfig(block_out_channels=(32, 64)), 4, 8, 16, 12), "u")
    assert plain["micro_conditioning"] is False and "micro_conditioning_dim" not in plain
    with pytest.raises(ConfigError, match="addition_embed_type 'text'"):
        unet_config_to_model({**unet_kwargs(mc, 4, 8, 16, 12), "addition_embed_type": "text"}, "u")


def test_config_errors_name_the_key():
    from latentforge.config import ConfigError

    for bad, key in ((["data.bucket_max_ratio=0.5"], "data.bucket_max_ratio"),
                     (["data.bucket_max_ratio=2", "data.bucket_multiple=4"], "data.bucket_multiple"),
                     (["data.bucket_max_ratio=2", "data.bucket_area=32"], "data.bucket_area"),
                     (["model.micro_conditioning=true", "model.pooled_text_conditioning=true"],
                      "model.pooled_text_conditioning"),
                     (["eval.sample_size=[32, 0]"], "eval.sample_size"),
                     (["data.caption_weights=[-1, 1]"], "data.caption_weights"),
                     (["data.filter_max_watermark=1.5"], "data.filter_max_watermark"),
                     (["data.sources=[{name: a, raw_shards: x}, {name: a, raw_shards: y}]"], "data.sources[1].name"),
                     (["data.sources=[{name: a}]"], "data.sources[0].raw_shards"),
                     (["synth.max_aspect=0.5"], "synth.max_aspect")):
        with pytest.raises(ConfigError) as e:
            resolve("tiny", None, bad)
        assert str(e.value).startswith(key) and "\n" not in str(e.value), str(e.value)
