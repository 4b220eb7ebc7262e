"""The time budget of one kubelet call, shared by everything the call does for each of its claims.

Kubelet gives up on a NodePrepareResources call after 45 s and then fails every claim in it. The
budget ends well before that, so each claim that runs out of time gets its own retryable error
while the others keep their answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from driver.errors import RetryableError

# Kubelet's own per-call timeout is 45 s (defaultClientCallTimeout); answering after 30 s at the
# latest leaves room for the transfer and a loaded node.
CALL_BUDGET_SECONDS = 30.0
# With a shorter caller deadline, use this share of it and keep the rest for the answer.
CALLER_SHARE = 2 / 3


class DeadlineExceeded(RetryableError):
    """The call's budget ran out before this claim finished; nothing was written for it."""


@dataclass(frozen=True)
class Deadline:
    expires: float  # time.monotonic()
    budget: float

    @classmethod
    def for_call(cls, caller_remaining: float | None) -> Deadline:
        """The budget of a call whose caller gives up after `caller_remaining` seconds (None: never)."""
        budget = CALL_BUDGET_SECONDS
        if caller_remaining is not None:
            budget = min(budget, max(0.0, caller_remaining * CALLER_SHARE))
        return cls(time.monotonic() + budget, budget)

    def remaining(self) -> float:
        return max(0.0, self.expires - time.monotonic())

    def check(self, doing: str) -> None:
        """Raise DeadlineExceeded if no time is left for `doing`."""
        if self.remaining() <= 0:
            raise DeadlineExceeded(
                f"{doing}: ran out of the call's {self.budget:.3g} s budget; kubelet retries"
            )
