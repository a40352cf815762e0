"""Synthetic captioned shapes: the embedded default dataset (and the tests' data).

Each image is one coloured shape on a solid background. Every attribute the caption names
is unambiguous in the pixels, so prompt adherence can be scored by detection
(`latentforge.eval.adherence`):

    a small red circle in the top left on a white background
      |     |    |      |                  `- BACKGROUNDS: white, black, gray
      |     |    |      `- POSITIONS: the shape's area centroid lies in that cell of a 3x3 grid
      |     |    `- SHAPES: circle, square, triangle (apex up)
      |     `- COLORS: six well separated named colours
      `- SIZES: small (bounding box 15-19% of the side) or large (32-38%)

Jitter (size inside its range, position +-3% of the side around the cell centre) makes
images vary without blurring the classes: a small shape is always at most 0.6x a large
one, and the centroid stays at least 6% of the side away from the border of its cell.

Shards use the img2dataset layout: per sample `KEY.json`, `KEY.png`, `KEY.txt`, keys of
9 digits (the global sample index), shards `00000.tar`, `00001.tar`, ... Sample i is a
pure function of (seed, i), independent of how samples are grouped into shards, and the
tar bytes are a pure function of the arguments (fixed tar metadata, sorted members,
deterministic PNG encoding).

Options for the web-scale data path (each off by default, leaving the square dataset
byte for byte as it was):
    max_aspect  images get a random aspect ratio up to this (area about image_size**2);
                positions are cells of the image's own 3x3 grid, sizes fractions of its
                shorter side
    captions=2  KEY.json "captions" holds the caption and a rephrasing of it
    metadata    KEY.json holds filterable fields as img2dataset writes them from LAION's
                parquet: original_width/original_height (1-8x the image), aesthetic (3-8),
                pwatermark and punsafe (0-1)
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from latentforge import outputs
from latentforge.config import Config
from latentforge.fileio import atomic_open, atomic_write
from latentforge.log import get_logger

log = get_logger("synth")

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Named colours, chosen far apart in RGB from each other and from every background
# (pairwise distance >= ~95), so nearest-colour detection is unambiguous.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 40),
    "purple": (150, 40, 190),
    "orange": (250, 130, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

# Bounding-box side as a fraction of the image side, per size class.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.15, 0.19), "large": (0.32, 0.38)}
POSITION_JITTER = 0.03  # max centroid offset from the cell centre, fraction of the side
_MARGIN = 0.02  # shapes stay this far (fraction of the side) inside the image
_SUPERSAMPLE = 4  # draw at 4x and box-filter down: exact-area anti-aliasing

# Caption phrase for each position ("in the top left", "at the top", "on the left", ...).
_POSITION_PHRASES: dict[str, str] = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}


@dataclass(frozen=True)
class ShapeSpec:
    shape: str  # one of SHAPES
    color: str  # a key of COLORS
    size: str  # one of SIZES
    position: str  # one of POSITIONS
    background: str  # a key of BACKGROUNDS

    def validate(self) -> None:
        """Raise ValueError naming the first field whose value is not in its vocabulary."""
        for name, vocab in (("shape", SHAPES), ("color", COLORS), ("size", SIZES),
                            ("position", POSITIONS), ("background", BACKGROUNDS)):
            value = getattr(self, name)
            if value not in vocab:
                raise ValueError(f"ShapeSpec.{name}: {value!r} is not one of {', '.join(vocab)}")


def position_cell(position: str) -> tuple[int, int]:
    """(row, col) in the 3x3 grid, each 0..2, of a position name."""
    if position not in POSITIONS:
        raise ValueError(f"position: {position!r} is not one of {', '.join(POSITIONS)}")
    i = POSITIONS.index(position)
    return i // 3, i % 3


def fill_ratio(shape: str) -> float:
    """Area of the shape over the area of its bounding box (the triangle's base = height)."""
    return {"circle": float(np.pi / 4), "square": 1.0, "triangle": 0.5}[shape]


def sample_spec(rng: np.random.Generator) -> ShapeSpec:
    """A uniformly random spec (each attribute drawn independently)."""
    return ShapeSpec(
        shape=SHAPES[int(rng.integers(len(SHAPES)))],
        color=list(COLORS)[int(rng.integers(len(COLORS)))],
        size=SIZES[int(rng.integers(len(SIZES)))],
        position=POSITIONS[int(rng.integers(len(POSITIONS)))],
        background=list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
    )


def caption(spec: ShapeSpec) -> str:
    """The caption of `spec`, e.g. "a small red circle in the top left on a white background"."""
    spec.validate()
    return (f"a {spec.size} {spec.color} {spec.shape} {_POSITION_PHRASES[spec.position]} "
            f"on a {spec.background} background")


_PHRASE_TO_POSITION = {v.split(" ", 1)[1]: k for k, v in _POSITION_PHRASES.items()}  # "the top left" -> ...


def _alt(words: object) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # type: ignore[arg-type]


_CAPTION_RE = re.compile(
    rf"an? (?P<size>{_alt(SIZES)}) (?P<color>{_alt(COLORS)}) (?P<shape>{_alt(SHAPES)}) "
    rf"(?:in|at|on) (?P<where>{_alt(_PHRASE_TO_POSITION)}) "
    rf"on an? (?P<background>{_alt(BACKGROUNDS)}) background"
)


def parse_caption(text: str) -> ShapeSpec | None:
    """The spec a caption describes, or None if it is not a shapes caption.

    The inverse of `caption`, tolerant of case, repeated whitespace and a trailing full
    stop (prompts typed by people); anything else returns None rather than a guess.
    """
    norm = " ".join(text.lower().split()).rstrip(".")
    m = _CAPTION_RE.fullmatch(norm)
    if m is None:
        return None
    return ShapeSpec(shape=m["shape"], color=m["color"], size=m["size"],
                     position=_PHRASE_TO_POSITION[m["where"]], background=m["background"])


def _layout(spec: ShapeSpec, rng: np.random.Generator) -> tuple[float, float, float]:
    """(cx, cy, side) in fractions of the image side: the area centroid and bbox side."""
    lo, hi = SIZE_RANGES[spec.size]
    side = float(rng.uniform(lo, hi))
    row, col = position_cell(spec.position)
    cx = (col + 0.5) / 3 + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
    cy = (row + 0.5) / 3 + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER))
    # The triangle's centroid sits at 2/3 of its height below the apex, i.e. side/6 below
    # its bbox centre. Clamp the bbox inside the image; with the ranges above the
    # centroid stays >= 0.06 inside its cell (worst case, a large triangle in the top
    # row: centroid <= 0.02 + 0.38 * 2/3 = 0.273 = 1/3 - 0.06).
    dy = side / 6 if spec.shape == "triangle" else 0.0
    half = side / 2
    cx = min(max(cx, _MARGIN + half), 1 - _MARGIN - half)
    cy = min(max(cy - dy, _MARGIN + half), 1 - _MARGIN - half) + dy
    return cx, cy, side


