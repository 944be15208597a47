"""The old import path of the run queue, kept while code outside the engine's lower floors still imports
it: the queue's rows (SQL) are in engine.store.queue_rows, its orchestration in engine.orchestrate.queue.

Import from those two; this module goes when nothing imports it (the import-linter layers contract
ignores exactly this one upward import, engine.store.queue -> engine.orchestrate.queue, until then).
"""
from engine.orchestrate.queue import ENDED, MAX_PARALLEL, RUNNING, WAITING, Queue, check_parallel, describe

__all__ = ["ENDED", "MAX_PARALLEL", "RUNNING", "WAITING", "Queue", "check_parallel", "describe"]
