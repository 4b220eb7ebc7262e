"""Prometheus metrics: one device schema for every vendor (OpenTelemetry hardware conventions in
Prometheus form), claim/pod attribution from the driver's own state, and the driver's own operations.

Device readings come from a sampling thread; a scrape only reads its last snapshot, so a scrape
never waits for a vendor library. docs/metrics.md lists every metric.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from driver.backends import Backend, Sampler
from driver.checkpoint import CheckpointCorrupt, CheckpointStore
from driver.claims import Consumer
from driver.errors import FatalError
from driver.health import KINDS, Effect, HealthBoard
from driver.inventory import Inventory
from driver.model import Device, DeviceSample, HealthStatus, Partition
from driver.prepare import PHASES, Timings
from driver.settings import metrics_endpoint

log = logging.getLogger(__name__)

DEVICE_LABELS = ("hw_id", "hw_type", "hw_vendor", "hw_model", "uuid", "k8s_node_name")
OPERATIONS = ("prepare", "unprepare")
ERROR_REASONS = (
    "ClaimError",
    "ConfigError",
    "RetryableError",
    "LockTimeout",
    "DeadlineExceeded",
    "StorageError",
    "CheckpointCorrupt",
    "internal",
)

# Seconds: from a tenth of a millisecond, for the parts of a call.
FINE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 30)

# Publisher failures by error class; anything else is counted as "other".
API_ERROR_REASONS = ("Conflict", "Gone", "RetryableError", "ClaimError", "FatalError", "other")


class DriverMetrics:
    """Counters and histograms of the driver's own work, label sets pre-initialised."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.operations = Counter(
            "unidra_operations",
            "Claims prepared or unprepared, by result.",
            ["operation", "result"],
            registry=registry,
        )
        self.duration = Histogram(
            "unidra_operation_duration_seconds",
            "Time to prepare or unprepare one claim.",
            ["operation"],
            buckets=(
                0.0005,
                0.001,
                0.002,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
            ),
            registry=registry,
        )
        self.phases = Histogram(
            "unidra_prepare_phase_seconds",
            "Where the time of a prepare goes, by phase.",
            ["phase"],
            buckets=FINE_BUCKETS,
            registry=registry,
        )
        self.calls = Histogram(
            "unidra_call_duration_seconds",
            "Time in the gRPC handler for one kubelet call, all its claims included.",
            ["operation"],
            buckets=FINE_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "unidra_operation_errors",
            "Failed claim operations, by error reason.",
            ["operation", "reason"],
            registry=registry,
        )
        self.slice_syncs = Counter(
            "unidra_slice_syncs",
            "ResourceSlice reconciliations, by result.",
            ["result"],
            registry=registry,
        )
        self.slice_writes = Counter(
            "unidra_slice_writes", "ResourceSlice API writes, by verb.", ["verb"], registry=registry
        )
        self.slice_writes_postponed = Counter(
            "unidra_slice_writes_postponed",
            "ResourceSlice writes held back by the pool's write limit (counted each time).",
            registry=registry,
        )
        self.publishing = Gauge(
            "unidra_publishing",
            "1 while this instance is the one that publishes the node's ResourceSlices.",
            registry=registry,
        )
        self.api_errors = Counter(
            "unidra_api_errors", "Kubernetes API errors, by reason.", ["reason"], registry=registry
        )
        self.health_events = Counter(
            "unidra_health_events", "Device health events, by kind.", ["kind"], registry=registry
        )
        self.restarts = Counter(
            "unidra_background_restarts",
            "Background loops restarted after a crash or an unexpected return.",
            ["loop"],
            registry=registry,
        )
        self.registered = Gauge(
            "unidra_registered",
            "1 while kubelet has accepted the plugin registration.",
            registry=registry,
        )
        for operation in OPERATIONS:
            for result in ("success", "error"):
                self.operations.labels(operation, result)
            self.duration.labels(operation)
            self.calls.labels(operation)
            for reason in ERROR_REASONS:
                self.errors.labels(operation, reason)
        for result in ("success", "error"):
            self.slice_syncs.labels(result)
        for verb in ("create", "update", "delete"):
            self.slice_writes.labels(verb)
        for phase in PHASES:
            self.phases.labels(phase)
        for api_reason in API_ERROR_REASONS:
            self.api_errors.labels(api_reason)
        for kind in KINDS:
            self.health_events.labels(kind)

    def observe(self, operation: str, seconds: float, error: Exception | None) -> None:
        self.duration.labels(operation).observe(seconds)
        self.operations.labels(operation, "error" if error else "success").inc()
        if error is not None:
            # The first listed reason in the error's class tree: a NotFound is a ClaimError.
            names = [cls.__name__ for cls in type(error).__mro__]
            reason = next((name for name in names if name in ERROR_REASONS), "internal")
            self.errors.labels(operation, reason).inc()

    def observe_phases(self, timings: Timings) -> None:
        for phase, seconds in timings.seconds.items():
            self.phases.labels(phase).observe(seconds)

    def observe_call(self, operation: str, seconds: float, outside_claims: float) -> None:
        """A kubelet call: its time, and for a prepare the handler's own part as a phase."""
        self.calls.labels(operation).observe(seconds)
        if operation == "prepare":
            self.phases.labels("handler").observe(outside_claims)

    def api_error(self, reason: str) -> None:
        self.slice_syncs.labels("error").inc()
        self.api_errors.labels(reason if reason in API_ERROR_REASONS else "other").inc()

    def watch_loops(self, names: Iterable[str]) -> None:
        """Start every loop's restart counter at zero, so a first crash shows as an increase."""
        for name in names:
            self.restarts.labels(name)


