"""Every hardware backend is held to the identity-only rule by the conformance property."""

from __future__ import annotations

from pathlib import Path

from driver import backends


def test_every_hardware_backend_runs_the_optional_reads_property() -> None:
    names = [name for name in backends.available_names() if name != "simulated"]
    assert names == ["amd", "furiosa", "gaudi", "intel-gpu", "nvidia", "rebellions", "tpu"]
    for name in names:
        tests = Path(__file__).parent / f"test_{name.replace('-', '_')}.py"
        assert "conformance.check_optional_reads(" in tests.read_text(), name
