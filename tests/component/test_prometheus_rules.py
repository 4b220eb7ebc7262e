"""The Prometheus rules: the alerts (manifests/components/alerts) and the exporter-name recording
rules (manifests/components/exporter-names). Every expression names metrics, labels and label
values the driver really exports. Prometheus' own rule engine (promtool) fires each alert on
scrapes of a real daemon: not yet registered, then healthy, then with a failed GPU, an API server
refusing its slices and a claim it cannot prepare, and fires nothing while it is healthy; and it
computes dcgm-exporter's and AMD's names, in their units, from a real daemon's scrape."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from driver import control, daemon
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.kubelet import client as kubelet
from driver.kubelet import sockets
from support.promql import grouping, selectors, walk
from support.waiting import wait_until

COMPONENTS = Path(__file__).resolve().parents[2] / "manifests/components"
RULES = COMPONENTS / "alerts/prometheusrule.yaml"
EXPORTER_NAMES = COMPONENTS / "exporter-names/prometheusrule.yaml"
MIB = 1048576
DEVICE = "gpu-0000-1b-00-0"
# What a scrape through the servicemonitor component adds to the driver's own labels.
TARGET = {
    "job": "unidra-metrics",
    "namespace": "unidra",
    "pod": "unidra-kubelet-plugin-x7k2p",
    "node": "node-a",
    "instance": "10.0.0.5:9464",
    "endpoint": "metrics",
    "service": "unidra-metrics",
}
Sample = tuple[str, tuple[tuple[str, str], ...]]


def rules(path: Path = RULES) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text())
    return [rule for group in document["spec"]["groups"] for rule in group["rules"]]


def scrape(instance: daemon.Daemon) -> str:
    assert instance.metrics_server is not None
    url = f"http://127.0.0.1:{instance.metrics_server.server_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def samples(text: str) -> dict[Sample, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return sum(
        v for (n, found), v in samples(text).items() if n == name and labels.items() <= set(found)
    )


def settled(instance: daemon.Daemon) -> str:
    """A scrape once slice syncing has settled: the publisher's own writes come back through its
    watch and cause syncs that need no write; a later one would count as a success."""
    last = scrape(instance)
    for _ in range(50):
        time.sleep(0.2)
        now = scrape(instance)
        syncs = value(now, "unidra_slice_syncs_total")
        if syncs == value(last, "unidra_slice_syncs_total"):
            return now
        last = now
    raise AssertionError("slice syncing did not settle within 10 s")


@pytest.fixture
def scrapes(node, api: FakeApiServer) -> tuple[str, str, str]:  # type: ignore[no-untyped-def]
    """Three scrapes of one daemon, stopped afterwards (one daemon per node): before kubelet
    registered it, healthy, and in a fault state."""
    instance = daemon.start(node.settings("dgx-h100", metrics_interval_seconds=0.05))
    plugin = None
    try:
        wait_until(lambda: value(scrape(instance), "hw_power_watts"), what="a first sample")
        unregistered = scrape(instance)
        plugin = kubelet.wait_for_registration(node.registrar_dir, expected_driver="unidra.dev")
        wait_until(
            lambda: (
                value(scrape(instance), "unidra_registered")
                and value(scrape(instance), "unidra_slice_syncs_total", result="success")
            ),
            what="registered and published",
        )
        healthy = settled(instance)
        # Reads too: a sync that has nothing to write still lists the slices, and counts as a
        # success when that works.
        api.fail(lambda method, path: "resourceslices" in path, 500, None)
        socket = sockets.control_socket(node.plugin_dir, None)
        control.request(socket, {"command": "inject", "device": DEVICE, "fault": "xid-79"})
        missing = ("default", "missing-claim", "6a1c1b7e-0000-4000-8000-000000000001")
        assert plugin.prepare([missing])[missing[2]].error
        wait_until(
            lambda: (
                value(scrape(instance), "unidra_slice_syncs_total", result="error")
                and value(scrape(instance), "hw_status", hw_id=DEVICE, hw_state="failed")
            ),
            what="the fault state in the metrics",
        )
        return unregistered, healthy, scrape(instance)
    finally:
        if plugin is not None:
            plugin.close()
        instance.stop()


@pytest.fixture
def mixed(node) -> str:  # type: ignore[no-untyped-def]
    """A scrape of a registered, healthy daemon with every vendor's devices (stopped afterwards:
    one daemon per node)."""
    with node.serve("mixed", metrics_interval_seconds=0.05) as (instance, _):
        wait_until(
            lambda: value(scrape(instance), "hw_gpu_memory_usage_bytes", hw_vendor="amd"),
            what="a first sample",
        )
        return scrape(instance)


def test_every_rule_names_metrics_labels_and_values_the_driver_exports(
    scrapes: tuple[str, str, str], mixed: str
) -> None:
    metrics: dict[str, set[str]] = {}
    values: dict[tuple[str, str], set[str]] = {}
    for name, labels in {**samples(scrapes[2]), **samples(mixed)}:
        metrics.setdefault(name, set()).update(label for label, _ in labels)
        for label, label_value in labels:
            values.setdefault((name, label), set()).add(label_value)
    used = set()
    for path in (RULES, EXPORTER_NAMES):
        for rule in rules(path):
            what = rule.get("alert") or rule["record"]
            expr = promql_parser.parse(rule["expr"])  # raises on a syntax error
            for selector in selectors(expr):
                assert selector.name in metrics, f"{what}: {selector.name} is not exported"
                used.add(selector.name)
                for matcher in selector.matchers.matchers:
                    assert matcher.name in metrics[selector.name], (what, matcher.name)
                    known = values.get((selector.name, matcher.name), set())
                    assert matcher.value in known, (what, matcher.name, matcher.value)
            for scope, labels in grouping(expr):
                available = set().union(*(metrics[s.name] for s in selectors(scope)))
                assert set(labels) <= available, (what, labels)
            series_labels = set().union(*(metrics[s.name] for s in selectors(expr)))
            if "record" in rule:  # later rules of its group read it, with label_replace's labels
                added = {n.args[1].val for n in walk(expr) if _is_label_replace(n)}
                metrics[rule["record"]] = series_labels | added
            # Annotations name only labels the alert's series have, or the scrape adds.
            for text in rule.get("annotations", {}).values():
                for label in re.findall(r"\$labels\.(\w+)", text):
                    assert label in series_labels | set(TARGET), (what, label)
    assert {
        "unidra_registered",
        "hw_status",
        "unidra_slice_syncs_total",
        "unidra_operation_errors_total",
        "hw_gpu_memory_usage_bytes",
    } <= used


def _is_label_replace(node: object) -> bool:
    return isinstance(node, promql_parser.Call) and node.func.name == "label_replace"


def promtool() -> str:
    """The promtool binary; the test skips (or fails, where CI provides it) without one."""
    binary = os.environ.get("UNIDRA_PROMTOOL") or shutil.which("promtool")
    if binary is None:
        message = (
            "promtool is not installed (Debian's prometheus package has it; .ci/run extracts it)"
        )
        if os.environ.get("UNIDRA_PROMTOOL_REQUIRED"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


def rule_file(path: Path, destination: Path, annotations: bool = True) -> Path:
    """A PrometheusRule's groups as a Prometheus rule file. promtool's unit tests compare
    annotations too, so they get the rules without; `promtool check rules` checks them."""
    groups = yaml.safe_load(path.read_text())["spec"]["groups"]
    for group in groups if not annotations else []:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    destination.write_text(yaml.safe_dump({"groups": groups}))
    return destination


def run_promtool(directory: Path, rules_path: Path, tests: dict[str, Any]) -> None:
    binary = promtool()
    checked = rule_file(rules_path, directory / "checked.yaml")
    check = subprocess.run(
        [binary, "check", "rules", str(checked)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    rule_file(rules_path, directory / "rules.yaml", annotations=False)
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": [tests]}
    (directory / "test.yaml").write_text(yaml.safe_dump(unit))
    done = subprocess.run(
        [binary, "test", "rules", "test.yaml"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


def series_values(*scrapes: str, minutes: tuple[int, ...]) -> list[dict[str, str]]:
    """promtool input series: each scrape's samples held for its phase's minutes, with the
    scrape's target labels; `_` where a phase did not have the series."""
    phases = [samples(text) for text in scrapes]
    series = []
    for name, labels in sorted(set().union(*phases)):
        if any(not math.isfinite(p.get((name, labels), 0.0)) for p in phases):
            continue  # promtool's series notation has no NaN (an unreadable checkpoint's gauge)
        parts = [
            f"{phase[(name, labels)]!r}+0x{count - 1}"
            if (name, labels) in phase
            else " ".join(["_"] * count)
            for phase, count in zip(phases, minutes, strict=True)
        ]
        selector = ",".join(
            f"{k}={json.dumps(v)}" for k, v in sorted({**dict(labels), **TARGET}.items())
        )
        series.append({"series": f"{name}{{{selector}}}", "values": " ".join(parts)})
    return series


