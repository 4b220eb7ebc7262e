"""`unidra demo`: a simulated GPU node's whole life with Unidra, narrated step by step.

Publish devices, allocate a claim, prepare it the way kubelet does, show its CDI spec, then
make the GPU fail (Xid 79) and watch the taint, kubelet's health stream, the claim's status and
the metrics follow, and recover. Everything lives in one private temporary directory; the
cluster around the plugin is a Cluster (driver.demo.cluster).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from driver import control, daemon, kubeapi, logs, quantities
from driver.demo.cluster import Cluster, EmbeddedCluster, wait
from driver.kubelet import sockets
from driver.settings import Settings

NODE = "demo-node"
NAMESPACE = "default"
CLAIM = "demo-gpu"
DRIVER = "unidra.dev"
# The demo's minimum hold before a recovered device clears: 30 s in production (docs/health.md).
HOLD_SECONDS = 3.0
WAIT_SECONDS = 30.0
T = TypeVar("T")


def run(profile: str = "dgx-h100", keep: bool = False, kube_bin: Path | None = None) -> int:
    """Run the story in a fresh private directory; the exit code for the CLI. With `kube_bin`,
    on a cluster of the real Kubernetes binaries in that directory."""
    root = Path(tempfile.mkdtemp(prefix="unidra-demo-", dir="/tmp"))  # short: socket paths
    try:
        cluster: Cluster
        if kube_bin is None:
            cluster = EmbeddedCluster(root)
        else:
            from driver.demo.kube import KubeCluster

            print(f"Starting Kubernetes from {kube_bin} in {root} ...", flush=True)
            cluster = KubeCluster(kube_bin, root, NODE)
        Story(root, profile).tell(cluster)
    finally:
        if keep:
            print(f"\nKept {root} (the log is plugin.log); remove it when done.")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


class Story:
    def __init__(self, root: Path, profile: str) -> None:
        self.root = root
        self.profile = profile
        self.step = 0
        self.cdi_root = root / "cdi"

    def say(self, title: str, *lines: str) -> None:
        self.step += 1
        print(f"\n{self.step}. {title}", flush=True)
        for line in lines:
            print(f"   {line}", flush=True)

    def tell(self, cluster: Cluster) -> None:
        self.cdi_root = cluster.directories.cdi_root
        try:
            with self._plugin(cluster) as instance:
                device = self._publish_and_prepare(cluster)
                self._fail_and_recover(cluster, instance, device)
                cluster.unprepare(NAMESPACE, CLAIM)
                self.say(
                    "The pod is gone: kubelet unprepares the claim.",
                    f"Its CDI spec is removed: {sorted(p.name for p in self._specs())} left.",
                )
        finally:
            cluster.close()
        self.say(
            f"Done. The plugin stopped, removed its sockets, and left no trace outside {self.root}."
        )

    @contextmanager
    def _plugin(self, cluster: Cluster) -> Iterator[daemon.Daemon]:
        self.say(
            "A private place for everything.",
            f"Kubelet's directories, the CDI directory and the plugin's log live in {self.root}.",
            "Nothing touches this machine's kubelet or /var/run/cdi.",
        )
        cluster.add_node(NODE)
        self.say(
            f"A cluster: {cluster.description}.",
            f"Node {NODE} exists; the API server is reached with {cluster.kubeconfig}.",
        )
        self._log_to(self.root / "plugin.log")
        directories = cluster.directories
        settings = Settings(
            node_name=NODE,
            driver_name=DRIVER,
            kubeconfig=cluster.kubeconfig,
            cdi_root=directories.cdi_root,
            registrar_dir=directories.registrar_dir,
            plugins_dir=directories.plugins_dir,
            backends=("simulated",),
            backend_options={"simulated": {"profile": self.profile}},
            metrics_address="127.0.0.1:0",
            metrics_interval_seconds=0.5,
            healthcheck_port=None,
            health_min_hold_seconds=HOLD_SECONDS,
            shutdown_grace_seconds=2.0,
        ).validate()
        instance = daemon.start(settings)
        try:
            self.say(
                f"The Unidra kubelet plugin starts for {NODE}, on simulated hardware ({self.profile}).",
                f"It found {len(instance.inventory.current().devices)} devices and listens on "
                f"{sockets.registration_socket(directories.registrar_dir, DRIVER, None)}.",
            )
            endpoint = cluster.register(DRIVER, WAIT_SECONDS)
            self.say(
                "Kubelet finds the registration socket and registers the plugin.",
                f"It will call the DRA service (v1) on {endpoint}.",
            )
            yield instance
        finally:
            instance.stop()

    def _publish_and_prepare(self, cluster: Cluster) -> str:
        api = kubeapi.Rest(kubeapi.build_client(cluster.kubeconfig))
        devices = _wait(lambda: _published(api), "the ResourceSlices")
        self.say(
            f"The plugin publishes {len(devices)} devices as ResourceSlices (pool {NODE}):",
            *(_describe(d) for d in devices[:4]),
            *(["..."] if len(devices) > 4 else []),
        )
        api.json(
            "creating the claim",
            "POST",
            f"{kubeapi.RESOURCE}/namespaces/{NAMESPACE}/resourceclaims",
            body=_claim(),
        )
        self.say(
            f"A user asks for one GPU: ResourceClaim {NAMESPACE}/{CLAIM}, "
            f"deviceClassName gpu.{DRIVER}.",
        )
        device = cluster.allocate(NAMESPACE, CLAIM, DRIVER, NODE)
        self.say(
            "The scheduler allocates a device and reserves the claim for a pod.",
            f"It picked {device}.",
        )
        ids = cluster.prepare(NAMESPACE, CLAIM)
        self.say(
            "Kubelet calls NodePrepareResources over the plugin's Unix socket (gRPC).",
            f"The plugin answers with the CDI device IDs for the container runtime: {', '.join(ids)}",
        )
        (spec,) = self._specs()
        edits = json.loads(spec.read_text())
        self.say(
            f"The CDI spec it wrote, {spec}:",
            *json.dumps(edits, indent=2).splitlines(),
        )
        return device

    def _fail_and_recover(self, cluster: Cluster, instance: daemon.Daemon, device: str) -> None:
        socket = sockets.control_socket(instance.settings.plugin_dir, None)
        answer = control.request(socket, {"command": "inject", "device": device, "fault": "xid-79"})
        self.say(
            f"The GPU fails: Xid 79 on {device} "
            f"(`unidra simulate inject --device {device} --fault xid-79`).",
            control.describe(answer),
        )
        api = kubeapi.Rest(kubeapi.build_client(cluster.kubeconfig))
        taint = _wait(lambda: _taint(api, device), "the taint")
        self.say(
            "The device gets a taint in its ResourceSlice: the scheduler gives it to no new claim,",
            "and NoExecute evicts the pods using it (the demo's claim tolerates it, so that its pod",
            "stays to show the fault).",
            f"taint: {taint['key']}={taint['value']}:{taint['effect']}",
        )
        self.say(
            "Kubelet's health stream reports it, and shows it in the pod's status:",
            f"{device}: {cluster.health(device, WAIT_SECONDS, unhealthy=True)}",
        )
        conditions = _wait(lambda: _conditions(api, device), "the claim's device status")
        self.say(
            "The claim's status says so too:",
            *(f"{c['type']}={c['status']} ({c.get('message', '')})" for c in conditions),
        )
        assert instance.metrics_server is not None
        port = instance.metrics_server.server_port
        self.say(
            f"Prometheus sees it at http://127.0.0.1:{port}/metrics:",
            *_metrics(port, device),
        )
        answer = control.request(socket, {"command": "recover", "device": device})
        self.say(
            f"The GPU is reset (`unidra simulate recover --device {device}`).",
            control.describe(answer),
        )
        started = time.monotonic()
        _wait(lambda: _taint(api, device) is None or None, "the taint to clear")
        self.say(
            f"After {time.monotonic() - started:.0f} s the taint is gone "
            f"(the demo holds {HOLD_SECONDS:.0f} s; the default is 30 s).",
            f"{device}: {cluster.health(device, WAIT_SECONDS, unhealthy=False)}",
        )

    def _specs(self) -> list[Path]:
        return sorted(self.cdi_root.glob("*.json"))

    @staticmethod
    def _log_to(path: Path) -> None:
        handler = logging.FileHandler(path)
        handler.setFormatter(logs.TextFormatter())
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(logging.INFO)


def _wait(probe: Callable[[], T | None], what: str) -> T:
    return wait(probe, WAIT_SECONDS, what)


def _slices(api: kubeapi.Rest) -> list[dict[str, Any]]:
    listing = api.json(
        "listing ResourceSlices",
        "GET",
        kubeapi.SLICES,
        {"fieldSelector": f"spec.driver={DRIVER},spec.nodeName={NODE}"},
    )
    return list(listing.get("items") or [])


def _published(api: kubeapi.Rest) -> list[dict[str, Any]]:
    return [d for s in _slices(api) for d in s["spec"].get("devices") or []]


def _describe(device: dict[str, Any]) -> str:
    attributes = device.get("attributes") or {}
    memory = quantities.parse((device.get("capacity") or {}).get("memory", {}).get("value", "0"))
    model = attributes.get("model", {}).get("string", "")
    return f"{device['name']}  {model}  {float(memory) / 2**30:.0f} GiB memory"


def _taint(api: kubeapi.Rest, device: str) -> dict[str, Any] | None:
    for item in _published(api):
        if item["name"] == device and item.get("taints"):
            return dict(item["taints"][0])
    return None


def _conditions(api: kubeapi.Rest, device: str) -> list[dict[str, Any]]:
    claim = api.json(
        "reading the claim",
        "GET",
        f"{kubeapi.RESOURCE}/namespaces/{NAMESPACE}/resourceclaims/{CLAIM}",
    )
    for entry in (claim.get("status") or {}).get("devices") or []:
        conditions = entry.get("conditions") or []
        if entry.get("device") == device and any(c.get("status") == "False" for c in conditions):
            return list(conditions)
    return []


def _metrics(port: int, device: str) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    lines = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "hw_status" and sample.labels["hw_id"] == device:
                state = sample.labels["hw_state"]
                lines.append(f'hw_status{{hw_id="{device}",hw_state="{state}"}} {sample.value:g}')
            elif sample.name == "unidra_health_events_total" and sample.labels["kind"] == "lost":
                lines.append(f'unidra_health_events_total{{kind="lost"}} {sample.value:g}')
    return lines


def _claim() -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": CLAIM, "namespace": NAMESPACE},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpu",
                        "exactly": {
                            "deviceClassName": f"gpu.{DRIVER}",
                            # Its pod stays on the failed GPU to show the fault in its status
                            # (with the effect named: docs/health.md, "The taint").
                            "tolerations": [
                                {
                                    "key": f"{DRIVER}/unhealthy",
                                    "operator": "Exists",
                                    "effect": "NoExecute",
                                }
                            ],
                        },
                    }
                ]
            }
        },
    }
