"""The import structure: layers that only look down, and no cycles between files.

Every module's imports are read from its source (late imports inside functions included),
so a cycle hidden behind a function-level import fails here too. The layers, lowest first:

    latentforge (core)  <-  data  <-  training  <-  eval  <-  launch

A module may import from its own layer or a lower one. Within and across layers the
file-level import graph must be acyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("core", "data", "training", "eval", "launch")
FOLDERS = {"core": REPO / "latentforge", "data": REPO / "data", "training": REPO / "training",
           "eval": REPO / "eval", "launch": REPO / "launch"}
# Only these modules may import deepspeed (DESIGN: one module owns the engine).
DEEPSPEED_IMPORTERS = {"latentforge.training.engine", "latentforge.training.deepspeed_compat"}


def _modules() -> dict[str, tuple[str, Path]]:
    """module name -> (layer, file)."""
    out = {}
    for layer, folder in FOLDERS.items():
        prefix = "latentforge" if layer == "core" else f"latentforge.{layer}"
        for f in sorted(folder.glob("*.py")):
            if f.is_symlink():
                continue
            name = prefix if f.stem == "__init__" else f"{prefix}.{f.stem}"
            out[name] = (layer, f)
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported latentforge module, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            # The longest known module the target names: `latentforge.data.latents.X` -> data.latents.
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.append((t, node.lineno))
    return found


def _graph() -> tuple[dict[str, tuple[str, Path]], dict[str, list[tuple[str, int]]]]:
    mods = _modules()
    known = set(mods)
    return mods, {m: _imports(m, f, known) for m, (_, f) in mods.items()}


def test_every_stage_folder_has_modules():
    mods = _modules()
    for layer in LAYERS:
        assert any(lay == layer for lay, _ in mods.values()), f"no modules found for layer {layer}"


def test_imports_only_look_down():
    mods, graph = _graph()
    bad = []
    for m, edges in graph.items():
        layer = LAYERS.index(mods[m][0])
        for target, line in edges:
            if LAYERS.index(mods[target][0]) > layer:
                bad.append(f"{mods[m][1].relative_to(REPO)}:{line} ({mods[m][0]}) imports {target} "
                           f"({mods[target][0]})")
    assert not bad, "imports that reach up a layer:\n" + "\n".join(bad)


def test_no_cycles_between_files():
    mods, graph = _graph()
    edges = {m: sorted({t for t, _ in e}) for m, e in graph.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_the_engine_imports_deepspeed():
    mods = _modules()
    bad = []
    for m, (_, f) in mods.items():
        if m in DEEPSPEED_IMPORTERS:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                bad.append(f"{f.relative_to(REPO)}:{node.lineno}")
    assert not bad, f"deepspeed imported outside {sorted(DEEPSPEED_IMPORTERS)}: {bad}"


@pytest.mark.parametrize("layer", ["data", "training", "eval", "launch"])
def test_checkout_resolves_the_package(layer):
    """A plain checkout resolves latentforge.<stage> to the stage folder (no install needed)."""
    link = REPO / "latentforge" / layer
    assert link.is_dir() and link.resolve() == (REPO / layer).resolve()


def test_the_checker_sees_late_imports(tmp_path):
    """The graph reader finds an import inside a function (the kind that hid cycles)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from latentforge.eval import sampling\n    return sampling\n")
    assert _imports("latentforge.data.m", f, {"latentforge.eval.sampling"}) == [("latentforge.eval.sampling", 2)]
