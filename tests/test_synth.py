"""Synthetic shapes: captions, rendering, deterministic shards, fixed prompts."""

from __future__ import annotations

import io
import itertools
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from latentforge.data import synth
from latentforge.data.synth import ShapeSpec

ALL_SPECS = [ShapeSpec(*t) for t in itertools.product(synth.SHAPES, synth.COLORS, synth.SIZES, synth.POSITIONS,
                                                      synth.BACKGROUNDS)]


def test_caption_round_trips_for_every_spec():
    captions = [synth.caption(s) for s in ALL_SPECS]
    assert len(set(captions)) == len(ALL_SPECS) == 972
    for spec, text in zip(ALL_SPECS, captions):
        assert synth.parse_caption(text) == spec, text


def test_caption_reads_naturally_and_parse_is_tolerant_but_strict():
    spec = ShapeSpec("circle", "red", "small", "top left", "white")
    assert synth.caption(spec) == "a small red circle in the top left on a white background"
    assert synth.caption(ShapeSpec("square", "blue", "large", "top", "gray")) == \
        "a large blue square at the top on a gray background"
    assert synth.caption(ShapeSpec("triangle", "orange", "large", "left", "black")) == \
        "a large orange triangle on the left on a black background"
    assert synth.parse_caption("  A small RED circle   in the top left on a white background.") == spec
    for junk in ("", "a photo of a dog", "a small red circle in the top left",
                 "a tiny red circle in the top left on a white background",
                 "a small red circle in the top left on a white background with a hat"):
        assert synth.parse_caption(junk) is None, junk


def test_bad_spec_is_a_value_error_naming_the_field():
    with pytest.raises(ValueError, match="shape"):
        synth.caption(ShapeSpec("hexagon", "red", "small", "top", "white"))
    with pytest.raises(ValueError, match="background"):
        synth.render(ShapeSpec("circle", "red", "small", "top", "pink"), 32, np.random.default_rng(0))


def _alpha(im: Image.Image, spec: ShapeSpec) -> np.ndarray:
    """Coverage per pixel, exact for box-filtered renders: pixel = bg + a * (colour - bg)."""
    a = np.asarray(im, dtype=np.float64)
    bg = np.array(synth.BACKGROUNDS[spec.background], dtype=np.float64)
    axis = np.array(synth.COLORS[spec.color], dtype=np.float64) - bg
    return np.clip((a - bg) @ axis / (axis @ axis), 0, 1)  # (H, W)


def test_render_attributes_are_unambiguous_in_the_pixels():
    rng = np.random.default_rng(0)
    size = 192
    fills = {s: [] for s in synth.SHAPES}
    for i in range(150):
        spec = synth.sample_spec(rng)
        im = synth.render(spec, size, rng)
        assert im.mode == "RGB" and im.size == (size, size)
        a = np.asarray(im)
        bg = synth.BACKGROUNDS[spec.background]
        # Background: the corners; colour: fully covered pixels have the exact colour.
        for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            assert tuple(a[y, x]) == bg
        assert (a.reshape(-1, 3) == synth.COLORS[spec.color]).all(axis=1).sum() >= 4
        alpha = _alpha(im, spec)
        area = alpha.sum()
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        cx, cy = (alpha * xx).sum() / area / size, (alpha * yy).sum() / area / size
        row, col = synth.position_cell(spec.position)
        # Position: the centroid is in the named cell, well away from its borders.
        assert row / 3 + 0.055 < cy < (row + 1) / 3 - 0.055, (spec, cy)
        assert col / 3 + 0.055 < cx < (col + 1) / 3 - 0.055, (spec, cx)
        # Size: the bounding box of covered pixels (+-1 px of anti-aliasing).
        ys, xs = np.nonzero(alpha > 0.5)
        side = max(np.ptp(xs) + 1, np.ptp(ys) + 1) / size
        lo, hi = synth.SIZE_RANGES[spec.size]
        assert lo - 1.5 / size <= side <= hi + 1.5 / size, (spec, side)
        fills[spec.shape].append(area / (size * side) ** 2)
    # Shape: area over bounding-box area.
    assert all(abs(f - np.pi / 4) < 0.06 for f in fills["circle"])
    assert all(f > 0.9 for f in fills["square"])
    assert all(abs(f - 0.5) < 0.06 for f in fills["triangle"])


