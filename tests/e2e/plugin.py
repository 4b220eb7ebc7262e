"""Unidra on a real cluster: the install, the kubelet plugin as a process, and pods that use its devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from driver import inventory
from driver.backends import BackendContext
from driver.checkpoint import CheckpointStore, PreparedClaim
from driver.localcluster import LocalCluster, free_port, stop_process
from driver.locks import FileLocks
from support.waiting import wait_until
from vendors.simulated import SimulatedBackend

REPO = Path(__file__).resolve().parents[2]
DRIVER = "unidra.dev"
NAMESPACE = "unidra"
IMAGE = "lab.local/pause:1"  # fakecri pretends to pull any image


def install_overlay(cluster: LocalCluster, overlay: str) -> str:
    """`kubectl apply -k manifests/overlays/<overlay>`; returns what kubectl wrote to stderr."""
    done = cluster.kubectl("apply", "-k", str(REPO / "manifests" / "overlays" / overlay))
    wait_until(lambda: daemonset_pod(cluster), timeout=60, what="the DaemonSet's pod on the node")
    return done.stderr


def daemonset_pod(cluster: LocalCluster, namespace: str = NAMESPACE) -> dict[str, Any] | None:
    pods = cluster.get_json(
        f"/api/v1/namespaces/{namespace}/pods?labelSelector=app.kubernetes.io/component%3Dkubelet-plugin"
    )["items"]
    on_node = [p for p in pods if p["spec"].get("nodeName") == cluster.node_name]
    return on_node[0] if on_node else None


def driver_kubeconfig(
    cluster: LocalCluster, namespace: str = NAMESPACE, account: str = "unidra"
) -> Path:
    """Credentials as the DaemonSet's pod has them: a service-account token bound to that pod.

    A pod-bound token carries the node's name, which the ResourceSlice admission policy checks.
    """
    return cluster.token_kubeconfig(
        f"{account}-{namespace}", pod_token(cluster, namespace, account)
    )


def pod_token(cluster: LocalCluster, namespace: str = NAMESPACE, account: str = "unidra") -> str:
    """A token of `account` bound to the DaemonSet's pod on the node, as kubelet projects it."""
    pod = daemonset_pod(cluster, namespace)
    assert pod is not None, "the DaemonSet has no pod on the node"
    return cluster.kubectl(
        "create",
        "token",
        account,
        "-n",
        namespace,
        "--bound-object-kind=Pod",
        f"--bound-object-name={pod['metadata']['name']}",
        f"--bound-object-uid={pod['metadata']['uid']}",
        "--duration=6h",
    ).stdout.strip()