@dataclass
class SampleCache:
    """The last readings of every device, refreshed by the sampling loop."""

    samples: dict[str, DeviceSample] = field(default_factory=dict)
    taken: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def replace(self, samples: Sequence[DeviceSample]) -> None:
        with self.lock:
            self.samples = {s.device: s for s in samples}
            self.taken = time.time()

    def get(self) -> dict[str, DeviceSample]:
        with self.lock:
            return dict(self.samples)


def sampling_loop(
    backends: Callable[[], Sequence[Backend]], cache: SampleCache, interval: float
) -> Callable[[threading.Event], None]:
    def loop(stop: threading.Event) -> None:
        while True:
            readings: list[DeviceSample] = []
            for backend in backends():
                if isinstance(backend, Sampler):
                    try:
                        readings.extend(backend.sample())
                    except Exception as err:
                        log.warning(
                            "Sampling failed", extra={"backend": backend.name, "error": str(err)}
                        )
            cache.replace(readings)
            if stop.wait(interval):
                return

    return loop


class DeviceCollector(Collector):
    """Device series at scrape time, from the sample cache, the inventory, the health board and the checkpoint."""

    def __init__(
        self,
        *,
        node: str,
        inventory: Callable[[], Inventory],
        board: HealthBoard,
        store: CheckpointStore,
        cache: SampleCache,
        host_root: Path = Path("/"),
    ) -> None:
        self.node = node
        self.inventory = inventory
        self.board = board
        self.store = store
        self.cache = cache
        self.host_root = host_root

    def describe(self) -> Iterator[Metric]:
        return iter(())  # names are known only at scrape time; skip the registry's check

    def collect(self) -> Iterator[Metric]:
        inventory = self.inventory()
        samples = self.cache.get()
        utilization = _gauge(
            "hw_gpu_utilization_ratio",
            "Fraction of time the device was busy (hw.gpu.utilization).",
            ("hw_gpu_task",),
        )
        memory_usage = _gauge(
            "hw_gpu_memory_usage_bytes", "Device memory in use (hw.gpu.memory.usage)."
        )
        memory_limit = _gauge(
            "hw_gpu_memory_limit_bytes", "Device memory size (hw.gpu.memory.limit)."
        )
        power = _gauge("hw_power_watts", "Power draw (hw.power).")
        energy = CounterMetricFamily(
            "hw_energy_joules",
            "Energy used since the driver loaded (hw.energy).",
            labels=DEVICE_LABELS,
        )
        temperature = _gauge(
            "hw_temperature_celsius",
            "Device temperature (hw.temperature).",
            ("hw_sensor_location",),
        )
        errors = CounterMetricFamily(
            "hw_errors", "Memory errors (hw.errors).", labels=(*DEVICE_LABELS, "error_type")
        )
        status = _gauge("hw_status", "1 for the device's current state (hw.status).", ("hw_state",))
        info = _gauge(
            "unidra_device_info",
            "Static facts of a device; value 1.",
            ("pci_bus_id", "numa_node", "architecture", "driver_version", "partition"),
        )
        for device in inventory.devices:
            labels = self._labels(device)
            sample = samples.get(device.name)
            state = self._state(device.name)
            for value in ("ok", "degraded", "failed"):
                status.add_metric([*labels, value], 1.0 if value == state else 0.0)
            info.add_metric(
                [
                    *labels,
                    device.pci_bus_id or "",
                    "" if device.numa_node is None else str(device.numa_node),
                    device.architecture,
                    device.driver_version or "",
                    "true" if device.partition_profile else "false",
                ],
                1.0,
            )
            limit = sample.memory_limit_bytes if sample else None
            _add(memory_limit, labels, limit or device.memory_bytes)
            if sample is None:
                continue
            _add(utilization, [*labels, "general"], sample.utilization)
            _add(memory_usage, labels, sample.memory_used_bytes)
            _add(power, labels, sample.power_watts)
            _add(energy, labels, sample.energy_joules)
            _add(temperature, [*labels, "die"], sample.temperature_celsius)
            _add(errors, [*labels, "corrected"], sample.errors_corrected)
            _add(errors, [*labels, "uncorrected"], sample.errors_uncorrected)
        yield from (
            utilization,
            memory_usage,
            memory_limit,
            power,
            energy,
            temperature,
            errors,
            status,
            info,
        )
        yield from self._claims(inventory, samples)

    def _state(self, device: str) -> str | None:
        """hw.status: failed for faults that make running work wrong, degraded for the rest."""
        health, _ = self.board.status(device)
        if health is HealthStatus.HEALTHY:
            return "ok"
        if health is HealthStatus.UNKNOWN:
            return None  # no series at 1: an unmonitored device is neither ok nor failing
        return "failed" if self.board.worst_effect(device) is Effect.NO_EXECUTE else "degraded"

    def _labels(self, device: Device) -> list[str]:
        return [device.name, device.type.value, device.vendor, device.model, device.uuid, self.node]

    def _claims(
        self, inventory: Inventory, samples: Mapping[str, DeviceSample]
    ) -> Iterator[Metric]:
        """One series per (device, pod using it), from the driver's own prepared-claim state;
        for shares also what they consumed and, where the vendor reports memory per process,
        what the processes of each pod use (docs/sharing.md)."""
        claim_labels = (
            "hw_id",
            "uuid",
            "k8s_node_name",
            "claim_namespace",
            "claim_name",
            "claim_uid",
        )
        claims = GaugeMetricFamily(
            "unidra_claim_device_info",
            "Joins a device to the claim holding it and the pods the claim is reserved for; value 1.",
            labels=(*claim_labels, "pod_name", "pod_uid", "share_id"),
        )
        consumed = GaugeMetricFamily(
            "unidra_share_consumed",
            "What a share consumed of its device, by capacity (bytes of memory, compute units).",
            labels=(*claim_labels, "share_id", "capacity"),
        )
        share_usage = GaugeMetricFamily(
            "unidra_share_memory_usage_bytes",
            "Device memory the processes of one pod use on a shared device, per share.",
            labels=(*claim_labels, "share_id", "pod_uid"),
        )
        prepared = GaugeMetricFamily("unidra_prepared_claims", "Claims prepared on this node.")
        try:
            checkpoint = self.store.read()
        except CheckpointCorrupt:
            prepared.add_metric([], float("nan"))
            yield from (claims, consumed, share_usage, prepared)
            return
        completed = list(checkpoint.claims.values())
        prepared.add_metric([], float(len(completed)))
        by_pod = self._memory_by_pod(samples) if any(s.processes for s in samples.values()) else {}
        for claim in completed:
            pods: list[Consumer | None] = [c for c in claim.consumers if c.resource == "pods"] or [
                None
            ]
            for device in claim.devices:
                item = inventory.allocatable(device.device)
                uuid = (
                    item.uuid
                    if isinstance(item, Device)
                    else (item.parent.uuid if isinstance(item, Partition) else "")
                )
                labels = [device.device, uuid, self.node, claim.namespace, claim.name, claim.uid]
                for pod in pods:
                    claims.add_metric(
                        [
                            *labels,
                            pod.name if pod else "",
                            pod.uid if pod else "",
                            device.share_id or "",
                        ],
                        1.0,
                    )
                if device.share_id is None:
                    continue
                for capacity, amount in sorted(device.consumed.items()):
                    consumed.add_metric([*labels, device.share_id, capacity], float(amount))
                if not samples.get(device.device, DeviceSample(device.device)).processes:
                    continue  # the vendor reports no per-process memory here
                for pod in (p for p in pods if p is not None):
                    used = by_pod.get((device.device, pod.uid), 0)
                    share_usage.add_metric([*labels, device.share_id, pod.uid], float(used))
        yield from (claims, consumed, share_usage, prepared)

    def _memory_by_pod(self, samples: Mapping[str, DeviceSample]) -> dict[tuple[str, str], int]:
        """Device memory per (device, pod UID), adding up each pod's processes."""
        used: dict[tuple[str, str], int] = {}
        for name, sample in samples.items():
            for process in sample.processes:
                pod = pod_of(self.host_root, process.pid)
                if pod is not None:
                    used[(name, pod)] = used.get((name, pod), 0) + process.memory_bytes
        return used


