"""The kubelet-plugin daemon: the one module that wires everything together and orders start and stop.

Start: discover devices -> recover node state -> DRA socket (DRA v1/v1beta1 and the health
stream) -> registration socket -> background loops (publishing, health, sampling, claim status)
-> metrics endpoint and control socket.
Stop (SIGTERM/SIGINT): registration socket first, then in-flight calls finish, then the DRA
socket, then the background loops. Slices stay: kubelet wipes them when no instance returns.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from driver import backends, kubeapi, slices
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
from driver.errors import ConfigError, FatalError, UnidraError
from driver.health import HealthBoard, parse_policy
from driver.inventory import LiveInventory
from driver.kubelet import sockets
from driver.kubelet.health_stream import HEALTH_SERVICES, DeviceHealth, HealthStream
from driver.kubelet.liveness import LivenessServer, SelfCheckingHealth
from driver.kubelet.registration import RegistrationServicer, RegistrationState
from driver.kubelet.server import PluginServers, UnixServer
from driver.kubelet.service import DRA_SERVICES, add_dra_services
from driver.locks import FileLocks
from driver.metrics import DeviceCollector, DriverMetrics, SampleCache, sampling_loop
from driver.model import HealthEvent, Partition
from driver.prepare import ClaimSource, Preparer, Timings
from driver.publisher import Plan, Publisher
from driver.settings import Settings, metrics_endpoint
from driver.supervisor import Supervisor

log = logging.getLogger(__name__)


class ClaimOperations:
    """What kubelet's calls reach: the Preparer, timed and counted, with claim status kept current."""

    def __init__(
        self, preparer: Preparer, metrics: DriverMetrics, status: ClaimStatusWriter
    ) -> None:
        self.preparer = preparer
        self.metrics = metrics
        self.status = status

    def prepare(self, ref: ClaimRef) -> tuple[PreparedDevice, ...]:
        timings = Timings()
        try:
            devices: tuple[PreparedDevice, ...] = self._timed(
                "prepare", ref, lambda: self.preparer.prepare(ref, timings)
            )
        finally:
            self.metrics.observe_phases(timings)
        return devices

    def unprepare(self, ref: ClaimRef) -> None:
        self._timed("unprepare", ref, lambda: self.preparer.unprepare(ref))

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

    def stop(self) -> None:
        log.info("Stopping", extra={"grace_seconds": self.settings.shutdown_grace_seconds})
        self.servers.stop(self.settings.shutdown_grace_seconds)
        self.control.stop()
        if self.liveness is not None:
            self.liveness.stop()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        self.supervisor.stop()
        log.info("Stopped; sockets removed")


def start(settings: Settings, claim_source: ClaimSource | None = None) -> Daemon:
    """Bring the plugin up and return once kubelet can register it."""
    live = _discover(settings)
    api_client = kubeapi.build_client(settings.kubeconfig)
    settings.plugin_dir.mkdir(parents=True, exist_ok=True)
    settings.cdi_root.mkdir(parents=True, exist_ok=True)
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
    )
    preparer.recover()

    registry = CollectorRegistry()
    metrics = DriverMetrics(registry)
    board = HealthBoard(
        taint_key=f"{settings.driver_name}/unhealthy",
        policy=parse_policy(settings.taint_effects),
        quiet_seconds=settings.health_quiet_seconds,
        min_hold_seconds=settings.health_min_hold_seconds,
    )
    board.monitored = _monitored(live)
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

    dra_path = sockets.dra_socket(settings.plugin_dir, settings.pod_uid)
    registration = RegistrationState()
    servicer = RegistrationServicer(
        settings.driver_name, str(dra_path), (*DRA_SERVICES, *HEALTH_SERVICES), registration
    )
    metrics.registered.set_function(lambda: 1.0 if registration.registered else 0.0)

    def serve_dra(server: Any) -> None:
        add_dra_services(server, operations)
        stream.add_to(server)

    servers = PluginServers(
        dra=UnixServer(dra_path, serve_dra, workers=32, name="dra"),
        registration=UnixServer(
            sockets.registration_socket(
                settings.registrar_dir, settings.driver_name, settings.pod_uid
            ),
            servicer.add_to,
            workers=2,
            name="registration",
        ),
    )
    servers.start()

    slice_api = kubeapi.SliceApi(api_client)
    _report_api_server(slice_api, settings)
    publisher = Publisher(
        api=slice_api,
        driver=settings.driver_name,
        node=settings.node_name,
        desired=lambda: slices.build(live.current(), board.taints()),
        on_sync=lambda plan: _count_writes(metrics, plan),
        on_error=metrics.api_error,
    )
    for callback in (publisher.wake, stream.notify, status.health_changed):
        board.subscribe(callback)

    supervisor = Supervisor(on_restart=lambda loop: metrics.restarts.labels(loop).inc())
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
    metrics_server = _serve_metrics(settings, registry)
    control = ControlServer(
        sockets.control_socket(settings.plugin_dir, settings.pod_uid),
        lambda request: _control(request, live, board),
    )
    control.start()
    liveness = _serve_liveness(settings, servers)
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
    )


def run(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; the exit code for the CLI."""
    os.umask(0o077)  # sockets, checkpoint and lock file: readable and writable by the driver only
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        # A second signal gets the default action, so a stuck shutdown can still be killed.
        signal.signal(signum, signal.SIG_DFL)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


def _serve_liveness(settings: Settings, servers: PluginServers) -> LivenessServer | None:
    if settings.healthcheck_port is None:
        return None
    server = LivenessServer(
        settings.healthcheck_port, SelfCheckingHealth(servers.registration.path, servers.dra.path)
    )
    server.start()
    return server


def _serve_metrics(settings: Settings, registry: CollectorRegistry) -> WSGIServer | None:
    """The Prometheus endpoint in its own thread; a short poll interval keeps shutdown prompt."""
    endpoint = metrics_endpoint(settings.metrics_address)
    if endpoint is None:
        return None
    host, port = endpoint
    try:
        server = make_server(
            host, port, make_wsgi_app(registry), ThreadingWSGIServer, handler_class=_QuietHandler
        )
    except OSError as err:
        raise FatalError(
            f"cannot serve metrics on {settings.metrics_address}: {err.strerror}"
        ) from err
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="metrics-http",
        daemon=True,
    )
    thread.start()
    log.info("Serving metrics", extra={"address": f"{host}:{server.server_port}"})
    return server


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
    }