def render(spec: ShapeSpec, size: int, rng: np.random.Generator, height: int | None = None) -> Image.Image:
    """An RGB image of `spec`, `size` wide and `height` (default `size`) tall. Jitter (bbox
    side, then centroid x and y) takes three draws from `rng`. The layout is in fractions:
    the centroid of the image's width and height, the bbox side of its shorter side."""
    spec.validate()
    height = size if height is None else height
    if min(size, height) < 8:
        raise ValueError(f"size: images must be at least 8 pixels, got {size}x{height}")
    cx, cy, side = _layout(spec, rng)
    sw, sh = size * _SUPERSAMPLE, height * _SUPERSAMPLE
    side_x, side_y = side * (min(size, height) / size), side * (min(size, height) / height)  # = side when square
    im = Image.new("RGB", (sw, sh), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(im)
    colour = COLORS[spec.color]
    # PIL coordinates are pixel corners at 4x; the box is [x0, x1) so subtract one pixel.
    x0, x1 = (cx - side_x / 2) * sw, (cx + side_x / 2) * sw - 1
    if spec.shape == "triangle":
        top = (cy - side_y * 2 / 3) * sh  # apex; the centroid is 2/3 of the height below it
        bottom = top + side_y * sh - 1
        draw.polygon([(x0, bottom), (x1, bottom), ((x0 + x1) / 2, top)], fill=colour)
    else:
        y0, y1 = (cy - side_y / 2) * sh, (cy + side_y / 2) * sh - 1
        if spec.shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        else:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
    return im.resize((size, height), Image.Resampling.BOX)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)  # PIL writes no timestamps: deterministic
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def rephrase(spec: ShapeSpec) -> str:
    """A second caption of `spec` in other words, e.g. "small red circle, top left, white background"."""
    return f"{spec.size} {spec.color} {spec.shape}, {spec.position}, {spec.background} background"


