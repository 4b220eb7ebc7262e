"""NVIDIA sharing against the real pynvml (fake libnvidia-ml, DGX H100 recording) and fake
`nvidia-smi` / `nvidia-cuda-mps-control` programs under the host root that record their calls.

Covers what a GPU offers (MPS only with the control program, Volta or newer, and a state
directory), a share's MPS environment and mounts from its limits, the MPS control daemon's whole
life (started in its own mount namespace with the GPU's /dev/shm, restarted when it dies, found
again by a new driver instance, stopped with `quit` when the last share goes, a leftover one
cleaned up), compute modes and time slices through nvidia-smi without a shell, and the errors.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver import inventory, sharing, slices, validation
from driver.backends import BackendContext
from driver.errors import BackendUnavailable
from driver.model import COMPUTE_UNITS, MEMORY, DeviceSharing, Sharing, Strategy
from support import mps, nvml
from support.hosts import FakeHost
from support.waiting import wait_until
from vendors.nvidia import NvidiaBackend
from vendors.nvidia.mps import client_env, memory_limit

GI = 1 << 30
MPS = DeviceSharing(Strategy.MPS)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the MPS launcher needs root for its mount namespace (CI runs as root)",
)


@pytest.fixture
def record(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mps.jsonl"
    yield path
    mps.kill_daemons(path)


def backend(host: FakeHost, state: Path | None, **options: str) -> NvidiaBackend:
    found = NvidiaBackend(
        BackendContext(host_root=host.root, node_name="node-a", options=options, state_dir=state)
    )
    found.discover()
    return found


@pytest.fixture
def gpus(host: FakeHost, record: Path, tmp_path: Path) -> Iterator[NvidiaBackend]:
    mps.nvidia_tools(host, record)
    with nvml.install(nvml.load("dgx-h100.json")):
        yield backend(host, tmp_path / "state")


def gpu(found: NvidiaBackend, name: str = "gpu-0000-1b-00-0"):  # type: ignore[no-untyped-def]
    return next(d for d in found.discover() if d.name == name)


def test_a_gpu_offers_mps_first_and_time_slices(gpus: NvidiaBackend) -> None:
    support = gpus.sharing_support(gpu(gpus))
    assert support is not None
    assert support.strategies == (Strategy.MPS, Strategy.TIME_SLICING)
    assert support.limits == {Strategy.MPS: frozenset({MEMORY, COMPUTE_UNITS})}
    assert support.intervals == ("Default", "Short", "Medium", "Long")


def test_mig_devices_are_not_shared(gpus: NvidiaBackend) -> None:
    migs = [d for d in gpus.discover() if d.partition_profile]
    assert migs and all(gpus.sharing_support(d) is None for d in migs)


def test_without_the_mps_program_shares_take_turns(
    host: FakeHost, record: Path, tmp_path: Path
) -> None:
    mps.nvidia_tools(host, record, mps=False)
    with nvml.install(nvml.load("dgx-h100.json")):
        found = backend(host, tmp_path / "state")
        support = found.sharing_support(gpu(found))
        assert support is not None and support.strategies == (Strategy.TIME_SLICING,)
        assert support.limits == {}


def test_inspect_says_what_the_node_offers_but_runs_no_daemon(host: FakeHost, record: Path) -> None:
    mps.nvidia_tools(host, record)
    with nvml.install(nvml.load("dgx-h100.json")):
        found = backend(host, None)  # as `unidra inspect` builds it: no state directory
        support = found.sharing_support(gpu(found))
        assert support is not None and support.strategies[0] is Strategy.MPS
        with pytest.raises(BackendUnavailable, match="a state directory for its pipes"):
            found.apply_sharing(gpu(found), MPS)


def test_the_driver_root_option_finds_the_tools(
    host: FakeHost, record: Path, tmp_path: Path
) -> None:
    mps.nvidia_tools(host, record, bin_dir="/run/nvidia/driver/usr/bin")
    with nvml.install(nvml.load("dgx-h100.json")):
        found = backend(host, tmp_path / "state", **{"driver-root": "/run/nvidia/driver"})
        support = found.sharing_support(gpu(found))
        assert support is not None and support.strategies[0] is Strategy.MPS


def test_a_share_gets_its_limits_and_the_daemons_directories(
    gpus: NvidiaBackend, tmp_path: Path
) -> None:
    device = gpu(gpus)
    edits = gpus.sharing_edits(
        device, Sharing(Strategy.MPS, memory_bytes=30 * GI, compute_units=33)
    )
    assert edits.env == (
        "CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps",
        "CUDA_MPS_LOG_DIRECTORY=/var/log/nvidia-mps",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=0=30G",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=25",  # 33 of 132 SMs
    )
    root = tmp_path / "state" / "mps" / device.name
    assert [(m.host_path, m.container_path, m.options[0]) for m in edits.mounts] == [
        (str(root / "pipe"), "/tmp/nvidia-mps", "rw"),
        (str(root / "log"), "/var/log/nvidia-mps", "ro"),
        (str(root / "shm"), "/dev/shm", "rw"),
    ]
    # Time-slicing holds nothing, so it edits nothing.
    assert not gpus.sharing_edits(device, Sharing(Strategy.TIME_SLICING, interval="Long"))


def test_limits_in_the_forms_mps_reads() -> None:
    assert memory_limit(8 * GI) == "8G"  # the form that held on a real H200
    assert memory_limit(1536 << 20) == "1536M"
    assert memory_limit((1 << 20) + 1) == "2M"
    # No compute limit: no percentage; a tiny share still gets 1 %.
    assert client_env(Sharing(Strategy.MPS), 132)[2:] == ()
    assert client_env(Sharing(Strategy.MPS, compute_units=1), 132)[-1] == (
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=1"
    )


@needs_root
def test_the_mps_daemon_lives_as_long_as_the_gpu_is_shared(
    gpus: NvidiaBackend, host: FakeHost, record: Path, tmp_path: Path
) -> None:
    device = gpu(gpus)
    root = tmp_path / "state" / "mps" / device.name
    gpus.apply_sharing(device, MPS)

    (daemon,) = mps.runs(record, "daemon")
    assert daemon["argv"] == ["-f"]
    assert daemon["env"] == {
        "CUDA_MPS_PIPE_DIRECTORY": str(root / "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": str(root / "log"),
        "CUDA_VISIBLE_DEVICES": device.uuid,  # the daemon sees its GPU only: clients see device 0
    }
    # The daemon's /dev/shm is the GPU's shm directory, which every share's container mounts.
    assert (root / "shm" / mps.SHM_MARKER).read_text() == str(daemon["pid"])
    assert not Path("/dev/shm", mps.SHM_MARKER).exists()
    assert mps.smi_calls(record) == [f"nvidia-smi -i {device.uuid} -c EXCLUSIVE_PROCESS"]

    # Applying the same state again starts nothing; a daemon that died is started again.
    gpus.apply_sharing(device, MPS)
    assert len(mps.runs(record, "daemon")) == 1
    os.kill(daemon["pid"], signal.SIGKILL)
    wait_until(lambda: not mps.alive(daemon["pid"]), what="the daemon to die")
    gpus.apply_sharing(device, MPS)
    _, second = mps.runs(record, "daemon")
    assert mps.alive(second["pid"])

    # A new driver instance finds the running daemon through its control pipe, starts none.
    restarted = backend(host, tmp_path / "state")
    restarted.apply_sharing(device, MPS)
    assert len(mps.runs(record, "daemon")) == 2
    assert mps.runs(record, "client")[-1]["commands"] == ["get_server_list"]

    # The last share has gone: `quit` on the control pipe, compute mode back, directory removed.
    restarted.apply_sharing(device, None)
    assert mps.runs(record, "command")[-1]["commands"] == ["quit"]
    wait_until(lambda: not mps.alive(second["pid"]), what="the daemon to quit")
    assert not root.exists()
    assert mps.smi_calls(record)[-1] == f"nvidia-smi -i {device.uuid} -c DEFAULT"
    assert not (tmp_path / "state" / "sharing" / f"{device.name}.json").exists()


@needs_root
def test_a_daemon_left_without_a_record_is_stopped(
    gpus: NvidiaBackend, record: Path, tmp_path: Path
) -> None:
    device = gpu(gpus)
    gpus.apply_sharing(device, MPS)
    (tmp_path / "state" / "sharing" / f"{device.name}.json").unlink()  # as if lost in a crash
    gpus.apply_sharing(device, None)
    (daemon,) = mps.runs(record, "daemon")
    wait_until(lambda: not mps.alive(daemon["pid"]), what="the leftover daemon to quit")
    assert not (tmp_path / "state" / "mps" / device.name).exists()


def test_time_slices_are_set_and_reset(gpus: NvidiaBackend, record: Path) -> None:
    device = gpu(gpus)
    gpus.apply_sharing(device, DeviceSharing(Strategy.TIME_SLICING, "Long"))
    gpus.apply_sharing(device, DeviceSharing(Strategy.TIME_SLICING, "Long"))  # no second call
    gpus.apply_sharing(device, DeviceSharing(Strategy.TIME_SLICING, "Short"))
    gpus.apply_sharing(device, None)
    assert mps.smi_calls(record) == [
        f"nvidia-smi compute-policy -i {device.uuid} --set-timeslice 3",
        f"nvidia-smi compute-policy -i {device.uuid} --set-timeslice 1",
        f"nvidia-smi compute-policy -i {device.uuid} --set-timeslice 0",
    ]
    assert mps.runs(record) == []  # time-slicing starts no daemon


def test_a_default_time_slice_changes_nothing(gpus: NvidiaBackend, record: Path) -> None:
    device = gpu(gpus)
    gpus.apply_sharing(device, DeviceSharing(Strategy.TIME_SLICING))
    gpus.apply_sharing(device, None)
    assert mps.smi_calls(record) == []


def test_a_failing_nvidia_smi_says_why(gpus: NvidiaBackend, host: FakeHost) -> None:
    host.executable("/usr/bin/nvidia-smi", 'echo "Insufficient Permissions" >&2\nexit 4\n')
    with pytest.raises(
        BackendUnavailable, match=r"nvidia-smi compute-policy -i GPU-.* failed with"
    ):
        gpus.apply_sharing(gpu(gpus), DeviceSharing(Strategy.TIME_SLICING, "Long"))


@needs_root
def test_a_daemon_that_cannot_start_says_why(
    gpus: NvidiaBackend, host: FakeHost, tmp_path: Path
) -> None:
    host.executable(
        "/usr/bin/nvidia-cuda-mps-control",
        'echo "[fake] An instance of this daemon is already running" >> '
        '"$CUDA_MPS_LOG_DIRECTORY/control.log"\nexit 1\n',
    )
    with pytest.raises(BackendUnavailable, match=r"exited: .* already running"):
        gpus.apply_sharing(gpu(gpus), MPS)


def test_memory_is_sampled_per_process(host: FakeHost, record: Path, tmp_path: Path) -> None:
    """What lets the metrics tell the shares of one GPU apart (docs/sharing.md)."""
    recording = nvml.load("dgx-h100.json")
    recording["devices"][0]["processes"] = [
        {"pid": 4242, "usedGpuMemory": 8 * GI},
        {"pid": 4343, "usedGpuMemory": 2 * GI},
    ]
    with nvml.install(recording):
        found = backend(host, tmp_path / "state")
        samples = {s.device: s for s in found.sample()}
    assert [(p.pid, p.memory_bytes) for p in samples["gpu-0000-1b-00-0"].processes] == [
        (4242, 8 * GI),
        (4343, 2 * GI),
    ]
    assert samples["gpu-0000-43-00-0"].processes == ()  # not recorded: NotSupported


def test_a_shareable_gpu_stays_within_the_api_limits(gpus: NvidiaBackend) -> None:
    """Sharing adds two attributes and request policies; the API still takes the slices
    (at most 32 attributes and capacities per device)."""
    found = inventory.discover([gpus], policy=sharing.parse_policy(True, {}))
    contents = slices.build(found)
    devices = [d for c in contents for d in c.devices]
    shared = [d for d in devices if d.get("allowMultipleAllocations")]
    assert len(shared) == 7  # every whole GPU; GPU 7's MIG devices are not shared
    assert shared[0]["attributes"]["sharing"] == {"string": "MPS,TimeSlicing"}
    assert max(len(d["attributes"]) + len(d["capacity"]) for d in devices) <= 32
    validation.check_pool(
        [
            slices.slice_object(
                c, driver="unidra.dev", node="node-a", node_uid=None, generation=1, count=1
            )
            for c in contents
        ]
    )
