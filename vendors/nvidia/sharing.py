"""Sharing an NVIDIA GPU: MPS with per-share limits, or time-slicing with a chosen interval.

MPS (Volta and newer, when `nvidia-cuda-mps-control` is installed) is the default for shares: the
GPU runs in EXCLUSIVE_PROCESS compute mode behind its own MPS daemon (vendors/nvidia/mps.py), and
each share's processes get a pinned-memory limit and an active-thread percentage from what the
share consumed. Time-slicing only sets the length of the slices the GPU gives each process
(`nvidia-smi compute-policy --set-timeslice`); it holds no limit.

What was applied to each GPU is recorded in `<state-dir>/sharing/<device>.json` before it is
done, so a restarted driver knows what to undo when the last share has gone.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from driver import durable
from driver.errors import BackendUnavailable
from driver.model import (
    COMPUTE_UNITS,
    MEMORY,
    TIME_SLICING_ONLY,
    ContainerEdits,
    Device,
    DeviceSharing,
    Sharing,
    SharingSupport,
    Strategy,
)
from vendors.host import Host
from vendors.nvidia.mps import CONTROL, MpsDaemons

log = logging.getLogger(__name__)

# nvidia-smi compute-policy --set-timeslice takes these as 0..3.
INTERVALS = ("Default", "Short", "Medium", "Long")
BIN_DIRS = ("usr/bin", "bin", "usr/local/nvidia/bin")
SMI_TIMEOUT = 30.0
_MPS_CAPABILITY = 7  # Volta: MPS clients get their own address space and execution limits


class NvidiaSharing:
    """MPS daemons, compute modes and time slices of one node's GPUs."""

    def __init__(self, host: Host, state_dir: Path | None, driver_root: str = "/") -> None:
        self.host = host
        self.state_dir = state_dir
        root = driver_root.strip("/")
        self.bin_dirs = [f"/{root}/{d}".replace("//", "/") for d in BIN_DIRS]
        self.control = self._binary(CONTROL)
        # The daemons need a place for their pipes: the kubelet plugin has one, `unidra inspect`
        # (which only says what the node offers) does not.
        self.mps = (
            MpsDaemons(state_dir, self.host.path(self.control))
            if state_dir is not None and self.control is not None
            else None
        )

    def support(self, device: Device) -> SharingSupport | None:
        if device.partition_profile is not None:
            return None  # MIG devices are partitions already; they are not shared again
        intervals = INTERVALS if self._binary("nvidia-smi") else ()
        major = int((device.compute_capability or "0").split(".")[0])
        if self.control is not None and major >= _MPS_CAPABILITY:
            return SharingSupport(
                strategies=(Strategy.MPS, Strategy.TIME_SLICING),
                limits={Strategy.MPS: frozenset({MEMORY, COMPUTE_UNITS})},
                intervals=intervals,
            )
        return SharingSupport(TIME_SLICING_ONLY.strategies, intervals=intervals)

    def edits(self, device: Device, sharing: Sharing) -> ContainerEdits:
        if sharing.strategy is Strategy.MPS and self.mps is not None:
            return self.mps.edits(device, sharing)
        return ContainerEdits()

    def apply(self, device: Device, state: DeviceSharing | None) -> None:
        """Bring one GPU into `state`; what was applied before is undone first."""
        applied = self._applied(device)
        orphan = (
            self.mps is not None
            and device.name in self.mps.known()
            and (applied is None or applied.strategy is not Strategy.MPS)
        )
        if state == applied and not orphan:
            if state is not None and state.strategy is Strategy.MPS and self.mps is not None:
                self.mps.ensure(device)  # a daemon that died is started again
            return
        if state is not None:
            self._record(device, state)  # before acting: a crash midway is undone at restart
        had_mps = orphan or (applied is not None and applied.strategy is Strategy.MPS)
        if had_mps and (state is None or state.strategy is not Strategy.MPS):
            if self.mps is not None:
                self.mps.stop(device)
            self._smi(device, "-i", device.uuid, "-c", "DEFAULT")
        had = _interval(applied)
        want = _interval(state)
        if want != had:
            self._smi(
                device,
                "compute-policy",
                "-i",
                device.uuid,
                "--set-timeslice",
                str(INTERVALS.index(want)),
            )
        if state is not None and state.strategy is Strategy.MPS:
            if self.mps is None:
                raise BackendUnavailable(
                    f"MPS needs {CONTROL} under the driver root and a state directory for its pipes"
                )
            if applied is None or applied.strategy is not Strategy.MPS:
                self._smi(device, "-i", device.uuid, "-c", "EXCLUSIVE_PROCESS")
            self.mps.ensure(device)
        if state is None:
            self._forget(device)
        log.info(
            "Shared GPU set up",
            extra={"device": device.name, "from": _name(applied), "to": _name(state)},
        )

    def _smi(self, device: Device, *args: str) -> None:
        self.host.run(
            [f"{d}/nvidia-smi" for d in self.bin_dirs],
            args,
            timeout=SMI_TIMEOUT,
            what=f"nvidia-smi {' '.join(args[:3])} for {device.name}",
        )

    def _binary(self, name: str) -> str | None:
        for folder in self.bin_dirs:
            if self.host.path(f"{folder}/{name}").is_file():
                return f"{folder}/{name}"
        return None

    def _record_path(self, device: Device) -> Path | None:
        return self.state_dir / "sharing" / f"{device.name}.json" if self.state_dir else None

    def _applied(self, device: Device) -> DeviceSharing | None:
        path = self._record_path(device)
        if path is None:
            return None
        try:
            item = json.loads(path.read_bytes())
            return DeviceSharing(Strategy(item["strategy"]), str(item.get("interval", "")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            log.warning(
                "Unreadable sharing record; resetting the GPU's time slice",
                extra={"path": str(path)},
            )
            # Assume a changed time slice, so it is reset; an MPS daemon is found by its directory.
            return DeviceSharing(Strategy.TIME_SLICING, "Long")

    def _record(self, device: Device, state: DeviceSharing) -> None:
        path = self._record_path(device)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            body = {"strategy": state.strategy.value, "interval": state.interval}
            durable.write_bytes(path, json.dumps(body).encode(), mode=0o600)

    def _forget(self, device: Device) -> None:
        path = self._record_path(device)
        if path is not None:
            durable.remove(path)


def _interval(state: DeviceSharing | None) -> str:
    if state is None or state.strategy is not Strategy.TIME_SLICING:
        return "Default"
    return state.interval or "Default"


def _name(state: DeviceSharing | None) -> str:
    if state is None:
        return "not shared"
    return state.strategy.value + (f" {state.interval}" if state.interval else "")
