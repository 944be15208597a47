"""Files made from past runs: their metric rows (CSV, JSON, Parquet) and a run's stored config (TOML),
through the engine's own exporters (``mediswift metrics``, ``runs export``)."""
from __future__ import annotations

from pathlib import Path

from engine.publish.run_export import FORMATS, export_config, export_metrics
from studio.models.run_store import RunStore

__all__ = ["FORMATS", "write_config", "write_metrics"]


def write_metrics(store: RunStore, run_ids: list[str], path: str | Path, fmt: str | None = None) -> int:
    """The runs' metric rows to one file (the format follows the suffix, or ``fmt``); the number of rows."""
    return export_metrics(store.db, run_ids, path, fmt)


def write_config(store: RunStore, run_id: str, path: str | Path) -> Path:
    """The run's stored config as a re-runnable TOML (``mediswift train FILE``)."""
    return export_config(store.db, run_id, path)
