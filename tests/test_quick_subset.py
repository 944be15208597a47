"""The quick subset (`pytest -m quick`) reaches every test module, so a developer who runs it while
working exercises every part of the product; the full suite adds the long end-to-end runs."""
from __future__ import annotations

import ast

import pytest
from helpers import REPO

pytestmark = pytest.mark.quick

# test modules whose every test is a long end-to-end run (minutes of real engines and widgets)
# (the queue faults kill runners in the middle of starting real engines)
ONLY_LONG = {"tests/test_studio_queue.py", "tests/faults/test_queue_faults.py"}


def has_quick_tests(path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "quick":
            return True
    return False


def test_every_test_module_has_quick_tests():
    modules = sorted(p for p in (REPO / "tests").rglob("test_*.py"))
    assert len(modules) > 20
    lacking = [p.relative_to(REPO).as_posix() for p in modules if not has_quick_tests(p)]
    assert sorted(lacking) == sorted(ONLY_LONG), (
        "test modules without a quick test (mark their fast tests @pytest.mark.quick):\n" + "\n".join(lacking))
