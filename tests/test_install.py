"""A non-editable install: the wheel holds each module once and the shipped profiles and
sbatch templates, and its CLI, installed into a fresh virtualenv, finds them by name."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("data", "training", "eval", "launch")
# What building the wheel reads; copied, so a stale build/ in the checkout cannot leak in.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "latentforge", "slurm", *STAGES)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert res.returncode == 0, f"{cmd} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _expected_files() -> set[str]:
    """Every file the wheel must hold under latentforge/, from the repository's layout."""
    files = {f"latentforge/{f.name}" for f in (REPO / "latentforge").glob("*.py") if not f.is_symlink()}
    for stage in STAGES:
        files |= {f"latentforge/{stage}/{f.name}" for f in (REPO / stage).glob("*.py")}
    files |= {f"latentforge/slurm/profiles/{f.name}" for f in (REPO / "slurm" / "profiles").glob("*.yaml")}
    files |= {f"latentforge/slurm/templates/{f.name}" for f in (REPO / "slurm" / "templates").glob("*.sbatch")}
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)])
    (whl,) = out.glob("latentforge-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_holds_every_module_once_and_the_shipped_files(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert len(names) == len(set(names)), "a file appears twice in the wheel"
    dist_info = [n for n in names if n.split("/")[0].endswith(".dist-info")]
    package = {n for n in names if n not in dist_info}
    # No copies through the latentforge/<stage> links (latentforge/data/data/..., a top-level
    # data/ package, the test-cluster scripts): exactly the mapped layout.
    assert package == _expected_files()
    assert any(n.endswith("/LICENSE") for n in dist_info)


@pytest.mark.slow
def test_installed_cli_finds_shipped_profiles_and_templates(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The dependencies come from this test's environment (a .pth line adds its site-packages
    # after the fresh venv's own, without running its .pth files: not its editable latentforge).
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_latentforge_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--no-index", str(wheel)],
         env=env, cwd=tmp_path)
    cli = str(venv / "bin" / "latentforge")

    def latentforge(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([cli, *args], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)

    installed = site / "latentforge" / "slurm"
    res = latentforge("shipped", "profile", "local")
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == (installed / "profiles" / "local.yaml").resolve()
    res = latentforge("shipped", "template", "train")
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip())
    assert path == (installed / "templates" / "train.sbatch").resolve()
    assert path.read_bytes() == (REPO / "slurm" / "templates" / "train.sbatch").read_bytes()
    listing = latentforge("shipped").stdout
    assert "local-processes" in listing and "precompute_array" in listing and str(site) in listing

    # `submit` resolves the profile by name before it looks at the target: the error is about
    # the target, so the shipped profile was found and validated.
    res = latentforge("submit", "eval", "--profile", "local", "--target", str(tmp_path / "no-such-run"))
    assert res.returncode == 2 and "--target:" in res.stderr and "is not a directory" in res.stderr, res.stderr
    res = latentforge("submit", "eval", "--profile", "no-such-profile", "--target", str(tmp_path))
    assert res.returncode == 2, res.stderr
    known = ", ".join(sorted(p.stem for p in (REPO / "slurm" / "profiles").glob("*.yaml")))  # every shipped one
    assert "local-processes" in known and "gpu-8x" in known
    assert f"not a profile in {(installed / 'profiles').resolve()} (known: {known})" in res.stderr


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared() -> None:
    """Each third-party module imported anywhere (late imports included) comes from a
    distribution pyproject.toml declares: a runtime dependency, or a dev one for tests."""
    from importlib.metadata import packages_distributions

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {_normalise(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in reqs}

    runtime = names(project["dependencies"])
    dev = runtime | names(project["optional-dependencies"]["dev"])
    local = {f.stem for f in (REPO / "tests").glob("*.py")} | {"benchmarks", "latentforge"}
    dists = packages_distributions()
    undeclared = []
    for folder in ("latentforge", *STAGES, "benchmarks", "scripts", "tests"):
        declared = dev if folder in ("tests", "benchmarks") else runtime
        for f in sorted((REPO / folder).glob("*.py")):
            if f.is_symlink():
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top in local or top == "tomli":  # tomli: 3.10 only
                        continue
                    if not {_normalise(d) for d in dists.get(top, [top])} & declared:
                        undeclared.append(f"{f.relative_to(REPO)}:{node.lineno}: {top}")
    assert not undeclared, "imports of undeclared packages:\n" + "\n".join(undeclared)
    assert "tomli" in runtime  # Python 3.10's TOML parser (marker python_version < '3.11')


@pytest.mark.slow
def test_the_install_caches_the_bytecode_of_what_latentforge_imports_late(tmp_path: Path) -> None:
    """scripts/warm_bytecode.py (run by the bootstrap) writes the bytecode even where
    PYTHONDONTWRITEBYTECODE is set, for the package's own modules and for the heavy ones it
    imports only inside functions (open_clip, DeepSpeed's ZeRO runtime); without it every
    rank compiles them again. PYTHONPYCACHEPREFIX sends the cache to an empty folder, so
    what appears there is what this run wrote."""
    import importlib.util

    prefix = tmp_path / "pycache"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(prefix),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    res = _run([sys.executable, str(REPO / "scripts" / "warm_bytecode.py")], env=env)
    assert re.search(r"bytecode cached for the \d+ modules latentforge imports", res.stdout), res.stdout

    def cached(module: str) -> bool:
        spec = importlib.util.find_spec(module)
        assert spec is not None and spec.origin, module
        # Under a prefix the cache mirrors the source's absolute path (PEP 3147 with PYTHONPYCACHEPREFIX).
        tag = sys.implementation.cache_tag
        src = Path(spec.origin)  # the path the import compiled from (a symlinked stage keeps its link path)
        return (prefix / src.parent.relative_to(src.anchor) / f"{src.stem}.{tag}.pyc").exists()

    for module in ("open_clip", "deepspeed.runtime.zero.stage_1_and_2", "diffusers.models.unets.unet_2d_condition",
                   "latentforge.training.loop", "latentforge.eval.fid"):
        assert cached(module), module
