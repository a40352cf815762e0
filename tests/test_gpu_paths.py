"""The CUDA, NCCL and bf16 paths, checked on a CPU: the rank -> GPU mapping from SLURM
environments (and what DeepSpeed then reads as its device), the precision and encoder
dtype decisions, the DeepSpeed config under bf16, the fused-AdamW step counter after a
universal load, pooled conditioning through the engine wrapper, batched held-out loss,
the eval copy of the U-Net released after each eval, and the other ranks' file poll while
rank 0 converts a universal checkpoint.

GPUs are faked by monkeypatching torch.cuda's device queries: every decision here is made
from them (latentforge/dist.py), and none needs a kernel to run.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import types
import weakref
from pathlib import Path

import pytest
import torch
from conftest import LAUNCH_NAMES

from latentforge import dist
from latentforge import env as lfenv
from latentforge.config import AbortError, ConfigError, resolve


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch):
    """fake_gpus(count, bf16=True): torch.cuda answers as on a node where this process sees
    `count` GPUs, with (A100/H100) or without (V100/T4) native bf16."""

    def make(count: int, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name",
                            lambda device=None: "NVIDIA H100 80GB HBM3" if bf16 else "Tesla V100-SXM2-32GB")

    return make


def _slurm_task(mp: pytest.MonkeyPatch, *, localid: int, tasks_per_node: int, nodes: int = 2, node: int = 1,
                visible: str | None) -> None:
    """The environment srun gives task `localid` of node `node`, then the launcher's export."""
    for name in LAUNCH_NAMES:
        mp.delenv(name, raising=False)  # a previous task's export (the same test process)
    values = dict(SLURM_PROCID=node * tasks_per_node + localid, SLURM_LOCALID=localid, SLURM_NODEID=node,
                  SLURM_NTASKS=nodes * tasks_per_node, SLURM_TASKS_PER_NODE=f"{tasks_per_node}(x{nodes})",
                  SLURM_STEP_ID=0, SLURM_JOB_ID=4242, SLURM_JOB_NODELIST=f"gpu[01-0{nodes}]",
                  MASTER_ADDR="gpu01")
    for k, v in values.items():
        mp.setenv(k, str(v))
    if visible is not None:
        mp.setenv("CUDA_VISIBLE_DEVICES", visible)
    lfenv.apply(lfenv.discover())  # what `latentforge train` does first


# ---------------------------------------------------------------------------------------
# Rank -> GPU.


def test_per_task_gpu_binding_gives_every_task_its_only_gpu(clean_env, fake_gpus) -> None:
    # srun --gpus-per-task=1 (or --gpu-bind=single:1): task 5 of 8 sees one GPU, its own.
    _slurm_task(clean_env, localid=5, tasks_per_node=8, visible="5")
    fake_gpus(1)
    assert dist.local_rank() == 5 and dist.device() == torch.device("cuda", 0)


def test_eight_tasks_per_node_seeing_eight_gpus_take_gpu_local_rank(clean_env, fake_gpus) -> None:
    for localid in (0, 5, 7):
        _slurm_task(clean_env, localid=localid, tasks_per_node=8, visible="0,1,2,3,4,5,6,7")
        fake_gpus(8)
        assert dist.device() == torch.device("cuda", localid)


@pytest.mark.parametrize("tasks, gpus, visible", [(8, 4, "0,1,2,3"), (8, 1, None), (4, 2, None)])
def test_more_ranks_than_gpus_is_one_error_naming_both_counts(clean_env, fake_gpus, tasks, gpus, visible) -> None:
    # (8, 1, None): 8 ranks on a one-GPU machine with no binding (torchrun --nproc-per-node 8).
    _slurm_task(clean_env, localid=1, tasks_per_node=tasks, visible=visible)
    fake_gpus(gpus)
    with pytest.raises(ValueError, match=rf"^{tasks} ranks on this node but {gpus} visible GPU"):
        dist.device()


def test_cuda_ordinal_rules() -> None:
    assert dist.cuda_ordinal(3, 8, 1, "3") == 0  # bound to one GPU
    assert dist.cuda_ordinal(0, 1, 1, None) == 0  # one rank, one GPU
    assert dist.cuda_ordinal(3, 4, 8, None) == 3  # fewer ranks than GPUs: GPU local_rank
    assert dist.cuda_ordinal(2, None, 4, None) == 2  # local world size unknown: local_rank must fit
    with pytest.raises(ValueError, match="5 ranks on this node but 4 visible"):
        dist.cuda_ordinal(4, None, 4, None)
    with pytest.raises(ValueError, match="no GPU is visible"):
        dist.cuda_ordinal(0, 1, 0, "")


