"""Unidra and the Go reference driver, side by side against one real kube-apiserver.

    hack/bench --side-by-side [--kube-bin DIR] [--rounds 5] [--cycles 150] [--json FILE]

A local control plane (driver/localcluster.py, over TLS) serves both drivers: Unidra
(`unidra kubelet-plugin`, 128 simulated H100s) and `dra-test-driver` (Kubernetes' own test driver,
128 devices), each with the cluster admin's client certificate and its own private plugin
directories. One kubelet-like client (driver/kubelet/client.py) registers both and calls them
over their real Unix sockets, with allocated ResourceClaims made beforehand in the API server.

Rounds interleave the drivers (the order flips every round), so drift in the machine hits both.
Calls are paced below the Go driver's client rate limit (QPS 50, burst 100): one prepare and
unprepare cycle every `--pace` seconds, one GET per claim. Scenarios: 1 claim x 1 device and 1
claim x 8 devices, sequential; 16 callers preparing at once (a burst, then a pause that keeps the
average under the limit). Reported per driver: the median over rounds of each round's p50 and
p99, the empty-call floor on the same socket (back to back, and one call per pace), RSS, and
for Unidra where the time of a call went, from its own histograms.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit import (
    BENCH_GPUS,
    NODE,
    Process,
    bench_profile,
    gpu,
    means_over,
    ok,
    summary,
    timed,
)

from driver.kubelet import client as kubelet
from driver.kubelet.gen.dra.v1 import api_pb2, api_pb2_grpc
from driver.localcluster import LocalCluster, stop_process

GO_DRIVER = "test-driver.cdi.k8s.io"
CLAIMS = "/apis/resource.k8s.io/v1/namespaces/default/resourceclaims"
CONCURRENCY = 16


@dataclass
class Driver:
    """One driver under test: how to name its devices, its client, its process."""

    name: str
    driver: str
    device: Callable[[int], str]
    plugin: kubelet.Plugin
    pid: int
    scrape: Callable[[], str] | None = None
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise KeyError("VmRSS")


def go_device(index: int) -> str:
    return f"device-{index:02d}"


@contextmanager
def go_driver(cluster: LocalCluster, root: Path) -> Iterator[Driver]:
    """`dra-test-driver kubelet-plugin` with private directories; registered with our client."""
    registry, plugins, cdi_dir = root / "go-registry", root / "go-plugins", root / "go-cdi"
    # It expects its own folder in the plugins directory to exist, as a DaemonSet's hostPath makes it.
    for directory in (registry, plugins / GO_DRIVER, cdi_dir):
        directory.mkdir(parents=True)
    with open(root / "go-driver.log", "wb") as log:
        process = subprocess.Popen(
            [
                str(cluster.bin_dir / "dra-test-driver"),
                f"--kubeconfig={cluster.admin_kubeconfig}",
                f"--drivername={GO_DRIVER}",
                "kubelet-plugin",
                f"--node-name={NODE}",
                f"--num-devices={BENCH_GPUS}",
                f"--cdi-dir={cdi_dir}",
                f"--datadir={plugins}",
                f"--plugin-registration-path={registry}",
            ],
            stdout=log,
            stderr=log,
        )
    try:
        plugin = kubelet.wait_for_registration(registry, timeout=60, expected_driver=GO_DRIVER)
        yield Driver("go-reference", GO_DRIVER, go_device, plugin, process.pid)
        plugin.close()
    finally:
        stop_process(process, 30)


@contextmanager
def unidra_driver(cluster: LocalCluster, root: Path) -> Iterator[Driver]:
    home = root / "unidra"
    home.mkdir()
    daemon = Process(home, cluster.admin_kubeconfig, str(bench_profile(home / "bench.yaml")))
    try:
        plugin = daemon.register()
        yield Driver("unidra", "unidra.dev", gpu, plugin, daemon.proc.pid, daemon.scrape)
        plugin.close()
    finally:
        daemon.stop()


class Claims:
    """Allocated ResourceClaims in the real API server, written as the scheduler leaves them."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.count = 0

    def make(self, driver: Driver, devices: Sequence[int]) -> tuple[str, str, str]:
        self.count += 1
        name = f"{driver.name}-{self.count}"
        requests = [
            {"name": f"r{i}", "exactly": {"deviceClassName": "bench"}} for i in range(len(devices))
        ]
        claim = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"devices": {"requests": requests}},
        }
        created = self.cluster.request("POST", CLAIMS, claim)[1]
        created["status"] = {
            "allocation": {
                "devices": {
                    "results": [
                        {
                            "request": f"r{i}",
                            "driver": driver.driver,
                            "pool": NODE,
                            "device": driver.device(index),
                        }
                        for i, index in enumerate(devices)
                    ]
                },
                "nodeSelector": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": [NODE]}
                            ]
                        }
                    ]
                },
            },
            "reservedFor": [{"resource": "pods", "name": f"{name}-pod", "uid": f"uid-{name}"}],
        }
        self.cluster.request("PUT", f"{CLAIMS}/{name}/status", created)
        return "default", name, created["metadata"]["uid"]


