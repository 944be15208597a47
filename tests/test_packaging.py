"""The wheel is the product: it holds every module and the bundled presets, and the engine runs from
it in an unrelated directory, with nothing of the checkout on its path."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, tiny

pytestmark = pytest.mark.quick


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of the sources: an in-tree build/ folder would keep stale modules in later wheels
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("engine", "studio", "resources"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # --no-build-isolation: the test environment's setuptools builds it, nothing is downloaded
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("mediswift_studio-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory) -> Path:
    """The wheel installed into a folder of its own (dependencies come from the test environment)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return target


@pytest.mark.quick
def test_the_wheel_holds_every_module_and_the_presets(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for top in ("engine", "studio") for p in (REPO / top).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert sources, "no sources found"
    assert sources <= names, f"modules missing from the wheel (add their package to pyproject.toml): {sorted(sources - names)}"
    presets = {p.name for p in (REPO / "resources" / "presets").glob("*.toml")}
    assert {"demo.toml", "finetune-hoc.toml"} <= presets
    assert {f"mediswift_resources/presets/{n}" for n in presets} <= names
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "mediswift = engine.cli:main" in text and "mediswift-studio = studio.app:main" in text


def _from_wheel(installed: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MEDISWIFT_DB", "MEDISWIFT_RUNS_DIR")}
    env.update(PYTHONPATH=str(installed), MEDISWIFT_HOME=str(cwd / "home"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_engine_runs_from_the_wheel_outside_the_checkout(installed: Path, tmp_path: Path):
    where = _from_wheel(installed, tmp_path, "-c", "import engine, studio, mediswift_resources as r; "
                        "print(engine.__file__); print(studio.__file__); print(r.__file__)")
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert Path(line).is_relative_to(installed), f"imported from outside the wheel: {line}"

    presets = _from_wheel(installed, tmp_path, "-m", "engine", "presets", "--json")
    assert presets.returncode == 0, presets.stderr
    listed = {p["name"]: p["path"] for p in json.loads(presets.stdout)}
    assert set(listed) == {p.stem for p in (REPO / "resources" / "presets").glob("*.toml")}
    assert all(Path(p).is_relative_to(installed) for p in listed.values())

    run = _from_wheel(installed, tmp_path, "-m", "engine", "train", "demo", *tiny("train.max_steps=3"), timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    finished = [e for e in events if e["type"] == "run_finished"]
    assert finished and finished[-1]["status"] == "completed" and finished[-1]["step"] == 3
    # the database and run folders default to the user's data directory, not the checkout or the cwd
    assert (tmp_path / "home" / "runs.db").is_file()
    assert list((tmp_path / "home" / "runs").iterdir())
