"""open_clip text encoder: a tiny real open_clip CLIP saved with open_clip's own formats."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from latentforge.config import TextConfig
from latentforge.data.text import (
    TINY_CONFIG,
    TINY_OPEN_CLIP_NAME,
    TextWeightsNotFound,
    build_text_encoder,
    register_tiny,
)

CAPTIONS = ["a photo of a cat", "", "a red cube on a blue sphere, studio lighting"]
EOT = 49407  # the CLIP BPE's <end_of_text>


class _BuiltinTokenizer:
    """save_for_hf calls tokenizer.save_pretrained(dir); the tiny config uses open_clip's
    built-in BPE (SimpleTokenizer, no files to save), so there is nothing to write."""

    def save_pretrained(self, dest: str) -> None:
        pass


# Our encoder and open_clip's own forward run the same fp32 ops, but not always with the
# same kernels (batching, fused attention, AVX2 vs AVX-512 vs ATEN_CPU_CAPABILITY=default
# reorder the sums). Through 3 pre-LN blocks of width 64 each sum of ~64 terms can differ
# by ~sqrt(64) eps relative, compounding per block: ~3 * 8 * 1.2e-7 = 3e-6 of values of
# order 1, so 1e-5 absolute and relative leaves a 3x margin and still catches any real
# difference (a wrong layer differs by ~1e-1).
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}

def _tiny_clip(seed: int):
    import open_clip

    register_tiny()
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_OPEN_CLIP_NAME).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same tiny weights as an open_clip_train checkpoint file and a save_for_hf directory."""
    from open_clip.push_to_hf_hub import save_for_hf

    root = tmp_path_factory.mktemp("clip")
    model = _tiny_clip(seed=123)
    # open_clip_train (src/open_clip_train/main.py) writes checkpoints as
    # torch.save({"epoch", "name", "state_dict": model.state_dict(), "optimizer"}, "epoch_N.pt").
    ckpt = root / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": model.state_dict()}, ckpt)
    local = root / "hf"
    save_for_hf(model, _BuiltinTokenizer(), TINY_CONFIG, local, safe_serialization=True)
    return {"model": model, "file": ckpt, "dir": local}


def _ref_tokens(model, text: torch.Tensor, layer_index: int) -> torch.Tensor:
    """ln_final(output of resblock `layer_index`), via open_clip's own forward_intermediates."""
    out = model.forward_intermediates(text=text, text_indices=[layer_index], normalize_intermediates=True,
                                      intermediates_only=True)
    return out["text_intermediates"][0]  # (N, L, D)


def test_loaded_file_matches_open_clip(saved: dict) -> None:
    import open_clip

    enc = build_text_encoder(TextConfig(model="tiny", pretrained=str(saved["file"]), layer="penultimate"))
    assert not enc.is_random and not hasattr(enc.model, "visual")  # the vision tower is dropped
    assert (enc.width, enc.pooled_dim, enc.context_length) == (64, 64, 77)
    emb = enc.encode(CAPTIONS)
    n = len(CAPTIONS)
    assert emb.tokens.shape == (n, 77, 64) and emb.tokens.dtype == torch.float32
    assert emb.pooled.shape == (n, 64) and emb.pooled.dtype == torch.float32
    assert emb.lengths.shape == (n,) and emb.lengths.dtype == torch.int64

    ref = saved["model"]
    text = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)(CAPTIONS)
    assert torch.equal(enc.tokenize(CAPTIONS), text)
    with torch.inference_mode():
        pooled = ref.encode_text(text, normalize=False)
        penult = _ref_tokens(ref, text, layer_index=1)  # 3 blocks: index 1 is the penultimate
    torch.testing.assert_close(emb.pooled, pooled, **FP32_TOL)
    torch.testing.assert_close(emb.tokens, penult, **FP32_TOL)
    # lengths count tokens up to and including EOT: "" is <start><end>.
    want = torch.tensor([int((row == EOT).nonzero()[0]) + 1 for row in text])
    assert torch.equal(emb.lengths, want) and int(emb.lengths[1]) == 2


def test_last_layer_differs_from_penultimate(saved: dict) -> None:
    import open_clip

    pen = build_text_encoder(TextConfig(model="tiny", pretrained=str(saved["file"]), layer="penultimate"))
    last = build_text_encoder(TextConfig(model="tiny", pretrained=str(saved["file"]), layer="last"))
    a, b = pen.encode(CAPTIONS), last.encode(CAPTIONS)
    assert not torch.allclose(a.tokens, b.tokens, atol=1e-3)  # another layer: differences of ~1e-1
    assert torch.equal(a.pooled, b.pooled)  # pooled is always the final layer
    text = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)(CAPTIONS)
    with torch.inference_mode():
        torch.testing.assert_close(b.tokens, _ref_tokens(saved["model"], text, layer_index=2), **FP32_TOL)
    assert pen.identity() != last.identity()