def expected(rule: str, *labelsets: dict[str, str]) -> dict[str, Any]:
    severity = next(r["labels"]["severity"] for r in rules() if r["alert"] == rule)
    alerts = [{"exp_labels": {**labels, **TARGET, "severity": severity}} for labels in labelsets]
    return {"alertname": rule, "exp_alerts": alerts}


def test_promtool_fires_each_alert_on_a_daemon_in_a_fault_state(
    scrapes: tuple[str, str, str], tmp_path: Path
) -> None:
    unregistered, healthy, faulty = scrapes
    failed = [
        dict(labels)
        for (name, labels), v in samples(faulty).items()
        if name == "hw_status" and dict(labels)["hw_state"] == "failed" and v == 1
    ]
    assert [f["hw_id"] for f in failed] == [DEVICE]
    prepare_errors = [
        dict(labels)
        for (name, labels), v in samples(faulty).items()
        if name == "unidra_operation_errors_total"
        and dict(labels)["operation"] == "prepare"
        and v > samples(healthy)[(name, labels)]
    ]
    assert prepare_errors
    assert value(faulty, "unidra_slice_syncs_total", result="success") == value(
        healthy, "unidra_slice_syncs_total", result="success"
    ), "a slice sync succeeded after the API server began refusing them"
    quiet = ("UnidraPluginNotRegistered", "UnidraDeviceDegraded", "UnidraBackgroundLoopRestarting")
    # Minutes 0-9: not registered; 10-39: healthy; 40-69: the faults.
    run_promtool(
        tmp_path,
        RULES,
        {
            "interval": "1m",
            "input_series": series_values(unregistered, healthy, faulty, minutes=(10, 30, 30)),
            "alert_rule_test": [
                {"eval_time": "9m", **expected("UnidraPluginNotRegistered", {})},
                *({"eval_time": "39m", "alertname": r["alert"], "exp_alerts": []} for r in rules()),
                {"eval_time": "45m", **expected("UnidraPrepareErrors", *prepare_errors)},
                {"eval_time": "50m", **expected("UnidraDeviceFailed", *failed)},
                {
                    "eval_time": "50m",
                    **expected("UnidraSlicePublicationFailing", {"result": "error"}),
                },
                *({"eval_time": "50m", "alertname": name, "exp_alerts": []} for name in quiet),
            ],
        },
    )


