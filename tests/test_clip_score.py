"""CLIP score: a tiny open_clip CLIP built here, saved with open_clip's own save pieces,
loaded back through load_clip_scorer and checked against a direct computation."""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from latentforge.eval import clip_score as cs

PROMPTS = ["a red circle", "a blue square on white", "two green triangles", "a photo of a cat",
           "noise", "a yellow star", "an orange ring", "black and white stripes"]


def _tiny_model() -> torch.nn.Module:
    import open_clip

    torch.manual_seed(0)
    from open_clip.transform import PreprocessCfg

    model = open_clip.CLIP(**copy.deepcopy(cs.TINY_CLIP_CONFIG)).eval()
    # As open_clip.create_model does: record the preprocessing (save_config_for_hf reads it).
    open_clip.set_model_preprocess_cfg(model, {**dataclasses.asdict(PreprocessCfg()), "size": 32})
    return model


def _images(n: int = 8, size: int = 40) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (n, 3, size, size + 8), generator=g, dtype=torch.uint8)  # not square
    imgs[: n // 2] //= 3
    return imgs


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model saved twice: as an open_clip HF-style folder (config JSON written by
    open_clip's save_config_for_hf + weights under open_clip's file name) and as a plain
    state-dict file, as open_clip training writes weights."""
    from open_clip.constants import HF_WEIGHTS_NAME
    from open_clip.push_to_hf_hub import save_config_for_hf

    root = tmp_path_factory.mktemp("clip")
    model = _tiny_model()
    folder = root / "tiny_clip"
    folder.mkdir()
    # save_for_hf would also call tokenizer.save_pretrained, which only HF tokenizers have;
    # these are the two other things it writes.
    save_config_for_hf(model, folder / "open_clip_config.json", model_config=copy.deepcopy(cs.TINY_CLIP_CONFIG))
    torch.save(model.state_dict(), folder / HF_WEIGHTS_NAME)
    ckpt = root / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, ckpt)
    return {"model": model, "folder": folder, "ckpt": ckpt}


def _direct_scores(model: torch.nn.Module, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Independent of ClipScorer: open_clip's transform and tokenizer, encode, normalise, cos."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    tf = image_transform_v2(PreprocessCfg(size=32), is_train=False)
    pix = torch.stack([tf(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    with torch.no_grad():
        img = model.encode_image(pix)
        txt = model.encode_text(open_clip.tokenize(prompts, context_length=77))
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1)


@pytest.mark.parametrize("how", ["local-dir", "file"])
def test_score_matches_direct_computation(saved: dict, how: str) -> None:
    pretrained = f"local-dir:{saved['folder']}" if how == "local-dir" else str(saved["ckpt"])
    scorer = cs.load_clip_scorer("tiny", pretrained, "cpu")
    assert not scorer.is_random and scorer.metric_name == "eval/clip_score"
    images = _images()
    cos = _direct_scores(saved["model"], images, PROMPTS)
    assert (cos > 0).any() and (cos < 0).any()  # the clamp is exercised on both sides
    got = scorer.score(images, PROMPTS)
    assert got.shape == (8,)
    # The same fp32 ops on the same batch, loaded independently: cosines a few ulps (1e-7)
    # apart at most, times 100.
    torch.testing.assert_close(got, 100 * cos.clamp(min=0), rtol=0, atol=1e-5)


def test_pil_and_tensor_inputs_agree_and_clip_score_is_the_mean(saved: dict) -> None:
    from PIL import Image

    scorer = cs.load_clip_scorer("tiny", f"local-dir:{saved['folder']}", "cpu")
    images = _images()
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    per_pair = scorer.score(images, PROMPTS)
    # Tensors become PIL images first: identical pixels, identical ops, so bitwise in practice.
    torch.testing.assert_close(scorer.score(pil, PROMPTS), per_pair, rtol=0, atol=1e-6)
    # Batches of 3 instead of 8 (other kernel blocking): scores of ~10-100 a few fp32 ulps
    # apart, then a mean in fp64: 1e-5 absolute.
    assert cs.clip_score(scorer, images, PROMPTS, batch_size=3) == pytest.approx(float(per_pair.double().mean()),
                                                                                 abs=1e-5)
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images, PROMPTS[:3])
    with pytest.raises(ValueError, match="images"):
        scorer.score(images.float(), PROMPTS)


def test_missing_weights_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "open_clip_pytorch_model.bin"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        cs.load_clip_scorer("ViT-B-32", str(missing), "cpu")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nodir")):
        cs.load_clip_scorer("tiny", f"local-dir:{tmp_path / 'nodir'}", "cpu")
    # A pretrained tag is not a local file: refused, never downloaded.
    with pytest.raises(FileNotFoundError, match="laion2b_s34b_b79k"):
        cs.load_clip_scorer("ViT-B-32", "laion2b_s34b_b79k", "cpu")


def test_local_dir_without_weights_is_refused(saved: dict, tmp_path: Path) -> None:
    folder = tmp_path / "config_only"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((saved["folder"] / "open_clip_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        cs.load_clip_scorer("tiny", f"local-dir:{folder}", "cpu")


def test_random_init_is_marked_and_seeded() -> None:
    a = cs.load_clip_scorer("tiny", None, "cpu", random_init_seed=3)
    assert a.is_random and a.metric_name == "eval/clip_score_randinit"
    b = cs.load_clip_scorer("tiny", "", "cpu", random_init_seed=3)
    c = cs.load_clip_scorer("tiny", None, "cpu", random_init_seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    with pytest.raises(ValueError, match="arch"):
        cs.load_clip_scorer("no-such-arch", None, "cpu")


_RANK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    from latentforge import dist
    from latentforge.eval import clip_score as cs

    folder, out = sys.argv[1], sys.argv[2]
    dist.init(timeout_s=60)
    r = dist.rank()
    data = torch.load(sys.argv[3])
    images, prompts = data["images"], data["prompts"]
    scorer = cs.load_clip_scorer("tiny", "local-dir:" + folder, "cpu")
    # Uneven shards (1 pair on rank 0, the rest on rank 1): a mean of per-rank means
    # would differ from the mean over all pairs.
    lo, hi = (0, 1) if r == 0 else (1, len(prompts))
    value = cs.clip_score(scorer, images[lo:hi], prompts[lo:hi])
    torch.save({"value": value}, f"{out}/rank{r}.pt")
    dist.destroy()
""")


