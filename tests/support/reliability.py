"""Sizes of the reliability suite: small in CI, large with UNIDRA_RELIABILITY=full (hack/reliability).

Each test records what it ran in `TALLY`; the suite prints the tally at the end, so a full run
reports its counts (docs/reliability.md keeps the last ones).
"""

from __future__ import annotations

import os
from collections import Counter

LEVEL = os.environ.get("UNIDRA_RELIABILITY", "ci")
_BUDGETS = {
    # kill -9 rounds, each a fresh process under a stream of calls
    "crash_rounds": {"ci": 4, "full": 1000},
    # seconds the API server is gone
    "outage_seconds": {"ci": 3, "full": 60},
    # a claim GET that hangs past the client's read timeout (15 s); 0 skips it
    "hang_seconds": {"ci": 0, "full": 20},
    # hypothesis examples per property
    "fuzz_examples": {"ci": 60, "full": 3000},
}
TALLY: Counter[str] = Counter()


def budget(name: str) -> int:
    if LEVEL not in ("ci", "full"):
        raise ValueError(f"UNIDRA_RELIABILITY={LEVEL!r}: expected ci or full")
    return _BUDGETS[name][LEVEL]
