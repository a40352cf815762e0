"""Raw shard reading: messy inputs made here, exact accounting, colours after conversion."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.data import raw, synth
from latentforge.data.raw import RawConfig, RawSample, Rejection, ShardReport


def _write_tar(path, members):
    """members: [(name, bytes)] in this order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return str(path)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR claiming width x height, and no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _noise(side: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


def _read(url, cfg):
    report = ShardReport(url=url)
    items = list(raw.iter_shard(url, cfg, report))
    assert report.seen == report.yielded + sum(report.rejected.values()) == len(items)
    assert report.yielded == sum(isinstance(i, RawSample) for i in items)
    return items, report


def _good(key, colour=(200, 30, 30), size=(24, 24), text=b"a caption"):
    return [(f"{key}.jpg", _encode(Image.new("RGB", size, colour), "JPEG")), (f"{key}.txt", text)]


def test_clean_synthetic_shard(tmp_path):
    [path] = synth.write_shards(tmp_path, 6, 6, 32, seed=0)
    items, report = _read(str(path), RawConfig(resolution=16))
    assert report.to_dict() == {"url": str(path), "seen": 6, "yielded": 6, "rejected": {}, "errors": [],
                                "notes": []}
    for i, s in enumerate(items):
        assert isinstance(s, RawSample) and s.key == f"{i:09d}"
        assert s.image.mode == "RGB" and s.image.size == (16, 16)
        assert s.caption == synth.caption(synth.ShapeSpec(**s.meta["json"]["spec"]))
        assert (s.meta["orig_width"], s.meta["orig_height"], s.meta["crop_top"], s.meta["crop_left"]) == (32, 32, 0, 0)


def test_messy_shard_exact_accounting(tmp_path):
    json_only = json.dumps({"caption": "  from the json  ", "url": "http://x"}).encode()
    members = [
        *_good("000"),
        ("001.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg"), ("001.txt", b"corrupt"),
        ("002.txt", b"no image here"),
        ("003.png", _encode(Image.new("RGB", (24, 24), "blue"), "PNG")),  # no caption at all
        ("004.jpg", _encode(Image.new("RGB", (24, 24)), "JPEG")), ("004.txt", b"  \n\t "),
        ("004.json", json.dumps({"caption": ""}).encode()),  # blank txt, blank json caption
        ("005.webp", _encode(Image.new("RGB", (24, 24), "green"), "WEBP")), ("005.json", json_only),
        *_good("006", text="caf\xe9 cr\xe8me".encode("latin-1")),
        *_good("000", text=b"the same key again"),  # not consecutive: a duplicate
        *_good("007", size=(8, 30)),  # shorter side 8 < min_size
        *_good("008", size=(60, 20)),  # aspect 3 > max_aspect
        ("009.png", _png_header(9000, 8000)), ("009.txt", b"72 Mpx > max_pixels"),
        ("010.png", _png_header(100_000, 100_000)), ("010.txt", b"beyond PIL's own hard limit"),
        ("011.png", _encode(_noise(24), "PNG")[:800]), ("011.txt", b"truncated png data"),
        *_good("012", text="\ufeffUTF-8 with a BOM ünïcode".encode("utf-8")),
    ]
    url = _write_tar(tmp_path / "messy.tar", members)
    items, report = _read(url, RawConfig(resolution=16, min_size=16, max_aspect=2.0))
    got = [(i.key, i.reason if isinstance(i, Rejection) else "ok") for i in items]
    assert got == [("000", "ok"), ("001", "corrupt_image"), ("002", "missing_image"), ("003", "missing_caption"),
                   ("004", "missing_caption"), ("005", "ok"), ("006", "ok"), ("000", "duplicate_key"),
                   ("007", "too_small"), ("008", "bad_aspect"), ("009", "decompression_bomb"),
                   ("010", "decompression_bomb"), ("011", "corrupt_image"), ("012", "ok")]
    assert (report.seen, report.yielded) == (14, 4)
    assert report.rejected == Counter(corrupt_image=2, missing_caption=2, decompression_bomb=2, missing_image=1,
                                      duplicate_key=1, too_small=1, bad_aspect=1)
    assert set(report.rejected) <= set(raw.REASONS) and report.errors == [] and report.ok
    ok = {i.key: i for i in items if isinstance(i, RawSample)}
    assert ok["005"].caption == "from the json" and ok["005"].meta["json"]["url"] == "http://x"
    assert ok["006"].caption == "café crème"  # latin-1 fallback
    assert ok["012"].caption == "UTF-8 with a BOM ünïcode"
    assert ok["000"].caption == "a caption"  # the first occurrence wins
    assert all(i.detail for i in items if isinstance(i, Rejection))


def test_lowered_pixel_limit_is_a_decompression_bomb(tmp_path):
    url = _write_tar(tmp_path / "a.tar", _good("000", size=(20, 20)) + _good("001", size=(10, 10)))
    items, report = _read(url, RawConfig(resolution=8, max_pixels=150))
    assert [getattr(i, "reason", "ok") for i in items] == ["decompression_bomb", "ok"]


def _one(tmp_path, data: bytes, ext: str, resolution: int) -> Image.Image:
    url = _write_tar(tmp_path / f"one-{ext}.tar", [(f"k.{ext}", data), ("k.txt", b"c")])
    [item], report = _read(url, RawConfig(resolution=resolution))
    assert isinstance(item, RawSample), item
    return item.image


def test_modes_become_8bit_rgb_with_transparency_on_white(tmp_path):
    px = lambda im: tuple(int(v) for v in np.asarray(im)[0, 0])  # noqa: E731
    # RGBA: transparent -> white; half-transparent red -> halfway to white.
    rgba = Image.new("RGBA", (8, 8), (200, 0, 0, 0))
    assert px(_one(tmp_path, _encode(rgba, "PNG"), "png", 8)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (200, 0, 0, 128))
    # 200 * 128/255 + 255 * 127/255 = 227.4
    assert px(_one(tmp_path, _encode(half, "PNG"), "png", 8)) == (227, 127, 127)
    # LA: grey 0 with alpha 255 stays black; alpha 0 becomes white.
    assert px(_one(tmp_path, _encode(Image.new("LA", (8, 8), (0, 255)), "PNG"), "png", 8)) == (0, 0, 0)
    assert px(_one(tmp_path, _encode(Image.new("LA", (8, 8), (0, 0)), "PNG"), "png", 8)) == (255, 255, 255)
    # P with a transparent palette index.
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 255, 10, 200, 10] + [0] * 762)
    assert px(_one(tmp_path, _encode(pal, "PNG", transparency=1), "png", 8)) == (255, 255, 255)
    assert px(_one(tmp_path, _encode(pal, "PNG", transparency=0), "png", 8)) == (10, 200, 10)
    # 16-bit greyscale is scaled (v / 257), not clipped at 255.
    for v16, v8 in ((65535, 255), (32896, 128), (257, 1), (0, 0)):
        g16 = Image.fromarray(np.full((8, 8), v16, dtype=np.uint16))
        assert g16.mode.startswith("I;16")
        assert px(_one(tmp_path, _encode(g16, "PNG"), "png", 8)) == (v8, v8, v8)
    # L and CMYK.
    assert px(_one(tmp_path, _encode(Image.new("L", (8, 8), 77), "PNG"), "png", 8)) == (77, 77, 77)
    cmyk = _one(tmp_path, _encode(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "TIFF"), "jpg", 8)
    assert px(cmyk) == (0, 255, 255)


