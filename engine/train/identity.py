"""Which run a component works for: what every stage component is handed besides its reporter.

A component reads the run's config, writes files into its run folder and starts from its parent
(resolved once, when the run was planned); what it has to say goes through the reporter
(engine.train.reporter), never through the database.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.core import registry
from engine.core.config import RunConfig
from engine.model.runs import RunRef


@dataclass(frozen=True)
class RunIdentity:
    run_id: str
    run_dir: Path
    cfg: RunConfig
    parent: RunRef | None = None  # the parent run and its files, as the plan resolved them
    writer: bool = True           # writes the files a process group shares (rank 0; the only process otherwise)


def continues_import(cfg: RunConfig, parent: RunRef | None) -> bool:
    """A pre-training whose parent is an imported model continues that model's weights (and so takes
    its shape, as a fine-tune does); from any other parent it reuses only the vocabulary."""
    return cfg.stage == registry.PRETRAIN and parent is not None and registry.shape_from_parent(cfg.stage, parent.stage)