def make_sample(index: int, image_size: int, seed: int, max_aspect: float = 1.0, captions: int = 1,
                metadata: bool = False) -> tuple[str, dict[str, bytes]]:
    """Sample `index` of the dataset with `seed`: (key, {"json", "png", "txt": bytes})."""
    rng = np.random.default_rng([seed, index])
    spec = sample_spec(rng)
    width = height = image_size
    if max_aspect > 1:  # drawn after the jitter, so the shapes are those of the square dataset
        r = float(np.exp(rng.uniform(-np.log(max_aspect), np.log(max_aspect)))) ** 0.5
        width, height = max(8, round(image_size * r)), max(8, round(image_size / r))
    im = render(spec, width, rng, height) if max_aspect > 1 else render(spec, image_size, rng)
    key = f"{index:09d}"
    text = caption(spec)
    meta = {"key": key, "caption": text, "width": width, "height": height, "spec": asdict(spec)}
    if captions > 1:
        meta["captions"] = [text, rephrase(spec)]
    if metadata:
        k = int(rng.integers(1, 9))
        meta.update(original_width=width * k, original_height=height * k,  # 3 decimals, as in LAION's parquet
                    aesthetic=float(np.floor(rng.uniform(3, 8) * 1000) / 1000),
                    pwatermark=float(np.floor(rng.uniform(0, 1) * 1000) / 1000),
                    punsafe=float(np.floor(rng.uniform(0, 1) * 1000) / 1000))
    return key, {
        "json": json.dumps(meta, sort_keys=True).encode(),
        "png": _png_bytes(im),
        "txt": text.encode(),
    }


STAMP = "synth.json"  # beside the shards, written last: the arguments that made them
_OWN_FILE_RE = re.compile(r"^(\d{5}\.tar|synth\.json|\..+\.tmp-\d+)$")  # shards, stamp, temporary names


def _stamp(num_samples: int, samples_per_shard: int, image_size: int, seed: int, max_aspect: float = 1.0,
           captions: int = 1, metadata: bool = False) -> dict[str, object]:
    """The arguments, with the options that are on (a square dataset's stamp is unchanged)."""
    args: dict[str, object] = {"num_samples": num_samples, "samples_per_shard": samples_per_shard,
                               "image_size": image_size, "seed": seed, "version": 1}
    options = {"max_aspect": max_aspect, "captions": captions, "metadata": metadata}
    args.update({k: v for k, v in options.items() if v != {"max_aspect": 1.0, "captions": 1, "metadata": False}[k]})
    return args


def is_synth_output(out: Path) -> bool:
    """A folder an earlier synth wrote: stamped, or (killed before the stamp) only shards."""
    return (out / STAMP).is_file() or all(_OWN_FILE_RE.match(p.name) for p in out.iterdir())


