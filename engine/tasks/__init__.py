"""Fine-tuning tasks: PubMedQA (yes/no/maybe), HoC (10 hallmarks, multi-label), plain causal LM.

A task reads its labelled files (any path: the same code scores the unseen test files), turns each
record into an ``Example`` (prompt segments + answer text + label), and scores predictions.
Problems with the user's files are ``InputError`` (exit code 2), naming the config key and the file.
Which module is a task's is the registry's answer (``engine.core.registry.TASKS``).
"""
from __future__ import annotations

from engine.core import registry
from engine.core.errors import InputError
from engine.tasks.base import Example


def get_task(name: str):
    """The task module for ``task.name`` (the registry's ``impl``: pubmedqa, hoc, lm)."""
    if name not in registry.TASKS:
        raise InputError(f"unknown task {name!r} (tasks: {', '.join(registry.TASK_NAMES)})", key="task.name")
    return registry.load_impl(registry.task(name).impl)


__all__ = ["Example", "InputError", "get_task"]
