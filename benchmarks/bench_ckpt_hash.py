"""What a checkpoint's content hashes cost: candidate hashes against the save time of a
~300M-parameter U-Net checkpoint.

    .venv/bin/python benchmarks/bench_ckpt_hash.py [--model 300m|mid] [--dir DIR] [--json]

One rank, ZeRO-2, fp32 with EMA: the `300m` U-Net of bench_train.py (as bench_memory.py
builds it), one optimizer step so the Adam moments exist, then:

1. DeepSpeed's own save (TorchCheckpointEngine.save: torch.save to a path), timed: the
   reference "save time";
2. latentforge's save (`checkpoint.save`: every file hashed with xxh3-128 as torch.save
   writes it, fsynced, COMPLETE with the file list), timed;
3. each candidate hash over the same bytes, timed alone: the files are read back in
   64 MiB chunks (from the page cache) and only the hash updates are timed, which is what
   hashing as the file is written costs: hashlib sha256 (OpenSSL, SHA-NI where the CPU
   has it), hashlib blake2b, zlib.crc32, xxhash xxh3_128 (the one checkpoints use).

It prints each hash's cost as a fraction of the save time (goal: < 10%), and the whole
difference between latentforge's save and DeepSpeed's (hashing plus the fsyncs, which
the hash does not cause but durability needs). Needs about 9 GB of memory and 2x the
checkpoint (~6 GB) of free disk under --dir.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks._common import Report  # noqa: E402
from benchmarks.bench_train import Stepper  # noqa: E402


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, b: bytes) -> None:
        self.value = zlib.crc32(b, self.value)


def _xxh3() -> object:
    import xxhash

    return xxhash.xxh3_128()


HASHES = {"sha256": hashlib.sha256, "blake2b": hashlib.blake2b, "crc32": _Crc32, "xxh3_128": _xxh3}


def hash_seconds(files: list[Path], make: object, chunk: int = 64 << 20) -> float:
    """Seconds spent in hash updates over the files' bytes (reads not counted)."""
    spent = 0.0
    for p in files:
        h = make()
        with open(p, "rb") as f:
            while b := f.read(chunk):
                t = time.perf_counter()
                h.update(b)
                spent += time.perf_counter() - t
    return spent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="300m", choices=["300m", "mid"])
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from latentforge.training import checkpoint
    from latentforge.training.state import TrainState

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-hash-", dir=args.dir))
    report = Report(f"checkpoint hash cost, {args.model} U-Net, 1 rank, ZeRO-2, fp32 + EMA")
    try:
        print(f"[bench] building the {args.model} U-Net engine (1 rank, ZeRO-2) and taking one step", flush=True)
        s = Stepper(args.model, 1, 2)
        s.step(0)
        state = TrainState(step=1, ema=s.ema.state_dict())

        # 1. DeepSpeed's own save: its checkpoint engine's save as shipped (class method, no hashing).
        ce = s.engine.ds.checkpoint_engine
        ours = ce.save
        del ce.save  # the instance attribute install_checkpoint_io set: back to TorchCheckpointEngine.save
        print("[bench] DeepSpeed's save", flush=True)
        t0 = time.perf_counter()
        s.engine.ds.save_checkpoint(str(root / "plain"), tag="step_00000001", client_state=state.state_dict(),
                                    save_latest=False)
        plain_s = time.perf_counter() - t0
        ce.save = ours
        files = sorted(p for p in (root / "plain" / "step_00000001").iterdir() if p.is_file())
        nbytes = sum(p.stat().st_size for p in files)

        # 2. latentforge's save: hashed as written, fsynced, COMPLETE with the file list.
        print("[bench] latentforge's save", flush=True)
        t0 = time.perf_counter()
        checkpoint.save(s.engine, root / "ours", state, keep_last=1)
        ours_s = time.perf_counter() - t0

        report.add("parameters", s.n_params / 1e6, "M", "{:.0f}")
        report.add("checkpoint size", nbytes / 1e9, f"GB in {len(files)} files", "{:.2f}")
        report.add("DeepSpeed save (torch.save, no fsync)", plain_s, "s", "{:.2f}")
        report.add("latentforge save (hash as written + fsync)", ours_s,
                   f"s ({100 * (ours_s - plain_s) / plain_s:+.0f}%)", "{:.2f}")
        # 3. Each candidate over the same bytes.
        for name, make in HASHES.items():
            print(f"[bench] hashing {nbytes / 1e9:.1f} GB with {name}", flush=True)
            sec = hash_seconds(files, make)
            report.add(f"{name}: hash time / save time", 100 * sec / plain_s,
                       f"% ({nbytes / sec / 1e9:.2f} GB/s, {sec:.2f} s)", "{:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.print(as_json=args.json)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