def test_deepspeed_reads_the_chosen_gpu_as_its_local_rank(clean_env, fake_gpus) -> None:
    """DeepSpeed 0.19.8 takes os.environ["LOCAL_RANK"] as the CUDA ordinal in
    deepspeed.initialize (set_device), init_process_group (device_id) and ZeRO-3 (Init):
    after bind_device_env, the value it reads is our ordinal and the launcher's local rank
    stays available to latentforge."""
    clean_env.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.utils import get_local_rank_from_launcher
    from deepspeed.runtime.engine import DeepSpeedEngine

    from latentforge.training.engine import bind_device_env

    _slurm_task(clean_env, localid=6, tasks_per_node=8, visible="6")
    fake_gpus(1)
    bind_device_env()
    assert os.environ["LOCAL_RANK"] == "0" and dist.local_rank() == 6
    assert dist.device() == torch.device("cuda", 0)  # unchanged by the rewrite
    seen = types.SimpleNamespace()
    DeepSpeedEngine._configure_with_arguments(seen, None, None)  # the engine's own reading
    assert seen.local_rank == 0 and get_local_rank_from_launcher() == 0
    bind_device_env()  # idempotent: a second call keeps the launcher's value
    assert os.environ["LOCAL_RANK"] == "0" and dist.local_rank() == 6

    _slurm_task(clean_env, localid=6, tasks_per_node=8, visible="0,1,2,3,4,5,6,7")
    fake_gpus(8)
    bind_device_env()
    assert os.environ["LOCAL_RANK"] == "6" and dist.device() == torch.device("cuda", 6)


def test_deepspeed_never_gets_an_ordinal_past_the_visible_gpus(clean_env, fake_gpus) -> None:
    from latentforge.training.engine import bind_device_env

    _slurm_task(clean_env, localid=6, tasks_per_node=8, visible="0,1,2,3")
    fake_gpus(4)
    with pytest.raises(ValueError, match="8 ranks on this node but 4 visible GPU"):
        bind_device_env()
    assert os.environ["LOCAL_RANK"] == "6"  # nothing half-done


# ---------------------------------------------------------------------------------------
# Precision and encoder dtypes.


def test_auto_precision_and_encoder_dtype_follow_the_hardware(clean_env, fake_gpus) -> None:
    assert dist.train_precision("auto") == "fp32" and dist.compute_dtype("auto") == "fp32"  # this CPU
    assert dist.compute_dtype("auto", "cuda") == "fp32"  # no CUDA here: nothing claims bf16
    fake_gpus(1, bf16=True)
    assert dist.train_precision("auto") == "bf16" and dist.compute_dtype("auto") == "bf16"
    fake_gpus(1, bf16=False)  # V100, T4: fp16 tensor cores, no native bf16
    assert dist.train_precision("auto") == "fp16" and dist.compute_dtype("auto") == "fp32"
    with pytest.raises(ConfigError, match="^train.precision: bf16 needs a GPU with native bf16.*V100"):
        dist.train_precision("bf16")
    assert dist.train_precision("fp16") == "fp16" and dist.compute_dtype("fp16") == "fp16"


def test_codec_and_text_resolve_auto_through_dist(clean_env, fake_gpus) -> None:
    from latentforge.data.codecs import resolve_dtype_name

    assert resolve_dtype_name("auto", "cpu", "codec.dtype") == "fp32"
    fake_gpus(1, bf16=True)
    assert resolve_dtype_name("auto", "cuda", "codec.dtype") == "bf16"
    fake_gpus(1, bf16=False)
    assert resolve_dtype_name("auto", "cuda", "text.dtype") == "fp32"
    with pytest.raises(ValueError, match="codec.dtype: expected auto, fp32, bf16 or fp16"):
        resolve_dtype_name("fp8", "cpu", "codec.dtype")


