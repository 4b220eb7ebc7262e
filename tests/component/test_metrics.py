"""The metrics endpoint: one device schema for every vendor, claim and pod attribution, driver operations,
scrapes that never wait for a vendor library, and monitors that crash being restarted and counted.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import promql_parser
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from driver import daemon
from driver.backends import BackendContext
from driver.checkpoint import CheckpointStore
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.fleet.metrics import FleetCollector, Summary
from driver.fleet.view import DEFAULT_JOB_SIZES, Fleet, summarize_models
from driver.health import HealthBoard
from driver.inventory import LiveInventory
from driver.kubelet import client as kubelet
from driver.locks import FileLocks
from driver.metrics import DeviceCollector, SampleCache, sampling_loop
from driver.model import DeviceSample, HealthEvent
from driver.supervisor import Supervisor
from support import cluster
from support.claims import allocated_claim, result
from support.promql import exported, grouping, selectors
from support.waiting import wait_until
from vendors.simulated import SimulatedBackend

DEVICE_METRICS = (
    "hw_gpu_utilization_ratio",
    "hw_gpu_memory_usage_bytes",
    "hw_gpu_memory_limit_bytes",
    "hw_power_watts",
    "hw_energy_joules_total",
    "hw_temperature_celsius",
    "hw_errors_total",
    "hw_status",
)


@pytest.fixture
def mixed(node) -> Iterator[tuple[daemon.Daemon, kubelet.Plugin]]:  # type: ignore[no-untyped-def]
    with node.serve("mixed", metrics_interval_seconds=0.05) as serving:
        yield serving


def scrape(instance: daemon.Daemon) -> str:
    assert instance.metrics_server is not None
    url = f"http://127.0.0.1:{instance.metrics_server.server_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def series(text: str, name: str) -> list[dict[str, str]]:
    found = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            found.append(dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0])))
    return found


def test_every_vendor_gets_the_same_device_series(mixed) -> None:  # type: ignore[no-untyped-def]
    instance, _ = mixed
    wait_until(lambda: series(scrape(instance), "hw_power_watts"), what="a first sample")
    text = scrape(instance)
    for name in DEVICE_METRICS:
        vendors = {s["hw_vendor"] for s in series(text, name)}
        assert vendors == {"nvidia", "amd", "intel", "furiosa", "rebellions"}, name
    npu = next(s for s in series(text, "hw_power_watts") if s["hw_vendor"] == "furiosa")
    assert (
        npu["hw_type"] == "npu"
        and npu["k8s_node_name"] == "node-a"
        and npu["uuid"]
        and npu["hw_model"] == "FuriosaAI RNGD"
    )
    assert {s["error_type"] for s in series(text, "hw_errors_total")} == {
        "corrected",
        "uncorrected",
    }
    # prometheus_client before 0.20 omits the _total suffix from the TYPE line
    assert re.search(r"^# TYPE hw_energy_joules(_total)? counter$", text, re.MULTILINE)


def test_claims_are_joined_to_devices_and_pods(mixed, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    instance, plugin = mixed
    claim = allocated_claim(api, "inference", [result("npu-0000-b1-00-0", "node-a", "npu")])
    assert plugin.prepare([claim])[claim[2]].error == ""
    text = scrape(instance)
    (joined,) = series(text, "unidra_claim_device_info")
    assert joined["hw_id"] == "npu-0000-b1-00-0" and joined["claim_name"] == "inference"
    assert joined["claim_namespace"] == "default" and joined["claim_uid"] == claim[2]
    assert joined["pod_name"] == "inference-pod" and joined["pod_uid"]
    assert "unidra_prepared_claims 1.0" in text
    assert 'unidra_operations_total{operation="prepare",result="success"} 1.0' in text
    assert 'unidra_operation_duration_seconds_count{operation="prepare"} 1.0' in text
    for phase in ("claim_get", "lock_wait", "cdi_write", "checkpoint_write"):
        assert f'unidra_prepare_phase_seconds_count{{phase="{phase}"}} 1.0' in text
    plugin.unprepare([claim])
    assert series(scrape(instance), "unidra_claim_device_info") == []


def test_failures_are_counted_by_reason(mixed) -> None:  # type: ignore[no-untyped-def]
    instance, plugin = mixed
    plugin.prepare([("default", "ghost", "7f1e2d3c-0000-4000-8000-000000000009")])
    text = scrape(instance)
    assert 'unidra_operation_errors_total{operation="prepare",reason="ClaimError"} 1.0' in text
    assert 'unidra_operations_total{operation="prepare",result="error"} 1.0' in text
    assert "unidra_registered 1.0" in text


def test_driver_metrics_are_initialised_before_anything_happens(mixed) -> None:  # type: ignore[no-untyped-def]
    instance, _ = mixed
    text = scrape(instance)
    assert (
        'unidra_operation_errors_total{operation="unprepare",reason="RetryableError"} 0.0' in text
    )
    assert 'unidra_slice_writes_total{verb="delete"}' in text
    assert "unidra_slice_writes_postponed_total 0.0" in text
    assert 'unidra_operation_errors_total{operation="prepare",reason="StorageError"} 0.0' in text
    wait_until(lambda: "unidra_publishing 1.0" in scrape(instance), what="the publisher gauge")


class StuckSampler:
    """A vendor library that hangs."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()

    def sample(self) -> Sequence[DeviceSample]:
        self.release.wait(30)
        return []