def test_exif_orientation_is_applied_before_crop(tmp_path):
    # Stored 32 wide x 16 high: left half red, right half blue. Orientation 6 means
    # "rotate 90 degrees clockwise to display": displayed 16 wide x 32 high, red on top.
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = (255, 0, 0)
    a[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(a), "JPEG", exif=exif.tobytes(), quality=95)
    url = _write_tar(tmp_path / "exif.tar", [("r.jpg", data), ("r.txt", b"rotated")])
    [s], _ = _read(url, RawConfig(resolution=16))
    assert (s.meta["orig_width"], s.meta["orig_height"]) == (16, 32)
    assert (s.meta["crop_top"], s.meta["crop_left"]) == (8, 0)
    out = np.asarray(s.image).astype(int)  # rows 8..23 of the displayed image
    assert out[2, 8, 0] > 200 and out[2, 8, 2] < 60  # red above
    assert out[13, 8, 2] > 200 and out[13, 8, 0] < 60  # blue below


def test_resize_center_crop_offsets():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 255  # the middle half is white
    im, top, left = raw.resize_center_crop(Image.fromarray(a), 10)
    assert (im.size, top, left) == ((10, 10), 0, 5)
    assert np.asarray(im)[:, 2:8].min() > 240  # the crop is the white middle
    im, top, left = raw.resize_center_crop(Image.fromarray(a.transpose(1, 0, 2)), 10)
    assert (im.size, top, left) == ((10, 10), 5, 0)
    # Same pixels as resizing the whole image, then cropping.
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    im, top, left = raw.resize_center_crop(noise, 64)
    full = noise.resize((96, 64), Image.Resampling.BICUBIC, reducing_gap=3.0).crop((16, 0, 80, 64))
    assert (top, left) == (0, 16) and im.tobytes() == full.tobytes()
    # A 1 x 40000 banner is cropped before it is resized (else 32 x 1.28M pixels).
    im, top, left = raw.resize_center_crop(Image.new("RGB", (1, 40_000), "red"), 32)
    assert (im.size, top, left) == ((32, 32), (1_280_000 - 32) // 2, 0)


def _five(tmp_path):
    members = [m for i in range(5) for m in sorted(_good(f"{i:03d}"))]  # jpg, txt per key
    path = tmp_path / "five.tar"
    _write_tar(path, members)
    with tarfile.open(path) as t:
        infos = t.getmembers()
    return path.read_bytes(), infos


@pytest.mark.parametrize("where", ["mid_data", "mid_header", "member_boundary"])
def test_truncated_tar_keeps_samples_before_the_cut(tmp_path, where):
    data, infos = _five(tmp_path)
    jpg3 = infos[6]  # "003.jpg"
    cut = {"mid_data": jpg3.offset_data + 100, "mid_header": jpg3.offset + 200,
           "member_boundary": jpg3.offset}[where]
    url = str(tmp_path / "cut.tar")
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    items, report = _read(url, RawConfig(resolution=8))
    assert [i.key for i in items if isinstance(i, RawSample)] == ["000", "001", "002"]
    assert report.rejected == Counter() and report.seen == 3
    assert len(report.errors) == 1 and report.errors[0].startswith("truncated_shard:")


def test_truncation_inside_a_sample_rejects_it(tmp_path):
    data, infos = _five(tmp_path)
    txt3 = infos[7]  # "003.txt": 003.jpg was read whole, its caption was cut
    url = str(tmp_path / "cut.tar")
    (tmp_path / "cut.tar").write_bytes(data[:txt3.offset_data + 3])
    items, report = _read(url, RawConfig(resolution=8))
    assert [(i.key, getattr(i, "reason", "ok")) for i in items] == [
        ("000", "ok"), ("001", "ok"), ("002", "ok"), ("003", "truncated_sample")]
    assert report.errors[0].startswith("truncated_shard:")


def test_gzip_and_pipe_and_truncated_gzip(tmp_path):
    data, _ = _five(tmp_path)
    gz = tmp_path / "five.tar.gz"
    gz.write_bytes(gzip.compress(data))
    for url in (str(gz), f"pipe:cat {tmp_path / 'five.tar'}"):
        items, report = _read(url, RawConfig(resolution=8))
        assert (report.seen, report.yielded, report.errors) == (5, 5, []), url
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gzip.compress(data)[:-200])
    items, report = _read(str(cut), RawConfig(resolution=8))
    assert report.errors and report.errors[0].startswith("truncated_shard:")