def test_ds_config_under_auto_precision_on_fake_gpus(clean_env, fake_gpus) -> None:
    from latentforge.training.engine import ds_config

    cfg = resolve("tiny", None, ["train.zero_stage=2"])
    fake_gpus(1, bf16=False)
    c = ds_config(cfg, 1)
    assert c["fp16"]["enabled"] and not c["bf16"]["enabled"] and c["communication_data_type"] == "fp32"
    fake_gpus(1, bf16=True)
    c = ds_config(cfg, 1)
    assert c["bf16"]["enabled"] and not c["fp16"]["enabled"]
    assert c["data_types"] == {"grad_accum_dtype": "fp32"} and c["communication_data_type"] == "fp32"


@pytest.mark.parametrize("stage, extra, accum_fp32", [
    (3, [], True), (2, [], True), (1, ["train.offload_optimizer=true"], True), (1, [], False), (0, [], False)])
def test_bf16_ds_config_reduces_in_fp32_and_accumulates_in_fp32_where_deepspeed_can(stage, extra,
                                                                                    accum_fp32) -> None:
    """The keys, checked against DeepSpeed 0.19.8's own config parser."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from latentforge.training.engine import ds_config

    c = ds_config(resolve("tiny", None, ["train.precision=bf16", f"train.zero_stage={stage}", *extra]), 1)
    assert c["communication_data_type"] == "fp32"
    assert ("data_types" in c) == accum_fp32
    parsed = DeepSpeedConfig(c)
    assert parsed.communication_data_type == torch.float32
    assert parsed.grad_accum_dtype == ("fp32" if accum_fp32 else None)
    fp32 = ds_config(resolve("tiny", None, ["train.precision=fp32", f"train.zero_stage={stage}", *extra]), 1)
    assert "communication_data_type" not in fp32 and "data_types" not in fp32  # fp32 runs unchanged


def test_bf16_accumulation_that_would_stay_in_bf16_is_refused() -> None:
    from latentforge.training.engine import ds_config

    for stage in (0, 1):
        cfg = resolve("tiny", None, ["train.precision=bf16", f"train.zero_stage={stage}",
                                     "train.global_batch_size=64", "train.micro_batch_size=8"])
        with pytest.raises(ConfigError, match=f"^train.zero_stage: bf16 with gradient accumulation .* stage {stage}"):
            ds_config(cfg, 2)


def test_autocast_is_the_training_precision_on_gpus_and_nothing_on_cpus(clean_env, fake_gpus) -> None:
    import contextlib

    assert isinstance(dist.autocast("bf16"), contextlib.nullcontext)  # CPU: fp32 eval stays bitwise
    fake_gpus(1, bf16=True)
    for precision, dtype in (("bf16", torch.bfloat16), ("auto", torch.bfloat16), ("fp16", torch.float16)):
        ctx = dist.autocast(precision)
        assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == dtype
    assert isinstance(dist.autocast("fp32"), contextlib.nullcontext)
    fake_gpus(1, bf16=False)  # a bf16-trained run evaluated on a V100
    assert dist.autocast("bf16").fast_dtype == torch.float16


# ---------------------------------------------------------------------------------------
# Engine details that need no DeepSpeed start-up.


def test_fused_adamw_step_counters_move_to_their_parameters() -> None:
    from latentforge.training.engine import place_optimizer_steps

    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    fused = torch.optim.AdamW([a], fused=True)
    plain = torch.optim.AdamW([b])
    fused.state[a].update(step=7, exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3))  # as a universal load leaves it
    plain.state[b]["step"] = torch.tensor(7.0, dtype=torch.float64)
    place_optimizer_steps(fused)
    place_optimizer_steps(plain)
    step = fused.state[a]["step"]
    assert torch.is_tensor(step) and step.dtype == torch.float32 and step.device == a.device and float(step) == 7
    assert plain.state[b]["step"].dtype == torch.float64  # only fused/capturable groups care
    a.grad = torch.ones(3)
    fused.step()  # the fused kernel takes it
    assert float(fused.state[a]["step"]) == 8


def _tiny_unet(pooled: bool):
    from latentforge.training.unet import build_unet

    cfg = resolve("tiny", None, [f"model.pooled_text_conditioning={str(pooled).lower()}"]).model
    torch.manual_seed(0)
    return build_unet(cfg, latent_channels=4, latent_size=8, text_dim=16, pooled_dim=8)


def test_pooled_conditioning_is_decided_by_the_unet_under_any_wrapper() -> None:
    from latentforge.training.unet import takes_pooled, unet_forward

    unet = _tiny_unet(pooled=True)
    wrapper = types.SimpleNamespace(module=types.SimpleNamespace(module=unet))  # Engine -> DeepSpeedEngine -> U-Net
    assert takes_pooled(unet) and takes_pooled(wrapper) and not takes_pooled(_tiny_unet(pooled=False))
    with pytest.raises(TypeError, match="neither a diffusers U-Net nor a wrapper"):
        takes_pooled(types.SimpleNamespace())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    cond = {"text": torch.randn(2, 5, 16), "pooled": torch.randn(2, 8)}
    other = {**cond, "pooled": torch.randn(2, 8)}
    with torch.no_grad():
        assert not torch.equal(unet_forward(unet, x, t, cond), unet_forward(unet, x, t, other))


def test_heldout_loss_in_batches_equals_one_pass() -> None:
    from latentforge.training.diffusion import Schedule, heldout_loss
    from latentforge.training.unet import unet_forward

    cfg = resolve("tiny", None, ["diffusion.prediction=eps", "diffusion.zero_terminal_snr=false"])
    schedule = Schedule.from_config(cfg.diffusion)
    unet = _tiny_unet(pooled=True).eval()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(7, 4, 8, 8, generator=g)
    cond = {"text": torch.randn(7, 5, 16, generator=g), "pooled": torch.randn(7, 8, generator=g)}

    def run(batch_size):
        return heldout_loss(lambda x, t, c: unet_forward(unet, x, t, c), x0, cond, cfg.diffusion, schedule, 3,
                            torch.Generator().manual_seed(1), batch_size=batch_size)

    whole = run(None)
    for bs in (1, 3, 7, 64):
        # fp32 forward passes of other batch shapes may differ by a few ulps per layer.
        assert run(bs) == pytest.approx(whole, rel=1e-5), bs
    with pytest.raises(ValueError, match="eval.heldout_batch_size"):
        run(0)
    with pytest.raises(ConfigError, match="eval.heldout_batch_size"):
        resolve("tiny", None, ["eval.heldout_batch_size=0"])


# ---------------------------------------------------------------------------------------
# The wait while rank 0 converts a universal checkpoint.


def test_waiting_ranks_follow_rank0s_heartbeat_and_stop_when_it_stops(tmp_path: Path) -> None:
    from latentforge.training.checkpoint import Heartbeat, wait_for_main

    beat = tmp_path / ".heartbeat"

    def rank0() -> None:  # busy 4x as long as the waiters' timeout, beating every 0.05 s
        with Heartbeat(beat, "converting", beat_s=0.05):
            time.sleep(0.8)

    t = threading.Thread(target=rank0)
    t.start()
    wait_for_main(beat, timeout_s=0.2, what="converting", poll_s=0.02)
    t.join()
    assert beat.read_text() == "done"
    beat.write_text("17")  # rank 0 beat once, then died
    t0 = time.monotonic()
    with pytest.raises(AbortError, match="rank 0 showed no progress converting for 0 s"):
        wait_for_main(beat, timeout_s=0.3, what="converting", poll_s=0.02)
    assert time.monotonic() - t0 >= 0.3


_CONVERT_RANK = """
import datetime, os, sys, time
from pathlib import Path
import torch.distributed as tdist
from latentforge.training import checkpoint as ck

