"""The budget of a kubelet call: 30 s at most, less when the caller gives up sooner."""

from __future__ import annotations

import time

import pytest

from driver.deadlines import CALL_BUDGET_SECONDS, Deadline, DeadlineExceeded


def test_the_budget_ends_well_before_the_callers_deadline() -> None:
    assert Deadline.for_call(None).budget == CALL_BUDGET_SECONDS
    assert Deadline.for_call(45.0).budget == 30.0  # kubelet's own 45 s timeout
    assert Deadline.for_call(3.0).budget == pytest.approx(2.0)
    assert Deadline.for_call(-1.0).budget == 0.0


def test_check_raises_a_retryable_error_once_the_budget_is_spent() -> None:
    Deadline.for_call(10.0).check("reading claim default/a")
    spent = Deadline(time.monotonic() - 1, 2.0)
    assert spent.remaining() == 0.0
    with pytest.raises(
        DeadlineExceeded, match="reading claim default/a: ran out of the call's 2 s budget"
    ):
        spent.check("reading claim default/a")
