"""The backend in docs/writing-a-backend.md, installed as a third party would: an entry point.

The code block is extracted from the document, written as a module with a dist-info carrying
the entry point, found through importlib.metadata, picked by its PCI vendor id, and checked by
the conformance suite: the documentation cannot drift from a working backend.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver import backends, conformance
from driver.backends import BackendContext
from support.hosts import FakeHost

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    text = (REPO / "docs/writing-a-backend.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert code is not None
    site = tmp_path / "site"
    (site / "unidra_acme-0.1.dist-info").mkdir(parents=True)
    (site / "unidra_acme.py").write_text(code.group(1))
    (site / "unidra_acme-0.1.dist-info/METADATA").write_text(
        "Metadata-Version: 2.1\nName: unidra-acme\nVersion: 0.1\n"
    )
    (site / "unidra_acme-0.1.dist-info/entry_points.txt").write_text(
        "[unidra.backends]\nacme = unidra_acme:AcmeBackend\n"
    )
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))
    sys.modules.pop("unidra_acme", None)
    importlib.invalidate_caches()


def acme_host(host: FakeHost) -> FakeHost:
    for index, bus in enumerate(("41", "42")):
        base = host.pci(f"0000:{bus}:00.0", 0x1F3C, 0x0001, 0x120000, numa=1, driver="acme")
        host.link(f"/sys/class/acme/acme{index}/device", str(base))
        host.file(f"/sys/class/acme/acme{index}/uuid", f"acme-{index}\n")
        host.file(f"/sys/class/acme/acme{index}/memory_bytes", f"{32 << 30}\n")
        host.char_device(f"/sys/class/acme/acme{index}", 499, index)
    return host


def test_the_documented_backend_loads_through_its_entry_point_and_conforms(
    installed: Path, tmp_path: Path
) -> None:
    host = acme_host(FakeHost(tmp_path / "host"))
    assert "acme" in backends.available_names()
    picked, _ = backends.detect(host.root)
    assert picked == ["acme"]
    backend = backends.create("acme", BackendContext(host_root=host.root, node_name="n"))
    found = conformance.check(backend)
    assert [d.name for d in found.devices] == ["npu-0000-41-00-0", "npu-0000-42-00-0"]
    assert found.devices[0].numa_node == 1
    assert backend.shared_edits(found.devices).env == ("ACME_VISIBLE_DEVICES=0,1",)


def test_the_documented_backend_explains_a_missing_driver(installed: Path, tmp_path: Path) -> None:
    built, failures = backends.create_all(
        ["acme"], lambda name: BackendContext(host_root=tmp_path / "empty")
    )
    assert built == []
    assert failures == {
        "acme": "the acme kernel driver is not loaded (no /sys/class/acme): modprobe acme"
    }
