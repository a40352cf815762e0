"""Byte-compile, once, every module latentforge's processes import (run by scripts/bootstrap.sh).

The install skips byte-compiling (`pip install --no-compile`): of the ~18,000 modules in the
environment most are never imported, and compiling them all cost 40 s on 2 cores. The ones
that are imported would compile on first use and be cached in __pycache__, except where the
environment sets PYTHONDONTWRITEBYTECODE (some CI images and containers do): then every
process compiles torch, DeepSpeed, diffusers and open_clip from source again. On a 2-core
machine that made `import open_clip` take 8 s instead of 3 s, in every rank and every eval.

So this script imports, with bytecode writing on whatever the environment says, every
module that latentforge (and its tests and benchmarks) imports anywhere: the package's own
modules, and each import statement found in its sources, at any depth (the heavy ones are
deliberately imported late, inside functions), plus the DeepSpeed runtime modules that
`deepspeed.initialize` imports. A module that does not import here (an optional one) is
counted and skipped: this only warms a cache.

    .venv/bin/python scripts/warm_bytecode.py
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = False  # whatever PYTHONDONTWRITEBYTECODE says: this process writes the cache

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("latentforge", "training", "data", "eval", "launch", "tests", "benchmarks", "scripts")
# Imported by deepspeed.initialize and DeepSpeed's checkpoint code, not by a statement of ours.
DEEPSPEED_RUNTIME = (
    "deepspeed.runtime.engine", "deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3",
    "deepspeed.runtime.zero.partition_parameters", "deepspeed.runtime.bf16_optimizer",
    "deepspeed.runtime.fp16.fused_optimizer", "deepspeed.runtime.fp16.unfused_optimizer",
    "deepspeed.runtime.pipe", "deepspeed.checkpoint.ds_to_universal", "deepspeed.utils.zero_to_fp32",
)


def imported_names(path: Path) -> set[str]:
    """Absolute module names `path`'s import statements name (`from a.b import c` gives a.b
    and a.b.c: c may be a submodule)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names if a.name != "*")
    return names


def main() -> int:
    t0 = time.monotonic()
    before = len(sys.modules)
    names: set[str] = set(DEEPSPEED_RUNTIME)
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")) if (ROOT / folder).is_dir() else ():
            if "peer" not in path.parts:  # benchmarks/peer: a vendored script with its own venv
                names |= imported_names(path)
    import latentforge

    names.update(m.name for m in pkgutil.walk_packages(latentforge.__path__, "latentforge."))
    skipped = 0
    for name in sorted(names):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception:  # an attribute rather than a module, an optional module, a test helper
            parent, _, attr = name.rpartition(".")
            try:  # `from diffusers import UNet2DConditionModel`: a lazy package imports it on access
                getattr(sys.modules[parent], attr)
            except Exception:
                skipped += 1
    print(f"[bootstrap] bytecode cached for the {len(sys.modules) - before} modules latentforge imports, in "
          f"{time.monotonic() - t0:.0f} s ({skipped} imported names are not modules here: attributes, "
          "optional modules, test helpers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
