"""Daemon settings: one frozen dataclass built from flags and environment in driver.cli, validated here.

Backend-specific options live in `backend_options[<backend>]`, owned by that backend.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from driver.errors import ConfigError
from driver.health import parse_policy
from driver.sharing import SharingPolicy
from driver.sharing import parse_policy as parse_sharing

DEFAULT_DRIVER_NAME = "unidra.dev"
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# A pod UID names socket and lock files, so only UUID-like text is accepted.
_POD_UID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Settings:
    node_name: str
    driver_name: str = DEFAULT_DRIVER_NAME
    kubeconfig: Path | None = None
    cdi_root: Path = Path("/var/run/cdi")
    registrar_dir: Path = Path("/var/lib/kubelet/plugins_registry")
    plugins_dir: Path = Path("/var/lib/kubelet/plugins")
    pod_uid: str | None = None
    host_root: Path = Path("/")
    backends: tuple[str, ...] = ()
    backend_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # Publish partitionable devices (KEP-4815, Kubernetes 1.35+ layout); beta and on only from 1.36.
    partitions: bool = False
    # Publish devices as shareable (consumable capacity, KEP-5075; beta and on from 1.36),
    # narrowed per backend by its `sharing` option (docs/sharing.md).
    sharing: bool = False
    # How often devices are rediscovered, so hot-plugged or removed devices reach the slices.
    rediscover_seconds: float = 60.0
    # How often shared devices are checked against their claims (a dead MPS daemon restarted).
    sharing_check_seconds: float = 5.0
    # Prometheus endpoint, host:port; empty disables it. 9464 is OpenTelemetry's Prometheus port.
    metrics_address: str = ":9464"
    metrics_interval_seconds: float = 10.0
    # gRPC health service for the liveness probe (0: any free port; None: off). 51515 as in dra-example-driver.
    healthcheck_port: int | None = 51515
    # kind=Effect overrides of the taint policy (docs/health.md).
    taint_effects: Mapping[str, str] = field(default_factory=dict)
    # Transient faults clear after this long without new faults (doubled for flapping devices).
    health_quiet_seconds: float = 300.0
    # No condition clears sooner than this after it was raised, so a flapping device cannot thrash.
    health_min_hold_seconds: float = 30.0
    # The health stream is resent this often, well inside its timeout.
    health_resend_seconds: float = 10.0
    # Time kubelet's in-flight calls get to finish after SIGTERM; kubelet's own call timeout is 45 s.
    shutdown_grace_seconds: float = 20.0
    # ResourceSlice writes of the pool: this many at once, refilled at this rate. Real changes are
    # rare and go out at once; anything fighting the driver over its slices is slowed to a trickle.
    slice_write_burst: int = 10
    slice_writes_per_second: float = 0.2

    @property
    def plugin_dir(self) -> Path:
        """The driver's private directory: DRA socket, checkpoint and lock file."""
        return self.plugins_dir / self.driver_name

    @property
    def sharing_policy(self) -> SharingPolicy:
        return parse_sharing(self.sharing, self.backend_options)

    @property
    def pool_name(self) -> str:
        """One pool per node, named after the node."""
        return self.node_name

    def validate(self) -> Settings:
        if not self.node_name:
            raise ConfigError(
                "--node-name", "is required (or set NODE_NAME, e.g. from the downward API)"
            )
        if len(self.node_name) > 253 or not _DNS_SUBDOMAIN.match(self.node_name):
            raise ConfigError(
                "--node-name", f"{self.node_name!r} is not a valid Kubernetes node name"
            )
        check_driver_name(self.driver_name)
        if self.pod_uid and not _POD_UID.match(self.pod_uid):
            raise ConfigError(
                "--pod-uid",
                f"{self.pod_uid[:80]!r} is not a pod UID (letters, digits and dashes, at most 63)",
            )
        if self.metrics_address and not _split_address(self.metrics_address):
            raise ConfigError(
                "--metrics-address", f"{self.metrics_address!r} is not HOST:PORT or :PORT"
            )
        parse_policy(self.taint_effects)
        parse_sharing(self.sharing, self.backend_options)
        if self.healthcheck_port is not None and not 0 <= self.healthcheck_port < 65536:
            raise ConfigError("--healthcheck-port", f"{self.healthcheck_port} is not a TCP port")
        for flag, seconds in (
            ("--metrics-interval-seconds", self.metrics_interval_seconds),
            ("--health-quiet-seconds", self.health_quiet_seconds),
            ("slice_writes_per_second", self.slice_writes_per_second),
            ("slice_write_burst", self.slice_write_burst),
        ):
            if not seconds > 0:
                raise ConfigError(flag, f"{seconds} must be a positive number of seconds")
        if not self.health_min_hold_seconds >= 0:
            raise ConfigError(
                "--health-min-hold-seconds",
                f"{self.health_min_hold_seconds} must be zero or a positive number of seconds",
            )
        for flag, path in (
            ("--cdi-root", self.cdi_root),
            ("--kubelet-registrar-directory-path", self.registrar_dir),
            ("--kubelet-plugins-directory-path", self.plugins_dir),
            ("--host-root", self.host_root),
        ):
            if not path.is_absolute():
                raise ConfigError(
                    flag,
                    f"{path} must be an absolute path (kubelet and the runtime see host paths)",
                )
        return self


def check_driver_name(name: str) -> str:
    """The driver name names files and directories too: only a lowercase DNS subdomain will do."""
    if len(name) > 63 or not _DNS_SUBDOMAIN.match(name):
        raise ConfigError(
            "--driver-name", f"{name!r} must be a lowercase DNS subdomain of at most 63 characters"
        )
    return name


def _split_address(address: str) -> tuple[str, int] | None:
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:  # 0: any free port
        return None
    # An empty host listens on every interface: Prometheus scrapes the pod IP.
    everywhere = "0.0.0.0"  # noqa: S104
    return host.strip("[]") or everywhere, int(port)


def metrics_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) of the metrics endpoint, or None when disabled."""
    return _split_address(address) if address else None
