"""The kubelet-plugin daemon: the one module that wires everything together and orders start and stop.

Start: discover devices -> recover node state -> DRA socket -> registration socket.
Stop (SIGTERM/SIGINT): registration socket first, then in-flight calls finish, then the DRA socket.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from types import FrameType

from driver import backends, inventory, kubeapi
from driver.backends import BackendContext
from driver.checkpoint import CheckpointStore
from driver.errors import FatalError
from driver.kubelet import sockets
from driver.kubelet.registration import RegistrationServicer, RegistrationState
from driver.kubelet.server import PluginServers, UnixServer
from driver.kubelet.service import DRA_SERVICES, add_dra_services
from driver.locks import FileLocks
from driver.prepare import ClaimSource, Preparer
from driver.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Daemon:
    """A running plugin: what tests and the CLI need to observe and stop it."""

    settings: Settings
    preparer: Preparer
    servers: PluginServers
    registration: RegistrationState

    def stop(self) -> None:
        log.info("Stopping", extra={"grace_seconds": self.settings.shutdown_grace_seconds})
        self.servers.stop(self.settings.shutdown_grace_seconds)
        log.info("Stopped; sockets removed")


def start(settings: Settings, claim_source: ClaimSource | None = None) -> Daemon:
    """Bring the plugin up and return once kubelet can register it."""
    os.umask(0o077)  # sockets, checkpoint and lock file: readable and writable by the driver only
    names = settings.backends
    if not names:
        raise FatalError("no backends selected: pass --simulate PROFILE or --vendors")
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
    devices = inventory.discover(built)
    if not devices.devices:
        raise FatalError("no devices found by any backend; run `unidra inspect` to see why")
    log.info(
        "Discovered devices",
        extra={
            "devices": len(devices.devices),
            "backends": sorted(devices.backends),
            "node": settings.node_name,
        },
    )
    settings.plugin_dir.mkdir(parents=True, exist_ok=True)
    settings.cdi_root.mkdir(parents=True, exist_ok=True)
    locks = FileLocks(settings.plugin_dir / "serialize.lock")
    preparer = Preparer(
        driver=settings.driver_name,
        pool=settings.pool_name,
        inventory=lambda: devices,
        claim_source=claim_source or kubeapi.ClaimReader(kubeapi.build_client(settings.kubeconfig)),
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
    return Daemon(settings, preparer, servers, registration)


def run(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; the exit code for the CLI."""
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
