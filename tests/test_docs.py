"""The docs stay true to the tree: the architecture map names every module, and no page points at a
file the repository lacks."""
from __future__ import annotations

import re

import pytest
from helpers import REPO

pytestmark = pytest.mark.quick

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = ("engine", "studio", "bench", "tests", "docs", "resources")
LINK = re.compile(r"\]\(([^)#\s]+)")  # markdown links
PATH = re.compile(r"`((?:%s)/[\w./-]+)" % "|".join(TOP))  # `engine/core/flops.py`, `bench/train_step.py:42`


def module_map() -> dict[str, str]:
    """The folder map of docs/architecture.md: package path -> the text that describes it.

    A line ``  name/  text`` (two-space steps of indentation) opens package ``name`` under the one
    above it; the lines after it, indented deeper, continue its text."""
    text = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("## Folder map", 1)[1].split("```", 2)[1]
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    current = None
    for line in block.splitlines():
        m = re.match(r"^(\s*)([\w]+)/(?:\s|$)", line)
        if m:
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            current = "/".join([*(name for _, name in stack), m.group(2)])
            stack.append((indent, m.group(2)))
            out[current] = line[m.end():]
        elif current is not None:
            out[current] += " " + line.strip()
    return out


@pytest.mark.quick
def test_the_architecture_map_names_every_module():
    described = module_map()
    missing = []
    for top in ("engine", "studio"):
        for path in sorted((REPO / top).rglob("*.py")):
            if "__pycache__" in path.parts or path.name == "__init__.py":
                continue
            package = path.parent.relative_to(REPO).as_posix()
            words = set(re.findall(r"[\w]+", described.get(package, "")))
            if package not in described:
                missing.append(f"{package}/ (the package itself)")
            elif path.stem not in words:
                missing.append(path.relative_to(REPO).as_posix())
    assert not missing, "docs/architecture.md's folder map lacks:\n" + "\n".join(sorted(set(missing)))


@pytest.mark.quick
def test_no_page_points_at_a_missing_file():
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: link {target}")
        for target in PATH.findall(text):
            target = target.split(":")[0].rstrip(".")
            if re.search(r"\b[A-Z]{3,}\b", target):  # a placeholder (engine/tasks/NAME.py)
                continue
            if not (REPO / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
        if "DESIGN.md" in text:
            broken.append(f"{page.relative_to(REPO)}: DESIGN.md (not part of the repository)")
    for path in [*(REPO / "engine").rglob("*.py"), *(REPO / "studio").rglob("*.py")]:
        if "DESIGN.md" in path.read_text(encoding="utf-8"):
            broken.append(f"{path.relative_to(REPO)}: DESIGN.md")
    assert not broken, "references to files the repository lacks:\n" + "\n".join(broken)


@pytest.mark.quick
def test_the_map_reader_reads_nesting():
    # the reader itself: a nested package and a continuation line
    assert set(module_map()) >= {"engine", "engine/core", "engine/model", "studio"}
