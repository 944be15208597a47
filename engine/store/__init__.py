"""The one store: the run database's schema (ordered migrations), its writes and its reads.

The only package that holds SQL or touches the SQLite connection; no torch, no Qt (the studio reads
through it). Orchestration that uses it (the queue runner, sweeps, the study) sits above, in
``engine.orchestrate``. ``DatabaseError`` is what opening or reading a damaged or foreign file raises,
so callers catch it without importing sqlite3 themselves.
"""
from sqlite3 import DatabaseError

__all__ = ["DatabaseError"]
