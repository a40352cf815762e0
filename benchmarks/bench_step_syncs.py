"""Host syncs and collectives per steady-state training step: the trainer against a bare
DeepSpeed step.

    .venv/bin/python benchmarks/bench_step_syncs.py [--ranks 2] [--steps 24] [--zero-stage 2] [--json]

Two runs of `--ranks` local ranks each, on a tiny synthetic latent dataset (the test
suite's TINY_OVERRIDES), with a counting patch installed in every rank before anything
is built:

  bare     DeepSpeed's own step on the same engine and model: forward (the diffusion
           loss), engine.backward, engine.step, with one fixed batch. What any DeepSpeed
           training loop pays.
  trainer  latentforge's `train()`: the loader, optimizer_step, the Meter, the EMA, the
           checkpoint decision, logging every `--log-every` steps.

Steady-state steps are those that are not sync points (log, checkpoint or first steps);
the counts of each step are taken between consecutive `optimizer_step` calls, so they
include the loop's bookkeeping. "Extra" is trainer minus bare.

How a CPU run counts device syncs. On a GPU a host sync is the host reading device data
(`.item()`, `bool()`, `float()`, `.tolist()`, `.cpu()`, a device-to-host copy, an op
whose output size depends on data) or a blocking host-to-device copy (torch synchronises
the stream after it). On a CPU everything is host memory, so the patch tracks which
tensors would live on the device: the engine's parameters, gradients and optimizer state,
the EMA, every `.to(device)` result, every factory call with an explicit `device=`, every
tensor a collective touched, and (through a TorchDispatchMode) every output of an op
with such an input. A read of one of those is counted as a sync, with the first
latentforge / DeepSpeed / torch.optim frame that caused it. Collectives are counted by
wrapping torch.distributed (name and element count).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import traceback
import weakref
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from benchmarks._common import Report  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "barrier", "all_to_all_single", "all_reduce_coalesced", "all_gather_object",
               "broadcast_object_list", "reduce", "gather", "scatter", "_all_gather_base", "_reduce_scatter_base")
SYNC_OPS = ("_local_scalar_dense", "equal", "is_nonzero", "nonzero", "masked_select", "unique", "_unique",
            "_unique2", "unique_consecutive", "unique_dim")
FACTORIES = ("tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "as_tensor")


class _Tags:
    """Tensors that would live on the device, by object identity (weak)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: Any) -> None:
        if isinstance(t, torch.Tensor) and not self.has(t):
            key = id(t)
            self._refs[key] = weakref.ref(t, lambda _, k=key: self._refs.pop(k, None))

    def has(self, t: Any) -> bool:
        r = self._refs.get(id(t)) if isinstance(t, torch.Tensor) else None
        return r is not None and r() is t


