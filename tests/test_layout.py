"""Layout rules that no import contract can check.

One store: SQL text, the SQLite connection and the sqlite modules appear only in engine/store/ (the
engine and the studio read and write the run database through its functions and RunDB's methods).
One registry: a stage or task name is written as a string only in engine/core/registry.py and the
module that implements that stage or task.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO
from import_graph import cycles, graph, modules

pytestmark = pytest.mark.quick

SCANNED = ("engine", "studio")  # the product's code; tests and benchmarks may reach into the database
STORE = REPO / "engine" / "store"

# SQL statements, and the ways to reach the connection or the sqlite modules behind RunDB (a docstring
# may say "SQLite"; an import or an attribute of the module is what counts)
SQL = re.compile(r"\b(select|insert|update|delete|create)\b.*\b(from|into|set|table|index)\b"
                 r"|\.execute(many)?\(|\.query\(|\bdb\.db\b|\.conn\b"
                 r"|^\s*(import|from)\s+sqlite|\bsqlite(3|_utils)\.", re.IGNORECASE)

def product_files() -> list[Path]:
    return [p for root in SCANNED for p in sorted((REPO / root).rglob("*.py"))]


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def assert_no_hits(hits: dict[str, list[str]], what: str) -> None:
    found = [h for lines in hits.values() for h in lines]
    assert not found, f"{what}:\n" + "\n".join(found)


def sql_lines(text: str) -> list[tuple[int, str]]:
    return [(i, line.strip()) for i, line in enumerate(text.splitlines(), 1) if SQL.search(line)]


@pytest.mark.quick
def test_only_the_store_holds_sql():
    hits: dict[str, list[str]] = {}
    for path in product_files():
        if STORE not in path.parents:
            for i, line in sql_lines(path.read_text(encoding="utf-8")):
                hits.setdefault(rel(path), []).append(f"{rel(path)}:{i}: {line}")
    assert_no_hits(hits, "SQL outside engine/store (add a function to engine/store/queries.py or a RunDB method instead)")


@pytest.mark.quick
def test_the_sql_scan_finds_what_it_should():
    assert sql_lines('x = 1\nrows = conn.execute(\n  "SELECT run_id FROM evaluations")\nself.db.db.conn\n') == [
        (2, "rows = conn.execute("), (3, '"SELECT run_id FROM evaluations")'), (4, "self.db.db.conn")]
    assert sql_lines("import sqlite3\nfrom sqlite_utils import Database\nexcept sqlite3.DatabaseError:\n") == [
        (1, "import sqlite3"), (2, "from sqlite_utils import Database"), (3, "except sqlite3.DatabaseError:")]
    assert sql_lines('label = "Pick a run to delete"\nbutton.clicked.connect(f)\n"""reads SQLite."""\n') == []


# -- one registry ----------------------------------------------------------------------------------
# A stage or task name is written as a string only in engine/core/registry.py and in the module that
# implements that stage or task (its registry ``impl``); everywhere else code asks the registry (a
# capability, a spec's field) or uses its name constants (VOCAB, PRETRAIN, ..., LM, PUBMEDQA, HOC).
# The scan reads every string constant of the syntax tree (docstrings and f-string text included), so
# prose that merely contains a name ("the prompt run's parent") is not a hit; a constant *equal* to one is.
#
# Homonyms: a few names are also words of other vocabularies (a config section, a config value, a
# tensor's name). Each lives in one named constant, listed here with what it means; the scan skips the
# value of that assignment in that file, and nothing else.
HOMONYMS = {
    ("engine/core/config.py", "SECTION"): "a config section's name: the [prompt] section (PromptConfig)",
    ("engine/core/config.py", "HEADS"): "task.head = 'lm': labels predicted as text by the language-model head",
    ("engine/core/config.py", "PROMPT_INITS"): "prompt.init = 'vocab': prompt vectors drawn from vocabulary embeddings",
    ("engine/model/soft_prompt.py", "TENSOR"): "the soft prompt's tensor name in its files and checkpoints",
    ("engine/store/rundb.py", "PROMPT_ARTIFACT"): "artifacts.kind of a soft prompt file",
    ("engine/publish/hf_export.py", "REPORT_PROMPT"): "export-hf's JSON field describing the exported prompt",
}

def registry_names() -> set[str]:
    from engine.core import registry

    return set(registry.STAGES) | set(registry.TASKS)


def own_modules() -> dict[str, set[str]]:
    """File -> the names it may write: the registry all of them, an implementation its own."""
    from engine.core import registry

    out = {"engine/core/registry.py": registry_names()}
    for name, impl in [*((s.name, s.impl) for s in registry.STAGES.values()),
                       *((t.name, t.impl) for t in registry.TASKS.values())]:
        if impl:
            out.setdefault(impl.partition(":")[0].replace(".", "/") + ".py", set()).add(name)
    return out


def name_literals(text: str, names: set[str], homonyms: set[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, name) of every string constant equal to one of ``names``, outside the values assigned to
    the ``homonyms`` constants."""
    import ast

    tree = ast.parse(text)
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id in homonyms for t in targets):
                skipped.update(id(n) for n in ast.walk(node.value))
    return sorted((n.lineno, n.value) for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in names
                  and id(n) not in skipped)


@pytest.mark.quick
def test_stage_and_task_names_are_written_only_in_the_registry_and_their_own_modules():
    names, own = registry_names(), own_modules()
    hits: dict[str, list[str]] = {}
    for path in product_files():
        r = rel(path)
        homonyms = {const for (file, const) in HOMONYMS if file == r}
        for i, name in name_literals(path.read_text(encoding="utf-8"), names - own.get(r, set()), homonyms):
            hits.setdefault(r, []).append(f"{r}:{i}: {name!r}")
    assert_no_hits(hits, "stage or task names written as strings (use engine.core.registry: a capability of "
                   "stage(name) / task(name), or the constants VOCAB ... HOC)")


@pytest.mark.quick
def test_the_name_scan_finds_what_it_should():
    names = {"prompt", "lm", "hoc"}
    text = ('"""A prompt run."""\nif stage == "prompt":\n    x = cfg.prompt\n'
            'HEADS = ("lm", "classifier")\nkeys = {"hoc": 1}\nmsg = f"a {x} prompt"\n')
    assert name_literals(text, names) == [(2, "prompt"), (4, "lm"), (5, "hoc")]
    assert name_literals(text, names, {"HEADS"}) == [(2, "prompt"), (5, "hoc")]
    assert name_literals(text, set()) == []


def test_no_import_cycle_among_the_engines_modules():
    """Within engine/cli (and every other engine package) no module imports, even inside a function or
    through importlib, a module that imports it back."""
    g = graph(modules(REPO / "engine"))
    assert "engine.cli.train_cmd" in g["engine.cli.main"]  # the scan sees the command modules
    assert not cycles(g), f"import cycles among engine modules: {cycles(g)}"


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert cycles({"a": ["b"], "b": []}) == []
