"""The kubelet-plugin daemon: the one module that wires everything together and orders start and stop.

Start: discover devices -> recover node state -> DRA socket -> registration socket -> publish slices.
Stop (SIGTERM/SIGINT): registration socket first, then in-flight calls finish, then the DRA
socket, then the background loops. Slices stay: kubelet wipes them when no instance returns.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from types import FrameType

from driver import backends, kubeapi, slices
from driver.backends import BackendContext
from driver.checkpoint import CheckpointStore
from driver.errors import FatalError, UnidraError
from driver.inventory import LiveInventory
from driver.kubelet import sockets
from driver.kubelet.registration import RegistrationServicer, RegistrationState
from driver.kubelet.server import PluginServers, UnixServer
from driver.kubelet.service import DRA_SERVICES, add_dra_services
from driver.locks import FileLocks
from driver.prepare import ClaimSource, Preparer
from driver.publisher import Publisher
from driver.settings import Settings
from driver.supervisor import Supervisor

log = logging.getLogger(__name__)


@dataclass
class Daemon:
    """A running plugin: what tests and the CLI need to observe and stop it."""

    settings: Settings
    inventory: LiveInventory
    preparer: Preparer
    servers: PluginServers
    registration: RegistrationState
    publisher: Publisher
    supervisor: Supervisor

    def stop(self) -> None:
        log.info("Stopping", extra={"grace_seconds": self.settings.shutdown_grace_seconds})
        self.servers.stop(self.settings.shutdown_grace_seconds)
        self.supervisor.stop()
        log.info("Stopped; sockets removed")


def start(settings: Settings, claim_source: ClaimSource | None = None) -> Daemon:
    """Bring the plugin up and return once kubelet can register it."""
    live = _discover(settings)
    api_client = kubeapi.build_client(settings.kubeconfig)
    settings.plugin_dir.mkdir(parents=True, exist_ok=True)
    settings.cdi_root.mkdir(parents=True, exist_ok=True)
    locks = FileLocks(settings.plugin_dir / "serialize.lock")
    preparer = Preparer(
        driver=settings.driver_name,
        pool=settings.pool_name,
        inventory=live.current,
        claim_source=claim_source or kubeapi.ClaimReader(api_client),
        store=CheckpointStore(settings.plugin_dir / "checkpoint.json", locks),
        locks=locks,
        cdi_root=settings.cdi_root,
    )
    preparer.recover()
    dra_path = sockets.dra_socket(settings.plugin_dir, settings.pod_uid)
    registration = RegistrationState()
    servicer = RegistrationServicer(settings.driver_name, str(dra_path), DRA_SERVICES, registration)
    servers = PluginServers(
        dra=UnixServer(dra_path, lambda s: add_dra_services(s, preparer), workers=32, name="dra"),
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
        desired=lambda: slices.build(live.current()),
    )
    supervisor = Supervisor()
    supervisor.spawn("slice-publisher", publisher.reconcile_loop, interrupt=publisher.wake)
    supervisor.spawn("slice-watch", publisher.watch_loop, interrupt=publisher.interrupt_watch)
    supervisor.spawn("rediscovery", lambda stop: _rediscover(live, publisher, settings, stop))
    return Daemon(settings, live, preparer, servers, registration, publisher, supervisor)


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
        ),
    )
    for name, reason in failures.items():
        log.error("Backend unavailable", extra={"backend": name, "reason": reason})
    live = LiveInventory(built, partitions=settings.partitions)
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
    live: LiveInventory, publisher: Publisher, settings: Settings, stop: threading.Event
) -> None:
    while not stop.wait(settings.rediscover_seconds):
        added, removed, changed = live.refresh()
        if added or removed or changed:
            publisher.wake()
