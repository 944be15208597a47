"""Where things live: the run database, run folders, presets. Ground floor (no torch, no Qt)."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DB_ENV = "MEDISWIFT_DB"
RUNS_ENV = "MEDISWIFT_RUNS_DIR"
HOME_ENV = "MEDISWIFT_HOME"

RESOURCES_PACKAGE = "mediswift_resources"  # the repository's resources/ folder, installed as package data


def presets_dir() -> Path:
    """The bundled presets, wherever the package is installed (a wheel, an editable checkout)."""
    return Path(str(resources.files(RESOURCES_PACKAGE) / "presets"))


def data_home() -> Path:
    """The user's data directory (XDG): $MEDISWIFT_HOME, else $XDG_DATA_HOME/mediswift, else ~/.local/share/mediswift."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base).expanduser() / "mediswift"


def default_db_path() -> Path:
    return Path(os.environ[DB_ENV]).expanduser() if os.environ.get(DB_ENV) else data_home() / "runs.db"


def default_runs_dir(db_path: Path | None = None) -> Path:
    """Run folders sit next to the database unless told otherwise, so one --db keeps a project together."""
    if os.environ.get(RUNS_ENV):
        return Path(os.environ[RUNS_ENV]).expanduser()
    if db_path is not None:
        return Path(db_path).expanduser().resolve().parent / "runs"
    return data_home() / "runs"


def cache_dir() -> Path:
    return data_home() / "cache"


def resolve_preset(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a bundled preset (``demo`` -> resources/presets/demo.toml)."""
    p = Path(name_or_path).expanduser()
    if p.exists() or p.suffix == ".toml" or os.sep in name_or_path:
        return p
    return presets_dir() / f"{name_or_path}.toml"


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.toml"))
