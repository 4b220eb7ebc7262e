"""Device names are stable, DNS-label-safe, and derived from PCI address or UUID; edits merge without duplicates."""

from __future__ import annotations

import re

import pytest

from driver.model import ContainerEdits, DeviceNode, DeviceType, stable_device_name

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    ("device_type", "bdf", "uuid", "expected"),
    [
        (DeviceType.GPU, "0000:1b:00.0", "GPU-x", "gpu-0000-1b-00-0"),
        (DeviceType.NPU, "0001:e3:1f.7", "x", "npu-0001-e3-1f-7"),
        (DeviceType.TPU, None, "abc", "tpu-" + "ba7816bf8f01"),
    ],
)
def test_stable_names(device_type: DeviceType, bdf: str | None, uuid: str, expected: str) -> None:
    name = stable_device_name(device_type, bdf, uuid)
    assert name == expected
    assert DNS_LABEL.match(name) and len(name) <= 63


@pytest.mark.parametrize("bad", ["00000000:1B:00.0", "1b:00.0", "0000:1B:00.0"])
def test_non_kernel_pci_form_is_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="kernel form"):
        stable_device_name(DeviceType.GPU, bad, "u")


def test_merged_edits_keep_first_env_value_and_unique_nodes() -> None:
    node = DeviceNode(path="/dev/x", major=1, minor=2)
    a = ContainerEdits(env=("A=1", "B=1"), device_nodes=(node,))
    b = ContainerEdits(env=("A=2", "C=3"), device_nodes=(node, DeviceNode(path="/dev/y")))
    merged = a.merged([b])
    assert merged.env == ("A=1", "B=1", "C=3")
    assert [n.path for n in merged.device_nodes] == ["/dev/x", "/dev/y"]
    assert not ContainerEdits() and merged
