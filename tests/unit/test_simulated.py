"""Simulated node profiles: every built-in loads and mirrors its machine, user files are checked strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from driver.backends import BackendContext
from driver.errors import BackendUnavailable, ConfigError
from driver.model import DeviceType, Mount
from vendors.simulated import SimulatedBackend, profiles


def backend(profile: str, **options: str) -> SimulatedBackend:
    return SimulatedBackend(
        BackendContext(node_name="node-a", options={"profile": profile, **options})
    )


EXPECTED = {
    "dgx-h100": (8, {"nvidia"}),
    "mi300x": (8, {"amd"}),
    "gaudi3": (8, {"intel"}),
    "rngd": (8, {"furiosa"}),
    "rbln-atom": (4, {"rebellions"}),
    "mixed": (9, {"nvidia", "amd", "intel", "furiosa", "rebellions"}),
}


def test_builtin_profiles_are_the_documented_ones() -> None:
    assert profiles.builtin_names() == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_profiles(name: str) -> None:
    devices = backend(name).discover()
    count, vendors = EXPECTED[name]
    assert len(devices) == count
    assert {d.vendor for d in devices} == vendors
    assert len({d.name for d in devices}) == count
    assert len({d.uuid for d in devices}) == count
    for device in devices:
        assert device.memory_bytes > 0 and device.compute_units > 0 and device.precisions


def test_dgx_h100_mirrors_the_machine() -> None:
    devices = backend("dgx-h100").discover()
    assert {d.model for d in devices} == {"NVIDIA H100 80GB HBM3"}
    assert [d.numa_node for d in devices] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert {d.interconnect.technology for d in devices if d.interconnect} == {"nvlink"}
    assert len({d.interconnect.domain for d in devices if d.interconnect}) == 1
    assert all(len(d.peers) == 7 for d in devices)
    assert all(d.uuid.startswith("GPU-") for d in devices)


def test_identity_is_stable_across_restarts_and_differs_between_nodes() -> None:
    first = [(d.name, d.uuid) for d in backend("mixed").discover()]
    again = [(d.name, d.uuid) for d in backend("mixed").discover()]
    other = SimulatedBackend(
        BackendContext(node_name="node-b", options={"profile": "mixed"})
    ).discover()
    assert first == again
    assert {u for _, u in first}.isdisjoint({d.uuid for d in other})


def test_edits_carry_the_vendor_device_nodes_and_drm_minors_are_node_wide() -> None:
    sim = backend("mixed")
    by_vendor = {}
    for device in sim.discover():
        by_vendor.setdefault(device.vendor, []).append(device)
    amd_nodes = [n.path for d in by_vendor["amd"] for n in sim.device_edits(d).device_nodes]
    intel_nodes = [n.path for d in by_vendor["intel"] for n in sim.device_edits(d).device_nodes]
    assert amd_nodes == [
        "/dev/dri/card1",
        "/dev/dri/renderD128",
        "/dev/dri/card2",
        "/dev/dri/renderD129",
    ]
    assert intel_nodes == ["/dev/dri/card3", "/dev/dri/renderD130"]
    assert [n.path for n in sim.shared_edits(by_vendor["amd"]).device_nodes] == ["/dev/kfd"]
    rngd = sim.device_edits(by_vendor["furiosa"][1])
    assert rngd.device_nodes[0].path == "/dev/rngd/npu1mgmt" and len(rngd.device_nodes) == 35


def test_claim_env_joins_the_claims_devices() -> None:
    sim = backend("gaudi3")
    devices = list(sim.discover())
    shared = sim.shared_edits([devices[2], devices[5]])
    assert "HABANA_VISIBLE_DEVICES=2,5" in shared.env
    assert "HL_VISIBLE_DEVICES=/dev/accel/accel2,/dev/accel/accel5" in shared.env


def test_dev_root_becomes_host_path() -> None:
    sim = backend("dgx-h100", **{"dev-root": "/tmp/fakedev/"})
    node = sim.device_edits(sim.discover()[0]).device_nodes[0]
    assert (node.path, node.host_path) == ("/dev/nvidia0", "/tmp/fakedev/nvidia0")


def test_intel_gpus_bind_udevs_by_path_links_only_where_the_dev_root_has_them(
    tmp_path: Path,
) -> None:
    by_path = tmp_path / "dri" / "by-path"
    by_path.mkdir(parents=True)
    (tmp_path / "dri" / "card3").touch()
    (by_path / "pci-0000:98:00.0-card").symlink_to("../card3")
    (by_path / "pci-0000:98:00.0-render").symlink_to("../renderD130")  # dangling: left out
    sim = backend("mixed", **{"dev-root": str(tmp_path)})
    devices = {d.vendor: d for d in sim.discover()}
    assert sim.device_edits(devices["intel"]).mounts == (
        Mount(
            f"{by_path}/pci-0000:98:00.0-card",
            "/dev/dri/by-path/pci-0000:98:00.0-card",
            options=("bind",),
        ),
    )
    assert sim.device_edits(devices["amd"]).mounts == ()  # the AMD backend binds none
    # Without a dev root the host's own /dev is looked at, which has no such GPU here.
    assert backend("mixed").device_edits(devices["intel"]).mounts == ()


def test_templates_take_the_pci_address() -> None:
    assert profiles.expand("pci-{pci}-render{drm+128}", 0, 2, pci="0000:98:00.0") == (
        "pci-0000:98:00.0-render130"
    )


def test_no_profile_is_a_one_line_reason() -> None:
    with pytest.raises(BackendUnavailable, match="needs a profile: pass --simulate"):
        SimulatedBackend(BackendContext())


def test_user_profile_with_its_own_model(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(
        """
