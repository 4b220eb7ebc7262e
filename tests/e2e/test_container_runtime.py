"""A real container runtime reads Unidra's CDI specs: podman with runc starts a container per claim.

For every built-in simulated profile, and again with `--partitions` for those that partition,
the real daemon serves a node whose /dev is a tree of real character devices. Two claims are
allocated from the slices it publishes (one device; the rest, or partitions of the rest) and
prepared over the DRA socket as kubelet does. A container started with each claim's CDI device
names must see exactly the spec's device nodes with their majors and minors (and nothing of the
other claim), the device cgroup must allow them, and the mounts and environment must be the spec's.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from driver import cdi
from driver.backends import BackendContext
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.model import ContainerEdits
from support import containers
from support.claims import allocated_claim, env_config, result
from support.processes import Process
from support.waiting import wait_until
from vendors.simulated import SimulatedBackend, profiles

pytestmark = pytest.mark.container_runtime

NODE = "node-a"
DRIVER = "unidra.dev"
PARTITIONED = [
    name
    for name in profiles.builtin_names()
    if any(p.model.partitions for p in profiles.load(name).placements)
]
MOUNTING = [
    name
    for name in profiles.builtin_names()
    if any(p.model.mounts for p in profiles.load(name).placements)
]
CONFIGS = [(name, False) for name in profiles.builtin_names()] + [
    (name, True) for name in PARTITIONED
]
# Prints every device node, the environment, the mounts and the device cgroup, then stats "$@".
SCRIPT = """
echo '== nodes'; find /dev \\( -type c -o -type b \\) -exec stat -c '%n %F %t %T' {} +
echo '== env'; env
echo '== mountinfo'; cat /proc/self/mountinfo
echo '== cgroup'; cat /sys/fs/cgroup/devices/devices.list 2>/dev/null || true
echo '== stat'; for path in "$@"; do stat -L -c '%n %F %t %T %s' "$path"; done
"""
REQUIRED = "UNIDRA_CONTAINER_RUNTIME"
DRM_NODE = re.compile(r"/dev/dri/(?P<name>(?P<kind>card|render)D?\d+)")
DEVICE_CGROUP_V1 = Path("/sys/fs/cgroup/devices/devices.list").exists()


class Seen:
    """What the container printed, section by section."""

    def __init__(self, output: str) -> None:
        sections: dict[str, list[str]] = {}
        current: list[str] = []
        for line in output.splitlines():
            if line.startswith("== "):
                current = sections.setdefault(line[3:], [])
            elif line:
                current.append(line)
        self.nodes = dict(line.split(" ", 1) for line in sections["nodes"])
        # HOSTNAME is the container's ID: it differs from one container to the next.
        self.env = {item for item in sections["env"] if not item.startswith("HOSTNAME=")}
        fields = [line.split() for line in sections["mountinfo"]]
        self.mount_options = {mount[4]: set(mount[5].split(",")) for mount in fields}
        self.cgroup = set(sections["cgroup"])
        self.stat = dict(line.split(" ", 1) for line in sections["stat"])


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[containers.Podman, Seen]]:
    """A private podman, and what a container with no CDI devices sees (the runtime's defaults).

    Where podman cannot run, the tests skip with the reason, or fail if CI requires them.
    """
    give_up = pytest.fail if os.environ.get(REQUIRED) == "required" else pytest.skip
    reason = containers.unavailable()
    if reason:
        give_up(reason)
    runtime = containers.Podman(tmp_path_factory.mktemp("podman"))
    try:
        try:
            baseline = Seen(runtime.run(tmp_path_factory.mktemp("no-cdi"), [], SCRIPT))
        except AssertionError as err:
            give_up(f"podman cannot run a container here: {err}")
        yield runtime, baseline
    finally:
        runtime.close()


def make_dev_root(profile: str, partitions: bool, root: Path) -> Path:
    """The simulated node's /dev: every node a claim could get as a real character device, and
    udev's by-path links to DRM devices."""
    backend = SimulatedBackend(
        BackendContext(node_name=NODE, options={"profile": profile, "dev-root": str(root)})
    )
    devices = backend.discover()
    edits = [backend.shared_edits(devices)]
    for device in devices:
        own = backend.device_edits(device)
        edits.append(own)
        for node in own.device_nodes:
            drm = DRM_NODE.fullmatch(node.path)
            if drm:
                link = root / "dri" / "by-path" / f"pci-{device.pci_bus_id}-{drm['kind']}"
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f"../{drm['name']}")
        layout = backend.partition_layout(device) if partitions else None
        edits += [backend.partition_edits(p) for p in layout.partitions] if layout else []
    for node in ContainerEdits().merged(edits).device_nodes:
        assert node.host_path and node.major is not None and node.minor is not None
        Path(node.host_path).parent.mkdir(parents=True, exist_ok=True)
        os.mknod(node.host_path, stat.S_IFCHR | 0o666, os.makedev(node.major, node.minor))
    return root