class PluginProcess:
    """`unidra kubelet-plugin` on the cluster's node, with the kubelet's own directories."""

    def __init__(
        self,
        cluster: LocalCluster,
        *,
        simulate: str = "dgx-h100",
        driver: str = DRIVER,
        kubeconfig: Path | None = None,
        args: Sequence[str] = (),
        pod_uid: str | None = None,
        name: str = "plugin",
        env: Mapping[str, str] | None = None,
        cdi_root: Path | None = None,
    ) -> None:
        self.driver = driver
        self.cluster = cluster
        self.root = cluster.workdir / name
        self.root.mkdir(exist_ok=True)
        self.cdi_root = cdi_root or cluster.workdir / "cdi"
        self.log_path = self.root / "plugin.log"
        self.metrics_port = free_port()
        self.pod_uid = pod_uid
        self.argv = [
            sys.executable,
            "-m",
            "driver",
            "kubelet-plugin",
            f"--node-name={cluster.node_name}",
            f"--kubeconfig={kubeconfig or driver_kubeconfig(cluster)}",
            f"--driver-name={driver}",
            f"--cdi-root={self.cdi_root}",
            f"--kubelet-registrar-directory-path={cluster.registrar_dir}",
            f"--kubelet-plugins-directory-path={cluster.plugins_dir}",
            f"--simulate={simulate}",
            f"--metrics-address=127.0.0.1:{self.metrics_port}",
            "--healthcheck-port=0",
            *([f"--pod-uid={pod_uid}"] if pod_uid else []),
            *args,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def plugin_dir(self) -> Path:
        return self.cluster.plugins_dir / self.driver

    def start(self, wait: bool = True) -> PluginProcess:
        kubelet_log = self.cluster.components["kubelet"].output()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env, stdout=log, stderr=log
            )
        if wait:
            self.wait_registered(since=len(kubelet_log))
        return self

    def wait_registered(self, since: int, timeout: float = 30.0) -> None:
        """Until the real kubelet logs that it registered this plugin."""

        def registered() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"the plugin exited with {self.process.returncode}:\n{self.output()[-3000:]}"
                )
            tail = self.cluster.components["kubelet"].output()[since:]
            return any(
                "Registered DRA plugin" in line and self.driver in line
                for line in tail.splitlines()
            )

        wait_until(registered, timeout=timeout, what="kubelet to register the plugin")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        return stop_process(self.process, timeout, signum)

    def metrics(self) -> str:
        return scrape(self.metrics_port)

    def samples(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """The current samples of one metric, by their sorted labels."""
        return metric_samples(self.metrics(), name)

    def checkpoint(self) -> dict[str, PreparedClaim]:
        locks = FileLocks(self.plugin_dir / "serialize.lock")
        return CheckpointStore(self.plugin_dir / "checkpoint.json", locks).read().claims

    def cdi_specs(self) -> list[Path]:
        return sorted(self.cdi_root.glob(f"k8s.{self.driver}-claim_*.json"))

    def __enter__(self) -> PluginProcess:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self.stop() not in (0, -signal.SIGTERM) and kind is None:
            raise AssertionError(f"the plugin did not stop cleanly:\n{self.output()[-3000:]}")


def scrape(port: int) -> str:
    """The Prometheus text a local /metrics endpoint serves."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return str(answer.read().decode())


def metric_samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric in a scrape, by their sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


# -- objects and pods ------------------------------------------------------------------------------


def apply(cluster: LocalCluster, *objects: Mapping[str, Any]) -> None:
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"kind": "List", "apiVersion": "v1", "items": list(objects)}),
    )


def delete(cluster: LocalCluster, kind: str, name: str, namespace: str | None = None) -> None:
    where = ["-n", namespace] if namespace else []
    cluster.kubectl("delete", kind, name, *where, "--ignore-not-found", "--wait=true")


def delete_pods(cluster: LocalCluster, namespace: str) -> None:
    """Delete every pod of a namespace and wait until they are gone (their claims go with them)."""
    cluster.kubectl("delete", "pods", "--all", "-n", namespace, "--wait=true", timeout=120)


def claim_template(name: str, namespace: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaimTemplate",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"spec": dict(spec)},
    }


def device_request(
    name: str = "gpu",
    device_class: str = "gpu.unidra.dev",
    count: int = 1,
    selectors: Iterable[str] = (),
) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": device_class, "count": count}
    if selectors:
        exactly["selectors"] = [{"cel": {"expression": e}} for e in selectors]
    return {"name": name, "exactly": exactly}


def pod(
    name: str,
    namespace: str,
    templates: Mapping[str, str] = {},
    claims: Mapping[str, str] = {},
    tolerations: Sequence[Mapping[str, Any]] = (),
    limits: Mapping[str, str] = {},
) -> dict[str, Any]:
    """A pod whose one container uses claims made from `templates` and the existing `claims`,
    and asks for the extended resources in `limits` (an unmodified pod: no claims at all)."""
    references = [{"name": ref, "resourceClaimTemplateName": t} for ref, t in templates.items()]
    references += [{"name": ref, "resourceClaimName": c} for ref, c in claims.items()]
    resources: dict[str, Any] = {"limits": dict(limits)} if limits else {}
    if references:
        resources["claims"] = [{"name": r["name"]} for r in references]
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "main", "image": IMAGE, "resources": resources}],
    }
    if references:
        spec["resourceClaims"] = references
    if tolerations:
        spec["tolerations"] = list(tolerations)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def ensure_namespace(cluster: LocalCluster, namespace: str) -> None:
    apply(cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    # Pods need the namespace's default service account, which a controller creates.
    wait_until(
        lambda: _exists(cluster, f"/api/v1/namespaces/{namespace}/serviceaccounts/default"),
        timeout=30,
        what=f"the default service account of {namespace}",
    )


def get(cluster: LocalCluster, path: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = cluster.get_json(path)
    return found


def _exists(cluster: LocalCluster, path: str) -> bool:
    return get(cluster, path) is not None


def pod_object(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any] | None:
    return get(cluster, f"/api/v1/namespaces/{namespace}/pods/{name}")


def wait_pod_ready(
    cluster: LocalCluster, namespace: str, name: str, timeout: float = 60.0
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        found = pod_object(cluster, namespace, name)
        conditions = (found or {}).get("status", {}).get("conditions", [])
        if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
            return found
        return None

    return wait_until(ready, timeout=timeout, what=f"pod {namespace}/{name} to be Ready")


def wait_pod_gone(cluster: LocalCluster, namespace: str, name: str, timeout: float = 60.0) -> None:
    wait_until(
        lambda: pod_object(cluster, namespace, name) is None,
        timeout=timeout,
        what=f"pod {namespace}/{name} to be deleted",
    )


def pod_claims(cluster: LocalCluster, namespace: str, pod_name: str) -> list[dict[str, Any]]:
    """The ResourceClaims a pod uses, as the API server has them."""
    found = pod_object(cluster, namespace, pod_name)
    assert found is not None
    names = [s["resourceClaimName"] for s in found["status"].get("resourceClaimStatuses", [])]
    claims = []
    for claim_name in names:
        claim = get(
            cluster, f"/apis/resource.k8s.io/v1/namespaces/{namespace}/resourceclaims/{claim_name}"
        )
        assert claim is not None
        claims.append(claim)
    return claims


def scheduling_message(cluster: LocalCluster, namespace: str, name: str) -> str:
    """The scheduler's reason for a pending pod, once it has given one."""

    def message() -> str:
        found = pod_object(cluster, namespace, name) or {}
        for condition in found.get("status", {}).get("conditions", []):
            if condition["type"] == "PodScheduled" and condition["status"] == "False":
                return str(condition.get("message", ""))
        return ""

    return wait_until(message, timeout=30, what=f"the scheduler's reason for {namespace}/{name}")


def container_cdi_devices(cluster: LocalCluster, namespace: str, pod_name: str) -> list[str]:
    """The CDI device names the real kubelet passed to the runtime for a pod's container."""
    names: list[str] = []
    if not cluster.container_log.exists():
        return names
    for line in cluster.container_log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("pod") == pod_name and entry.get("namespace") == namespace:
            names = list(entry.get("cdi") or [])
    return names


def slices(cluster: LocalCluster, driver: str = DRIVER) -> list[dict[str, Any]]:
    found = cluster.get_json(
        "/apis/resource.k8s.io/v1/resourceslices"
        f"?fieldSelector=spec.driver%3D{driver},spec.nodeName%3D{cluster.node_name}"
    )
    items: list[dict[str, Any]] = found["items"]
    return items


def published_devices(cluster: LocalCluster, driver: str = DRIVER) -> dict[str, dict[str, Any]]:
    """The devices of the node's pool at its newest generation, by name."""
    items = slices(cluster, driver)
    if not items:
        return {}
    newest = max(s["spec"]["pool"]["generation"] for s in items)
    return {
        d["name"]: d
        for s in items
        if s["spec"]["pool"]["generation"] == newest
        for d in s["spec"].get("devices", [])
    }


def wait_published(
    cluster: LocalCluster, count: int, timeout: float = 30.0
) -> dict[str, dict[str, Any]]:
    def complete() -> dict[str, dict[str, Any]] | None:
        devices = published_devices(cluster)
        return devices if len(devices) == count else None

    return wait_until(complete, timeout=timeout, what=f"{count} published devices")


def type_checking(cluster: LocalCluster, policy: str) -> dict[str, Any]:
    """A ValidatingAdmissionPolicy's status.typeChecking, once the API server has checked it."""

    def checked() -> dict[str, Any] | None:
        found = get(
            cluster, f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{policy}"
        )
        assert found is not None, f"no ValidatingAdmissionPolicy {policy}"
        status: dict[str, Any] = found.get("status", {})
        done = status.get("observedGeneration") == found["metadata"]["generation"]
        return status if done and "typeChecking" in status else None

    typed: dict[str, Any] = wait_until(checked, timeout=30, what=f"{policy} to be type-checked")[
        "typeChecking"
    ]
    return typed


def probe_slice(node: str, driver: str = DRIVER) -> dict[str, Any]:
    """A ResourceSlice of `driver` on `node`, for dry-run writes that admission judges."""
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{driver}-admission-probe"},
        "spec": {
            "driver": driver,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": [{"name": "gpu-0"}],
        },
    }