def test_a_scrape_never_waits_for_a_vendor_library(tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = SimulatedBackend(BackendContext(node_name="n", options={"profile": "rngd"}))
    live = LiveInventory([backend])
    cache = SampleCache()
    stuck = StuckSampler()
    supervisor = Supervisor()
    supervisor.spawn(
        "sampler", sampling_loop(lambda: [backend, stuck], cache, 0.05), interrupt=stuck.release.set
    )  # type: ignore[list-item]
    registry = CollectorRegistry()
    store = CheckpointStore(tmp_path / "checkpoint.json", FileLocks(tmp_path / "lock"))
    registry.register(
        DeviceCollector(
            node="n",
            inventory=live.current,
            board=HealthBoard(taint_key="k/u"),
            store=store,
            cache=cache,
        )
    )
    started = time.perf_counter()
    text = generate_latest(registry).decode()
    assert time.perf_counter() - started < 1.0
    assert "hw_gpu_memory_limit_bytes" in text
    supervisor.stop()


def test_hw_status_is_failed_for_noexecute_faults_and_degraded_for_the_rest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    backend = SimulatedBackend(BackendContext(node_name="n", options={"profile": "rngd"}))
    inventory = LiveInventory([backend])
    first, second, unmonitored = (d.name for d in inventory.current().devices[:3])
    board = HealthBoard(taint_key="k/u")
    board.monitored.update({first, second})
    board.report(HealthEvent(first, "lost", "", "fell off the bus", healthy=False))
    board.report(HealthEvent(second, "overheating", "", "95 C", healthy=False))
    registry = CollectorRegistry()
    registry.register(
        DeviceCollector(
            node="n",
            inventory=inventory.current,
            board=board,
            store=CheckpointStore(tmp_path / "checkpoint.json", FileLocks(tmp_path / "lock")),
            cache=SampleCache(),
        )
    )
    text = generate_latest(registry).decode()
    states = {
        (sample.labels["hw_id"], sample.labels["hw_state"])
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "hw_status" and sample.value == 1.0
    }
    assert states == {(first, "failed"), (second, "degraded")}  # unmonitored: no state at 1
    assert unmonitored not in {device for device, _ in states}


class CrashingMonitor(SimulatedBackend):
    def __init__(self, context: BackendContext) -> None:
        super().__init__(context)
        self.starts = 0

    def health_events(self, stop: threading.Event) -> Iterator[HealthEvent]:
        self.starts += 1
        if self.starts < 3:
            raise RuntimeError("the vendor library hung up")
        yield from super().health_events(stop)


@pytest.mark.crashes_expected
def test_a_monitor_that_dies_is_restarted_and_counted(
    node, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    import driver.supervisor

    monkeypatch.setattr(driver.supervisor.Backoff, "next", lambda self: 0.01)
    monitor: list[CrashingMonitor] = []

    def factory(context: BackendContext) -> CrashingMonitor:
        monitor.append(CrashingMonitor(context))
        return monitor[0]

    monkeypatch.setattr("driver.backends.load_factory", lambda name: factory)
    instance = daemon.start(node.settings())
    try:
        wait_until(lambda: monitor and monitor[0].starts >= 3, what="the monitor to be restarted")
        assert instance.supervisor.workers["health-simulated"].restarts == 2
        text = scrape(instance)
        assert 'unidra_background_restarts_total{loop="health-simulated"} 2.0' in text
    finally:
        instance.stop()


DASHBOARD = (
    Path(__file__).resolve().parents[2]
    / "manifests/components/grafana-dashboard/unidra-dashboard.json"
)
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$node": ".*", "$vendor": ".*"}


def fleet_exported() -> dict[str, set[str]]:
    """What `unidra fleet --serve-metrics` exports, for a node with a tainted and an allocated GPU."""
    fleet = Fleet()
    names = cluster.device_names()
    for obj in cluster.node_slices("node-a", taints={names[0]: cluster.unhealthy()}):
        fleet.apply("ResourceSlice", "ADDED", obj)
    fleet.apply("ResourceClaim", "ADDED", cluster.claim("train", [("node-a", names[1])]))

    def summary() -> Summary:
        fleet.refresh()
        groups = list(fleet.groups())
        return groups, summarize_models(groups, DEFAULT_JOB_SIZES), {}

    registry = CollectorRegistry()
    registry.register(FleetCollector(summary))
    return exported(generate_latest(registry).decode())


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for name, value in GRAFANA_VARIABLES.items():
        queries = [q.replace(name, value) for q in queries]
    return queries


def test_every_dashboard_query_names_metrics_and_labels_the_driver_exports(  # type: ignore[no-untyped-def]
    mixed, api: FakeApiServer
) -> None:
    instance, plugin = mixed
    claim = allocated_claim(api, "inference", [result("npu-0000-b1-00-0", "node-a", "npu")])
    assert plugin.prepare([claim])[claim[2]].error == ""
    wait_until(lambda: series(scrape(instance), "hw_power_watts"), what="a first sample")
    metrics = {**exported(scrape(instance)), **fleet_exported()}
    used: set[str] = set()
    for query in dashboard_queries():
        if query.startswith("label_values("):
            name, label = query.removeprefix("label_values(").removesuffix(")").split(", ")
            assert label in metrics[name], query
            used.add(name)
            continue
        expr = promql_parser.parse(query)  # raises on a syntax error
        for selector in selectors(expr):
            assert selector.name in metrics, f"{selector.name} is not exported: {query}"
            used.add(selector.name)
            for matcher in selector.matchers.matchers:
                assert matcher.name in metrics[selector.name], f"{matcher.name}: {query}"
        for scope, labels in grouping(expr):
            available = set().union(*(metrics[s.name] for s in selectors(scope)))
            assert set(labels) <= available, f"{sorted(set(labels) - available)}: {query}"
    assert {"hw_status", "unidra_claim_device_info"} <= used
    assert {
        "unidra_fleet_devices",
        "unidra_fleet_largest_free_group",
        "unidra_fleet_fragmentation_ratio",
        "unidra_fleet_device_taint_info",
    } <= used
    assert {name.removesuffix("_total") for name in DEVICE_METRICS} <= {
        name.removesuffix("_total") for name in used
    }


def test_metrics_only_on_metrics_and_no_created_series(mixed) -> None:  # type: ignore[no-untyped-def]
    import urllib.error

    instance, _ = mixed
    assert "_created" not in scrape(instance)
    assert instance.metrics_server is not None
    for path in ("/", "/healthz"):
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(
                f"http://127.0.0.1:{instance.metrics_server.server_port}{path}", timeout=5
            )
        assert answer.value.code == 404
        answer.value.close()