def published(api: FakeApiServer) -> list[dict[str, Any]]:
    """The specs of the node's ResourceSlices, once every slice of the newest generation is there."""

    def complete() -> list[dict[str, Any]] | None:
        specs = [s["spec"] for s in api.list("resource.k8s.io", "resourceslices")]
        ours = [s for s in specs if s["driver"] == DRIVER and s.get("nodeName") == NODE]
        if not ours:
            return None
        newest = max(s["pool"]["generation"] for s in ours)
        current = [s for s in ours if s["pool"]["generation"] == newest]
        return current if len(current) == current[0]["pool"]["resourceSliceCount"] else None

    return wait_until(complete, timeout=30, what="the node's ResourceSlices")


class Counters:
    """Shared counters left on the node, taken as the scheduler would when it allocates a device."""

    def __init__(self, slices: Sequence[Mapping[str, Any]]) -> None:
        self.left = {
            counter_set["name"]: {k: int(v["value"]) for k, v in counter_set["counters"].items()}
            for spec in slices
            for counter_set in spec.get("sharedCounters", [])
        }

    def take(self, device: Mapping[str, Any]) -> bool:
        needs = [
            (use["counterSet"], name, int(value["value"]))
            for use in device.get("consumesCounters", [])
            for name, value in use["counters"].items()
        ]
        if any(self.left[where][name] < amount for where, name, amount in needs):
            return False
        for where, name, amount in needs:
            self.left[where][name] -= amount
        return True


def allocate(slices: Sequence[Mapping[str, Any]], partitions: bool) -> dict[str, list[str]]:
    """Two claims: the last whole device, and every other device (or as many partitions as fit)."""
    devices = [d for spec in slices for d in spec.get("devices", [])]
    is_partition = [d["attributes"].get("partition", {}).get("bool", False) for d in devices]
    whole = [d for d, split in zip(devices, is_partition, strict=True) if not split]
    counters = Counters(slices)
    assert counters.take(whole[-1])
    rest = (
        [d for d, split in zip(devices, is_partition, strict=True) if split]
        if partitions
        else whole[:-1]
    )
    chosen = [d["name"] for d in rest if counters.take(d)]
    assert chosen, "no device left for the second claim"
    return {"one": [whole[-1]["name"]], "rest": chosen}


def expected_edits(spec: Mapping[str, Any], ids: set[str]) -> dict[str, list[Any]]:
    """The edits a CDI runtime applies for these device IDs: the spec's own, then each device's."""
    named = {cdi.qualified_name(DRIVER, d["name"]): d for d in spec["devices"]}
    assert ids == set(named), "the claim's CDI IDs are not the spec's devices"
    edits: dict[str, list[Any]] = {"deviceNodes": [], "env": [], "mounts": [], "hooks": []}
    for part in [
        spec.get("containerEdits", {}),
        *(named[i]["containerEdits"] for i in sorted(ids)),
    ]:
        for key, items in edits.items():
            items.extend(part.get(key, []))
    return edits