tdist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))  # the collective timeout
run_dir = Path(sys.argv[1])
def slow_conversion(run_dir, tag, hashes=True):  # 3x the collective timeout
    time.sleep(6)
    (ck.ckpt_dir(run_dir) / ck.universal_tag(tag)).mkdir(parents=True)
ck.make_universal = slow_conversion
ck.check = lambda folder, hashes: type("Status", (), {"ok": True, "problems": []})()  # a sound source
plan = ck.ResumePlan("step_00000004", "step_00000004_universal", True, "world size 2 -> 1")
print("problems", ck._convert(run_dir, plan, hashes=False, timeout_s=2.0))
tdist.barrier()  # the process group survived the wait
tdist.destroy_process_group()
"""


def test_a_conversion_longer_than_the_collective_timeout_is_waited_for(tmp_path: Path) -> None:
    """Two gloo ranks whose collectives time out after 2 s; rank 0's conversion takes 6 s.
    The other rank waits on the heartbeat file, not in the broadcast, and both go on."""
    import socket
    import subprocess
    import sys

    (tmp_path / "checkpoints").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_NAMES}
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT_RANK, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env=dict(base, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)))
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "problems []" in out, out[-3000:]
    assert (tmp_path / "checkpoints" / "step_00000004_universal").is_dir()
    assert not (tmp_path / "checkpoints" / ".universal_heartbeat").exists()


# ---------------------------------------------------------------------------------------
# Evaluation does not keep its fp32 copy of the U-Net.


def test_periodic_eval_releases_its_copy_of_the_unet(tiny_data, monkeypatch) -> None:
    from latentforge.data.encoders import build_encoders
    from latentforge.eval import evaluate as ev
    from latentforge.training.diffusion import Schedule
    from latentforge.training.ema import EMA
    from latentforge.training.loop import build_model, open_latents
    from latentforge.training.tracking import Tracker

    root, overrides = tiny_data
    cfg = resolve("tiny", None, [*overrides, "eval.heldout_batch_size=5", "eval.clip_score=false"])
    encoders = build_encoders(cfg, "cpu")
    latents = open_latents(cfg, encoders)
    unet = build_model(cfg, latents.shapes)
    ema = EMA(dict(unet.named_parameters()), cfg.ema)
    evaluator = ev.Evaluator(cfg, encoders, latents.shapes, latents.heldout_parts, latents.null_text,
                             root / "evalcopy", Schedule.from_config(cfg.diffusion))
    built: list[weakref.ref] = []
    real_build = ev.build_unet

    def build_and_watch(*args, **kwargs):
        model = real_build(*args, **kwargs)
        built.append(weakref.ref(model))
        return model

    monkeypatch.setattr(ev, "build_unet", build_and_watch)
    tracker = Tracker(uri="", experiment="x", enabled=False)
    tracker.start()
    for step in (1, 2):
        metrics = evaluator.run(None, ema, step, tracker)
        assert any(k.startswith("eval/loss_t") for k in metrics)
        gc.collect()
        assert len(built) == step and all(ref() is None for ref in built)  # nothing held between evals
    tracker.finish("FINISHED")


# ---------------------------------------------------------------------------------------
# End to end on the CPU: latents whose "auto" dtypes a GPU resolved, pooled conditioning,
# and the EMA of the fp32 master weights under bf16.


@pytest.fixture(scope="module")
def gpu_made_latents(tiny_data, tmp_path_factory):
    """(overrides, latent_dir): tiny_data's raw shards precomputed as on a GPU with native
    bf16, where `text.dtype: auto` resolves to bf16 (faked: only the resolution is)."""
    from latentforge.data import precompute

    root, overrides = tiny_data
    latent_dir = tmp_path_factory.mktemp("gpu_latents") / "latents"
    overrides = [*overrides, f"data.latent_dir={latent_dir}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist, "compute_dtype", lambda requested, dev=None: "bf16" if requested == "auto" else requested)
        precompute.run(resolve("tiny", None, overrides))
    return overrides, latent_dir


def test_latents_whose_auto_dtype_a_gpu_resolved_are_accepted_on_a_cpu(gpu_made_latents) -> None:
    from latentforge.data import latents as lat
    from latentforge.data import precompute
    from latentforge.data.encoders import build_encoders
    from latentforge.training.loop import open_latents

    overrides, latent_dir = gpu_made_latents
    recorded = lat.load_manifest(latent_dir)["identity"]
    assert recorded["text"]["dtype"] == "bf16" and recorded["codec"]["dtype"] == "fp32"  # pixel codec: exact fp32

    cfg = resolve("tiny", None, overrides)  # text.dtype: auto, on this CPU
    encoders = build_encoders(cfg, "cpu")
    assert encoders.text.identity()["dtype"] == "fp32"  # this device's own choice for prompts
    assert open_latents(cfg, encoders).identity == recorded  # the trainer's check passes
    assert open_latents(resolve("tiny", None, [*overrides, "text.dtype=bf16"]),
                        build_encoders(resolve("tiny", None, [*overrides, "text.dtype=bf16"]), "cpu"))
    explicit = resolve("tiny", None, [*overrides, "text.dtype=fp32"])
    with pytest.raises(ValueError, match=r"text\.dtype: latents have 'bf16', config gives 'fp32'") as e:
        open_latents(explicit, build_encoders(explicit, "cpu"))
    assert "\n" not in str(e.value)

    # Resolved once: a CPU precompute that continues the dataset encodes in the recorded bf16.
    done = sorted((latent_dir / lat.SHARDS).glob("*.json"))
    before = {p.name: p.read_bytes() for p in sorted((latent_dir / lat.SHARDS).iterdir())}
    done[0].unlink()
    precompute.run(cfg)
    assert {p.name: p.read_bytes() for p in sorted((latent_dir / lat.SHARDS).iterdir())} == before
    assert lat.load_manifest(latent_dir)["identity"] == recorded


@pytest.mark.slow
def test_pooled_text_conditioning_trains_on_them_and_its_export_samples(gpu_made_latents, tmp_path) -> None:
    import subprocess
    import sys

    from PIL import Image

    from latentforge.launch.cli import main

    overrides, _ = gpu_made_latents
    run_dir = tmp_path / "pooled"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_NAMES}
    proc = subprocess.run([sys.executable, "-m", "latentforge.launch.cli", "train", "--preset", "tiny", *overrides,
                           f"run_dir={run_dir}", "nproc=1", "model.pooled_text_conditioning=true",
                           "train.max_steps=4", "train.log_every=2", "train.ckpt_every_steps=4",
                           "tracking.enabled=false"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    losses = [float(v) for v in __import__("re").findall(r"\[train\] step \d+/4 loss (\S+)", proc.stdout)]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)

    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(out / "unet_ema", local_files_only=True)
    assert unet.config.class_embed_type == "projection"
    png = tmp_path / "sample.png"
    assert main(["sample", "--model", str(out), "--prompt", "a large red circle in the center on a white background",
                 "--n", "1", "--steps", "2", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 0


def _bf16_master_run(train_run, stage: int):
    return train_run(f"bf16-ema-z{stage}", "train.precision=bf16", f"train.zero_stage={stage}", "ema.decay=0",
                     "train.max_steps=3", "train.log_every=3", "train.ckpt_every_steps=3", "optim.lr=1e-2", nproc=2)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_bf16_ema_averages_the_fp32_master_weights(train_run, stage: int) -> None:
    """Two gloo ranks in bf16 on the CPU. With decay 0 the EMA after an update is exactly
    what it averages: it must equal the optimizer's fp32 master weights (DeepSpeed's
    zero_to_fp32 reads them from the optimizer shards), and not their bf16 copies in the
    module."""
    import json

    from latentforge.training import checkpoint
    from latentforge.training.engine import consolidated_state_dict

    run_dir, log = _bf16_master_run(train_run, stage)
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] and ds["communication_data_type"] == "fp32"
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    tag = checkpoint.latest_tag(run_dir)
    master = consolidated_state_dict(checkpoint.ckpt_dir(run_dir), tag)
    ema = checkpoint.client_state(run_dir, tag).ema
    assert ema["updates"] == 3 and set(ema["shadow"]) == set(master)
    for name, w in master.items():
        assert torch.equal(ema["shadow"][name], w), name
    states = sorted((checkpoint.ckpt_dir(run_dir) / tag).glob("*model_states.pt"))[0]
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    low = {k: v for k, v in module.items() if k in master}
    if stage == 3:  # ZeRO-3's module states hold no whole weights; its bf16 weights are the master rounded
        low = {k: w.bfloat16() for k, w in master.items()}
    assert all(v.dtype == torch.bfloat16 for v in low.values())
    differ = sum(not torch.equal(ema["shadow"][k], low[k].float()) for k in master)
    assert differ > len(master) // 2  # bf16 rounding would have been averaged in


def test_gpu_check_dry_run_parses_and_lists_its_steps_without_a_gpu() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_NAMES}
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gpu_check.py"), "--dry-run"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for step in ("precompute", "train-z2", "train-z3", "cpu-2rank", "resume-gpu", "eval", "export"):
        assert f" {step} " in proc.stdout, step
    assert "dry run OK" in proc.stdout
    proc = subprocess.run([sys.executable, str(root / "scripts" / "gpu_check.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    if not torch.cuda.is_available():  # without a GPU the real check refuses in one line
        assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr and len(proc.stderr.splitlines()) == 1