def create_as(
    cluster: LocalCluster, user: str, node: str, obj: Mapping[str, Any]
) -> tuple[int, str]:
    """`kubectl create --dry-run=server` as `user` with a token bound to `node`: (exit code, stderr)."""
    done = cluster.kubectl(
        "create",
        "--dry-run=server",
        "-f",
        "-",
        f"--as={user}",
        f"--as-user-extra=authentication.kubernetes.io/node-name={node}",
        input=json.dumps(obj),
        check=False,
    )
    return done.returncode, done.stderr


def can_i(cluster: LocalCluster, user: str, verb: str, resource: str) -> bool:
    """`kubectl auth can-i` as `user`; `resource` may carry /subresource/name."""
    resource, _, rest = resource.partition("/")
    subresource, _, name = rest.partition("/")
    done = cluster.kubectl(
        "auth",
        "can-i",
        verb,
        f"{resource}/{name}" if name else resource,
        *([f"--subresource={subresource}"] if subresource else []),
        f"--as={user}",
        check=False,
    )
    return done.stdout.strip() == "yes"


def wait_seconds_for(probe: Any, seconds: float) -> None:
    """Let the cluster act for a while when the test proves that something does NOT happen."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not probe(), "it happened"
        time.sleep(0.2)


def simulated_device_count(profile: str, partitions: bool = False) -> int:
    """How many devices (with --partitions: and partitions) a simulated profile publishes."""
    backend = SimulatedBackend(BackendContext(node_name="node-a", options={"profile": profile}))
    found = inventory.discover([backend], partitions=partitions)
    return len(found.devices) + len(found.partitions)


def wait_unprepared(process: PluginProcess, timeout: float = 30.0) -> None:
    """Until kubelet has unprepared every claim (it does so a little after the pods are gone)."""
    wait_until(lambda: not process.checkpoint(), timeout=timeout, what="an empty checkpoint")


def unidra(*args: str) -> str:
    """Run the `unidra` command line; its standard output (a failure raises with its stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "driver", *args], cwd=REPO, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise AssertionError(f"unidra {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def apply_component(cluster: LocalCluster, component: str) -> Path:
    """`kubectl apply -k` of a kustomization that uses manifests/components/<component>; returns
    its directory (for `kubectl delete -k`)."""
    directory = cluster.workdir / f"component-{component}"
    directory.mkdir(exist_ok=True)
    # kustomize refuses absolute paths to components.
    path = os.path.relpath(REPO / "manifests" / "components" / component, directory)
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"components:\n  - {path}\n"
    )
    cluster.kubectl("apply", "-k", str(directory))
    return directory


def service_account_kubeconfig(cluster: LocalCluster, account: str, namespace: str) -> Path:
    """A kubeconfig with a fresh token of a service account (`kubectl create token`)."""
    token = cluster.kubectl("create", "token", account, "-n", namespace).stdout.strip()
    return cluster.token_kubeconfig(f"{namespace}-{account}", token)


def pod_events(cluster: LocalCluster, namespace: str, name: str, reason: str) -> list[str]:
    """The messages of a pod's events with one reason, oldest first."""
    found = cluster.get_json(
        f"/api/v1/namespaces/{namespace}/events"
        f"?fieldSelector=involvedObject.name%3D{name},reason%3D{reason}"
    )
    events = sorted(found["items"], key=lambda e: e.get("lastTimestamp") or "")
    return [str(e.get("message", "")) for e in events]