def stat_line(path: str) -> str:
    """A host file as busybox `stat -L -c '%F %t %T'` prints it: type, hex major and minor."""
    found = os.stat(path)
    kind = "character special file" if stat.S_ISCHR(found.st_mode) else "regular file"
    return f"{kind} {os.major(found.st_rdev):x} {os.minor(found.st_rdev):x}"


def check_container(seen: Seen, baseline: Seen, edits: Mapping[str, list[Any]]) -> None:
    assert edits["hooks"] == [], "simulated specs carry no hooks to run"
    nodes = {}
    for node in edits["deviceNodes"]:
        assert node["type"] == "c"
        wanted = f"character special file {node['major']:x} {node['minor']:x}"
        assert stat_line(node["hostPath"]) == wanted, f"{node['hostPath']} on the host"
        assert seen.nodes.get(node["path"]) == wanted, f"{node['path']} in the container"
        nodes[node["path"]] = wanted
        if DEVICE_CGROUP_V1:
            access = node.get("permissions", "rwm")
            assert f"c {node['major']}:{node['minor']} {access}" in seen.cgroup, node["path"]
    for mount in edits["mounts"]:
        target = mount["containerPath"]
        restrictions = {"ro", "nosuid", "nodev"} & set(mount.get("options", []))
        assert restrictions <= seen.mount_options[target], target
        host = stat_line(mount["hostPath"])
        size = os.stat(mount["hostPath"]).st_size
        assert seen.stat[target] == f"{host} {size}", f"{target} is not {mount['hostPath']}"
        if host.startswith("character"):
            nodes[target] = host
    # Exactly the spec's nodes and environment besides the runtime's own: nothing of another
    # claim or device, and no variable given two values.
    assert seen.nodes == {**baseline.nodes, **nodes}
    assert seen.env == baseline.env | set(edits["env"])


@pytest.mark.parametrize(
    ("profile", "partitions"),
    CONFIGS,
    ids=[f"{name}{'-partitions' if split else ''}" for name, split in CONFIGS],
)
def test_container_gets_the_claims_devices_mounts_and_environment(
    podman: tuple[containers.Podman, Seen],
    node: Any,
    api: FakeApiServer,
    processes: list[Process],
    profile: str,
    partitions: bool,
) -> None:
    runtime, baseline = podman
    dev_root = make_dev_root(profile, partitions, node.root / "dev")
    argv = [*node.argv(profile), f"--simulate-dev-root={dev_root}"]
    daemon = Process(node, argv=[*argv, "--partitions"] if partitions else argv)
    processes.append(daemon)
    plugin = daemon.wait_registered(node)
    try:
        allocation = allocate(published(api), partitions)
        claims = {
            name: allocated_claim(
                api,
                name,
                [result(device, NODE) for device in devices],
                config=[env_config({"CLAIM_NAME": name})],
            )
            for name, devices in allocation.items()
        }
        answer = plugin.prepare(claims.values())
        mounts_seen = 0
        for name, (_, _, uid) in claims.items():
            assert answer[uid].error == "", answer[uid].error
            ids = {i for device in answer[uid].devices for i in device["cdiDeviceIDs"]}
            spec_file = node.cdi_root / cdi.spec_filename(DRIVER, uid)
            edits = expected_edits(cdi.read_spec(spec_file) or {}, ids)
            assert f"CLAIM_NAME={name}" in edits["env"]
            mounts = [m["containerPath"] for m in edits["mounts"]]
            seen = Seen(runtime.run(node.cdi_root, sorted(ids), SCRIPT, mounts))
            check_container(seen, baseline, edits)
            mounts_seen += len(mounts)
        assert (mounts_seen > 0) == (profile in MOUNTING)
        answer = plugin.unprepare(claims.values())
        assert [r.error for r in answer.values()] == ["", ""]
    finally:
        plugin.close()


def test_the_profiles_exercise_partitions_and_mounts() -> None:
    """Else the checks above of partition nodes and of mounts would prove nothing."""
    assert PARTITIONED and MOUNTING
