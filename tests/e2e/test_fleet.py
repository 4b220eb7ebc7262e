"""`unidra fleet` against the real cluster: the real scheduler allocates, the driver's health
monitor and an admin taint devices, and the fleet, run with its shipped service account, follows
every change from watches (JSON reports and metrics) without listing again."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e.plugin import (
    NAMESPACE,
    REPO,
    PluginProcess,
    apply,
    apply_component,
    claim_template,
    delete,
    delete_pods,
    device_request,
    ensure_namespace,
    metric_samples,
    pod,
    pod_claims,
    scheduling_message,
    scrape,
    service_account_kubeconfig,
    unidra,
    wait_pod_ready,
    wait_published,
    wait_unprepared,
)

from driver.fleet.view import KINDS
from driver.localcluster import LocalCluster, free_port, stop_process
from support.waiting import wait_until

NS = "e2e-fleet"
TWO_FABRICS = Path(__file__).parent / "profiles" / "two-fabrics.yaml"
BOARD_A, BOARD_B = "nvlink-board-a", "nvlink-board-b"
MODEL = "NVIDIA H100 80GB HBM3"
ON_BOARD_A = 'device.attributes["resource.kubernetes.io"].pciBusID == "0000:1b:00.0"'
LOST = "xid-79"  # the GPU fell off the bus: unidra.dev/unhealthy=lost-79, NoExecute


def _gang(count: int) -> dict[str, Any]:
    return {
        "devices": {
            "requests": [device_request(count=count)],
            "constraints": [{"matchAttribute": "unidra.dev/interconnectDomain"}],
        }
    }


def _pinned(tolerations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    request = device_request(selectors=[ON_BOARD_A])
    if tolerations:
        request["exactly"]["tolerations"] = tolerations
    return {"devices": {"requests": [request]}}


TEMPLATES = {
    "one-on-board-a": _pinned(),
    "two-on-one-fabric": _gang(2),
    "four-on-one-fabric": _gang(4),
    # A job that checkpoints before it leaves a failing GPU: it tolerates the NoExecute taint.
    "one-on-board-a-tolerating-loss": _pinned(
        [{"key": "unidra.dev/unhealthy", "operator": "Exists", "effect": "NoExecute"}]
    ),
}


class FleetWatch:
    """`unidra fleet --watch -o json --serve-metrics` as a process: the reports it printed, its metrics."""

    def __init__(self, kubeconfig: Path, directory: Path) -> None:
        self.port = free_port()
        self.out = directory / "fleet-watch.json"
        self.log = directory / "fleet-watch.log"
        with open(self.out, "wb") as out, open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "driver",
                    "fleet",
                    f"--kubeconfig={kubeconfig}",
                    "--watch",
                    "-o",
                    "json",
                    f"--serve-metrics=127.0.0.1:{self.port}",
                ],
                cwd=REPO,
                stdout=out,
                stderr=log,
            )

    def reports(self) -> list[dict[str, Any]]:
        """Every report printed so far: JSON documents one after another."""
        text = self.out.read_text()
        decoder = json.JSONDecoder()
        found, at = [], 0
        while text[at:].strip():
            at += len(text[at:]) - len(text[at:].lstrip())
            try:
                document, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                break  # a report still being written
            found.append(document)
        return found

    def wait_report(self, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The newest report once `check` holds for it."""

        def matching() -> dict[str, Any] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"the fleet exited:\n{self.log.read_text()[-3000:]}")
            printed = self.reports()
            return printed[-1] if printed and check(printed[-1]) else None

        try:
            return wait_until(matching, timeout=20, what=what)
        except AssertionError as err:
            printed = self.reports()
            last = _groups(printed[-1]) if printed else "none"
            raise AssertionError(f"{err}; the last report's groups: {last}") from None

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return metric_samples(scrape(self.port), name)

    def assert_listed_once(self) -> None:
        """Every kind was listed once, at start: changes came from watches."""
        lists = {dict(k)["kind"]: v for k, v in self.samples("unidra_fleet_lists_total").items()}
        assert lists == dict.fromkeys(KINDS, 1.0)

    def stop(self) -> None:
        code = stop_process(self.process, 30)
        assert code == 0, f"the fleet exited with {code}:\n{self.log.read_text()[-3000:]}"
        assert "Traceback" not in self.log.read_text()