def test_shard_level_failures_never_raise(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tar file " * 100)
    empty_file = tmp_path / "zero.tar"
    empty_file.write_bytes(b"")
    empty_tar = _write_tar(tmp_path / "empty.tar", [])
    cases = {str(junk): "not_a_tar:", str(empty_file): "not_a_tar: empty file",
             str(tmp_path / "missing.tar"): "open_failed:"}
    for url, prefix in cases.items():
        items, report = _read(url, RawConfig(resolution=8))
        assert items == [] and report.seen == 0 and len(report.errors) == 1, (url, report)
        assert report.errors[0].startswith(prefix) and report.errors[0].split(":")[0] in raw.SHARD_ERRORS
    # A failed command: its empty output is no tar, and its exit status says why.
    items, report = _read(f"pipe:cat {tmp_path / 'missing.tar'} 2>/dev/null", RawConfig(resolution=8))
    assert items == [] and report.errors[0] == "not_a_tar: empty file (0 bytes)"
    assert report.errors[1].startswith("read_error:") and "status 1" in report.errors[1]
    items, report = _read(empty_tar, RawConfig(resolution=8))
    assert (items, report.errors, report.notes) == ([], [], ["empty_shard"])


def test_garbage_after_members_is_a_corrupt_shard(tmp_path):
    data, infos = _five(tmp_path)
    url = str(tmp_path / "garbled.tar")
    (tmp_path / "garbled.tar").write_bytes(data[:infos[6].offset] + b"\x01" * 2048)
    items, report = _read(url, RawConfig(resolution=8))
    assert report.yielded == 3 and report.errors[0].startswith("corrupt_shard:")


def test_concatenated_tars_are_not_silently_cut(tmp_path):
    data, _ = _five(tmp_path)
    (tmp_path / "twice.tar").write_bytes(data + data)
    items, report = _read(str(tmp_path / "twice.tar"), RawConfig(resolution=8))
    assert report.yielded == 5 and report.errors[0].startswith("corrupt_shard: data after the end-of-archive")


def test_stray_members_are_noted_and_repeated_extensions_split_samples(tmp_path):
    members = [("README", b"hello"), ("._000.jpg", b"mac junk"), *_good("000"), *_good("000")]
    url = _write_tar(tmp_path / "a.tar", members)
    with tarfile.open(url, "a") as t:  # and a directory entry
        d = tarfile.TarInfo("subdir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
    items, report = _read(url, RawConfig(resolution=8))
    assert [getattr(i, "reason", "ok") for i in items] == ["ok", "duplicate_key"]
    assert report.notes == ["ignored_members: 3 (README, ._000.jpg, subdir)"]


def test_a_command_failing_after_its_output_keeps_the_samples(tmp_path):
    _five(tmp_path)
    items, report = _read(f"pipe:cat {tmp_path / 'five.tar'}; exit 4", RawConfig(resolution=8))
    assert (report.seen, report.yielded) == (5, 5)
    assert len(report.errors) == 1 and report.errors[0].startswith("read_error:") and "status 4" in report.errors[0]


@pytest.mark.timeout(60)
def test_early_stop_kills_the_command_instead_of_waiting(tmp_path):
    _five(tmp_path)
    gen = raw.iter_shard(f"pipe:cat {tmp_path / 'five.tar'}; sleep 600", RawConfig(resolution=8))
    assert isinstance(next(gen), RawSample)
    gen.close()  # returns at once: the command is killed, not awaited


def test_tensor_round_trip_is_exact():
    a = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    im = Image.fromarray(a.astype(np.uint8), "RGB")
    x = raw.to_tensor(im)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert raw.from_tensor(x).tobytes() == im.tobytes()
    assert np.asarray(raw.from_tensor(torch.full((3, 2, 2), 3.0))).max() == 255
    with pytest.raises(ValueError, match="x"):
        raw.from_tensor(torch.zeros(1, 3, 2, 2))


def test_raw_config_validation_and_from_data_config():
    from latentforge.config import DataConfig

    cfg = RawConfig.from_data_config(DataConfig(resolution=64, min_size=32, max_aspect=2.5))
    assert (cfg.resolution, cfg.min_size, cfg.max_aspect, cfg.max_pixels) == (64, 32, 2.5, 64_000_000)
    assert cfg.identity()["crop_policy"] == raw.CROP_POLICY
    for kw, field in (({"resolution": 0}, "resolution"), ({"resolution": 8, "max_aspect": 0.5}, "max_aspect"),
                      ({"resolution": 8, "min_size": -1}, "min_size"),
                      ({"resolution": 8, "max_pixels": 0}, "max_pixels")):
        with pytest.raises(ValueError, match=field):
            RawConfig(**kw)