def test_local_dir_forms_match_the_file(saved: dict) -> None:
    from_file = build_text_encoder(TextConfig(model="tiny", pretrained=str(saved["file"]))).encode(CAPTIONS)
    for pretrained in (f"local-dir:{saved['dir']}", str(saved["dir"])):
        enc = build_text_encoder(TextConfig(model="tiny", pretrained=pretrained))
        assert not enc.is_random
        emb = enc.encode(CAPTIONS)
        assert torch.equal(emb.tokens, from_file.tokens) and torch.equal(emb.pooled, from_file.pooled)
        ident = enc.identity()
        weights = saved["dir"] / "open_clip_model.safetensors"
        assert ident["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert ident["arch"] == TINY_CONFIG


def test_tiny_random_init_is_seeded_and_leaves_global_rng_alone(saved: dict) -> None:
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = build_text_encoder(TextConfig(model="tiny"))
    b = build_text_encoder(TextConfig(model="tiny"))
    assert torch.equal(torch.get_rng_state(), before)
    assert a.is_random and a.identity()["weights_sha256"] == "random-init:0"
    ea, eb = a.encode(CAPTIONS), b.encode(CAPTIONS)
    assert torch.equal(ea.tokens, eb.tokens) and torch.equal(ea.pooled, eb.pooled)
    assert a.identity() == b.identity() and json.loads(json.dumps(a.identity())) == a.identity()
    loaded = build_text_encoder(TextConfig(model="tiny", pretrained=str(saved["file"]))).encode(CAPTIONS)
    assert not torch.allclose(ea.pooled, loaded.pooled)  # the checkpoint really replaced the random weights


def test_identity_hash_tracks_weights(tmp_path: Path, saved: dict) -> None:
    a = build_text_encoder(TextConfig(model="tiny", pretrained=str(saved["file"]))).identity()
    assert a["weights_sha256"] == hashlib.sha256(saved["file"].read_bytes()).hexdigest()
    assert a == build_text_encoder(TextConfig(model="tiny", pretrained=str(saved["file"]))).identity()
    other = tmp_path / "other.pt"
    torch.save({"epoch": 1, "state_dict": _tiny_clip(seed=5).state_dict()}, other)
    b = build_text_encoder(TextConfig(model="tiny", pretrained=str(other))).identity()
    assert b["weights_sha256"] != a["weights_sha256"]
    assert {**b, "weights_sha256": None} == {**a, "weights_sha256": None}  # only the hash differs
    assert a["layer"] == "penultimate" and a["dtype"] == "fp32" and a["context_length"] == 77


def test_missing_weights_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match="text.pretrained") as e:
        build_text_encoder(TextConfig(model="tiny", pretrained=str(missing)))
    assert str(missing) in str(e.value) and isinstance(e.value, TextWeightsNotFound)
    with pytest.raises(FileNotFoundError, match="nodir"):
        build_text_encoder(TextConfig(model="tiny", pretrained=f"local-dir:{tmp_path / 'nodir'}"))
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CONFIG}))
    with pytest.raises(FileNotFoundError, match="no open_clip weights"):  # open_clip alone would random-init
        build_text_encoder(TextConfig(model="tiny", pretrained=f"local-dir:{tmp_path / 'cfg_only'}"))


def test_bad_config_and_captions() -> None:
    with pytest.raises(ValueError, match="text.model"):
        build_text_encoder(TextConfig(model="No-Such-Arch"))
    with pytest.raises(ValueError, match="text.model"):
        build_text_encoder(TextConfig(model="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"))
    with pytest.raises(ValueError, match="text.layer"):
        build_text_encoder(TextConfig(layer="middle"))
    with pytest.raises(ValueError, match="text.pretrained"):
        build_text_encoder(TextConfig(pretrained="hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"))
    enc = build_text_encoder(TextConfig())
    with pytest.raises(ValueError, match="list of str"):
        enc.encode("a bare string")
    empty = enc.encode([])
    assert empty.tokens.shape == (0, 77, 64) and empty.pooled.shape == (0, 64) and empty.lengths.shape == (0,)


def test_bf16_compute_on_cpu(saved: dict) -> None:
    fp32 = build_text_encoder(TextConfig(model="tiny", pretrained=str(saved["file"]))).encode(CAPTIONS)
    enc = build_text_encoder(TextConfig(model="tiny", pretrained=str(saved["file"]), dtype="bf16"))
    assert enc.model.transformer.get_cast_dtype() == torch.bfloat16
    emb = enc.encode(CAPTIONS)
    assert emb.tokens.dtype == emb.pooled.dtype == torch.float32
    # bf16 has 8 significant bits (relative rounding 4e-3); through 3 blocks and a layer norm
    # the outputs (order 1) drift by up to a few 1e-2: rtol 0.05, atol 0.1.
    torch.testing.assert_close(emb.tokens, fp32.tokens, rtol=0.05, atol=0.1)
    torch.testing.assert_close(emb.pooled, fp32.pooled, rtol=0.05, atol=0.1)
    assert not torch.equal(emb.tokens, fp32.tokens)
    assert enc.identity()["dtype"] == "bf16"