def test_small_is_clearly_smaller_than_large():
    (_, shi), (llo, _) = synth.SIZE_RANGES["small"], synth.SIZE_RANGES["large"]
    assert shi / llo <= 0.6


def test_render_is_deterministic_in_rng():
    spec = ShapeSpec("triangle", "green", "large", "bottom right", "black")
    a = synth.render(spec, 32, np.random.default_rng(7)).tobytes()
    b = synth.render(spec, 32, np.random.default_rng(7)).tobytes()
    c = synth.render(spec, 32, np.random.default_rng(8)).tobytes()
    assert a == b and a != c


def _members(path):
    with tarfile.open(path) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers()]


def test_write_shards_layout(tmp_path):
    paths = synth.write_shards(tmp_path / "s", num_samples=10, samples_per_shard=4, image_size=16, seed=3)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["00000.tar", "00001.tar", "00002.tar",
                                                                  synth.STAMP]  # no temps; the stamp last
    keys = []
    for p in paths:
        members = _members(p)
        names = [m.name for m, _ in members]
        assert names == sorted(names)
        for m, _ in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        files = {m.name: data for m, data in members}
        for key in sorted({n.split(".")[0] for n in names}):
            keys.append(key)
            assert {f"{key}.json", f"{key}.png", f"{key}.txt"} <= set(files)
            meta = json.loads(files[f"{key}.json"])
            assert meta["key"] == key and meta["width"] == meta["height"] == 16
            spec = ShapeSpec(**meta["spec"])
            assert files[f"{key}.txt"].decode() == meta["caption"] == synth.caption(spec)
            im = Image.open(io.BytesIO(files[f"{key}.png"]))
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (16, 16)
    assert keys == [f"{i:09d}" for i in range(10)]


def test_write_shards_is_byte_identical_per_seed_and_independent_of_sharding(tmp_path):
    a = synth.write_shards(tmp_path / "a", 9, 4, 16, seed=1)
    b = synth.write_shards(tmp_path / "b", 9, 4, 16, seed=1)
    c = synth.write_shards(tmp_path / "c", 9, 4, 16, seed=2)
    d = synth.write_shards(tmp_path / "d", 9, 9, 16, seed=1)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]
    # Sample i depends on (seed, i) only, not on which shard holds it.
    one = {m.name: data for p in a for m, data in _members(p)}
    assert one == {m.name: data for m, data in _members(d[0])}


def test_write_shards_refuses_a_folder_with_other_shards(tmp_path):
    (tmp_path / "old.tar").write_bytes(b"")  # not a synth's: the folder is someone else's
    with pytest.raises(ValueError, match="refusing to write .*not an earlier data synth output"):
        synth.write_shards(tmp_path, 4, 2, 16, seed=0)
    (tmp_path / "old.tar").unlink()
    (tmp_path / "00009.tar").write_bytes(b"")  # a larger earlier synth: its extra shards would mix in
    with pytest.raises(ValueError, match="out_dir"):
        synth.write_shards(tmp_path, 4, 2, 16, seed=0)
    with pytest.raises(ValueError, match="samples_per_shard"):
        synth.write_shards(tmp_path / "x", 4, 0, 16, seed=0)


def test_ensure_shards_writes_once_and_refuses_other_settings(tmp_path):
    paths = synth.ensure_shards(tmp_path, 5, 2, 16, seed=0)
    before = [p.stat().st_mtime_ns for p in paths]
    assert synth.ensure_shards(tmp_path, 5, 2, 16, seed=0) == paths
    assert [p.stat().st_mtime_ns for p in paths] == before  # not rewritten
    paths[1].unlink()  # a lost shard is written again
    assert synth.ensure_shards(tmp_path, 5, 2, 16, seed=0) == paths and paths[1].exists()
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        synth.ensure_shards(tmp_path, 5, 2, 16, seed=1)


