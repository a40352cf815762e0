"""Shape adherence: detection on renders and hand-made images, scoring true and shuffled prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.data import raw, synth
from latentforge.data.synth import ShapeSpec
from latentforge.eval import adherence


def _renders(n: int, seed: int, resolution: int = 32, source: int = 64):
    """Renders downsampled like training data: shorter side resized, centre crop."""
    rng = np.random.default_rng(seed)
    specs, images = [], []
    for _ in range(n):
        spec = synth.sample_spec(rng)
        image, _, _ = raw.resize_center_crop(synth.render(spec, source, rng), resolution)
        specs.append(spec)
        images.append(image)
    return specs, images


def test_ground_truth_renders_at_32px_score_high():
    specs, images = _renders(120, seed=0)
    s = adherence.score(images, [synth.caption(x) for x in specs])
    assert s["color"] == 1.0 and s["background"] == 1.0
    assert s["adherence"] >= 0.95 and s["exact"] >= 0.9
    assert min(s[a] for a in adherence.ATTRIBUTES) >= 0.9
    assert (s["count"], s["skipped"]) == (120.0, 0.0)


@pytest.mark.parametrize("resolution, source", [(64, 64), (32, 256)])
def test_other_resolutions(resolution, source):
    specs, images = _renders(30, seed=1, resolution=resolution, source=source)
    assert sum(adherence.detect(im) == sp for im, sp in zip(images, specs)) >= 27


def test_shuffled_prompts_score_low():
    specs, images = _renders(120, seed=2)
    prompts = [synth.caption(x) for x in specs]
    deranged = prompts[1:] + prompts[:1]  # every image gets another image's prompt
    s = adherence.score(images, deranged)
    assert s["adherence"] < 0.5 and s["exact"] < 0.05


def _canvas(bg: str, side: int = 32) -> np.ndarray:
    return np.tile(np.array(synth.BACKGROUNDS[bg], np.uint8), (side, side, 1))


def test_detect_hand_made_images():
    yy, xx = np.mgrid[0:32, 0:32] + 0.5
    # A small red disc (diameter 5 px = 0.16 of the side) in the top left.
    a = _canvas("white")
    a[(xx - 5.5) ** 2 + (yy - 5.5) ** 2 <= 2.5 ** 2] = synth.COLORS["red"]
    assert adherence.detect(a) == ShapeSpec("circle", "red", "small", "top left", "white")
    # A large blue square (11 px = 0.34 of the side) in the bottom right.
    a = _canvas("gray")
    a[19:30, 19:30] = synth.COLORS["blue"]
    assert adherence.detect(a) == ShapeSpec("square", "blue", "large", "bottom right", "gray")
    # A large yellow apex-up triangle (base = height = 11 px) in the centre.
    a = _canvas("black")
    a[(yy >= 10) & (yy <= 21) & (np.abs(xx - 16) <= (yy - 10) / 2)] = synth.COLORS["yellow"]
    assert adherence.detect(Image.fromarray(a)) == ShapeSpec("triangle", "yellow", "large", "center", "black")


def test_noise_and_speckles_are_tolerated():
    specs, images = _renders(60, seed=4)
    rng = np.random.default_rng(0)
    noisy = [np.clip(np.asarray(im) + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8) for im in images]
    assert adherence.score(noisy, [synth.caption(x) for x in specs])["adherence"] >= 0.9
    # A large green square on the left, plus stray green pixels on the right.
    a = _canvas("white")
    a[11:22, 1:12] = synth.COLORS["green"]
    a[3, 28] = a[20, 29] = a[29, 25] = synth.COLORS["green"]
    assert adherence.detect(a) == ShapeSpec("square", "green", "large", "left", "white")


def test_blank_image_has_only_a_background():
    blank = _canvas("white")
    assert adherence.detect(blank) is None
    s = adherence.score([blank], ["a small red circle in the top left on a white background"])
    assert s["background"] == 1.0 and s["shape"] == s["color"] == s["size"] == s["position"] == 0.0
    assert s["adherence"] == pytest.approx(0.2)


def test_unparsed_prompts_are_skipped_and_counted_and_tensors_work():
    specs, images = _renders(4, seed=3)
    prompts = [synth.caption(x) for x in specs]
    batch = torch.stack([raw.to_tensor(im) for im in images])  # (4, 3, 32, 32) in [-1, 1]
    s = adherence.score(batch, prompts[:3] + ["a photo of a cat"])
    assert (s["count"], s["skipped"]) == (3.0, 1.0) and s["adherence"] == 1.0
    none = adherence.score(images[:1], ["not a shapes caption"])
    assert none["count"] == 0.0 and math.isnan(none["adherence"])
    with pytest.raises(ValueError, match="images"):
        adherence.score(images, prompts[:2])


def test_diversity_tells_a_collapsed_grid_from_a_diverse_one():
    from latentforge.eval.diversity import diversity

    specs = [ShapeSpec("circle", "red", "large", "center", "white"),
             ShapeSpec("square", "blue", "small", "top left", "black")]
    a = [np.asarray(synth.render(s, 32, np.random.default_rng(0))) for s in specs]
    b = [np.asarray(synth.render(s, 32, np.random.default_rng(1))) for s in specs]  # same prompts, other draws
    collapsed = diversity(np.stack([a[0], a[0], a[1], a[1]]), [0, 0, 1, 1])
    assert collapsed["same"] == 0.0 and collapsed["diff"] > 0.1 and collapsed["ratio"] == 0.0
    diverse = diversity(np.stack([a[0], b[0], a[1], b[1]]), [0, 0, 1, 1])
    assert 0.0 < diverse["same"] < diverse["diff"] and 0.0 < diverse["ratio"] < 1.0
    with pytest.raises(ValueError, match="prompt ids"):
        diversity(np.stack(a), [0])
