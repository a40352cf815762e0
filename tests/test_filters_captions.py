"""Metadata filters (exact accounting with messy and missing json and parquet fields) and
several captions per image (where they come from, that precompute encodes each one, and
that the loader's choice is deterministic)."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from latentforge.config import resolve
from latentforge.data import filters as flt
from latentforge.data import latents as lat
from latentforge.data import raw
from latentforge.data.captions import choose_caption, extra_captions


def _png(seed: int, w: int = 20, h: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


GOOD = {"original_width": 800, "original_height": 600, "aesthetic": 6.0, "pwatermark": 0.1, "punsafe": 0.05}

# key -> (json text or None, caption, image bytes or None, the reason expected; "" = kept)
MESSY: dict[str, tuple[str | None, str, bytes | None, str]] = {
    "k00": (json.dumps(GOOD), "a good caption here", None, ""),
    "k01": (json.dumps({**GOOD, "aesthetic": 3.0}), "a good caption here", None, "filtered_aesthetic"),
    "k02": (json.dumps({k: v for k, v in GOOD.items() if k != "aesthetic"}), "a good caption here", None,
            "missing_aesthetic"),
    "k03": (json.dumps({**GOOD, "aesthetic": "abc"}), "a good caption here", None, "missing_aesthetic"),
    "k04": ('{"original_width": 800, "original_height": 600, "aesthetic": NaN, "pwatermark": 0, "punsafe": 0}',
            "a good caption here", None, "missing_aesthetic"),
    "k05": (json.dumps({**GOOD, "pwatermark": 0.95}), "a good caption here", None, "filtered_watermark"),
    "k06": (json.dumps({**GOOD, "punsafe": None}), "a good caption here", None, "missing_unsafe"),
    "k07": (json.dumps({**GOOD, "original_width": 100}), "a good caption here", None, "filtered_original_size"),
    "k08": (None, "no json, the parquet has it all", None, ""),
    "k09": (None, "no json and no parquet row", None, "missing_original_size"),
    "k10": (json.dumps(GOOD), "short", None, "filtered_caption_length"),
    "k11": (json.dumps({**GOOD, "aesthetic": " 6.5 "}), "a numeric string is a number", None, ""),
    "k12": (json.dumps({**GOOD, "aesthetic": True}), "a bool is not a number", None, "missing_aesthetic"),
    "k13": (json.dumps({k: v for k, v in GOOD.items() if k != "aesthetic"}), "the parquet fills the gap", None,
            ""),
    "k14": (json.dumps({**GOOD, "aesthetic": 1.0}), "filtered before decoding", b"not an image",
            "filtered_aesthetic"),
    "k15": (json.dumps({**GOOD, "aesthetic": 7.0}), "kept filters then a corrupt image", b"not an image",
            "corrupt_image"),
    "k16": (json.dumps({**GOOD, "width": 10, "height": 10, "original_width": None}), "half a size is no size",
            None, "missing_original_size"),
    "k17": ("[1, 2]", "a json that is not an object", None, "missing_original_size"),
    "k18": (json.dumps({"width": 900, "height": 700, "aesthetic": 9, "pwatermark": 0.2, "punsafe": 0.2}),
            "width and height stand in for the original size", None, ""),
}
PARQUET_ROWS = [
    {"key": "k08", "original_width": 1024, "original_height": 768, "aesthetic": 7.5, "pwatermark": 0.2,
     "punsafe": 0.01},
    {"key": "k13", "original_width": 1, "original_height": 1, "aesthetic": 5.5, "pwatermark": 0.9, "punsafe": 0.9},
]
FILTERS = ["data.filter_min_original_side=256", "data.filter_max_original_side=4096", "data.filter_min_aesthetic=5",
           "data.filter_max_watermark=0.8", "data.filter_max_unsafe=0.5", "data.filter_min_caption_words=2"]


def write_messy(d: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    with tarfile.open(d / "00000.tar", "w") as tar:
        for i, (key, (js, cap, img, _)) in enumerate(MESSY.items()):
            members = {"png": img if img is not None else _png(i), "txt": cap.encode()}
            if js is not None:
                members["json"] = js.encode()
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tar.addfile(info, io.BytesIO(members[ext]))
    pq.write_table(pa.Table.from_pylist(PARQUET_ROWS), d / "00000.parquet")
    return d / "00000.tar"


def test_filter_accounting_with_messy_and_missing_metadata(tmp_path: Path) -> None:
    shard = write_messy(tmp_path / "raw")
    cfg = resolve("tiny", None, FILTERS)
    rcfg = raw.RawConfig.from_data_config(cfg.data)
    report = raw.ShardReport(url=str(shard))
    got = {}
    for item in raw.iter_shard(str(shard), rcfg, report):
        got[item.key] = item.reason if isinstance(item, raw.Rejection) else ""
    assert got == {k: v[3] for k, v in MESSY.items()}
    assert report.seen == len(MESSY) == report.yielded + sum(report.rejected.values())
    assert any(n.startswith("metadata_parquet: 00000.parquet") for n in report.notes)
    # A broken parquet is a note; the json alone still serves.
    (tmp_path / "raw" / "00000.parquet").write_bytes(b"PAR1 garbage")
    report = raw.ShardReport(url=str(shard))
    got = {i.key: (i.reason if isinstance(i, raw.Rejection) else "") for i in raw.iter_shard(str(shard), rcfg, report)}
    assert got["k08"] == "missing_original_size" and got["k13"] == "missing_aesthetic" and got["k00"] == ""
    assert any(n.startswith("metadata_parquet_error:") for n in report.notes)


def test_filters_through_precompute_keep_seen_written_rejected(tmp_path: Path) -> None:
    from latentforge.data import precompute

    write_messy(tmp_path / "raw")
    cfg = resolve("tiny", None, [f"run_root={tmp_path}", f"data.raw_shards={tmp_path}/raw/*.tar",
                                 f"data.latent_dir={tmp_path}/lat", "data.precompute_workers=0", *FILTERS])
    precompute.run(cfg)
    m = lat.load_manifest(tmp_path / "lat")
    want = Counter(v[3] for v in MESSY.values() if v[3])
    assert m["rejected"] == dict(want) and m["written"] == sum(1 for v in MESSY.values() if not v[3])
    assert m["seen"] == m["written"] + sum(m["rejected"].values())
    assert m["identity"]["filters"] == {"min_original_side": 256, "max_original_side": 4096, "min_aesthetic": 5.0,
                                        "max_watermark": 0.8, "max_unsafe": 0.5, "min_caption_words": 2}
    text = precompute.inspect(tmp_path / "lat")
    assert "filtered_aesthetic" in text and "missing_unsafe" in text and "written + rejected == seen" in text
    shard = json.loads((tmp_path / "lat" / "shards" / "00000.json").read_text())
    assert {r["key"]: r["reason"] for r in shard["rejections"]} == {k: v[3] for k, v in MESSY.items() if v[3]}


def test_off_filters_read_nothing():
    off = flt.MetadataFilters()
    assert not off.active and off.identity() == {} and off.check("x", {}) is None
    assert flt.MetadataFilters(min_caption_words=2).check("one", {}) == ("filtered_caption_length",
                                                                         "1 words, outside [2, inf]")
    assert not flt.MetadataFilters(min_caption_words=2).needs_metadata


# ---------------------------------------------------------------------------------------
# Captions.


def test_extra_captions_from_json_lists_fields_and_members():
    meta = {"captions": ["first", "a recaption", " ", "first", 7], "alt": "alt text"}
    files = {"recap.txt": "  from a member\n".encode()}
    assert extra_captions(files, meta, ("captions",), "first", 4) == ["a recaption"]
    assert extra_captions(files, meta, ("recap.txt", "captions", "alt"), "first", 4) == [
        "from a member", "a recaption", "alt text"]
    assert extra_captions(files, meta, ("recap.txt", "captions", "alt"), "first", 2) == ["from a member"]
    assert extra_captions({}, None, ("captions",), "first", 4) == []


def test_caption_choice_is_deterministic_and_follows_the_weights():
    keys = [f"{i:09d}" for i in range(3000)]
    a = [choose_caption(1, 0, k, 3, (1.0, 1.0, 2.0)) for k in keys]
    assert a == [choose_caption(1, 0, k, 3, (1.0, 1.0, 2.0)) for k in keys]
    c = Counter(a)
    assert abs(c[2] - 1500) < 150 and abs(c[0] - 750) < 120 and abs(c[1] - 750) < 120
    assert a != [choose_caption(1, 1, k, 3, (1.0, 1.0, 2.0)) for k in keys]  # another pass, another draw
    assert a != [choose_caption(2, 0, k, 3, (1.0, 1.0, 2.0)) for k in keys]
    assert {choose_caption(1, 0, k, 2, (0.0, 1.0)) for k in keys} == {1}
    assert {choose_caption(1, 0, k, 3, (1.0,)) for k in keys} == {0}  # weights it leaves out count 0
    assert {choose_caption(1, 0, k, 1, ()) for k in keys} == {0}
    u = Counter(choose_caption(4, 2, k, 2) for k in keys)
    assert abs(u[0] - 1500) < 150


def test_precompute_encodes_every_caption_and_the_loader_picks_one_deterministically(tmp_path: Path) -> None:
    from latentforge.data import precompute, synth
    from latentforge.data.encoders import build_encoders
    from latentforge.data.loader import LatentLoader

    synth.write_shards(tmp_path / "raw", 24, 12, 32, seed=3, captions=2)
    ov = [f"run_root={tmp_path}", f"data.raw_shards={tmp_path}/raw/*.tar", f"data.latent_dir={tmp_path}/lat",
          "data.precompute_workers=0", "data.caption_fields=[captions]", "data.latent_samples_per_shard=8"]
    cfg = resolve("tiny", None, ov)
    precompute.run(cfg)
    m = lat.load_manifest(tmp_path / "lat")
    assert m["identity"]["captions"] == {"fields": ["captions"], "max": 4}
    enc = build_encoders(cfg)
    recs = [r for p in m["parts"] for r in lat.read_part(tmp_path / "lat" / p["file"])]
    assert len(recs) == 24 and all(len(r.extra) == 1 for r in recs)
    r = recs[0]
    spec = synth.parse_caption(r.caption)
    assert r.extra[0][0] == synth.rephrase(spec)
    e = enc.text.encode([r.caption, r.extra[0][0]])
    assert torch.allclose(torch.from_numpy(r.extra[0][1].astype(np.float32)), e.tokens[1], atol=2e-3, rtol=1e-3)
    assert torch.allclose(torch.from_numpy(r.pooled.astype(np.float32)), e.pooled[0], atol=2e-3, rtol=1e-3)
    assert r.meta["text_lens"] == [int(e.lengths[0]), int(e.lengths[1])]

    def choices(world: int, workers: int) -> dict[tuple[int, int], int]:
        out = {}
        for rank in range(world):
            lo = LatentLoader(tmp_path / "lat", m["parts"], micro_batch=4, seed=5, rank=rank, world_size=world,
                              num_workers=workers, shapes=m["shapes"], caption_weights=(1.0, 1.0))
            it = iter(lo)
            for _ in range(lo.steps_remaining):
                b = next(it)
                for i in range(4):
                    if b["mask"][i]:
                        out[(int(b["part"][i]), int(b["index"][i]))] = int(b["caption"][i])
            it.close()
        return out

    one, two = choices(1, 0), choices(2, 1)
    assert one == two and len(one) == 24 and set(one.values()) == {0, 1}
