"""The `latentforge` command line.

Thin entry points: each subcommand parses, resolves the config and calls one function.
Heavy imports (torch, deepspeed, mlflow, open_clip) happen inside the handlers, so
`latentforge --help` and `latentforge train --help` answer at once.

    latentforge data synth --out DIR          synthetic shapes shards (img2dataset layout)
    latentforge data inspect LATENT_DIR       per-reason accounting of a precompute
    latentforge precompute [CONFIG] [k=v]...  raw shards -> latent shards + manifests
    latentforge train [CONFIG] [k=v]...       DeepSpeed training (local ranks, SLURM or torchrun)
    latentforge eval RUN_DIR|EXPORT           stand-alone evaluation
    latentforge export RUN_DIR --out DIR      diffusers-format U-Net (EMA and raw)
    latentforge sample --model DIR --prompt P images from an export
    latentforge submit KIND --profile P       the same jobs through submitit (SLURM or local)
    latentforge status RUN_DIR                job state, step, last metrics, log tail
    latentforge runs compare EXPERIMENT       compare MLflow runs
    latentforge runs sync RUN_DIR             deliver what jobs could not send to MLflow
    latentforge ckpt universal RUN_DIR        universal checkpoint: resume at another world size
    latentforge ckpt verify RUN_DIR           each checkpoint: intact, damaged (and why) or incomplete
    latentforge shipped [profile|template N]  the shipped cluster profiles and sbatch templates, and where
    latentforge demo                          the whole pipeline on the embedded defaults
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML or TOML config file (applied over the preset)")
    p.add_argument("--preset", help="named preset: tiny (default), sd2-base-256")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="config overrides, e.g. train.max_steps=100 model.block_out_channels=[32,64]")


def resolve_config(args: argparse.Namespace) -> Any:
    from latentforge.config import resolve

    return resolve(args.preset, args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="latentforge", description="Train text-to-image latent diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="raw and latent datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write synthetic shapes shards (img2dataset layout)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--num", type=int, default=None, help="number of images (default: synth.num_samples)")
    s.add_argument("--per-shard", type=int, default=None, help="images per shard")
    s.add_argument("--size", type=int, default=None, help="image side in pixels")
    s.add_argument("--seed", type=int, default=None, help="dataset seed")
    s.add_argument("--max-aspect", type=float, default=None, help="random aspect ratios up to this (1 = square)")
    s.add_argument("--captions", type=int, default=None, choices=(1, 2), help="captions per image (2: a rephrasing)")
    s.add_argument("--metadata", action="store_true", help="write filterable json fields (aesthetic, pwatermark, ...)")
    i = dsub.add_parser("inspect", help="per-reason accounting of a latent dataset")
    i.add_argument("latent_dir")

    pc = sub.add_parser("precompute", help="encode raw shards into latent shards")
    _add_config_args(pc)
    pc.add_argument("--task-index", type=int, default=None, help="this task (default: $SLURM_ARRAY_TASK_ID or 0)")
    pc.add_argument("--num-tasks", type=int, default=None, help="tasks sharing the shards (default: array size or 1)")
    pc.add_argument("--verify", action="store_true", help="check counts of an existing precompute and exit")
    pc.add_argument("--assemble", action="store_true", help="assemble the dataset manifest after a job array")

    tr = sub.add_parser("train", help="train a U-Net on latent shards")
    _add_config_args(tr)
    tr.add_argument("--nproc", type=int, default=None, help="local ranks to start (overrides nproc)")

    ev = sub.add_parser("eval", help="evaluate a run directory or an export")
    ev.add_argument("target", help="RUN_DIR (latest checkpoint) or an export directory")
    _add_config_args(ev)

    ex = sub.add_parser("export", help="write a diffusers-format U-Net from a run's checkpoint")
    ex.add_argument("run_dir")
    ex.add_argument("--out", required=True)
    ex.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    ex.add_argument("--merge-lora", action="store_true",
                    help="LoRA runs: write the U-Nets with the adapters folded in (the adapter file is written either way)")

    sa = sub.add_parser("sample", help="generate images from an export")
    sa.add_argument("--model", required=True, help="export directory")
    sa.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    sa.add_argument("--out", default="samples.png")
    sa.add_argument("--n", type=int, default=4, help="images per prompt")
    sa.add_argument("--steps", type=int, default=None)
    sa.add_argument("--cfg-scale", type=float, default=None)
    sa.add_argument("--sampler", default=None)
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    sa.add_argument("--size", default=None, help="HEIGHTxWIDTH in pixels (default: the run's nominal size)")
    sa.add_argument("--crop", default="0,0", help="micro-conditioning crop TOP,LEFT (default 0,0)")
    sa.add_argument("--init-image", default=None, help="image-to-image / inpainting: the picture to start from")
    sa.add_argument("--mask", default=None, help="inpainting: white where to generate, black where to keep the "
                                                 "init image")
    sa.add_argument("--strength", type=float, default=None,
                    help="how much of the sampling to run from the noised init image, (0, 1] (default: 1 with "
                         "--mask, 0.8 without)")

    sb = sub.add_parser("submit", help="submit precompute/train/eval through submitit")
    sb.add_argument("kind", choices=["precompute", "train", "eval"])
    sb.add_argument("--profile", required=True,
                    help="cluster profile: a YAML path or a shipped name (`latentforge shipped` lists them)")
    sb.add_argument("--target", default=None, help="eval: RUN_DIR or export to evaluate")
    sb.add_argument("--wait", action="store_true", help="block until the job finishes")
    sb.add_argument("--num-tasks", type=int, default=None,
                    help="precompute: array tasks, each a group of raw shards (default: profile array_tasks, "
                         "else one per shard)")
    sb.add_argument("--task-index", type=int, default=None, help="precompute: submit this one task alone")
    sb.add_argument("--resubmit-failed", action="store_true",
                    help="precompute: resubmit only the tasks of the last array whose shards are not all done")
    _add_config_args(sb)

    st = sub.add_parser("status", help="job state, step, last metrics and log tail of a run")
    st.add_argument("run_dir")

    ck = sub.add_parser("ckpt", help="checkpoint tools")
    csub = ck.add_subparsers(dest="ckpt_command", required=True)
    cu = csub.add_parser("universal", help="convert a checkpoint to DeepSpeed's universal form; the next "
                                           "start-up loads it (once), at any world size")
    cu.add_argument("run_dir")
    cu.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    cv = csub.add_parser("verify", help="check every checkpoint's files against its COMPLETE record; exit 1 "
                                        "if the latest one is damaged")
    cv.add_argument("run_dir")
    cv.add_argument("--tag", default=None, help="check this checkpoint folder only")
    cv.add_argument("--sizes-only", action="store_true", help="compare sizes, not content hashes (fast)")

    runs = sub.add_parser("runs", help="MLflow runs")
    rsub = runs.add_subparsers(dest="runs_command", required=True)
    rc = rsub.add_parser("compare", help="table of an experiment's runs")
    rc.add_argument("rest", nargs=argparse.REMAINDER)
    rs = rsub.add_parser("sync", help="deliver the records that jobs of a run could not send to MLflow "
                                      "(RUN_DIR/tracking and its stand-alone evals')")
    rs.add_argument("run_dir")
    rs.add_argument("--uri", default=None, help="tracking URI (default: the one each job used)")

    sh = sub.add_parser("shipped", help="the cluster profiles and sbatch templates this install ships, and where")
    sh.add_argument("kind", nargs="?", choices=["profile", "template"], help="print the path of one")
    sh.add_argument("name", nargs="?", help="its name (local, gpu-8x, train, ...)")

    dm = sub.add_parser("demo", help="synth -> precompute -> train (2 ranks) -> eval -> export on the tiny preset")
    dm.add_argument("--run-root", default="runs", help="where data, runs and the MLflow store go")
    dm.add_argument("overrides", nargs="*", metavar="section.field=value")
    return p


# ---------------------------------------------------------------------------------------
# Handlers.


def cmd_data_synth(args: argparse.Namespace) -> int:
    from latentforge.config import SynthConfig
    from latentforge.data.synth import write_shards

    d = SynthConfig()
    paths = write_shards(args.out, num_samples=args.num or d.num_samples,
                         samples_per_shard=args.per_shard or d.samples_per_shard,
                         image_size=args.size or d.image_size, seed=d.seed if args.seed is None else args.seed,
                         max_aspect=args.max_aspect or d.max_aspect, captions=args.captions or d.captions,
                         metadata=args.metadata or d.metadata)
    print(f"wrote {len(paths)} shards to {args.out}")
    return 0


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from latentforge.data.precompute import inspect

    print(inspect(args.latent_dir))
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    from latentforge.data import precompute
    from latentforge.data.shards import task_from_env

    if args.verify:
        problems = precompute.verify(cfg)
        for pr in problems:
            print(f"verify: {pr}")
        print("verify: OK" if not problems else f"verify: {len(problems)} problem(s)")
        return 0 if not problems else 1
    if args.assemble:
        m = precompute.assemble(cfg)
        print(f"assembled {cfg.resolved_latent_dir}/manifest.json: {m['written']} samples in {len(m['parts'])} parts")
        return 0
    env_index, env_count = task_from_env()
    index = env_index if args.task_index is None else args.task_index
    count = env_count if args.num_tasks is None else args.num_tasks
    if count == 1:
        from latentforge.data.synth import ensure_synth

        ensure_synth(cfg)
    precompute.run(cfg, task_index=index, num_tasks=count)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_config(args)
    if args.nproc is not None:
        cfg.nproc = args.nproc
    from latentforge import spawn

    if spawn.should_spawn(cfg.nproc):
        from latentforge.training.loop import preflight

        preflight(cfg)  # init_from/LoRA against the latents, the latent set of a resume: before any rank starts
        argv = ["train"] + (["--config", args.config] if args.config else []) + \
               (["--preset", args.preset] if args.preset else []) + list(args.overrides) + [f"nproc={cfg.nproc}"]
        return spawn.spawn(argv, cfg.nproc)
    from latentforge import dist
    from latentforge.env import apply, discover

    apply(discover())
    from latentforge.eval.evaluate import Evaluator
    from latentforge.training.loop import train

    try:
        result = train(cfg, make_evaluator=Evaluator)
    finally:
        # Leave the process group before interpreter exit, on errors too: a backend left to
        # the C++ destructors at exit can abort the process ("terminate called without an
        # active exception", exit 134/250) after the error line, hiding the exit code.
        dist.destroy()
    if not result.preempted:
        return 0
    from latentforge.training.control import exit_code_for_stop

    return exit_code_for_stop()  # 130 after Ctrl-C, else the requeue code


def cmd_eval(args: argparse.Namespace) -> int:
    from latentforge.eval.standalone import main as eval_main

    return eval_main(args.target, args.preset, args.config, args.overrides)


def cmd_export(args: argparse.Namespace) -> int:
    from latentforge.training.export import export

    out = export(args.run_dir, args.out, tag=args.tag, merge_lora=args.merge_lora)
    print(f"exported to {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from latentforge.eval.sample import sample_from_export

    try:
        size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
        crop = tuple(int(v) for v in args.crop.split(","))
    except ValueError:
        size, crop = (), ()
    if (size is not None and len(size) != 2) or len(crop) != 2:
        raise ValueError(f"--size/--crop: expected HEIGHTxWIDTH and TOP,LEFT, got {args.size!r}, {args.crop!r}")
    path = sample_from_export(args.model, args.prompt, args.out, n=args.n, steps=args.steps,
                              cfg_scale=args.cfg_scale, sampler=args.sampler, seed=args.seed, use_ema=not args.raw,
                              size=size, crop=crop, init_image=args.init_image, mask=args.mask,
                              strength=args.strength)
    print(f"wrote {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from latentforge.launch.submit import submit

    return submit(args.kind, args.profile, args.preset, args.config, list(args.overrides), target=args.target,
                  wait=args.wait, num_tasks=args.num_tasks, task_index=args.task_index,
                  resubmit_failed=args.resubmit_failed)


def cmd_status(args: argparse.Namespace) -> int:
    from latentforge.launch.status import status

    print(status(args.run_dir))
    return 0


def cmd_ckpt(args: argparse.Namespace) -> int:
    if args.ckpt_command == "verify":
        return cmd_ckpt_verify(args)
    from latentforge.training.checkpoint import make_universal

    utag = make_universal(args.run_dir, args.tag)
    print(f"universal checkpoint {utag} in {args.run_dir}/checkpoints; the next start-up of this run loads it")
    return 0


def cmd_ckpt_verify(args: argparse.Namespace) -> int:
    """Torch-free: reads COMPLETE records and the files (training/ckpt_layout.py)."""
    from pathlib import Path

    from latentforge.training import ckpt_layout as cl

    d = cl.ckpt_dir(Path(args.run_dir))
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: no checkpoints folder (is {args.run_dir} a run directory?)")
    statuses = cl.check_run(Path(args.run_dir), hashes=not args.sizes_only, tag=args.tag)
    latest = args.tag or cl.latest_name(Path(args.run_dir)) or cl.latest_tag(Path(args.run_dir))
    if latest and all(st.name != latest for st in statuses):
        statuses.append(cl.Status(latest, "damaged", [f"`latest` names {latest}, which is not in {d}"]))
    for st in statuses:
        print(("* " if st.name == latest else "  ") + st.line())
    if not statuses:
        print(f"no checkpoints in {d}")
    bad = next((st for st in statuses if st.name == latest and not st.ok), None)
    if bad is not None:
        print(f"latest checkpoint {bad.name} is {bad.state}; a resume falls back to the newest intact one")
        return 1
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    if args.runs_command == "sync":
        from latentforge.training.tracking import sync

        results = sync(args.run_dir, uri=args.uri)
        for r in results:
            print(f"{r.spool}: run {r.run_id or '(not created)'}: {r.delivered} records delivered"
                  + (f", {r.left} still waiting (the store is unreachable?)" if r.left else "")
                  + "".join(f"; {n}" for n in r.notes))
        if not results:
            print(f"{args.run_dir}: nothing waiting to be delivered")
        return 1 if any(r.left for r in results) else 0
    from latentforge.training.runs import main as runs_main

    return runs_main(args.rest)


def cmd_shipped(args: argparse.Namespace) -> int:
    from latentforge.launch import profiles

    if args.kind is None:
        for title, folder, suffix in (("profiles (--profile NAME)", profiles.PROFILES_DIR, ".yaml"),
                                      ("sbatch templates (sbatch PATH ...)", profiles.TEMPLATES_DIR, ".sbatch")):
            print(f"{title}: {folder}")
            for name, path in profiles.shipped(folder, suffix).items():
                print(f"  {name:<18} {path}")
        return 0
    if not args.name:
        raise ValueError(f"shipped {args.kind}: give a name (`latentforge shipped` lists them)")
    if args.kind == "profile":
        path = profiles.find_profile(args.name)
        profiles.load_profile(path)  # a shipped profile that does not validate is a bug: say so here
    else:
        path = profiles.find_template(args.name)
    print(path.resolve())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from latentforge.launch.demo import demo

    return demo(args.run_root, list(args.overrides))


HANDLERS = {
    "precompute": cmd_precompute, "train": cmd_train, "eval": cmd_eval, "export": cmd_export,
    "sample": cmd_sample, "submit": cmd_submit, "status": cmd_status, "runs": cmd_runs, "demo": cmd_demo,
    "ckpt": cmd_ckpt, "shipped": cmd_shipped,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse (3.11) fills a `nargs="*"` positional at the first run of positionals, so in
    # `submit train --profile P k=v` the overrides after the options would be "unrecognized":
    # take them as overrides, in order, and refuse anything else as before.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = args.overrides + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from latentforge.config import AbortError, ConfigError
    from latentforge.log import configure

    configure()
    try:
        if args.command == "data":
            return cmd_data_synth(args) if args.data_command == "synth" else cmd_data_inspect(args)
        return HANDLERS[args.command](args)
    except ConfigError as e:
        print(f"latentforge: config error: {e}", file=sys.stderr)
        return 2
    except AbortError as e:
        if os.environ.get("RANK", "0") == "0" or not getattr(e, "agreed", False):  # an agreed one: said once
            print(f"latentforge: aborted: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:  # bad input: one clear line, no traceback
        if os.environ.get("LATENTFORGE_DEBUG"):
            raise
        print(f"latentforge: {e} (set LATENTFORGE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before a command took SIGINT over (start-up): one line, not a traceback
        if os.environ.get("LATENTFORGE_DEBUG"):
            raise
        print("latentforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