def write_shards(out_dir: str | os.PathLike, num_samples: int, samples_per_shard: int, image_size: int,
                 seed: int, max_aspect: float = 1.0, captions: int = 1, metadata: bool = False) -> list[Path]:
    """Write the dataset as raw shards `out_dir/00000.tar`, ...; return their paths in order.

    Every shard is (re)written; each appears only when complete (temporary name, then
    os.replace); the stamp (STAMP) comes last. Refuses an `out_dir` that would destroy
    work (latentforge/outputs.py: a run, checkpoint or latent directory, an MLflow store, a
    non-empty folder other than an earlier synth) and a folder holding other `*.tar`
    files, which a glob over it would silently mix into the dataset.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples: must be >= 1, got {num_samples}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard: must be >= 1, got {samples_per_shard}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect: must be >= 1 (1 = square), got {max_aspect}")
    out = Path(out_dir)
    outputs.check_output_dir(out, command="data synth", metadata=STAMP, is_earlier_output=is_synth_output)
    out.mkdir(parents=True, exist_ok=True)
    num_shards = -(-num_samples // samples_per_shard)
    paths = [out / f"{i:05d}.tar" for i in range(num_shards)]
    stray = sorted(set(out.glob("*.tar")) - set(paths))
    if stray:
        raise ValueError(f"out_dir: {out} already holds other shards ({', '.join(p.name for p in stray[:3])}"
                         f"{', ...' if len(stray) > 3 else ''}); use an empty folder")
    for i, path in enumerate(paths):
        with atomic_open(path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(i * samples_per_shard, min((i + 1) * samples_per_shard, num_samples)):
                key, files = make_sample(index, image_size, seed, max_aspect, captions, metadata)
                for ext in sorted(files):
                    _add(tar, f"{key}.{ext}", files[ext])
    atomic_write(out / STAMP, json.dumps(_stamp(num_samples, samples_per_shard, image_size, seed, max_aspect, captions,
                                                metadata), sort_keys=True))
    return paths


def ensure_shards(out_dir: str | os.PathLike, num_samples: int, samples_per_shard: int, image_size: int,
                  seed: int, max_aspect: float = 1.0, captions: int = 1, metadata: bool = False) -> list[Path]:
    """The dataset's shard paths, writing them only if `out_dir` does not hold them yet.

    A stamp file (written last) records the arguments; a folder stamped with other
    arguments is a ValueError rather than a silent rewrite, since latents may already
    have been computed from it. Safe to call from several processes at once: each
    writes identical bytes under its own temporary names.
    """
    out = Path(out_dir)
    args = _stamp(num_samples, samples_per_shard, image_size, seed, max_aspect, captions, metadata)
    stamp = out / STAMP
    if stamp.exists():
        old = json.loads(stamp.read_text())
        if old != args:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {args.get(k)!r}" for k in sorted(set(old) | set(args))
                             if old.get(k) != args.get(k))
            raise ValueError(f"synth: {out} holds a synthetic dataset made with other settings ({diff}); "
                             f"remove it or use another run_root")
        paths = [out / f"{i:05d}.tar" for i in range(-(-num_samples // samples_per_shard))]
        if all(p.exists() for p in paths):
            return paths
    return write_shards(out, num_samples, samples_per_shard, image_size, seed, max_aspect, captions, metadata)


def ensure_synth(cfg: Config) -> None:
    """The embedded default dataset: synthesize it into RUN_ROOT/synth on first use when
    data.raw_shards is empty and there are no data.sources (a no-op when the shards are
    already there)."""
    if cfg.data.raw_shards or cfg.data.sources:
        return
    out = Path(cfg.run_root) / "synth"
    s = cfg.synth
    log.info(f"{s.num_samples} synthetic images in {out}")
    ensure_shards(out, s.num_samples, s.samples_per_shard, s.image_size, s.seed, s.max_aspect, s.captions, s.metadata)


def fixed_prompts(n: int, seed: int = 0) -> list[str]:
    """`n` distinct captions for sample grids. The first 6 cover every colour and every
    shape, the first 18 every (colour, shape) pair; sizes, positions and backgrounds come
    from concatenated seeded permutations, so each is balanced over any full block."""
    total = len(SHAPES) * len(COLORS) * len(SIZES) * len(POSITIONS) * len(BACKGROUNDS)
    if not 0 <= n <= total:
        raise ValueError(f"n: expected 0..{total} prompts (distinct specs), got {n}")
    rng = np.random.default_rng(seed)

    def cycle(vocab: list[str]) -> list[str]:  # n items: back-to-back permutations of vocab
        out: list[str] = []
        while len(out) < n:
            out += [vocab[j] for j in rng.permutation(len(vocab))]
        return out[:n]

    colors, shapes = cycle(list(COLORS))[:len(COLORS)], cycle(list(SHAPES))[:len(SHAPES)]
    sizes, positions, backgrounds = cycle(list(SIZES)), cycle(list(POSITIONS)), cycle(list(BACKGROUNDS))
    used: set[ShapeSpec] = set()
    out = []
    for i in range(n):
        # Colour cycles with period 6, shape with period 3 shifted by one each round of 6,
        # so every 18 prompts hold all 18 (colour, shape) pairs.
        color, shape = colors[i % len(colors)], shapes[(i + i // len(colors)) % len(shapes)]
        spec = ShapeSpec(shape, color, sizes[i], positions[i], backgrounds[i])
        if spec in used:  # rare: take a seeded free combination for this (colour, shape) pair
            free = [ShapeSpec(shape, color, z, p, b) for z in SIZES for p in POSITIONS for b in BACKGROUNDS]
            free = [f for f in free if f not in used]
            spec = free[int(rng.integers(len(free)))]
        used.add(spec)
        out.append(caption(spec))
    return out