def _groups(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per interconnect domain of node-a: free, allocated, tainted and the largest free group."""
    return {
        g["domain"]: {k: g[k] for k in ("free", "allocated", "tainted", "largestFreeGroup")}
        for node in report["nodes"]
        for g in node["groups"]
    }


def _devices(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["name"]: d for node in report["nodes"] for g in node["groups"] for d in g["devices"]}


def _counts(free: int, allocated: int = 0, tainted: int = 0) -> dict[str, int]:
    return {"free": free, "allocated": allocated, "tainted": tainted, "largestFreeGroup": free}


def _by_domain(samples: dict[tuple[tuple[str, str], ...], float]) -> dict[str, float]:
    return {dict(k)["interconnect_domain"]: v for k, v in samples.items()}


@pytest.fixture(scope="module")
def fabrics(cluster: LocalCluster, installed: str) -> Iterator[PluginProcess]:
    """Two NVLink boards of four H100 on node-a, faults recovering at once, and the claim templates."""
    ensure_namespace(cluster, NS)
    apply(cluster, *(claim_template(name, NS, spec) for name, spec in TEMPLATES.items()))
    with PluginProcess(
        cluster, simulate=str(TWO_FABRICS), args=["--health-min-hold-seconds=0"]
    ) as process:
        wait_published(cluster, 8)
        yield process


@pytest.fixture(scope="module")
def fleet_kubeconfig(cluster: LocalCluster, installed: str) -> Path:
    """The shipped fleet component applied, and a token of its service account."""
    apply_component(cluster, "fleet")
    # Its pod would only idle on the fake runtime: the fleet runs here, as that account.
    delete(cluster, "deployment", "unidra-fleet", NAMESPACE)
    return service_account_kubeconfig(cluster, "unidra-fleet", NAMESPACE)


@pytest.fixture(scope="module")
def fleet(
    cluster: LocalCluster, fabrics: PluginProcess, fleet_kubeconfig: Path
) -> Iterator[FleetWatch]:
    watch = FleetWatch(fleet_kubeconfig, fabrics.root)
    try:
        watch.wait_report(
            lambda r: _groups(r) == {BOARD_A: _counts(4), BOARD_B: _counts(4)}, "the first report"
        )
        yield watch
    finally:
        watch.stop()


@pytest.fixture(autouse=True)
def no_pods_left(cluster: LocalCluster, fabrics: PluginProcess) -> Iterator[None]:
    yield
    delete_pods(cluster, NS)
    wait_unprepared(fabrics)


def _run(cluster: LocalCluster, name: str, template: str) -> list[str]:
    """Start a pod with a claim from `template`; the devices the scheduler gave it."""
    apply(cluster, pod(name, NS, templates={"gpu": template}))
    wait_pod_ready(cluster, NS, name)
    (claim,) = pod_claims(cluster, NS, name)
    return [r["device"] for r in claim["status"]["allocation"]["devices"]["results"]]


def _expect(
    fleet: FleetWatch, what: str, board_a: dict[str, int], board_b: dict[str, int]
) -> dict[str, Any]:
    """The watch prints the expected groups, and the metrics say the same."""
    expected = {BOARD_A: board_a, BOARD_B: board_b}
    report = fleet.wait_report(lambda r: _groups(r) == expected, what)
    largest = _by_domain(fleet.samples("unidra_fleet_largest_free_group"))
    assert largest == {d: float(c["largestFreeGroup"]) for d, c in expected.items()}
    devices = fleet.samples("unidra_fleet_devices")
    for state in ("free", "allocated", "tainted"):
        by_state = {k: v for k, v in devices.items() if dict(k)["state"] == state}
        assert _by_domain(by_state) == {d: float(c[state]) for d, c in expected.items()}, state
    fleet.assert_listed_once()
    return report


def _fragmentation(report: dict[str, Any]) -> dict[int, int]:
    (model,) = report["models"]
    assert model["model"] == MODEL
    return {f["jobSize"]: f["stranded"] for f in model["fragmentation"]}


def test_largest_free_group_follows_the_real_schedulers_allocations(
    cluster: LocalCluster, fleet: FleetWatch, fleet_kubeconfig: Path
) -> None:
    assert _run(cluster, "one", "one-on-board-a") == ["gpu-0000-1b-00-0"]
    report = _expect(fleet, "one GPU taken on board a", _counts(3, 1), _counts(4))
    assert report["models"][0]["largestFreeGroup"] == 4
    assert _fragmentation(report) == {2: 1, 4: 3, 8: 7}

    four = _run(cluster, "four", "four-on-one-fabric")
    assert sorted(four) == [f"gpu-0000-{b}-00-0" for b in ("9d", "c3", "d1", "df")]  # board b
    report = _expect(fleet, "board b full", _counts(3, 1), _counts(0, 4))
    assert report["models"][0]["largestFreeGroup"] == 3
    assert _fragmentation(report)[4] == 3  # 3 GPUs free, not one job of 4 fits

    # The fragmentation story: a 4-GPU job waits while 3 GPUs are free.
    apply(cluster, pod("four-more", NS, templates={"gpu": "four-on-one-fabric"}))
    assert "cannot allocate all claims" in scheduling_message(cluster, NS, "four-more")
    report = fleet.wait_report(lambda r: bool(r["pending"]), "the pending pod in the report")
    ((claim_name, requests),) = [
        (c["name"], c["requests"]) for p in report["pending"] for c in p["claims"]
    ]
    assert report["pending"][0]["pod"] == "four-more" and claim_name.startswith("four-more-gpu")
    assert requests == [{"name": "gpu", "deviceClassNames": ["gpu.unidra.dev"], "count": 4}]

    two = _run(cluster, "two", "two-on-one-fabric")
    report = _expect(fleet, "two more on board a", _counts(1, 3), _counts(0, 4))
    assert {d[: len("gpu-0000-1b")] for d in two} <= {"gpu-0000-43", "gpu-0000-52", "gpu-0000-61"}
    assert report["models"][0]["largestFreeGroup"] == 1

    # Who holds what: the claims as the API server has them, with their pods.
    held = {
        c["name"]: (sorted(d["device"] for d in c["devices"]), [p["name"] for p in c["pods"]])
        for c in report["claims"]
    }
    for name in ("one", "four", "two"):
        (claim,) = pod_claims(cluster, NS, name)
        results = claim["status"]["allocation"]["devices"]["results"]
        assert held[claim["metadata"]["name"]] == (sorted(r["device"] for r in results), [name])
    devices = _devices(report)
    for device in two:
        (holder,) = devices[device]["holders"]
        assert (holder["namespace"], holder["claim"]) == (
            NS,
            pod_claims(cluster, NS, "two")[0]["metadata"]["name"],
        )

    # The one-shot report, read with the same account, is the watch's.
    once = json.loads(unidra("fleet", f"--kubeconfig={fleet_kubeconfig}", "-o", "json"))
    assert all(s["served"] and "error" not in s for s in once["sources"].values())
    latest = fleet.reports()[-1]
    assert {k: v for k, v in once.items() if k != "sources"} == {
        k: v for k, v in latest.items() if k != "sources"
    }


def test_a_lost_gpu_shows_tainted_with_its_holder_and_is_free_after_recovery(
    cluster: LocalCluster, fabrics: PluginProcess, fleet: FleetWatch
) -> None:
    assert _run(cluster, "checkpointing", "one-on-board-a-tolerating-loss") == ["gpu-0000-1b-00-0"]
    (claim,) = pod_claims(cluster, NS, "checkpointing")
    held, idle = "gpu-0000-1b-00-0", "gpu-0000-43-00-0"
    plugins = f"--kubelet-plugins-directory-path={cluster.plugins_dir}"
    try:
        for device in (held, idle):
            unidra("simulate", "inject", f"--device={device}", f"--fault={LOST}", plugins)
        report = _expect(fleet, "two lost GPUs", _counts(2, 1, 1), _counts(4))
        devices = _devices(report)
        lost = [
            {
                "key": "unidra.dev/unhealthy",
                "value": "lost-79",
                "effect": "NoExecute",
                "source": "ResourceSlice",
            }
        ]
        assert devices[held]["state"] == "allocated" and devices[held]["taints"] == lost
        assert [(h["namespace"], h["claim"]) for h in devices[held]["holders"]] == [
            (NS, claim["metadata"]["name"])
        ]
        assert devices[idle]["state"] == "tainted" and devices[idle]["taints"] == lost
        assert "holders" not in devices[idle]
        taints = fleet.samples("unidra_fleet_device_taint_info")
        assert sorted((dict(k)["hw_id"], dict(k)["taint_value"]) for k in taints) == [
            (held, "lost-79"),
            (idle, "lost-79"),
        ]
        wait_pod_ready(cluster, NS, "checkpointing")  # it tolerates the loss: not evicted
    finally:
        for device in (held, idle):
            unidra("simulate", "recover", f"--device={device}", plugins)
    _expect(fleet, "both GPUs recovered", _counts(3, 1), _counts(4))
    assert fleet.samples("unidra_fleet_device_taint_info") == {}


def test_an_admins_device_taint_rule_takes_its_device_out_of_the_free_group(
    cluster: LocalCluster, fleet: FleetWatch
) -> None:
    rule = {
        "apiVersion": "resource.k8s.io/v1beta2",
        "kind": "DeviceTaintRule",
        "metadata": {"name": "fleet-repair"},
        "spec": {
            "deviceSelector": {
                "driver": "unidra.dev",
                "pool": cluster.node_name,
                "device": "gpu-0000-9d-00-0",
            },
            "taint": {"key": "example.com/repair", "value": "fan", "effect": "NoSchedule"},
        },
    }
    apply(cluster, rule)
    try:
        report = _expect(fleet, "the rule's device tainted", _counts(4), _counts(3, 0, 1))
        assert _devices(report)["gpu-0000-9d-00-0"]["taints"] == [
            {
                "key": "example.com/repair",
                "value": "fan",
                "effect": "NoSchedule",
                "source": "DeviceTaintRule/fleet-repair",
            }
        ]
        (labels,) = fleet.samples("unidra_fleet_device_taint_info")
        assert dict(labels)["taint_source"] == "DeviceTaintRule/fleet-repair"
    finally:
        delete(cluster, "devicetaintrule", "fleet-repair")
    _expect(fleet, "the rule deleted", _counts(4), _counts(4))


def test_a_cordoned_node_has_no_free_devices(cluster: LocalCluster, fleet: FleetWatch) -> None:
    cluster.kubectl("cordon", cluster.node_name)
    try:
        report = _expect(fleet, "node-a cordoned", _counts(0), _counts(0))
        (node,) = report["nodes"]
        assert node["unschedulable"] == "cordoned"
        assert {g["unavailable"] for g in node["groups"]} == {4}
    finally:
        cluster.kubectl("uncordon", cluster.node_name)
    report = _expect(fleet, "node-a uncordoned", _counts(4), _counts(4))
    assert "unschedulable" not in report["nodes"][0]


def _permissions(cluster: LocalCluster, kubeconfig: Path) -> set[str]:
    """`kubectl auth can-i --list` as the kubeconfig's user, one row per line."""
    listed = cluster.kubectl("auth", "can-i", "--list", kubeconfig=kubeconfig).stdout
    return {" ".join(line.split()) for line in listed.splitlines()[1:]}


def test_the_shipped_fleet_role_is_enough_and_only_reads(
    cluster: LocalCluster, fleet_kubeconfig: Path
) -> None:
    # What any service account may do (discovery, self-reviews) is not the role's doing.
    baseline = _permissions(cluster, service_account_kubeconfig(cluster, "default", NAMESPACE))
    granted = _permissions(cluster, fleet_kubeconfig) - baseline
    assert granted == {
        "pods [] [] [list watch]",
        "nodes [] [] [list watch]",
        "devicetaintrules.resource.k8s.io [] [] [list watch]",
        "deviceclasses.resource.k8s.io [] [] [list watch]",
        "resourceclaims.resource.k8s.io [] [] [list watch]",
        "resourceslices.resource.k8s.io [] [] [list watch]",
    }
    once = json.loads(unidra("fleet", f"--kubeconfig={fleet_kubeconfig}", "-o", "json"))
    assert {
        kind: (s["served"], s.get("error")) for kind, s in once["sources"].items()
    } == dict.fromkeys(KINDS, (True, None))
