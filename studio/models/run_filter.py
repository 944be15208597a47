"""Which runs a search shows: every word of the text in the run's id, name, stage, status, tags or notes
(case-insensitive), as the runs browser, the compare list and ``search_runs`` filter them."""
from __future__ import annotations

from typing import Iterable


def run_text(run: dict) -> str:
    """What a search looks in, lower-cased."""
    return " ".join([run["id"], run.get("name") or "", run.get("notes") or "", " ".join(run.get("tags") or []),
                     run["stage"], run["status"]]).lower()


def text_matches(run: dict, text: str) -> bool:
    hay = run_text(run)
    return all(word in hay for word in text.lower().split())


def run_matches(run: dict, text: str, status: str = "", stage: str = "") -> bool:
    """The browser's filter: a status and a stage ("" for any), and the search text."""
    if status and run["status"] != status:
        return False
    if stage and run["stage"] != stage:
        return False
    return text_matches(run, text)


def search_runs(runs: Iterable[dict], text: str, include_archived: bool = False) -> list[dict]:
    """The runs whose id, name, stage, status, tags or notes contain every word of ``text``."""
    return [r for r in runs if (include_archived or not r.get("archived")) and text_matches(r, text)]
