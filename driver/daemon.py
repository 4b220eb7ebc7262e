"""The kubelet-plugin daemon: the one module that wires everything together and orders start and stop.

Start: claim this instance's sockets (refusing while another instance owns them) -> bind the
metrics and health ports -> discover devices -> recover node state -> DRA socket (DRA
v1/v1beta1 and the health stream) -> registration socket -> background loops (publishing once
this instance holds the node's publisher lock, health, sampling, claim status) -> metrics
endpoint and control socket. Whatever fails, nothing that another instance serves is touched.
Stop (SIGTERM/SIGINT): registration socket first, then publishing is handed over, then
in-flight calls finish, then the DRA socket, then the background loops. Slices stay: kubelet
wipes them when no instance returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry

from driver import backends, boot, instances, kubeapi, slices
from driver.backends import (
    Backend,
    BackendContext,
    FaultInjector,
    HealthSource,
    SharingController,
)
from driver.checkpoint import CheckpointStore, PreparedDevice
from driver.claim_status import ClaimStatusWriter
from driver.claims import ClaimRef
from driver.control import ControlServer
from driver.deadlines import Deadline
from driver.errors import ConfigError, FatalError, UnidraError
from driver.health import HealthBoard, parse_policy
from driver.health_store import HealthStore
from driver.instances import InstanceRecord, Lease
from driver.inventory import LiveInventory, partitions_warning
from driver.kubelet import sockets
from driver.kubelet.health_stream import HEALTH_SERVICES, DeviceHealth, HealthStream
from driver.kubelet.liveness import LivenessServer, SelfCheckingHealth
from driver.kubelet.registration import RegistrationServicer, RegistrationState
from driver.kubelet.server import PluginServers, UnixServer
from driver.kubelet.service import DRA_SERVICES, ClaimRunner, add_dra_services
from driver.locks import FileLocks
from driver.metrics import (
    DeviceCollector,
    DriverMetrics,
    SampleCache,
    bind_http,
    sampling_loop,
    serve_in_background,
)
from driver.model import HealthEvent, Partition
from driver.prepare import ClaimSource, Preparer, Timings
from driver.publisher import Plan, Publisher, TokenBucket
from driver.settings import Settings
from driver.supervisor import Supervisor, stop_on_signals

log = logging.getLogger(__name__)

# How often an instance that does not publish checks whether the publisher let go.
LEASE_POLL_SECONDS = 0.5


class ClaimOperations:
    """What kubelet's calls reach: the Preparer, timed and counted, with claim status kept current."""

    def __init__(
        self, preparer: Preparer, metrics: DriverMetrics, status: ClaimStatusWriter
    ) -> None:
        self.preparer = preparer
        self.metrics = metrics
        self.status = status

    def prepare(self, ref: ClaimRef, deadline: Deadline) -> tuple[PreparedDevice, ...]:
        timings = Timings()
        try:
            devices: tuple[PreparedDevice, ...] = self._timed(
                "prepare", ref, lambda: self.preparer.prepare(ref, timings, deadline)
            )
        finally:
            self.metrics.observe_phases(timings)
        return devices

    def unprepare(self, ref: ClaimRef, deadline: Deadline) -> None:
        self._timed("unprepare", ref, lambda: self.preparer.unprepare(ref, deadline))

    def _timed(self, operation: str, ref: ClaimRef, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            result = call()
        except Exception as err:
            self.metrics.observe(operation, time.perf_counter() - started, err)
            raise
        self.metrics.observe(operation, time.perf_counter() - started, None)
        (self.status.prepared if operation == "prepare" else self.status.unprepared)(ref)
        return result


class Leadership:
    """This instance's turn as the node's publisher.

    It waits for the publisher lock; holding it, it adopts the health the previous publisher
    saved, publishes the slices and saves every health change; on stop it lets go, so the next
    instance takes over only then (or when this process dies and the kernel drops the lock).
    """

    def __init__(
        self,
        *,
        lease: Lease,
        record: InstanceRecord,
        publisher: Publisher,
        board: HealthBoard,
        store: HealthStore,
        metrics: DriverMetrics,
    ) -> None:
        self.lease = lease
        self.record = record
        self.publisher = publisher
        self.board = board
        self.store = store
        self.metrics = metrics
        # Re-entrant: taking the lead adopts health, and the board then calls health_changed.
        self._lock = threading.RLock()
        self._done = False

    @property
    def leading(self) -> bool:
        return self.publisher.leading.is_set()

    def loop(self, stop: threading.Event) -> None:
        announced = False
        while not stop.is_set():
            with self._lock:
                if self._done:
                    break
                if self.lease.try_acquire(self.record):
                    self._lead()
                    break
            if not announced:
                holder = self.lease.holder()
                log.info(
                    "Another instance publishes this node's ResourceSlices; serving kubelet and "
                    "taking over when it stops",
                    extra={"publisher": holder.describe() if holder else "starting"},
                )
                announced = True
            stop.wait(LEASE_POLL_SECONDS)
        stop.wait()

    def health_changed(self) -> None:
        """Board subscriber: the publisher keeps the saved health current."""
        with self._lock:
            if self.leading:
                self.store.save(self.board.snapshot())

    def let_go(self) -> None:
        """Stop publishing and release the lock; never leads again."""
        with self._lock:
            self._done = True
            if not self.lease.held:
                return
            self.publisher.let_go()
            self.store.save(self.board.snapshot())
            self.lease.release()
            self.metrics.publishing.set(0)
        log.info("Stopped publishing ResourceSlices; the next instance takes over")

    def _lead(self) -> None:
        adopted = self.board.restore(self.store.load())
        self.store.save(self.board.snapshot())
        self.metrics.publishing.set(1)
        self.publisher.leading.set()
        self.publisher.wake()
        log.info("Publishing this node's ResourceSlices", extra={"conditions_adopted": adopted})


@dataclass
class Daemon:
    """A running plugin: what tests and the CLI need to observe and stop it."""

    settings: Settings
    inventory: LiveInventory
    preparer: Preparer
    servers: PluginServers
    registration: RegistrationState
    publisher: Publisher
    board: HealthBoard
    stream: HealthStream
    status: ClaimStatusWriter
    registry: CollectorRegistry
    supervisor: Supervisor
    control: ControlServer
    metrics_server: WSGIServer | None
    liveness: LivenessServer | None
    leadership: Leadership
    runner: ClaimRunner
    instance: Lease

    def stop(self) -> None:
        log.info("Stopping", extra={"grace_seconds": self.settings.shutdown_grace_seconds})
        # Kubelet deregisters this instance at once and sends new calls to another one, if any.
        self.servers.registration.stop(0)
        self.leadership.let_go()
        self.servers.dra.stop(self.settings.shutdown_grace_seconds)
        self.runner.close()
        self.control.stop()
        if self.liveness is not None:
            self.liveness.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.supervisor.stop()
        self.instance.release(remove=True)
        log.info("Stopped; sockets removed")


def start(settings: Settings, claim_source: ClaimSource | None = None) -> Daemon:
    """Bring the plugin up and return once kubelet can register it; on failure, undo what was done."""
    with contextlib.ExitStack() as undo:
        daemon = _start(settings, claim_source, undo)
        undo.pop_all()
        return daemon


def _start(
    settings: Settings, claim_source: ClaimSource | None, undo: contextlib.ExitStack
) -> Daemon:
    settings.plugin_dir.mkdir(parents=True, exist_ok=True)
    dra_path = sockets.dra_socket(settings.plugin_dir, settings.pod_uid)
    registration_path = sockets.registration_socket(
        settings.registrar_dir, settings.driver_name, settings.pod_uid
    )
    control_path = sockets.control_socket(settings.plugin_dir, settings.pod_uid)
    record = InstanceRecord.of_this_process(
        settings.pod_uid, [dra_path, registration_path, control_path]
    )
    instance = instances.claim_instance(settings.plugin_dir, settings.pod_uid, record)
    undo.callback(instance.release, remove=True)

    # Ports next: a port in use must fail before any socket is touched.
    registry = CollectorRegistry()
    metrics = DriverMetrics(registry)
    metrics_server = bind_http(settings.metrics_address, "--metrics-address", registry)
    if metrics_server is not None:
        undo.callback(metrics_server.server_close)
    liveness = _bind_liveness(settings, registration_path, dra_path)
    if liveness is not None:
        undo.callback(liveness.stop)

    live = _discover(settings)
    api_client = kubeapi.build_client(settings.kubeconfig)
    settings.cdi_root.mkdir(parents=True, exist_ok=True)
    boot_id = boot.boot_id(settings.host_root)
    locks = FileLocks(settings.plugin_dir / "serialize.lock")
    store = CheckpointStore(settings.plugin_dir / "checkpoint.json", locks)
    preparer = Preparer(
        driver=settings.driver_name,
        pool=settings.pool_name,
        inventory=live.current,
        claim_source=claim_source or kubeapi.ClaimReader(api_client),
        store=store,
        locks=locks,
        cdi_root=settings.cdi_root,
        boot_id=boot_id,
    )
    preparer.recover()

    board = HealthBoard(
        taint_key=f"{settings.driver_name}/unhealthy",
        policy=parse_policy(settings.taint_effects),
        quiet_seconds=settings.health_quiet_seconds,
        min_hold_seconds=settings.health_min_hold_seconds,
    )
    board.monitored = _monitored(live)
    health_store = HealthStore(settings.plugin_dir / "health.json", boot_id)
    board.restore(health_store.load())
    stream = HealthStream(
        settings.pool_name,
        lambda: _health_snapshot(live, board),
        resend_seconds=settings.health_resend_seconds,
    )
    status = ClaimStatusWriter(
        api=kubeapi.ClaimStatusApi(api_client),
        driver=settings.driver_name,
        pool=settings.pool_name,
        store=store,
        board=board,
        inventory=live.current,
    )
    operations = ClaimOperations(preparer, metrics, status)
    runner = ClaimRunner()
    undo.callback(runner.close)

    registration = RegistrationState()
    servicer = RegistrationServicer(
        settings.driver_name, str(dra_path), (*DRA_SERVICES, *HEALTH_SERVICES), registration
    )
    metrics.registered.set_function(lambda: 1.0 if registration.registered else 0.0)

    def serve_dra(server: Any) -> None:
        add_dra_services(server, operations, runner, metrics.observe_call)
        stream.add_to(server)

    servers = PluginServers(
        dra=UnixServer(dra_path, serve_dra, workers=32, name="dra"),
        registration=UnixServer(registration_path, servicer.add_to, workers=2, name="registration"),
    )
    servers.start()
    undo.callback(servers.stop, 0)

    slice_api = kubeapi.SliceApi(api_client)
    _report_api_server(slice_api, settings)
    publisher = Publisher(
        api=slice_api,
        driver=settings.driver_name,
        node=settings.node_name,
        desired=lambda: slices.build(live.current(), board.taints()),
        on_sync=lambda plan: _count_writes(metrics, plan),
        on_error=metrics.api_error,
        on_postponed=metrics.slice_writes_postponed.inc,
        limit=TokenBucket(settings.slice_write_burst, settings.slice_writes_per_second),
    )
    publisher.leading.clear()  # until this instance holds the node's publisher lock
    leadership = Leadership(
        lease=instances.publisher_lease(settings.plugin_dir),
        record=record,
        publisher=publisher,
        board=board,
        store=health_store,
        metrics=metrics,
    )
    undo.callback(leadership.let_go)
    board.subscribe(leadership.health_changed)
    board.subscribe(publisher.wake)
    board.subscribe(stream.notify)
    # Claim status follows health from the publisher only, so two instances never disagree there.
    board.subscribe(lambda: status.health_changed() if leadership.leading else None)

    supervisor = Supervisor(on_restart=lambda loop: metrics.restarts.labels(loop).inc())
    undo.callback(supervisor.stop)
    supervisor.spawn("publisher-lease", leadership.loop)
    supervisor.spawn("slice-publisher", publisher.reconcile_loop, interrupt=publisher.wake)
    supervisor.spawn("slice-watch", publisher.watch_loop, interrupt=publisher.interrupt_watch)
    supervisor.spawn(
        "rediscovery", lambda stop: _rediscover(live, publisher, board, settings, stop)
    )
    supervisor.spawn("claim-status", status.loop)
    if any(isinstance(b, SharingController) for b in live.current().backends.values()):
        supervisor.spawn(
            "sharing", lambda stop: _check_sharing(preparer, settings.sharing_check_seconds, stop)
        )
    supervisor.spawn("health-board", lambda stop: _tick(board, stop), interrupt=stream.notify)
    for backend in live.current().backends.values():
        if isinstance(backend, HealthSource):
            supervisor.spawn(f"health-{backend.name}", _health_loop(backend, board, metrics))
    cache = SampleCache()
    supervisor.spawn(
        "metrics-sampler",
        sampling_loop(
            lambda: list(live.current().backends.values()), cache, settings.metrics_interval_seconds
        ),
    )
    metrics.watch_loops(supervisor.workers)
    registry.register(
        DeviceCollector(
            node=settings.node_name,
            inventory=live.current,
            board=board,
            store=store,
            cache=cache,
            host_root=settings.host_root,
        )
    )
    if metrics_server is not None:
        serve_in_background(metrics_server)
    control = ControlServer(control_path, lambda request: _control(request, live, board))
    control.start()
    undo.callback(control.stop)
    if liveness is not None:
        liveness.start()
    return Daemon(
        settings,
        live,
        preparer,
        servers,
        registration,
        publisher,
        board,
        stream,
        status,
        registry,
        supervisor,
        control,
        metrics_server,
        liveness,
        leadership,
        runner,
        instance,
    )


def run(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; the exit code for the CLI."""
    os.umask(0o077)  # sockets, checkpoint and lock file: readable and writable by the driver only
    stop = stop_on_signals()
    daemon = start(settings)
    log.info("Ready", extra={"driver": settings.driver_name, "node": settings.node_name})
    stop.wait()
    daemon.stop()
    return 0


def _discover(settings: Settings) -> LiveInventory:
    names = list(settings.backends)
    not_picked: dict[str, str] = {}
    if not names:
        names, not_picked = backends.detect(settings.host_root)
        log.info("Picked backends by PCI devices", extra={"backends": names})
    if not names:
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(not_picked.items()))
        raise FatalError(
            f"no accelerators found ({reasons}); use --simulate PROFILE to run without hardware"
        )
    built, failures = backends.create_all(
        names,
        lambda name: BackendContext(
            host_root=settings.host_root,
            node_name=settings.node_name,
            options=settings.backend_options.get(name, {}),
            state_dir=settings.plugin_dir / name,
        ),
    )
    for name, reason in failures.items():
        log.error("Backend unavailable", extra={"backend": name, "reason": reason})
    warning = partitions_warning(built) if settings.partitions else None
    if warning:
        log.warning(warning)
    live = LiveInventory(built, partitions=settings.partitions, policy=settings.sharing_policy)
    current = live.current()
    if not current.devices:
        raise FatalError("no devices found by any backend; run `unidra inspect` to see why")
    log.info(
        "Discovered devices",
        extra={
            "devices": len(current.devices),
            "partitions": len(current.partitions),
            "backends": sorted(current.backends),
            "node": settings.node_name,
        },
    )
    return live


def _report_api_server(api: kubeapi.SliceApi, settings: Settings) -> None:
    """Say which Kubernetes and resource.k8s.io versions the server offers; warn where it matters."""
    try:
        version, served = api.server_version()
    except UnidraError as err:
        log.warning("Cannot read the API server version yet", extra={"error": str(err)})
        return
    log.info("API server", extra={"version": version, "resource_k8s_io": served, "using": "v1"})
    if "v1" not in served:
        log.error(
            "The API server does not serve resource.k8s.io/v1; Unidra needs Kubernetes 1.34 or newer"
        )
    minor = _minor(version)
    if settings.partitions and minor is not None and minor < 35:
        log.error(
            "--partitions publishes the Kubernetes 1.35 layout (counters in their own slices); "
            "this server is older and will treat the pool as invalid",
            extra={"version": version},
        )


def _minor(version: str) -> int | None:
    parts = version.lstrip("v").split(".")
    try:
        return int(parts[1])
    except (IndexError, ValueError):
        return None


def _rediscover(
    live: LiveInventory,
    publisher: Publisher,
    board: HealthBoard,
    settings: Settings,
    stop: threading.Event,
) -> None:
    while not stop.wait(settings.rediscover_seconds):
        added, removed, changed = live.refresh()
        if added or removed or changed:
            board.monitored = _monitored(live)
            publisher.wake()


def _check_sharing(preparer: Preparer, seconds: float, stop: threading.Event) -> None:
    while not stop.wait(seconds):
        preparer.reconcile_sharing()


def _monitored(live: LiveInventory) -> set[str]:
    """Devices whose backend reports health: the others are Unknown, not presumed healthy."""
    current = live.current()
    return {d.name for d in current.devices if isinstance(current.backend_of(d), HealthSource)}


def _health_snapshot(live: LiveInventory, board: HealthBoard) -> list[DeviceHealth]:
    current = live.current()
    items: list[DeviceHealth] = []
    for device in current.devices:
        status, message = board.status(device.name)
        items.append((device.name, status, message, board.updated(device.name)))
    for partition in current.partitions.values():
        status, message = board.status(partition.parent.name)
        items.append((partition.name, status, message, board.updated(partition.parent.name)))
    return items


def _health_loop(
    backend: Backend, board: HealthBoard, metrics: DriverMetrics
) -> Callable[[threading.Event], None]:
    def loop(stop: threading.Event) -> None:
        assert isinstance(backend, HealthSource)
        for event in backend.health_events(stop):
            metrics.health_events.labels(event.kind).inc()
            board.report(event)
            if stop.is_set():
                return

    return loop


def _tick(board: HealthBoard, stop: threading.Event) -> None:
    while not stop.is_set():
        board.tick()
        deadline = board.next_deadline()
        wait = 1.0 if deadline is None else min(1.0, max(0.05, deadline - time.monotonic()))
        stop.wait(wait)


def _count_writes(metrics: DriverMetrics, plan: Plan) -> None:
    metrics.slice_syncs.labels("success").inc()
    metrics.slice_writes.labels("create").inc(len(plan.creates))
    metrics.slice_writes.labels("update").inc(len(plan.updates))
    metrics.slice_writes.labels("delete").inc(len(plan.deletes))


def _bind_liveness(settings: Settings, registration: Path, dra: Path) -> LivenessServer | None:
    """The health-check port, bound now and served once the sockets are up."""
    if settings.healthcheck_port is None:
        return None
    return LivenessServer(settings.healthcheck_port, SelfCheckingHealth(registration, dra))


def _control(request: dict[str, Any], live: LiveInventory, board: HealthBoard) -> dict[str, Any]:
    """Answer `unidra simulate inject|recover|health`."""
    command = request.get("command")
    if command == "health":
        return {
            "devices": [
                {"device": n, "health": str(s), "message": m}
                for n, s, m, _ in _health_snapshot(live, board)
            ]
        }
    device = str(request.get("device", ""))
    current = live.current()
    item = current.allocatable(device)
    if item is None:
        raise ConfigError("--device", f"no device {device!r} on this node")
    owner = current.backend_of(item.parent if isinstance(item, Partition) else item)
    if not isinstance(owner, FaultInjector):
        raise ConfigError(
            "--device",
            f"{device} belongs to the {owner.name} backend, which takes no injected faults",
        )
    if command == "inject":
        event: HealthEvent = owner.inject(device, str(request.get("fault", "")))
    elif command == "recover":
        event = owner.recover(device)
    else:
        raise ConfigError("command", f"unknown command {command!r}")
    return {
        "device": event.device,
        "kind": event.kind,
        "code": event.code,
        "healthy": event.healthy,
        # A recovery clears nothing before the minimum hold is over: say how long that is.
        "hold_seconds": board.hold_left(event.device) if event.healthy else 0.0,
    }