def cycle(plugin: kubelet.Plugin, claim: tuple[str, str, str]) -> tuple[float, float]:
    prepare = timed(lambda: ok(plugin.prepare([claim]), claim))
    unprepare = timed(lambda: ok(plugin.unprepare([claim]), claim))
    return prepare, unprepare


def paced(calls: Sequence[Callable[[], None]], pace: float) -> None:
    """Run the calls one every `pace` seconds (a call that overruns delays the next one only)."""
    start = time.perf_counter()
    for n, call in enumerate(calls):
        delay = start + n * pace - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        call()


def sequential_round(
    driver: Driver, claims: list[tuple[str, str, str]], pace: float
) -> dict[str, Any]:
    prepares: list[float] = []
    unprepares: list[float] = []

    def one(claim: tuple[str, str, str]) -> Callable[[], None]:
        def run() -> None:
            p, u = cycle(driver.plugin, claim)
            prepares.append(p)
            unprepares.append(u)

        return run

    paced([one(c) for c in claims], pace)
    return {"prepare": summary(prepares), "unprepare": summary(unprepares)}


def concurrent_round(
    driver: Driver, bursts: list[list[tuple[str, str, str]]], pace: float
) -> dict[str, Any]:
    """Each burst: CONCURRENCY callers prepare at once, then unprepare at once."""
    prepares: list[float] = []
    unprepares: list[float] = []
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:

        def burst(claims: list[tuple[str, str, str]]) -> Callable[[], None]:
            def run() -> None:
                barrier = threading.Barrier(len(claims))

                def caller(claim: tuple[str, str, str]) -> None:
                    barrier.wait()
                    p = timed(lambda: ok(driver.plugin.prepare([claim]), claim))
                    barrier.wait()
                    u = timed(lambda: ok(driver.plugin.unprepare([claim]), claim))
                    with lock:
                        prepares.append(p)
                        unprepares.append(u)

                list(pool.map(caller, claims))

            return run

        # A burst makes CONCURRENCY GETs: space bursts so the average stays under the limit.
        paced([burst(b) for b in bursts], pace * CONCURRENCY)
    return {"prepare": summary(prepares), "unprepare": summary(unprepares)}


def floor(driver: Driver, count: int, pace: float = 0.0) -> dict[str, float]:
    """Empty NodePrepareResources calls, back to back or one every `pace` seconds (a call after
    a pause pays for waking the server's threads, as a prepare does)."""
    stub = api_pb2_grpc.DRAPluginStub(driver.plugin.channel)
    empty = api_pb2.NodePrepareResourcesRequest()
    samples: list[float] = []
    paced(
        [lambda: samples.append(timed(lambda: stub.NodePrepareResources(empty, timeout=10)))]
        * count,
        pace,
    )
    return summary(samples)


def median_of(rounds: list[dict[str, Any]], call: str, figure: str) -> float:
    return round(statistics.median(r[call][figure] for r in rounds), 3)