_POD_UID = re.compile(
    r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})"
)


def pod_of(host_root: Path, pid: int) -> str | None:
    """The UID of the pod a host process runs in, from its cgroup path (systemd or cgroupfs
    layout); None for a process outside any pod or one that is gone."""
    try:
        text = (host_root / "proc" / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    found = _POD_UID.search(text)
    return found.group(1).replace("_", "-") if found else None


def _gauge(name: str, documentation: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=(*DEVICE_LABELS, *extra))


def _add(
    family: GaugeMetricFamily | CounterMetricFamily, labels: list[str], value: float | int | None
) -> None:
    if value is not None:
        family.add_metric(labels, float(value))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


def serve_http(
    address: str,
    flag: str,
    registry: CollectorRegistry,
    ready: Callable[[], bool] | None = None,
) -> WSGIServer | None:
    """Serve /metrics (and /readyz when `ready` is given) in a thread; None when `address` is empty."""
    server = bind_http(address, flag, registry, ready)
    if server is not None:
        serve_in_background(server)
    return server


def bind_http(
    address: str,
    flag: str,
    registry: CollectorRegistry,
    ready: Callable[[], bool] | None = None,
) -> WSGIServer | None:
    """Bind the endpoint's port without serving yet, so a taken port fails before anything else."""
    endpoint = metrics_endpoint(address)
    if endpoint is None:
        return None
    host, port = endpoint
    metrics_app = wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if ready is not None and environ.get("PATH_INFO") == "/readyz":
            ok = ready()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [b"ok\n" if ok else b"not synced yet\n"]
        answer: Iterable[bytes] = metrics_app(environ, start_response)
        return answer

    try:
        return make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as err:
        raise FatalError(f"cannot serve metrics on {address} ({flag}): {err.strerror}") from err


def serve_in_background(server: WSGIServer) -> None:
    """Serve a bound endpoint in a thread of its own; a short poll interval keeps shutdown prompt."""
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="metrics-http",
        daemon=True,
    )
    thread.start()
    host = str(server.server_address[0])
    log.info("Serving metrics", extra={"address": f"{host}:{server.server_port}"})


def wsgi_app(registry: CollectorRegistry) -> Callable[[dict[str, Any], Any], Iterable[bytes]]:
    """The scrape endpoint: /metrics only (not / or /healthz), without `_created` series."""
    disable_created_metrics()  # type: ignore[no-untyped-call]
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"metrics are at /metrics\n"]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app
