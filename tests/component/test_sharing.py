"""Shares of one device through the kubelet plugin, over real sockets and a real HTTP API server.

Each (device, shareID) gets its own CDI device and checkpoint entry; shares never exceed the
device and never meet an exclusive allocation; unpreparing one share leaves the others; a
strategy the device cannot run is refused naming the field; AMD CU masks are disjoint and
survive a restart; NVIDIA MPS shares run behind one control daemon per GPU, restarted when it
dies, kept across a driver restart and stopped with the last share. (The real scheduler's side
is tests/e2e/test_sharing.py.)
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from driver import cdi
from driver.backends import BackendContext
from driver.checkpoint import CheckpointStore, PreparedClaim, PreparedDevice
from driver.claims import Consumer
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.health import HealthBoard
from driver.inventory import LiveInventory
from driver.locks import FileLocks
from driver.metrics import DeviceCollector, SampleCache
from driver.model import DeviceSample, ProcessUsage, Sharing, Strategy
from support import mps, nvml
from support.claims import allocated_claim, result, share, sharing_config
from support.hosts import FakeHost
from support.waiting import wait_until
from vendors.simulated import SimulatedBackend

POOL = "node-a"
GPU0, GPU1 = "gpu-0000-1b-00-0", "gpu-0000-43-00-0"
MI300X = "gpu-0000-05-00-0"
GI = 1 << 30
GPU0_UUID = "GPU-01974aa6-a4c1-5bc0-bb11-ae467477a12e"  # of gpu-0000-1b-00-0 in the DGX recording
needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the MPS launcher needs root for its mount namespace (CI runs as root)",
)


def recorded(node) -> dict[str, PreparedClaim]:  # type: ignore[no-untyped-def]
    locks = FileLocks(node.plugin_dir / "serialize.lock")
    return CheckpointStore(node.plugin_dir / "checkpoint.json", locks).read().claims


def spec_devices(node, uid: str) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    spec = json.loads(cdi.spec_path(node.cdi_root, "unidra.dev", uid).read_text())
    return {d["name"]: d["containerEdits"] for d in spec["devices"]}


def share_id(api: FakeApiServer, claim: tuple[str, str, str], index: int = 0) -> str:
    obj = api.get("resource.k8s.io", "resourceclaims", claim[1], namespace=claim[0])
    return str(obj["status"]["allocation"]["devices"]["results"][index]["shareID"])


def test_shares_of_one_gpu_each_get_their_own_cdi_device_and_record(node, api) -> None:  # type: ignore[no-untyped-def]
    with node.serve(sharing=True) as (_, plugin):
        a = allocated_claim(api, "a", [share(GPU0, POOL, "30Gi")])
        b = allocated_claim(api, "b", [share(GPU0, POOL, "30Gi")])
        answers = plugin.prepare([a, b])
        assert answers[a[2]].error == "" and answers[b[2]].error == ""
        for claim in (a, b):
            sid = share_id(api, claim)
            (device,) = answers[claim[2]].devices
            assert device["shareID"] == sid  # kubelet gets it back (v1 field 5)
            assert device["cdiDeviceIDs"] == [f"k8s.unidra.dev/claim={claim[2]}-{GPU0}-{sid}"]
            (entry,) = recorded(node)[claim[2]].devices
            assert (entry.share_id, entry.consumed) == (sid, {"memory": 30 * GI, "computeUnits": 0})
            # The simulated GPU has no MPS: its shares take turns, and nothing is held.
            assert entry.sharing == Sharing(Strategy.TIME_SLICING)

        # A third 30Gi share would not fit the 79.6 GiB GPU; a whole-device claim neither.
        c = allocated_claim(api, "c", [share(GPU0, POOL, "30Gi")])
        whole = allocated_claim(api, "whole", [result(GPU0, POOL)])
        refused = plugin.prepare([c, whole])
        assert (
            f"the shares of device {GPU0} would use 90Gi of memory, more than its 81559Mi"
            in refused[c[2]].error
        )
        assert "an exclusive allocation cannot join them" in refused[whole[2]].error
        assert set(recorded(node)) == {a[2], b[2]}
        assert not cdi.spec_path(node.cdi_root, "unidra.dev", c[2]).exists()

        # Unprepare releases one share and leaves the other alone; then the third one fits.
        assert plugin.unprepare([a])[a[2]].error == ""
        assert set(recorded(node)) == {b[2]}
        assert cdi.spec_path(node.cdi_root, "unidra.dev", b[2]).exists()
        assert plugin.prepare([c])[c[2]].error == ""


def test_two_shares_of_one_gpu_in_one_claim_are_not_duplicates(node, api) -> None:  # type: ignore[no-untyped-def]
    with node.serve(sharing=True) as (_, plugin):
        claim = allocated_claim(
            api,
            "two-containers",
            [
                share(GPU0, POOL, "20Gi", request="small"),
                share(GPU0, POOL, "40Gi", request="large"),
            ],
        )
        answer = plugin.prepare([claim])[claim[2]]
        assert answer.error == ""
        assert [d["requestNames"] for d in answer.devices] == [["small"], ["large"]]
        assert len(spec_devices(node, claim[2])) == 2
        # Together they hold 60Gi of the GPU: another 20Gi share does not fit.
        other = allocated_claim(api, "other", [share(GPU0, POOL, "20Gi")])
        assert "would use 80Gi of memory" in plugin.prepare([other])[other[2]].error


def test_an_exclusive_holder_keeps_shares_away(node, api) -> None:  # type: ignore[no-untyped-def]
    with node.serve(sharing=True) as (_, plugin):
        owner = allocated_claim(api, "owner", [result(GPU1, POOL)])
        assert plugin.prepare([owner])[owner[2]].error == ""
        guest = allocated_claim(api, "guest", [share(GPU1, POOL, "10Gi")])
        assert "already prepared for claim default/owner" in plugin.prepare([guest])[guest[2]].error


def test_a_strategy_the_device_cannot_run_is_refused_naming_the_field(node, api) -> None:  # type: ignore[no-untyped-def]
    with node.serve(sharing=True) as (_, plugin):
        claim = allocated_claim(
            api, "wants-mps", [share(GPU0, POOL, "10Gi")], config=[sharing_config("MPS")]
        )
        error = plugin.prepare([claim])[claim[2]].error
        assert error == (
            "status.allocation.devices.config[0].opaque.parameters.sharing.strategy: MPS is not "
            f"available on {GPU0} (nvidia NVIDIA H100 80GB HBM3); it offers TimeSlicing"
        )
        assert recorded(node) == {}


def test_amd_cu_masks_are_disjoint_and_survive_a_restart(node, api) -> None:  # type: ignore[no-untyped-def]
    a = allocated_claim(api, "a", [share(MI300X, POOL, "64Gi", "38")])
    b = allocated_claim(api, "b", [share(MI300X, POOL, "64Gi", "76")])
    with node.serve("mi300x", sharing=True) as (_, plugin):
        answers = plugin.prepare([a, b])
        assert answers[a[2]].error == "" and answers[b[2]].error == ""
    masks = {}
    for claim in (a, b):
        (edits,) = spec_devices(node, claim[2]).values()
        masks[claim[1]] = [e for e in edits.get("env", []) if e.startswith("HSA_CU_MASK=")]
    # The two claims of one call are prepared side by side: either may plan first, but their
    # masks never overlap (a clash is planned again, not refused).
    assert sorted(masks.values()) in (
        [["HSA_CU_MASK=0:0-37"], ["HSA_CU_MASK=0:38-113"]],
        [["HSA_CU_MASK=0:0-75"], ["HSA_CU_MASK=0:76-113"]],
    )
    assert {len(range(*_bounds(m[0]))) for m in masks.values()} == {38, 76}

    # /var/run is a tmpfs: after a reboot the specs are rewritten, with the same masks.
    before = spec_devices(node, b[2])
    cdi.spec_path(node.cdi_root, "unidra.dev", b[2]).unlink()
    with node.serve("mi300x", sharing=True) as (_, plugin):
        assert spec_devices(node, b[2]) == before
        c = allocated_claim(api, "c", [share(MI300X, POOL, "8Gi", "8")])
        assert plugin.prepare([c])[c[2]].error == ""
        (edits,) = spec_devices(node, c[2]).values()
        assert "HSA_CU_MASK=0:114-121" in edits["env"]


def _bounds(mask: str) -> tuple[int, int]:
    """`HSA_CU_MASK=0:38-113` as range bounds (38, 114)."""
    first, last = mask.rsplit(":", 1)[1].split("-")
    return int(first), int(last) + 1


# -- NVIDIA MPS through the whole plugin: the real backend on a fake host -----------------------


@pytest.fixture
def nvidia_node(node, tmp_path: Path) -> Iterator[tuple[Path, dict[str, object]]]:  # type: ignore[no-untyped-def]
    """A fake NVIDIA host (NVML replaying a DGX H100, recording tools), as plugin settings."""
    host = FakeHost(node.root / "host")
    host.proc_devices({"nvidia-frontend": 195, "nvidia-caps": 237, "nvidia-uvm": 510})
    record = tmp_path / "mps.jsonl"
    mps.nvidia_tools(host, record)
    settings: dict[str, object] = {
        "backends": ("nvidia",),
        "backend_options": {},
        "host_root": host.root,
        "sharing": True,
        "sharing_check_seconds": 0.2,
    }
    with nvml.install(nvml.load("dgx-h100.json")):
        yield record, settings
    mps.kill_daemons(record)


@needs_root
def test_mps_shares_through_the_plugin_and_a_restart(node, api, nvidia_node) -> None:  # type: ignore[no-untyped-def]
    record, settings = nvidia_node
    a = allocated_claim(api, "a", [share(GPU0, POOL, "30Gi", "33")])
    b = allocated_claim(api, "b", [share(GPU0, POOL, "20Gi")])
    with node.serve(**settings) as (_, plugin):
        answers = plugin.prepare([a, b])
        assert answers[a[2]].error == "" and answers[b[2]].error == ""
        (edits,) = spec_devices(node, a[2]).values()
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=30G" in edits["env"]
        assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25" in edits["env"]
        assert {m["containerPath"] for m in edits["mounts"]} >= {"/tmp/nvidia-mps", "/dev/shm"}
        (edits,) = spec_devices(node, b[2]).values()
        assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=20G" in edits["env"]
        assert not any(e.startswith("CUDA_MPS_ACTIVE_THREAD") for e in edits["env"])
        (first,) = mps.runs(record, "daemon")  # one daemon for the GPU's two shares

        # A daemon that dies is started again by the sharing check, without a prepare.
        os.kill(first["pid"], signal.SIGKILL)
        wait_until(lambda: len(mps.runs(record, "daemon")) == 2, what="the daemon's restart")

    # The driver stops; the daemon serves on. The next instance finds it and starts none.
    _, second = mps.runs(record, "daemon")
    assert mps.alive(second["pid"])
    with node.serve(**settings) as (_, plugin):
        assert len(mps.runs(record, "daemon")) == 2
        assert plugin.unprepare([a])[a[2]].error == ""
        assert mps.alive(second["pid"])  # share b still needs it
        assert plugin.unprepare([b])[b[2]].error == ""
        wait_until(lambda: not mps.alive(second["pid"]), what="the last share's daemon to quit")
    assert mps.smi_calls(record) == [
        f"nvidia-smi -i {GPU0_UUID} -c EXCLUSIVE_PROCESS",
        f"nvidia-smi -i {GPU0_UUID} -c DEFAULT",
    ]


@needs_root
def test_a_daemon_that_died_with_the_driver_is_started_again(node, api, nvidia_node) -> None:  # type: ignore[no-untyped-def]
    record, settings = nvidia_node
    claim = allocated_claim(api, "a", [share(GPU0, POOL, "30Gi")])
    with node.serve(**settings) as (_, plugin):
        assert plugin.prepare([claim])[claim[2]].error == ""
    # A driver restart in a container takes its daemons with it (docs/sharing.md).
    mps.kill_daemons(record)
    with node.serve(**settings):
        assert len(mps.runs(record, "daemon")) == 2  # recovery started it before serving
        assert mps.alive(mps.runs(record, "daemon")[-1]["pid"])


def test_metrics_show_what_each_share_consumed_and_uses(tmp_path: Path) -> None:
    """Consumption from the checkpoint for every vendor; memory per share where the vendor
    reports it per process, joined to pods through the processes' cgroups."""
    host = FakeHost(tmp_path / "host")
    pods = ("0f2a9d1c-5b6e-4c2d-9a8b-7e6f5d4c3b2a", "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d")
    systemd = pods[0].replace("-", "_")  # the systemd cgroup driver's spelling
    host.file(
        "/proc/4242/cgroup",
        "0::/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{systemd}.slice/cri-containerd-1.scope\n",
    )
    host.file("/proc/4343/cgroup", f"0::/kubepods/burstable/pod{pods[1]}/0123abcd\n")
    host.file("/proc/4444/cgroup", "0::/system.slice/nvidia-persistenced.service\n")
    store = CheckpointStore(tmp_path / "checkpoint.json", FileLocks(tmp_path / "lock"))
    shares = {}
    with store.update() as checkpoint:
        for name, pod in zip(("a", "b"), pods, strict=True):
            sid = f"{name * 8}-0000-4000-8000-000000000000"
            shares[name] = sid
            checkpoint.claims[name] = PreparedClaim(
                name,
                "ns",
                f"claim-{name}",
                (
                    PreparedDevice(
                        "gpu",
                        POOL,
                        GPU0,
                        (),
                        share_id=sid,
                        consumed={"memory": 30 * GI, "computeUnits": 0},
                    ),
                ),
                (Consumer("pods", f"pod-{name}", pod),),
            )
    cache = SampleCache()
    cache.replace(
        [
            DeviceSample(
                GPU0,
                processes=(
                    ProcessUsage(4242, 8 * GI),
                    ProcessUsage(4343, 2 * GI),
                    ProcessUsage(4444, GI),  # not in a pod: no share's
                ),
            )
        ]
    )
    backend = SimulatedBackend(BackendContext(node_name="n", options={"profile": "dgx-h100"}))
    registry = CollectorRegistry()
    registry.register(
        DeviceCollector(
            node="n",
            inventory=LiveInventory([backend]).current,
            board=HealthBoard(taint_key="k/u"),
            store=store,
            cache=cache,
            host_root=host.root,
        )
    )
    text = generate_latest(registry).decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    usage = {
        s.labels["share_id"]: (s.labels["pod_uid"], s.value)
        for s in samples
        if s.name == "unidra_share_memory_usage_bytes"
    }
    assert usage == {shares["a"]: (pods[0], 8.0 * GI), shares["b"]: (pods[1], 2.0 * GI)}
    consumed = {
        (s.labels["share_id"], s.labels["capacity"]): s.value
        for s in samples
        if s.name == "unidra_share_consumed"
    }
    assert consumed[(shares["a"], "memory")] == 30.0 * GI
    info = {s.labels["share_id"] for s in samples if s.name == "unidra_claim_device_info"}
    assert info == set(shares.values())


def test_per_process_limits_apply_to_one_gpu_per_claim(node, api) -> None:  # type: ignore[no-untyped-def]
    """A CU mask (or an MPS daemon) reaches a process through its environment, where its GPU
    is device 0: two masked shares of different GPUs in one claim cannot both hold."""
    other = "gpu-0000-26-00-0"
    claim = allocated_claim(
        api,
        "two-gpus",
        [share(MI300X, POOL, "8Gi", "8", request="a"), share(other, POOL, "8Gi", "8", request="b")],
    )
    fine = allocated_claim(
        api,
        "memory-only",
        [share(MI300X, POOL, "8Gi", request="a"), share(other, POOL, "8Gi", request="b")],
    )
    with node.serve("mi300x", sharing=True) as (_, plugin):
        answers = plugin.prepare([claim, fine])
    assert answers[claim[2]].error == (
        f"per-process sharing (MPS, CU masks) applies to one GPU per claim, but this claim holds "
        f"{MI300X}, {other}; use one claim per GPU"
    )
    assert answers[fine[2]].error == ""  # time-sliced shares of two GPUs hold nothing per process