def run(kube_bin: Path, rounds: int, cycles: int, pace: float) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="usbs", dir="/tmp"))
    cluster = LocalCluster(kube_bin, root / "cluster", kubelet=False)
    try:
        cluster.start()
        with unidra_driver(cluster, root) as unidra, go_driver(cluster, root) as go:
            drivers = [unidra, go]
            claims = Claims(cluster)
            bursts = max(1, cycles // CONCURRENCY)
            scenarios: dict[str, Callable[[Driver], dict[str, Any]]] = {
                "1x1_sequential": lambda d: sequential_round(
                    d, [claims.make(d, [n % BENCH_GPUS]) for n in range(cycles)], pace
                ),
                "1x8_sequential": lambda d: sequential_round(
                    d, [claims.make(d, range(8)) for _ in range(cycles)], pace
                ),
                f"1x1_{CONCURRENCY}_callers": lambda d: concurrent_round(
                    d,
                    [[claims.make(d, [c]) for c in range(CONCURRENCY)] for _ in range(bursts)],
                    pace,
                ),
            }
            for driver in drivers:  # warm both: connections, caches, first slices
                sequential_round(driver, [claims.make(driver, [0]) for _ in range(10)], pace)
            windows: dict[str, list[tuple[str, str]]] = {name: [] for name in scenarios}
            for number in range(rounds):
                order = drivers if number % 2 == 0 else drivers[::-1]
                for name, scenario in scenarios.items():
                    for driver in order:
                        before = driver.scrape() if driver.scrape else ""
                        driver.rounds.setdefault(name, []).append(scenario(driver))
                        if driver.scrape:
                            windows[name].append((before, driver.scrape()))
            report: dict[str, Any] = {
                "machine": {"cpus": os.cpu_count(), "kube_bin": str(kube_bin)},
                "rounds": rounds,
                "cycles_per_round": cycles,
                "pace_s": pace,
                "scenarios": {},
            }
            for name in scenarios:
                entry: dict[str, Any] = {}
                for driver in drivers:
                    entry[driver.name] = {
                        f"{call}_{figure}": median_of(driver.rounds[name], call, figure)
                        for call in ("prepare", "unprepare")
                        for figure in ("median_ms", "p99_ms")
                    }
                entry["ratio_unidra_to_go"] = {
                    key: round(entry["unidra"][key] / entry["go-reference"][key], 2)
                    for key in entry["unidra"]
                }
                report["scenarios"][name] = entry
            report["floor"] = {d.name: floor(d, 300) for d in drivers}
            report["floor_paced"] = {d.name: floor(d, 150, pace) for d in drivers}
            report["rss_mib"] = {d.name: round(d.rss_mib(), 1) for d in drivers}
            report["rss_ratio_unidra_to_go"] = round(
                report["rss_mib"]["unidra"] / report["rss_mib"]["go-reference"], 2
            )
            report["unidra_where_the_time_goes_mean_ms"] = {
                name: where_the_time_goes(unidra.rounds[name], windows[name]) for name in scenarios
            }
            return report
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)  # etcd's data and the logs: hundreds of MiB


def where_the_time_goes(rounds: list[dict[str, Any]], windows: list[tuple[str, str]]) -> Any:
    """Unidra's own histograms against what the client saw, as means per call (1 claim each)."""
    phases = means_over(windows, "unidra_prepare_phase_seconds", "phase")
    calls = means_over(windows, "unidra_call_duration_seconds", "operation")
    claims = means_over(windows, "unidra_operation_duration_seconds", "operation")
    found: dict[str, dict[str, float]] = {}
    for call in ("prepare", "unprepare"):
        client = statistics.fmean(r[call]["mean_ms"] for r in rounds)
        entry = {
            "client": round(client, 3),
            # Both ends of the gRPC call, the socket, and the wait for a worker thread.
            "outside_the_handler": round(client - calls.get(call, 0.0), 3),
            "in_the_handler": calls.get(call, 0.0),
            "in_the_claim": claims.get(call, 0.0),
        }
        if call == "prepare":
            in_phases = {k: v for k, v in phases.items() if k != "handler"}
            entry.update(in_phases)
            entry["handler"] = phases.get("handler", 0.0)
            entry["claim_outside_phases"] = round(
                entry["in_the_claim"] - sum(in_phases.values()), 3
            )
        found[call] = entry
    return found


def table(report: dict[str, Any]) -> str:
    """The report as the Markdown table BENCHMARKS.md carries."""
    lines = [
        "| scenario | figure | Unidra | Go reference | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, entry in report["scenarios"].items():
        for key in entry["unidra"]:
            lines.append(
                f"| {name} | {key.replace('_median_ms', ' p50').replace('_p99_ms', ' p99')} ms "
                f"| {entry['unidra'][key]} | {entry['go-reference'][key]} "
                f"| {entry['ratio_unidra_to_go'][key]} |"
            )
    for key, what in (("floor", "back to back"), ("floor_paced", "one per pace")):
        floor_ = report[key]
        lines.append(
            f"| floor (empty call, {what}) | p50 ms | {floor_['unidra']['median_ms']} "
            f"| {floor_['go-reference']['median_ms']} | |"
        )
    rss = report["rss_mib"]
    lines.append(
        f"| daemon | RSS MiB | {rss['unidra']} | {rss['go-reference']} "
        f"| {report['rss_ratio_unidra_to_go']} |"
    )
    return "\n".join(lines)
