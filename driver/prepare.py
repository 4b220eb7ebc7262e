"""PREPARE and UNPREPARE claims: plan (pure) -> CDI spec -> checkpoint entry.

The claim is fetched from the API before any lock is taken. The CDI spec is written before the
claim is recorded, and unprepare drops the record before the spec, so a recorded claim always
has its spec. The record is the one durable write (group-committed with concurrent calls); the
spec is only atomic: a power loss may take it, and recovery rewrites it from the record before
kubelet is served. A spec without a record is a prepare that failed or died before answering
kubelet, or an unprepare that died before finishing: recovery removes it, kubelet retries. A
prepare whose record cannot be written removes its spec before answering. Everything after the
fetch is idempotent: a recorded claim is answered from the checkpoint without side effects, and
unprepare succeeds for claims it has never seen. Every wait (the claim GET, the claim's lock) is
bounded by the kubelet call's Deadline.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from driver import cdi, claims, crashpoints, durable, opaque, sharing
from driver.backends import Partitioner, Sharer, SharingController
from driver.checkpoint import (
    Checkpoint,
    CheckpointCorrupt,
    CheckpointStore,
    PreparedClaim,
    PreparedDevice,
)
from driver.claims import MAX_LABEL, AllocatedClaim, AllocationResult, ClaimRef, shown
from driver.deadlines import Deadline
from driver.errors import BackendUnavailable, ClaimError, ConfigError, StorageError, UnidraError
from driver.inventory import Inventory
from driver.locks import FileLocks
from driver.model import COMPUTE_UNITS, ContainerEdits, Device, Partition, Sharing, Strategy
from driver.sharing import Holding

log = logging.getLogger(__name__)


class ClaimSource(Protocol):
    def __call__(self, ref: ClaimRef, timeout: float) -> Mapping[str, object]:
        """The ResourceClaim as stored, waiting at most about `timeout` seconds."""
        ...


ADMIN_ACCESS_ENV = "DRA_ADMIN_ACCESS=true"
# Compute-unit masks are planned before the locks; a concurrent prepare may take them meanwhile.
PLANNING_ATTEMPTS = 3


class UnitsTaken(ClaimError):
    """The compute units planned for a share went to another one: plan again."""


@dataclass(frozen=True)
class Plan:
    """What preparing a claim will write, computed without side effects."""

    devices: tuple[PreparedDevice, ...]
    spec: dict[str, object]
    # The allocated devices and partitions by name, for the conflict check.
    items: dict[str, Device | Partition] = field(default_factory=dict)


@dataclass(frozen=True)
class Configured:
    """One allocation result with its effective config and the sharing it will be prepared with."""

    result: AllocationResult
    config: opaque.DeviceConfig
    sharing: Sharing | None = None
    used: dict[str, int] = field(default_factory=dict)


@dataclass
class Timings:
    """Where the time of one prepare went, by phase (PHASES), for metrics and benchmarks."""

    seconds: dict[str, float] = field(default_factory=dict)

    def mark(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now


PHASES = (
    "checkpoint_read",
    "claim_get",
    "plan",
    "lock_wait",
    "conflict_check",
    "cdi_write",
    "checkpoint_write",
    # Observed per call by the gRPC handler: its time outside running the claims (reading the
    # request, the call's deadline, building the answer).
    "handler",
)


@dataclass(frozen=True)
class RecoveryReport:
    rewritten: tuple[str, ...] = ()
    orphans_removed: tuple[str, ...] = ()
    rebuilt_from_cdi: tuple[str, ...] = ()
    corrupt_checkpoint: str | None = None
    rebooted: bool = False
    restored_from_slots: str | None = None


class Preparer:
    """Prepares and unprepares claims for one driver on one node."""

    def __init__(
        self,
        *,
        driver: str,
        pool: str,
        inventory: Callable[[], Inventory],
        claim_source: ClaimSource,
        store: CheckpointStore,
        locks: FileLocks,
        cdi_root: Path,
        boot_id: str = "",
    ) -> None:
        self.driver = driver
        self.pool = pool
        self.inventory = inventory
        self.claim_source = claim_source
        self.store = store
        self.locks = locks
        self.cdi_root = cdi_root
        self.boot_id = boot_id

    def prepare(
        self, ref: ClaimRef, timings: Timings | None = None, deadline: Deadline | None = None
    ) -> tuple[PreparedDevice, ...]:
        """Prepare one claim and return its devices; raises an UnidraError for this claim only."""
        timings = timings or Timings()
        deadline = deadline or Deadline.for_call(None)
        started = time.perf_counter()
        self._check_uid(ref)
        done = self.store.read().claims.get(ref.uid)
        started = timings.mark("checkpoint_read", started)
        if done is not None:
            return done.devices
        deadline.check(f"reading claim {ref}")
        claim = claims.parse(self.claim_source(ref, deadline.remaining()), ref)
        started = timings.mark("claim_get", started)
        for attempt in range(1, PLANNING_ATTEMPTS + 1):
            try:
                devices = self._prepare_planned(ref, claim, timings, deadline, started)
                break
            except UnitsTaken:
                if attempt == PLANNING_ATTEMPTS:
                    raise
                started = time.perf_counter()
        log.info(
            "Prepared claim",
            extra={"claim": str(ref), "uid": ref.uid, "devices": len(devices)},
        )
        return devices

    def _prepare_planned(
        self,
        ref: ClaimRef,
        claim: AllocatedClaim,
        timings: Timings,
        deadline: Deadline,
        started: float,
    ) -> tuple[PreparedDevice, ...]:
        """Plan, write the spec, record the claim: the part a concurrent prepare can make stale."""
        plan = self.plan(claim)
        started = timings.mark("plan", started)
        deadline.check(f"preparing claim {ref}")
        with self.locks.claim(ref.uid, timeout=deadline.remaining()):
            started = timings.mark("lock_wait", started)
            checkpoint = self.store.read()
            if ref.uid in checkpoint.claims:  # a concurrent call for the same claim won
                return checkpoint.claims[ref.uid].devices
            # Refuse early, before writing anything; checked again when recording.
            self._check_conflicts(checkpoint, ref, plan)
            started = timings.mark("conflict_check", started)
            path = cdi.spec_path(self.cdi_root, self.driver, ref.uid)
            cdi.write_spec(path, plan.spec)
            started = timings.mark("cdi_write", started)
            crashpoints.hit("prepare-after-cdi")
            record = PreparedClaim(
                uid=ref.uid,
                namespace=ref.namespace,
                name=ref.name,
                devices=plan.devices,
                consumers=claim.reserved_for,
            )

            def add(checkpoint: Checkpoint) -> None:
                self._check_conflicts(checkpoint, ref, plan)
                checkpoint.claims[ref.uid] = record
                # Under the checkpoint lock, so the last share of a device unprepared at the
                # same time cannot tear down what this one needs. Failing here records nothing.
                self._apply_sharing(checkpoint, _shared_devices(plan.devices), strict=True)

            try:
                self.store.commit(add)
            except Exception:
                # Not recorded (another claim took the device meanwhile, sharing could not be set
                # up, or the disk refused): kubelet gets an error, so no spec may stay behind to
                # be found by a container.
                if not self._maybe_recorded(ref.uid):
                    self._remove_unrecorded(ref, path)
                raise
            timings.mark("checkpoint_write", started)
        return plan.devices

    def unprepare(self, ref: ClaimRef, deadline: Deadline | None = None) -> None:
        """Undo prepare; succeeds for unknown claims and needs nothing but the checkpoint.

        The record goes first: if it cannot be updated, the spec stays and kubelet's retry finds
        the claim as it was. A spec whose record is gone is removed by the retry or at start.
        """
        self._check_uid(ref)
        deadline = deadline or Deadline.for_call(None)
        deadline.check(f"unpreparing claim {ref}")
        with self.locks.claim(ref.uid, timeout=deadline.remaining()):

            def remove(checkpoint: Checkpoint) -> bool:
                entry = checkpoint.claims.pop(ref.uid, None)
                if entry is not None:
                    # The other shares of a device keep it as it is; the last one releases it.
                    self._apply_sharing(checkpoint, _shared_devices(entry.devices), strict=False)
                return entry is not None

            known = self.store.commit(remove)
            crashpoints.hit("unprepare-after-record-removed")
            removed = cdi.remove_spec(cdi.spec_path(self.cdi_root, self.driver, ref.uid))
        if known or removed:
            log.info("Unprepared claim", extra={"claim": str(ref), "uid": ref.uid})

    def plan(self, claim: AllocatedClaim) -> Plan:
        """Devices, config, sharing and the CDI spec for a claim; pure apart from reading the
        inventory and, for compute-unit masks, the checkpoint."""
        results = claims.results_for(claim, self.driver, self.pool)
        decoded = opaque.decode_all(claim.config, self.driver)
        inventory = self.inventory()
        configured = [
            self._configure(inventory, result, opaque.effective(decoded, result))
            for result in results
        ]
        configured = self._with_units(inventory, configured)
        _check_one_limited_device(configured)
        return self._render(claim.ref.uid, configured)

    def reconcile_sharing(self) -> None:
        """Bring every device whose sharing needs setting up into the state its prepared
        allocations need: restart a dead MPS daemon, stop one nobody needs (also after a restart)."""
        inventory = self.inventory()
        names = [
            d.name
            for d in inventory.devices
            if isinstance(inventory.backend_of(d), SharingController)
        ]
        if not names:
            return
        with self.store.update() as checkpoint:
            self._apply_sharing(checkpoint, names, strict=False)

    def recover(self) -> RecoveryReport:
        """Repair state after a crash or reboot; run once at start before serving kubelet."""
        durable.remove_stale_temporaries(self.cdi_root, f"k8s.{self.driver}-{cdi.CLASS}_")
        for name in (self.store.path.name, self.store.slots.path.name):
            durable.remove_stale_temporaries(self.store.path.parent, f"{name}.")
        corrupt = None
        rebuilt: list[str] = []
        restored = self.store.restore_from_slots()
        if restored:
            log.warning("Checkpoint restored from its durable copy", extra={"reason": restored})
        with self.locks.state():
            try:
                if self.store.lost():  # not a first start: the specs must not look orphaned
                    raise CheckpointCorrupt("checkpoint.json is missing and its copy is damaged")
                checkpoint = self.store.read()
            except CheckpointCorrupt as err:
                corrupt = self._set_aside_corrupt(str(err))
                checkpoint = self._rebuild_from_cdi()
                rebuilt = sorted(checkpoint.claims)
                self.store.write(checkpoint)
        rewritten, orphans = [], []
        with self.store.update() as checkpoint:
            previous_boot = checkpoint.boot_id
            rebooted = bool(previous_boot and self.boot_id and previous_boot != self.boot_id)
            if rebooted:
                log.warning(
                    "The node rebooted since the checkpoint was written; restoring the CDI specs "
                    "of prepared claims",
                    extra={"boot_id": self.boot_id, "previous_boot_id": previous_boot},
                )
            checkpoint.boot_id = self.boot_id or previous_boot
            for uid, entry in list(checkpoint.claims.items()):
                with self.locks.try_claim(uid) as free:
                    path = cdi.spec_path(self.cdi_root, self.driver, uid)
                    # Not free: another instance is unpreparing it right now.
                    if free and self._restore_spec(entry, path):
                        rewritten.append(uid)
            # A spec without an entry is a prepare that died before recording it: kubelet got
            # no answer and will retry.
            for uid, path in cdi.claim_specs(self.cdi_root, self.driver).items():
                if uid not in checkpoint.claims:
                    with self.locks.try_claim(uid) as free:
                        if free and cdi.remove_spec(path):
                            orphans.append(uid)
        self.reconcile_sharing()
        report = RecoveryReport(
            rewritten=tuple(rewritten),
            orphans_removed=tuple(orphans),
            rebuilt_from_cdi=tuple(rebuilt),
            corrupt_checkpoint=corrupt,
            rebooted=rebooted,
            restored_from_slots=restored,
        )
        _log_recovery(report)
        return report

    def _configure(
        self, inventory: Inventory, result: AllocationResult, config: opaque.DeviceConfig
    ) -> Configured:
        """The sharing one allocation runs under, from its consumed capacity and its config."""
        used = sharing.consumed(dict(result.consumed), self.driver)
        if result.admin_access:
            return Configured(result, config, None, used)  # monitoring: nothing to set up
        item = self._allocatable(inventory, result)
        if isinstance(item, Partition):
            if result.share_id is None and config.sharing is None:
                return Configured(result, config, None, used)
            # Partitions are not shared: their parent is, and a share of it is never a partition.
            return Configured(
                result,
                config,
                sharing.resolve(item.parent, None, config.sharing, result.share_id, used),
                used,
            )
        support = inventory.sharing.get(item.name)
        resolved = sharing.resolve(item, support, config.sharing, result.share_id, used)
        return Configured(result, config, resolved, used)

    def _with_units(self, inventory: Inventory, configured: list[Configured]) -> list[Configured]:
        """Give compute-unit masks to shares of devices that split compute that way.

        Units other claims hold come from the checkpoint as read now; the conflict check under
        the lock catches a concurrent prepare that took the same ones.
        """
        taken: dict[str, set[int]] = {}
        out = []
        for item in configured:
            support = inventory.sharing.get(item.result.device)
            device = inventory.get(item.result.device)
            if (
                item.sharing is None
                or not item.sharing.compute_units
                or support is None
                or device is None
                or not support.unit_masks
            ):
                out.append(item)
                continue
            if not taken:
                for claim in self.store.read().claims.values():
                    for held in claim.devices:
                        if held.sharing is not None:
                            taken.setdefault(held.device, set()).update(held.sharing.units)
            busy = taken.setdefault(device.name, set())
            units = sharing.assign_units(
                sharing.total(device, COMPUTE_UNITS), item.sharing.compute_units, busy, device.name
            )
            busy.update(units)
            out.append(
                Configured(item.result, item.config, replace(item.sharing, units=units), item.used)
            )
        return out

    def _render(self, uid: str, configured: Sequence[Configured]) -> Plan:
        inventory = self.inventory()
        prepared: list[PreparedDevice] = []
        cdi_devices: dict[str, cdi.CdiDevice] = {}
        by_backend: dict[str, list[Device]] = {}
        items: dict[str, Device | Partition] = {}
        for entry in configured:
            result, config = entry.result, entry.config
            item = self._allocatable(inventory, result)
            items[item.name] = item
            device = item.parent if isinstance(item, Partition) else item
            backend = inventory.backend_of(device)
            if isinstance(item, Partition) and isinstance(backend, Partitioner):
                own = backend.partition_edits(item)
            else:
                own = backend.device_edits(device)
            if entry.sharing is not None and isinstance(backend, Sharer):
                own = own.merged([backend.sharing_edits(device, entry.sharing)])
            edits = self._device_edits(own, config, result)
            name = cdi.device_name(uid, item.name, result.share_id)
            cdi_devices[name] = cdi.CdiDevice(name, edits)
            by_backend.setdefault(device.backend, []).append(device)
            prepared.append(
                PreparedDevice(
                    request=result.request,
                    pool=result.pool,
                    device=result.device,
                    cdi_ids=(cdi.qualified_name(self.driver, name),),
                    admin_access=result.admin_access,
                    share_id=result.share_id,
                    config=config.to_json(),
                    consumed=entry.used,
                    sharing=entry.sharing,
                )
            )
        shared = ContainerEdits().merged(
            inventory.backends[name].shared_edits(devices) for name, devices in by_backend.items()
        )
        spec = cdi.build_claim_spec(self.driver, list(cdi_devices.values()), shared)
        return Plan(devices=tuple(prepared), spec=spec, items=items)

    def _allocatable(self, inventory: Inventory, result: AllocationResult) -> Device | Partition:
        item = inventory.allocatable(result.device)
        if item is None:
            hint = "" if inventory.layouts else "; partitions are published only with --partitions"
            raise ClaimError(
                f"device {shown(result.device, MAX_LABEL)} (request {shown(result.request, MAX_LABEL)}) "
                "is not a device of this node; "
                f"the pool {self.pool} has {len(inventory.devices)} devices{hint}"
            )
        return item

    @staticmethod
    def _device_edits(
        own: ContainerEdits, config: opaque.DeviceConfig, result: AllocationResult
    ) -> ContainerEdits:
        taken = {item.split("=", 1)[0] for item in own.env}
        clash = sorted(taken & set(config.env))
        if clash:
            raise ConfigError(
                f"opaque config env[{clash[0]!r}]",
                f"is set by the driver for device {result.device} and cannot be overridden",
            )
        extra = [config.edits()]
        if result.admin_access:
            extra.append(ContainerEdits(env=(ADMIN_ACCESS_ENV,)))
        return own.merged(extra)

    def _check_conflicts(self, checkpoint: Checkpoint, ref: ClaimRef, plan: Plan) -> None:
        """Refuse a device another claim holds exclusively, an exclusive allocation of a shared
        device, shares beyond the device's capacity, and shares that disagree on the strategy."""
        mine: dict[str, list[Holding]] = {}
        for device in plan.devices:
            mine.setdefault(device.device, []).append(_holding(str(ref), device))
        others: dict[str, list[Holding]] = {}
        for other in checkpoint.claims.values():
            if other.uid == ref.uid:
                continue
            label = f"{other.namespace}/{other.name} (UID {other.uid})"
            for device in other.devices:
                if device.device in mine and device.pool == self.pool:
                    others.setdefault(device.device, []).append(_holding(label, device))
        for name, wanted in mine.items():
            problem = sharing.conflict(plan.items[name], others.get(name, []), wanted)
            holders = sorted({h.claim for h in others.get(name, []) if not h.admin_access})
            if problem and holders:
                # Waiting helps: kubelet unprepares the holders when their pods are gone.
                raise ClaimError(f"{problem}; held by {', '.join(holders)} until their pods end")
            if problem:  # this claim's own allocations disagree: only changing the claim helps
                raise ClaimError(problem)
            if sharing.units_taken(others.get(name, []), wanted):
                raise UnitsTaken(f"compute units of device {name} went to another share meanwhile")

    def _apply_sharing(self, checkpoint: Checkpoint, names: Sequence[str], strict: bool) -> None:
        """Set up (or release) each named device for the allocations the checkpoint holds on it.

        Strict (prepare): a device that cannot be set up fails the claim. Otherwise (unprepare,
        reconcile) the failure is logged and the next reconcile tries again.
        """
        inventory = self.inventory()
        for name in names:
            device = inventory.get(name)
            backend = inventory.backend_of(device) if device is not None else None
            if device is None or not isinstance(backend, SharingController):
                continue
            holdings = [
                _holding(claim.uid, held)
                for claim in checkpoint.claims.values()
                for held in claim.devices
                if held.device == name and held.pool == self.pool
            ]
            if any(h.unknown for h in holdings):
                # Rebuilt from CDI specs: how the device is shared is not known, so whatever
                # runs on it (an MPS daemon) stays until those shares are unprepared.
                continue
            state = sharing.device_state(h.sharing for h in holdings)
            try:
                backend.apply_sharing(device, state)
            except BackendUnavailable as err:
                if strict:
                    raise ClaimError(f"cannot set up sharing of device {name}: {err}") from err
                log.error(
                    "Cannot bring a shared device into the state its claims need",
                    extra={"device": name, "state": str(state), "reason": str(err)},
                )

    def _restore_spec(self, entry: PreparedClaim, path: Path) -> bool:
        """Rewrite a completed claim's CDI spec if it is missing or differs (e.g. /var/run was wiped by a reboot)."""
        configured = [
            Configured(
                AllocationResult(
                    request=d.request,
                    driver=self.driver,
                    pool=d.pool,
                    device=d.device,
                    admin_access=d.admin_access,
                    share_id=d.share_id,
                ),
                opaque.decode_stored(d.config),
                d.sharing,
                dict(d.consumed),
            )
            for d in entry.devices
        ]
        try:
            plan = self._render(entry.uid, configured)
        except (ClaimError, ConfigError) as err:
            log.warning(
                "Cannot restore CDI spec of prepared claim",
                extra={"uid": entry.uid, "reason": str(err)},
            )
            return False
        if cdi.read_spec(path) == plan.spec:
            return False
        try:
            cdi.write_spec(path, plan.spec)
        except StorageError as err:
            # A full or read-only CDI root must not keep the driver from starting: kubelet's
            # unprepare is what frees space. The spec is written again at the next start.
            log.warning(
                "Cannot restore CDI spec of prepared claim",
                extra={"uid": entry.uid, "reason": str(err)},
            )
            return False
        return True

    def _set_aside_corrupt(self, reason: str) -> str:
        if not self.store.path.exists():
            log.error("Checkpoint is lost; rebuilt from CDI specs", extra={"reason": reason})
            return reason
        target = self.store.path.with_name(f"{self.store.path.name}.corrupt-{int(time.time())}")
        self.store.path.rename(target)
        durable.sync_directory(target.parent)
        log.error(
            "Checkpoint is corrupt; moved aside and rebuilt from CDI specs",
            extra={"reason": reason, "moved_to": str(target)},
        )
        return f"{reason} (moved to {target})"

    def _rebuild_from_cdi(self) -> Checkpoint:
        """Recover what a corrupt checkpoint held from the claims' CDI specs (request names are lost)."""
        names = set(self.inventory().by_name)
        checkpoint = Checkpoint()
        for uid, path in cdi.claim_specs(self.cdi_root, self.driver).items():
            spec = cdi.read_spec(path)
            if spec is None:
                # Which devices it held is unknowable; recovery removes it as an orphan.
                log.error(
                    "Unreadable CDI spec left out of the rebuilt checkpoint",
                    extra={"path": str(path)},
                )
                continue
            devices = []
            for entry in spec.get("devices", []):
                cdi_name = str(entry.get("name", ""))
                device, share = _split_cdi_name(cdi_name.removeprefix(f"{uid}-"), names)
                devices.append(
                    PreparedDevice(
                        request="",
                        pool=self.pool,
                        device=device,
                        cdi_ids=(cdi.qualified_name(self.driver, cdi_name),),
                        share_id=share,
                    )
                )
            checkpoint.claims[uid] = PreparedClaim(
                uid=uid, namespace="", name="", devices=tuple(devices)
            )
        return checkpoint

    def _maybe_recorded(self, uid: str) -> bool:
        """Whether the record may have landed after all (a write that failed only at making it
        durable: the directory sync, or the durable copy): then the spec must stay, and kubelet's
        retry answers from the record."""
        try:
            return uid in self.store.read().claims
        except UnidraError:
            return True  # unknowable: an orphan spec is harmless, a record without one is not

    def _remove_unrecorded(self, ref: ClaimRef, path: Path) -> None:
        try:
            cdi.remove_spec(path)
        except UnidraError as err:  # recovery removes it at the next start
            log.error(
                "Cannot remove the CDI spec of a claim that was not prepared",
                extra={"claim": str(ref), "uid": ref.uid, "error": str(err)},
            )

    @staticmethod
    def _check_uid(ref: ClaimRef) -> None:
        if not cdi.valid_claim_uid(ref.uid):
            raise ClaimError(f"claim {ref} has an invalid UID {ref.shown_uid!r}")


