"""One run described for the runs browser's side panel: its details as rich text and its stored config
as the user writes it. No widgets."""
from __future__ import annotations

import json

from engine.core.config import from_dict
from engine.core.errors import InputError
from studio.models import formatting as fmt
from studio.models.config_form import shape_text
from studio.models.families import run_model
from studio.models.labels import STATUS_COLORS, stage_text
from studio.models.run_store import disk_usage


def detail_html(run: dict, checkpoints: list[dict]) -> str:
    """Name, stage, status, model, parent, checkpoints and disk use, folder, duration, summary, error: one a
    line."""
    rid = run["id"]
    disk = disk_usage(run, checkpoints)
    summary = run.get("summary") or {}
    lines = [f"<b>{run.get('name') or rid}</b> ({rid}) — {stage_text(run['stage'])}",
             f"status <b style='color:{STATUS_COLORS.get(run['status'], '#333')}'>{run['status']}</b>",
             *([f"model: {shape_text(model)}"] if (model := run_model(run)) else []),
             f"parent: {run.get('parent_id') or '—'}",
             f"checkpoints: {len(checkpoints)}" + (f", last at step {checkpoints[-1]['step']}" if checkpoints else "")
             + (f" · disk: {fmt.nbytes(disk['checkpoint_bytes'])} in checkpoints, {fmt.nbytes(disk['run_dir_bytes'])} "
                "in the run folder" if disk["run_dir_bytes"] else ""),
             f"folder: {run.get('run_dir') or '—'}"]
    if run.get("started_at") and run.get("finished_at"):
        lines.append(f"duration: {fmt.duration(run['finished_at'] - run['started_at'])}")
    if summary:
        lines.append("summary: " + ", ".join(f"{k} {_summary_value(k, v)}" for k, v in list(summary.items())[:8]))
    if run.get("error"):
        lines.append(f"<span style='color:#c9302c'>error: {run['error']}</span>")
    return "<br>".join(lines)


def _summary_value(key: str, value) -> str:
    """FLOP counts with their unit (26.2 GFLOP, not 26,172,456,960), other numbers as numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return fmt.flops(value) if "flops" in key else fmt.number(value)


def config_text(config: dict) -> str:
    """TOML, as the user writes it; JSON if the current engine no longer accepts this old config."""
    try:
        return from_dict(config).to_toml()
    except InputError:
        return json.dumps(config, indent=2, sort_keys=True)
