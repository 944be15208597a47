"""Seeds derived from the run's seed and a position (rank, step, layer): random state that depends on
where it is used, never on how the run got there, so a resumed or re-sharded run draws the same."""
from __future__ import annotations

import hashlib


def derived_seed(*parts) -> int:
    """A 64-bit seed from the parts, joined with '/' and hashed."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little")