def test_shards_are_grouped_by_webdataset_as_img2dataset_samples(tmp_path):
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    [path] = synth.write_shards(tmp_path, 6, 6, 16, seed=0)
    with open(path, "rb") as f:
        samples = list(group_by_keys(dict(m, __url__=str(path)) for m in tar_file_iterator(f)))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(6)]
    assert all({"png", "txt", "json"} <= set(s) for s in samples)


def test_fixed_prompts_cover_every_shape_and_colour():
    p = synth.fixed_prompts(8)
    assert p == synth.fixed_prompts(8) and p != synth.fixed_prompts(8, seed=1)
    specs = [synth.parse_caption(t) for t in synth.fixed_prompts(18, seed=4)]
    assert all(s is not None for s in specs)
    assert {s.color for s in specs[:6]} == set(synth.COLORS)
    assert {s.shape for s in specs[:6]} == set(synth.SHAPES)
    assert {(s.color, s.shape) for s in specs} == set(itertools.product(synth.COLORS, synth.SHAPES))
    assert {s.size for s in specs} == set(synth.SIZES) and {s.background for s in specs} == set(synth.BACKGROUNDS)
    everything = synth.fixed_prompts(972)
    assert len(set(everything)) == 972
    with pytest.raises(ValueError, match="n"):
        synth.fixed_prompts(973)


def test_non_square_images_metadata_and_two_captions(tmp_path):
    """The web-scale options: aspect ratios up to max_aspect (area about image_size**2), the
    rendering on the image's own grid, filterable metadata and a rephrased caption; the
    square dataset is unchanged when they are off."""
    from latentforge.eval import adherence

    ratios, sizes = [], []
    for i in range(60):
        key, files = synth.make_sample(i, 64, seed=2, max_aspect=2.0, captions=2, metadata=True)
        meta = json.loads(files["json"])
        im = Image.open(io.BytesIO(files["png"]))
        assert im.size == (meta["width"], meta["height"])
        ratios.append(max(im.size) / min(im.size))
        sizes.append(im.size[0] * im.size[1])
        assert meta["captions"] == [files["txt"].decode(), synth.rephrase(synth.parse_caption(meta["caption"]))]
        k = meta["original_width"] // meta["width"]
        assert 1 <= k <= 8 and meta["original_height"] == meta["height"] * k
        assert 3 <= meta["aesthetic"] <= 8 and 0 <= meta["pwatermark"] <= 1 and 0 <= meta["punsafe"] <= 1
        # The same shape, colour and place as the square dataset's sample: only the canvas differs.
        _, square = synth.make_sample(i, 64, seed=2)
        assert json.loads(square["json"])["spec"] == meta["spec"]
    assert max(ratios) <= 2.0 + 0.05 and max(ratios) > 1.5 and min(ratios) < 1.2
    assert all(abs(s / 64 ** 2 - 1) < 0.1 for s in sizes)
    # The shapes stay detectable on a non-square canvas cropped to a square.
    key, files = synth.make_sample(7, 96, seed=0, max_aspect=1.3)
    im = Image.open(io.BytesIO(files["png"]))
    spec = synth.parse_caption(files["txt"].decode())
    got = adherence.score([np.asarray(im.resize((96, 96)))], [synth.caption(spec)])
    assert got["count"] == 1
    # Off by default: byte for byte the square sample.
    assert synth.make_sample(3, 32, 0, 1.0, 1, False) == synth.make_sample(3, 32, 0)


def test_stamp_names_only_options_that_are_on(tmp_path):
    synth.ensure_shards(tmp_path / "a", 8, 4, 16, 0)
    assert set(json.loads((tmp_path / "a" / synth.STAMP).read_text())) == {
        "num_samples", "samples_per_shard", "image_size", "seed", "version"}
    synth.ensure_shards(tmp_path / "b", 8, 4, 16, 0, max_aspect=2.0, metadata=True)
    stamp = json.loads((tmp_path / "b" / synth.STAMP).read_text())
    assert stamp["max_aspect"] == 2.0 and stamp["metadata"] is True and "captions" not in stamp
    with pytest.raises(ValueError, match="max_aspect: 2.0 -> None"):
        synth.ensure_shards(tmp_path / "b", 8, 4, 16, 0)
