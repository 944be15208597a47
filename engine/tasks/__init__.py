"""Fine-tuning tasks: PubMedQA (yes/no/maybe), HoC (10 hallmarks, multi-label), plain causal LM.

A task reads its labelled files (any path: the same code scores the unseen test files), turns each
record into an ``Example`` (prompt segments + answer text + label), and scores predictions.
Problems with the user's files are ``InputError`` (exit code 2), naming the config key and the file.
"""
from __future__ import annotations

from engine.core.errors import InputError
from engine.tasks.base import Example


def get_task(name: str):
    """The task module for ``task.name`` (pubmedqa, hoc, lm)."""
    if name == "pubmedqa":
        from engine.tasks import pubmedqa as mod
    elif name == "hoc":
        from engine.tasks import hoc as mod
    elif name == "lm":
        from engine.tasks import lm as mod
    else:
        raise InputError(f"unknown task {name!r} (tasks: pubmedqa, hoc, lm)", key="task.name")
    return mod


__all__ = ["Example", "InputError", "get_task"]
