"""Print what the reliability suite ran, so full runs report their counts."""

from __future__ import annotations

import pytest

from support.reliability import LEVEL, TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TALLY:
        terminalreporter.section(f"reliability ({LEVEL})")
        for name, count in sorted(TALLY.items()):
            terminalreporter.write_line(f"{name}: {count}")