def _holding(claim: str, device: PreparedDevice) -> Holding:
    return Holding(claim, device.share_id, device.admin_access, device.consumed, device.sharing)


def _shared_devices(devices: Sequence[PreparedDevice]) -> list[str]:
    return sorted({d.device for d in devices if d.sharing is not None or d.share_id is not None})


def _check_one_limited_device(configured: Sequence[Configured]) -> None:
    """Per-process sharing (an MPS daemon, a CU mask) reaches a process through its environment,
    which calls its GPU device 0 and names one MPS daemon: a claim may use it on one GPU."""
    limited = sorted(
        {
            c.result.device
            for c in configured
            if c.sharing and (c.sharing.strategy is Strategy.MPS or c.sharing.units)
        }
    )
    if len(limited) < 2:
        return
    problem = (
        f"per-process sharing (MPS, CU masks) applies to one GPU per claim, but this claim holds "
        f"{', '.join(limited)}; use one claim per GPU"
    )
    config = next((c.config.sharing for c in configured if c.config.sharing is not None), None)
    if config is not None:
        raise ConfigError(f"{config.path}.strategy", problem)
    raise ClaimError(problem)


def _split_cdi_name(rest: str, device_names: set[str]) -> tuple[str, str | None]:
    """Split `<device>[-<shareID>]` using the known device names."""
    if rest in device_names:
        return rest, None
    for name in device_names:
        if rest.startswith(name + "-"):
            return name, rest[len(name) + 1 :]
    return rest, None


def _log_recovery(report: RecoveryReport) -> None:
    if report.rewritten:
        log.warning(
            "Rewrote missing or stale CDI specs of prepared claims",
            extra={"uids": list(report.rewritten)},
        )
    if report.orphans_removed:
        log.warning(
            "Removed CDI specs of claims not in the checkpoint",
            extra={"uids": list(report.orphans_removed)},
        )
