"""`unidra fleet` against a live (test) API server: the report in every output, list+watch that
stays current through a scripted series of allocations and taints and relists only on 410 Gone,
paged lists, the metrics endpoint, --watch reprinting, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from driver import cli, kubeapi
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.fleet.view import KINDS
from driver.fleet.watch import FleetWatcher
from driver.supervisor import Supervisor
from support import cluster
from support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
NAMES = cluster.device_names()
RESOURCE = "resource.k8s.io"


def populate(api: FakeApiServer) -> None:
    """node-a and node-b with 8 H100s each in two NVLink domains of 4; one GPU of node-a failing,
    one of node-b reserved by an admin's rule, a 2-GPU training claim on node-a."""
    registered = {n["metadata"]["name"] for n in api.list("", "nodes")}
    for node in ("node-a", "node-b"):
        if node not in registered:
            api.create("", "nodes", cluster.node(node))
        failing = {NAMES[2]: cluster.unhealthy("xid-79")} if node == "node-a" else None
        for obj in cluster.node_slices(node, domains=2, taints=failing):
            api.create(RESOURCE, "resourceslices", obj)
    api.create(
        RESOURCE,
        "resourceclaims",
        cluster.claim("train", [("node-a", NAMES[0]), ("node-a", NAMES[1])], pods=["train-0"]),
    )
    api.create("", "pods", cluster.pod("train-0", ["train"], node="node-a"))
    rule = cluster.taint_rule(
        "training", key="example.com/training", pool="node-b", device=NAMES[4]
    )
    api.create(RESOURCE, "devicetaintrules", rule, version="v1beta2")