description: a lab box
models:
  tpu-v5e:
    vendor: google
    type: tpu
    model: TPU v5 lite
    architecture: v5e
    memory: 17179869184
    computeUnits: 1
    precisions: [bf16, int8]
    pciVendorId: "0x1ae0"
    pciDeviceId: "0x0063"
    interconnect: ici
    deviceNodes:
      - {path: "/dev/vfio/{index}", major: 243, minor: "{index}"}
devices:
  - model: tpu-v5e
    interconnectDomain: slice-2x2
    instances:
      - {pciBusID: "0000:00:04.0", numaNode: -1}
      - {pciBusID: "0000:00:05.0"}
"""
    )
    devices = backend(str(path)).discover()
    assert [d.type for d in devices] == [DeviceType.TPU, DeviceType.TPU]
    assert devices[0].numa_node is None  # -1 means unknown
    assert devices[0].peers == (devices[1].uuid,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("devices: []", "a profile needs at least one device"),
        (
            "devices: [{model: nope, instances: [{pciBusID: '0000:01:00.0'}]}]",
            r"devices\[0\]\.model: unknown model 'nope'",
        ),
        (
            "devices: [{model: rngd, instances: [{pciBusID: '0000:01:00.0', numa: 1}]}]",
            r"instances\[0\]\.numa: unknown field",
        ),
        ("devices: [{model: rngd, instances: [{pciBusID: 5}]}]", r"pciBusID: must be string"),
        (
            "devices: [{model: rngd, interconnectDomain: x, instances: [{pciBusID: '0000:01:00.0'}]}]",
            "has no interconnect",
        ),
        (
            "devices: [{model: rngd, instances: [{pciBusID: '0000:01:00.0'}, {pciBusID: '0000:01:00.0'}]}]",
            "used twice",
        ),
        ("devices: [", "not valid YAML"),
        (
            "models: {x: {vendor: v, type: npu, model: X, architecture: a, memory: 1, computeUnits: 1,"
            " precisions: [], pciVendorId: '0x1', pciDeviceId: '0x2', mounts: [/etc/x.json]}}\n"
            "devices: [{model: x, instances: [{pciBusID: '0000:01:00.0'}]}]",
            r"models\.x\.mounts\[0\]: must be a path under /dev/",
        ),
    ],
)
def test_bad_user_profiles_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        backend(str(path))
    assert str(path) in str(caught.value)


def test_unknown_profile_lists_the_builtins() -> None:
    with pytest.raises(ConfigError, match=r"neither a built-in profile .*dgx-h100.* nor a file"):
        backend("dgx-a100")
