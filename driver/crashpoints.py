"""Named crash points for reliability tests, in the spirit of etcd's gofail.

With UNIDRA_CRASHPOINT=<name> in the environment, the process SIGKILLs itself when it reaches
that point, so tests can reproduce "killed exactly between these two writes" deterministically.
Unset (always in production), `hit` is one dictionary look-up.
"""

from __future__ import annotations

import os
import signal

_ARMED = os.environ.get("UNIDRA_CRASHPOINT", "")

# Every point the code declares, so tests can iterate over them and a typo fails loudly.
POINTS = (
    "prepare-after-cdi",
    "unprepare-after-record-removed",
)


def hit(point: str) -> None:
    if point == _ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