def unidra(*args: str, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "driver", "fleet", f"--kubeconfig={kubeconfig}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def kubeconfig(api: FakeApiServer, tmp_path: Path) -> Path:
    return api.write_kubeconfig(tmp_path / "kubeconfig")


def test_the_report_as_a_table_json_and_yaml(api: FakeApiServer, kubeconfig: Path) -> None:
    populate(api)
    table = unidra(kubeconfig=kubeconfig)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "MODELS" and "LARGEST FREE GROUP" in lines[1]
    assert lines[2].split()[-6:] == ["0", "0", "4", "2", "4", "12"]  # partitions, largest, stranded
    assert "unidra.dev/unhealthy=xid-79:NoSchedule  ResourceSlice" in table.stdout
    assert "example.com/training:NoSchedule         DeviceTaintRule/training" in table.stdout
    assert "train-0 (Running)" in table.stdout
    document = json.loads(unidra("-o", "json", kubeconfig=kubeconfig).stdout)
    assert yaml.safe_load(unidra("-o", "yaml", kubeconfig=kubeconfig).stdout) == document
    groups = {
        (n["node"], g["domain"]): g["largestFreeGroup"]
        for n in document["nodes"]
        for g in n["groups"]
    }
    assert groups == {
        ("node-a", "node-a-nvswitch-fabric-0-0"): 1,  # 2 allocated, 1 failing
        ("node-a", "node-a-nvswitch-fabric-0-1"): 4,
        ("node-b", "node-b-nvswitch-fabric-0-0"): 4,
        ("node-b", "node-b-nvswitch-fabric-0-1"): 3,  # 1 reserved by the rule
    }
    assert document["models"][0]["largestFreeGroup"] == 4
    assert document["claims"][0]["pods"] == [
        {"name": "train-0", "phase": "Running", "node": "node-a"}
    ]
    assert all(s["synced"] and s["served"] for s in document["sources"].values())


def test_lists_are_read_in_pages(api: FakeApiServer, kubeconfig: Path) -> None:
    populate(api)
    for node in ("node-c", "node-d", "node-e"):
        for obj in cluster.node_slices(node):
            api.create(RESOURCE, "resourceslices", obj)
    collection = kubeapi.Collection(
        kubeapi.build_client(kubeconfig),
        "ResourceSlices",
        ("/apis/resource.k8s.io/v1/resourceslices",),
    )
    pages = list(collection.pages(page_size=2))
    items = [item for page, _ in pages for item in page]
    assert sorted(i["spec"]["nodeName"] for i in items) == [
        "node-a",
        "node-b",
        "node-c",
        "node-d",
        "node-e",
    ]
    requests = [r for r in api.requests if r.path.endswith("/resourceslices")]
    assert len(pages) == len(requests) == 3 and "continue=" in requests[-1].query
    assert len({version for _, version in pages}) == 1  # one list, one resourceVersion


def test_rules_an_api_server_does_not_serve_are_left_out_with_a_note(
    api: FakeApiServer, kubeconfig: Path
) -> None:
    populate(api)
    api.fail(lambda method, path: "devicetaintrules" in path, status=404, times=None)
    run = unidra(kubeconfig=kubeconfig)
    assert run.returncode == 0, run.stderr
    assert "DeviceTaintRule/training" not in run.stdout
    assert "note: DeviceTaintRule not read: the API server serves no DeviceTaintRules" in run.stdout
    assert "the DRADeviceTaintRules feature gate" in run.stdout


def test_pods_the_role_may_not_read_are_left_out_with_a_note(
    api: FakeApiServer, kubeconfig: Path
) -> None:
    populate(api)
    api.fail(lambda method, path: path.endswith("/pods"), status=403, times=None)
    run = unidra(kubeconfig=kubeconfig)
    assert run.returncode == 0, run.stderr
    assert "train-0 (unknown)" in run.stdout  # the claim still names its pod
    assert "note: Pod not read: listing Pods: access denied" in run.stdout


def test_errors_are_one_line(
    kubeconfig: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    gone = FakeApiServer()
    gone.port = port
    nowhere = gone.write_kubeconfig(tmp_path / "gone")
    for args, code, text in [
        (("--job-sizes", "4,0"), 2, "--job-sizes: '4,0' is not a list of positive integers"),
        (("--serve-metrics", "everywhere"), 2, "--serve-metrics: 'everywhere' is not HOST:PORT"),
        ((f"--kubeconfig={nowhere}",), 1, "unidra: listing ResourceSlices: API server unreachable"),
    ]:
        assert cli.main(["fleet", f"--kubeconfig={kubeconfig}", *args]) == code
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1, err


# -- keeping current --------------------------------------------------------------------------


@pytest.fixture
def watcher(api: FakeApiServer, kubeconfig: Path) -> Iterator[FleetWatcher]:
    # Short watches: every second each kind resumes from its last resourceVersion (bookmarks).
    watching = FleetWatcher(kubeapi.build_client(kubeconfig), watch_seconds=1)
    supervisor = Supervisor()
    for kind in KINDS:
        supervisor.spawn(kind, watching.loop(kind), interrupt=watching.interrupt)
    yield watching
    supervisor.stop()


def groups(watcher: FleetWatcher) -> dict[tuple[str, str], int]:
    return {(g.node, g.domain[-1]): g.largest_free_group for g in watcher.report().groups}


def allocate(api: FakeApiServer, name: str, node: str, *indices: int) -> None:
    created = api.create(RESOURCE, "resourceclaims", cluster.claim(name, count=len(indices)))
    allocated = cluster.claim(name, [(node, NAMES[i]) for i in indices], pods=[f"{name}-0"])
    api.update(
        RESOURCE,
        "resourceclaims",
        cluster.with_status(created, allocated["status"]),
        subresource="status",
    )


def test_watches_follow_a_scripted_series_of_allocations_and_taints(
    api: FakeApiServer, watcher: FleetWatcher
) -> None:
    populate(api)
    expected = {("node-a", "0"): 1, ("node-a", "1"): 4, ("node-b", "0"): 4, ("node-b", "1"): 3}
    wait_until(lambda: groups(watcher) == expected, what="the initial view")
    steps: list[tuple[Any, dict[tuple[str, str], int]]] = [
        (lambda: allocate(api, "a2", "node-a", 4, 5), {("node-a", "1"): 2}),
        (lambda: allocate(api, "b1", "node-b", 0), {("node-b", "0"): 3}),
        (lambda: api.delete(RESOURCE, "resourceclaims", "train", "default"), {("node-a", "0"): 3}),
        (lambda: taint(api, "node-b", NAMES[1]), {("node-b", "0"): 2}),
        (
            lambda: api.delete(RESOURCE, "devicetaintrules", "training", version="v1beta2"),
            {("node-b", "1"): 4},
        ),
        (lambda: taint(api, "node-a", None), {("node-a", "0"): 4}),  # the failing GPU recovered
        # Cordoned: the scheduler places no new pods there, so nothing of node-b is free.
        (lambda: cordon(api, "node-b", True), {("node-b", "0"): 0, ("node-b", "1"): 0}),
        (lambda: cordon(api, "node-b", False), {("node-b", "0"): 2, ("node-b", "1"): 4}),
    ]
    for act, change in steps:
        act()
        expected.update(change)
        wait_until(lambda: groups(watcher) == expected, what=f"the view after {change}")
    (model,) = watcher.report().models
    assert (model.counts["free"], model.largest_free_group) == (12, 4)
    # Watches end every second and resume from the last resourceVersion; nothing is listed twice.
    wait_until(
        lambda: (
            len([r for r in api.requests if "watch=true" in r.query and "slices" in r.path]) >= 2
        ),
        what="a watch to resume",
    )
    assert {kind: s.lists for kind, s in watcher.sync.items()} == dict.fromkeys(watcher.sync, 1)
    # Nodes are listed in small pages: each carries its images (BENCHMARKS.md).
    (node_list,) = [r for r in api.requests if r.path == "/api/v1/nodes" and "watch" not in r.query]
    assert "limit=100" in node_list.query
    watches = [r for r in api.requests if "watch=true" in r.query]
    assert watches and all(
        "resourceVersion=" in r.query and "resourceVersion=&" not in r.query for r in watches
    )


def cordon(api: FakeApiServer, name: str, unschedulable: bool) -> None:
    (found,) = [n for n in api.list("", "nodes") if n["metadata"]["name"] == name]
    found["spec"] = cluster.node(name, unschedulable=unschedulable)["spec"]
    api.update("", "nodes", found)


def taint(api: FakeApiServer, node: str, device: str | None) -> None:
    """The driver republishes its node's slice with (or without) the health taint on `device`."""
    (current,) = [s for s in api.list(RESOURCE, "resourceslices") if s["spec"]["nodeName"] == node]
    (fresh,) = cluster.node_slices(
        node, domains=2, taints={device: cluster.unhealthy()} if device else None
    )
    current["spec"] = fresh["spec"]
    api.update(RESOURCE, "resourceslices", current)


def test_an_expired_watch_relists_and_catches_up(api: FakeApiServer, watcher: FleetWatcher) -> None:
    populate(api)
    wait_until(lambda: watcher.synced, what="the first lists")
    expired = api.fail(
        lambda method, path: method == "GET" and path.endswith("/resourceclaims"), status=410
    )
    wait_until(lambda: expired.hits == 1, what="the watch to expire")
    allocate(api, "late", "node-b", 0, 1, 2, 3)
    wait_until(
        lambda: groups(watcher).get(("node-b", "0")) == 0, what="the claim made after expiry"
    )
    assert watcher.sync["ResourceClaim"].lists == 2 and watcher.sync["ResourceSlice"].lists == 1


def test_a_failing_watch_is_reported_until_a_watch_opens_again(
    api: FakeApiServer, watcher: FleetWatcher
) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from driver.fleet import render as fleet_render
    from driver.fleet.metrics import FleetCollector

    registry = CollectorRegistry()
    registry.register(FleetCollector(watcher.summary))

    def failing() -> float | None:
        return sample(generate_latest(registry).decode(), "unidra_fleet_watch_failing", kind="Pod")

    populate(api)
    wait_until(lambda: watcher.synced and failing() == 0.0, what="the first lists")
    broken = api.fail(
        lambda method, path: method == "GET" and path.endswith("/pods"), status=500, times=None
    )
    # Kept-alive connections the server closed also fail a watch now and then (retried at
    # once): wait for the refusals, which last until they are cleared.
    wait_until(
        lambda: broken.hits >= 2 and bool(watcher.sync["Pod"].error), what="the pod watch to fail"
    )
    assert failing() == 1.0
    assert "note: Pod may be stale, its watch failed (retrying)" in fleet_render.tables(
        watcher.report()
    )
    api.clear_faults()
    wait_until(lambda: failing() == 0.0, what="a pod watch to open again")


# -- the processes an operator runs -------------------------------------------------------------


def fleet_process(kubeconfig: Path, *args: str, **streams: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "driver", "fleet", f"--kubeconfig={kubeconfig}", *args],
        cwd=REPO,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        **streams,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read().decode()
    except OSError as err:
        return getattr(err, "code", 0), ""


def sample(text: str, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and all(item.labels.get(k) == v for k, v in labels.items()):
                return float(item.value)
    return None


def test_serve_metrics_exports_the_view_and_stops_on_sigterm(
    api: FakeApiServer, kubeconfig: Path, tmp_path: Path
) -> None:
    populate(api)
    port = free_port()
    log = (tmp_path / "fleet.log").open("w")
    proc = fleet_process(kubeconfig, f"--serve-metrics=127.0.0.1:{port}", stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: fetch(base + "/readyz")[0] == 200, what="readiness")
        text = fetch(base + "/metrics")[1]
        group_a0 = {"k8s_node_name": "node-a", "interconnect_domain": "node-a-nvswitch-fabric-0-0"}
        assert sample(text, "unidra_fleet_largest_free_group", **group_a0) == 1.0
        assert sample(text, "unidra_fleet_devices", state="tainted", **group_a0) == 1.0
        assert sample(text, "unidra_fleet_devices", state="allocated", **group_a0) == 2.0
        assert sample(text, "unidra_fleet_fragmentation_ratio", job_size="8") == 1.0
        taint_labels = {
            "hw_id": NAMES[2],
            "taint_key": "unidra.dev/unhealthy",
            "taint_value": "xid-79",
        }
        assert sample(text, "unidra_fleet_device_taint_info", **taint_labels) == 1.0
        assert sample(text, "unidra_fleet_synced", kind="DeviceTaintRule") == 1.0
        api.delete(RESOURCE, "resourceclaims", "train", "default")
        wait_until(
            lambda: (
                sample(fetch(base + "/metrics")[1], "unidra_fleet_largest_free_group", **group_a0)
                == 3.0
            ),
            what="the freed GPUs in the metrics",
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert "Traceback" not in (tmp_path / "fleet.log").read_text()


def test_watch_prints_the_report_again_when_it_changes(
    api: FakeApiServer, kubeconfig: Path
) -> None:
    populate(api)
    proc = fleet_process(
        kubeconfig, "--watch", "-o", "json", stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    documents: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if line.rstrip("\n") == "}":  # the end of one top-level JSON document
                documents.append(json.loads("".join(lines)))
                lines = []

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: len(documents) == 1, what="the first report")
        assert documents[0]["models"][0]["free"] == 12
        api.delete(RESOURCE, "resourceclaims", "train", "default")
        wait_until(lambda: len(documents) == 2, what="the report after a change")
        assert documents[1]["models"][0]["free"] == 14 and documents[1]["claims"] == []
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        reader.join(timeout=5)
        assert proc.stdout is not None
        proc.stdout.close()