# (recorded name, Unidra's metric, vendor, factor, the exporter's labels from Unidra's)
EXPORTER_SERIES = (
    ("DCGM_FI_DEV_GPU_UTIL", "hw_gpu_utilization_ratio", "nvidia", 100.0, "dcgm"),
    ("DCGM_FI_DEV_FB_USED", "hw_gpu_memory_usage_bytes", "nvidia", 1 / MIB, "dcgm"),
    ("DCGM_FI_DEV_POWER_USAGE", "hw_power_watts", "nvidia", 1.0, "dcgm"),
    ("DCGM_FI_DEV_GPU_TEMP", "hw_temperature_celsius", "nvidia", 1.0, "dcgm"),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "hw_energy_joules_total", "nvidia", 1000.0, "dcgm"),
    ("gpu_gfx_activity", "hw_gpu_utilization_ratio", "amd", 100.0, "amd"),
    ("gpu_used_vram", "hw_gpu_memory_usage_bytes", "amd", 1 / MIB, "amd"),
    ("gpu_total_vram", "hw_gpu_memory_limit_bytes", "amd", 1 / MIB, "amd"),
    ("gpu_power_usage", "hw_power_watts", "amd", 1.0, "amd"),
    ("gpu_edge_temperature", "hw_temperature_celsius", "amd", 1.0, "amd"),
)
EXPORTER_LABELS = {
    "dcgm": {"UUID": "uuid", "modelName": "hw_model", "Hostname": "k8s_node_name"},
    "amd": {"gpu_uuid": "uuid", "card_series": "hw_model", "hostname": "k8s_node_name"},
}


def test_promtool_computes_the_exporters_names_from_a_scrape(mixed: str, tmp_path: Path) -> None:
    found = samples(mixed)
    tests = []
    for record, source, vendor, factor, exporter in EXPORTER_SERIES:
        wanted = []
        for (name, labels), number in found.items():
            series = dict(labels)
            if name != source or series["hw_vendor"] != vendor:
                continue
            renamed = {new: series[old] for new, old in EXPORTER_LABELS[exporter].items()}
            wanted.append(
                {
                    "labels": _selector(record, {**series, **TARGET, **renamed}),
                    "value": number * factor,
                }
            )
        assert wanted, (record, "no source series in the scrape")
        tests.append({"expr": record, "eval_time": "5m", "exp_samples": wanted})
    for record in (
        "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL",
        "gpu_ecc_uncorrect_total",
        "DCGM_FI_DEV_FB_FREE",
    ):
        tests.append(
            {
                "expr": f"count({record}) > 0",
                "eval_time": "5m",
                "exp_samples": [{"labels": "{}", "value": _devices(found, record)}],
            }
        )
    run_promtool(
        tmp_path,
        EXPORTER_NAMES,
        {
            "interval": "1m",
            "input_series": series_values(mixed, minutes=(10,)),
            "promql_expr_test": tests,
        },
    )


def _devices(found: dict[Sample, float], record: str) -> int:
    vendor = "nvidia" if record.startswith("DCGM") else "amd"
    return sum(
        1
        for (name, labels), _ in found.items()
        if name == "hw_gpu_memory_usage_bytes" and dict(labels)["hw_vendor"] == vendor
    )


def _selector(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"