def _site() -> str:
    """The first frame of latentforge, DeepSpeed or torch.optim that led here."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        f = frame.filename
        if "benchmarks/" in f:
            continue
        for marker in ("/training/", "/data/", "/eval/", "/latentforge/", "deepspeed/", "torch/optim/"):
            if marker in f:
                return f"{f.split(marker, 1)[1] if marker.startswith('/') else marker + f.split(marker, 1)[1]}" \
                       f":{frame.lineno} {frame.name}"
    return "elsewhere"


class Counter(TorchDispatchMode):
    """Counts syncs on device data and collectives; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.tags = _Tags()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.h2d: collections.Counter[str] = collections.Counter()
        self.colls: collections.Counter[str] = collections.Counter()
        self.coll_numel: list[int] = []
        self.active = False

    def snapshot(self) -> tuple[int, int, int, int]:
        return sum(self.syncs.values()), sum(self.h2d.values()), sum(self.colls.values()), sum(self.coll_numel)

    def sync(self, what: str) -> None:
        if self.active:
            self.syncs[f"{what} at {_site()}"] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tagged = any(self.tags.has(a) for a in flat)
        name = func.overloadpacket.__name__
        if tagged and (name in SYNC_OPS or (name == "index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in flat[1:]))):
            self.sync(f"aten.{name}")
        if name == "copy_" and len(args) > 1 and self.tags.has(args[1]) and not self.tags.has(args[0]):
            self.sync("device-to-host copy_")
        out = func(*args, **kwargs)
        if tagged:
            for t in tree_flatten(out)[0]:
                self.tags.add(t)
        return out


def install(counter: Counter, device: torch.device) -> None:
    """The Python-level patches: tensor reads, `.to`, factories, collectives."""
    import torch.distributed as tdist
    from torch.distributed import distributed_c10d as c10d

    T = torch.Tensor
    for meth in ("tolist", "numpy", "cpu"):
        orig = getattr(T, meth)

        def read(self: torch.Tensor, *a: Any, _orig: Any = orig, _m: str = meth, **k: Any) -> Any:
            if counter.tags.has(self):
                counter.sync(f"Tensor.{_m}")
            return _orig(self, *a, **k)

        setattr(T, meth, read)
    # item(), bool(), float(), int() reach the dispatcher as aten._local_scalar_dense.
    orig_to = T.to

    def to(self: torch.Tensor, *a: Any, **k: Any) -> Any:
        target = k.get("device")
        for x in a:
            if isinstance(x, (torch.device, str)) and not isinstance(x, torch.dtype):
                target = x
        out = orig_to(self, *a, **k)
        if target is not None and torch.device(target).type == device.type and not counter.tags.has(self):
            if not k.get("non_blocking", False):
                if counter.active:
                    counter.h2d[f"blocking .to(device) at {_site()}"] += 1
            if out is self:
                out = self.clone()  # keep the host tensor untagged
            counter.tags.add(out)
        return out

    T.to = to
    for name in FACTORIES:
        orig_f = getattr(torch, name)

        def factory(*a: Any, _orig: Any = orig_f, **k: Any) -> Any:
            out = _orig(*a, **k)
            # torch's own internals name the device too (e.g. rebuilding a DataLoader
            # worker's batch from shared memory: host data); only our and DeepSpeed's
            # explicit devices count.
            caller = sys._getframe(1).f_code.co_filename
            if k.get("device") is not None and ("/torch/" not in caller or "/torch/optim/" in caller):
                counter.tags.add(out)
            return out

        setattr(torch, name, factory)
    for name in COLLECTIVES:
        if not hasattr(tdist, name):
            continue
        orig_c = getattr(tdist, name)

        def collective(*a: Any, _orig: Any = orig_c, _n: str = name, **k: Any) -> Any:
            tensors = [t for t in tree_flatten((a, k))[0] if isinstance(t, torch.Tensor)]
            for t in tensors:
                counter.tags.add(t)
            if counter.active:
                counter.colls[f"{_n} at {_site()}"] += 1
                counter.coll_numel.append(sum(t.numel() for t in tensors))
            return _orig(*a, **k)

        setattr(tdist, name, collective)
        if hasattr(c10d, name):
            setattr(c10d, name, collective)


def tag_reachable(counter: Counter, *roots: Any, depth: int = 6) -> int:
    """Tag every tensor reachable from `roots` through attributes, dicts, lists (the
    engine's and optimizer's state, the EMA): what would live on the device."""
    seen: set[int] = set()
    n = 0

    def walk(obj: Any, d: int) -> None:
        nonlocal n
        if d < 0 or id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            counter.tags.add(obj)
            n += 1
            if obj.grad is not None:
                counter.tags.add(obj.grad)
            return
        if isinstance(obj, dict):
            items = list(obj.items())
            for k, v in items:
                walk(k, d - 1)
                walk(v, d - 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in list(obj):
                walk(v, d - 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type) and type(obj).__module__.split(".")[0] in (
                "deepspeed", "torch", "latentforge", "diffusers"):
            walk(vars(obj), d - 1)

    for r in roots:
        walk(r, depth)
    return n


# ---------------------------------------------------------------------------------------
# The two workers (one process per rank).


def _steady(counter: Counter, marks: list[tuple[int, tuple[int, int, int, int]]], sync_steps: set[int]) -> dict:
    """Per-step deltas between consecutive marks, steady-state steps only."""
    rows = []
    for (step, a), (_, b) in zip(marks, marks[1:]):
        if step + 1 not in sync_steps:
            rows.append([y - x for x, y in zip(a, b)])
    return {"steps": len(rows), "syncs": [r[0] for r in rows], "h2d": [r[1] for r in rows],
            "colls": [r[2] for r in rows], "numel": [r[3] for r in rows]}


def worker_bare(args: argparse.Namespace, cfg: Any) -> dict:
    from latentforge import dist
    from latentforge.training import engine as eng
    from latentforge.training.diffusion import Schedule, loss_fn
    from latentforge.training.loop import build_model, step_generator
    from latentforge.training.unet import unet_forward

    counter = Counter()
    install(counter, dist.device())
    eng.init_distributed(cfg.train.collective_timeout_s)
    shapes = {"latent": [48, 8, 8], "text": [77, 64], "pooled": [64]}
    engine = eng.build_engine(build_model(cfg, shapes), cfg)
    schedule = Schedule.from_config(cfg.diffusion)
    g = torch.Generator().manual_seed(dist.rank())
    micro = engine.micro_batch
    x0 = torch.randn(micro, *shapes["latent"], generator=g).to(dist.device())
    cond = {"text": torch.randn(micro, *shapes["text"], generator=g).to(dist.device()),
            "pooled": torch.randn(micro, *shapes["pooled"], generator=g).to(dist.device())}
    tag_reachable(counter, engine.ds, engine.client_optimizer)
    marks = []
    with counter:
        for i in range(args.steps):
            if i == 2:
                counter.active = True
            marks.append((i, counter.snapshot()))
            for m in range(engine.accum):
                loss = loss_fn(lambda x, t, c: unet_forward(engine, x, t, c), x0, cond, cfg.diffusion, schedule,
                               step_generator(0, dist.rank(), i, m))["loss"]
                engine.backward(loss)
                engine.step()
        marks.append((args.steps, counter.snapshot()))
    out = _steady(counter, marks[2:], set())
    out.update(sites={"syncs": dict(counter.syncs), "h2d": dict(counter.h2d), "colls": dict(counter.colls)})
    return out


def worker_trainer(args: argparse.Namespace, cfg: Any) -> dict:
    from latentforge import dist
    from latentforge.training import loop

    counter = Counter()
    install(counter, dist.device())
    marks: list[tuple[int, tuple[int, int, int, int]]] = []
    step_fn, ema_cls = loop.optimizer_step, loop.EMA
    state = {"started": False}

    def optimizer_step(engine: Any, batches: Any, cfg_: Any, schedule: Any, null_text: Any, step: int,
                       accum: int, part_source: Any = None) -> Any:
        if not state["started"]:  # the engine, optimizer and EMA exist now: tag what lives on the device
            tag_reachable(counter, engine.ds, engine.client_optimizer, *ema_instances)
            counter.__enter__()
            state["started"] = True
        counter.active = step >= 2
        marks.append((step, counter.snapshot()))
        return step_fn(engine, batches, cfg_, schedule, null_text, step, accum, part_source)

    ema_instances: list[Any] = []

    class EMA(ema_cls):  # type: ignore[misc,valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            ema_instances.append(self)

    loop.optimizer_step, loop.EMA = optimizer_step, EMA
    try:
        loop.train(cfg)
    finally:
        if state["started"]:
            marks.append((cfg.train.max_steps, counter.snapshot()))
            counter.__exit__(None, None, None)
    sync_steps = {s for s in range(1, cfg.train.max_steps + 1) if loop.sync_due(cfg, s, s == 1)} \
        if hasattr(loop, "sync_due") else {s for s in range(1, cfg.train.max_steps + 1) if s % cfg.train.log_every == 0}
    out = _steady(counter, [m for m in marks if m[0] >= 2], sync_steps)
    out.update(sites={"syncs": dict(counter.syncs), "h2d": dict(counter.h2d), "colls": dict(counter.colls)})
    return out


def worker(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_OVERRIDES

    from latentforge.config import resolve

    torch.set_num_threads(1)
    cfg = resolve("tiny", None, [f"run_root={args.root}", *TINY_OVERRIDES, f"run_name=syncs-{args.kind}",
                                 f"train.max_steps={args.steps}", f"train.log_every={args.log_every}",
                                 "train.ckpt_every_steps=0", f"train.zero_stage={args.zero_stage}",
                                 "tracking.enabled=false", "eval.every_steps=0"])
    out = (worker_bare if args.kind == "bare" else worker_trainer)(args, cfg)
    from latentforge import dist

    Path(args.out, f"{args.kind}-rank{dist.rank()}.json").write_text(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per run (the first 2 are not counted)")
    ap.add_argument("--log-every", type=int, default=8)
    ap.add_argument("--zero-stage", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--root", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.kind = args.worker
        return worker(args)

    from benchmarks.bench_train import spawn_ranks

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_OVERRIDES

    from latentforge.config import resolve
    from latentforge.data import precompute
    from latentforge.data.synth import ensure_synth

    with tempfile.TemporaryDirectory(prefix="bench_syncs_") as root, tempfile.TemporaryDirectory() as out:
        print(f"[bench] tiny latent dataset in {root}", flush=True)
        cfg = resolve("tiny", None, [f"run_root={root}", *TINY_OVERRIDES])
        ensure_synth(cfg)
        precompute.run(cfg)
        res = {}
        for kind in ("bare", "trainer"):
            print(f"[bench] {kind}: {args.ranks} rank(s), {args.steps} steps", flush=True)
            codes = spawn_ranks(__file__, [f"--worker={kind}", f"--root={root}", f"--out={out}",
                                           f"--steps={args.steps}", f"--log-every={args.log_every}",
                                           f"--zero-stage={args.zero_stage}"], args.ranks)
            if any(codes):
                print(f"[bench] {kind}: ranks exited with {codes}", file=sys.stderr)
                return 1
            res[kind] = json.loads((Path(out) / f"{kind}-rank0.json").read_text())

    rep = Report(f"host syncs and collectives per steady-state step, {args.ranks} rank(s), ZeRO-{args.zero_stage}, "
                 f"rank 0")
    per = {}
    for kind in ("bare", "trainer"):
        r = res[kind]
        per[kind] = {k: statistics.mean(r[k]) if r[k] else float("nan") for k in ("syncs", "h2d", "colls", "numel")}
        rep.add(f"{kind}: steady-state steps counted", r["steps"])
        rep.add(f"{kind}: host syncs per step", per[kind]["syncs"], "", "{:.2f}")
        rep.add(f"{kind}: blocking host-to-device copies per step", per[kind]["h2d"], "(each a sync on CUDA)",
                "{:.2f}")
        rep.add(f"{kind}: collectives per step", per[kind]["colls"], f"({per[kind]['numel']:.0f} elements)", "{:.2f}")
    rep.add("extra host syncs (trainer - bare)", per["trainer"]["syncs"] - per["bare"]["syncs"] +
            per["trainer"]["h2d"] - per["bare"]["h2d"], "(goal 0)", "{:.2f}")
    rep.add("extra collectives (trainer - bare)", per["trainer"]["colls"] - per["bare"]["colls"],
            "(goal <= 1 small)", "{:.2f}")
    rep.print(args.json)
    for kind in ("bare", "trainer"):
        n = max(1, res[kind]["steps"] + 2)
        print(f"\n   {kind}: where they happen (counts over the counted steps, sync points included)")
        for group, counts in res[kind]["sites"].items():
            for site, c in sorted(counts.items(), key=lambda kv: -kv[1]):
                print(f"     {group:5s} {c:5d}  ({c / n:.2f}/step)  {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