def _run_two_ranks(script: Path, *args: str) -> list[str]:
    """Run `script args` as ranks 0 and 1 of a gloo group on loopback; every rank must exit
    0. Returns each rank's output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(2):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "CUDA_VISIBLE_DEVICES": "",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
        outs.append(out)
    return outs


_EXIT_SCRIPT = textwrap.dedent("""
    import os
    import sys
    import torch

    def threads():
        return len(os.listdir("/proc/self/task"))

    if sys.argv[1] == "trainer":
        from latentforge.training import engine
        engine._deepspeed()  # its import starts a thread of its own (jemalloc's)
        before = threads()
        engine.init_distributed(60)
    else:
        from latentforge import dist
        before = threads()
        dist.init(timeout_s=60)
    from latentforge import dist
    import open_clip  # after init, as periodic eval and stand-alone eval import it
    t = torch.ones(2, dtype=torch.float64)
    dist.all_reduce_sum(t)
    dist.destroy()
    print("threads", before, threads())
""")


@pytest.mark.parametrize("join", ["dist", "trainer"])
def test_a_job_importing_open_clip_after_init_leaves_no_process_group_alive(join: str, tmp_path: Path) -> None:
    """open_clip imports torch.distributed.nn, whose functions take group.WORLD as a default
    argument. Imported after init, they kept the group (and its gloo threads) alive past
    destroy(), and a worker thread releasing the last collective's tensors during interpreter
    shutdown aborted a finished job now and then (SIGABRT, "terminate called without an
    active exception"). After destroy() every thread the group started is gone."""
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    for out in _run_two_ranks(script, join):
        counts = [line.split()[1:] for line in out.splitlines() if line.startswith("threads ")]
        assert counts, out
        before, after = map(int, counts[-1])
        assert after == before, out


def test_two_ranks_average_over_all_pairs(saved: dict, tmp_path: Path) -> None:
    images = _images(6)
    prompts = PROMPTS[:6]
    torch.save({"images": images, "prompts": prompts}, tmp_path / "data.pt")
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    _run_two_ranks(script, str(saved["folder"]), str(tmp_path), str(tmp_path / "data.pt"))
    want = float((100 * _direct_scores(saved["model"], images, prompts).clamp(min=0)).double().mean())
    for r in range(2):
        # Pairs split over 2 ranks (other batches), fp64 sum and count reduced: as above.
        assert torch.load(tmp_path / f"rank{r}.pt")["value"] == pytest.approx(want, abs=1e-5)
