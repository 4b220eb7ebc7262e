"""manifests/: every install variant renders, validates against the Kubernetes 1.34 schemas, and
matches what the code does: RBAC grants exactly the API calls the daemon makes, the DaemonSet
sets only real settings and the ports the daemon listens on, and node selection covers every
backend's PCI match."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import kubernetes_validate
import pytest

from driver import backends, cli, kubeapi
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.settings import Settings
from support import kustomize
from support.claims import allocated_claim, result
from support.waiting import wait_until

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
COMPONENTS = sorted(p.name for p in (MANIFESTS / "components").iterdir() if p.name != "settings")
KUBERNETES = "1.34.0"
# Custom resources of other projects, which the Kubernetes schemas do not cover.
CUSTOM = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("nfd.k8s-sigs.io/v1alpha1", "NodeFeatureRule"),
}


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An overlay with the base and every component, as an operator would write one."""
    directory = tmp_path_factory.mktemp("overlay")
    relative = os.path.relpath(MANIFESTS, directory)
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {relative}/base\n  - {relative}/settings\ncomponents:\n"
        + "".join(f"  - {relative}/components/{name}\n" for name in COMPONENTS)
        + f"  - {relative}/components/settings\n"
    )
    return directory


def variants(everything: Path) -> list[Path]:
    return [MANIFESTS, *sorted((MANIFESTS / "overlays").iterdir()), everything]


def by_kind(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return by_kind(objects)[("DaemonSet", "unidra-kubelet-plugin")]


def test_every_variant_validates_against_the_kubernetes_schemas(everything: Path) -> None:
    for directory in [*variants(everything), MANIFESTS / "cleanup"]:
        objects = kustomize.render(directory)
        assert objects, directory
        for item in objects:
            if (item["apiVersion"], item["kind"]) in CUSTOM:
                assert item["metadata"]["name"] and item["spec"]
                continue
            kubernetes_validate.validate(item, KUBERNETES, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_python_renderer_agrees_with_kubectl(everything: Path) -> None:
    def key(item: dict[str, Any]) -> tuple[str, str]:
        return item["kind"], item["metadata"]["name"]

    for directory in [*variants(everything), MANIFESTS / "cleanup"]:
        ours = sorted(kustomize.build(directory), key=key)
        theirs = sorted(kustomize.kubectl_build(directory), key=key)
        assert ours == theirs, directory


def test_the_base_installs_everything_the_driver_needs() -> None:
    objects = by_kind(kustomize.render(MANIFESTS))
    for wanted in [
        ("Namespace", "unidra"),
        ("ServiceAccount", "unidra"),
        ("ClusterRole", "unidra-kubelet-plugin"),
        ("ClusterRoleBinding", "unidra-kubelet-plugin"),
        ("ValidatingAdmissionPolicy", "unidra-resourceslices"),
        ("ValidatingAdmissionPolicyBinding", "unidra-resourceslices"),
        ("ValidatingAdmissionPolicy", "unidra-opaque-config"),
        ("ValidatingAdmissionPolicyBinding", "unidra-opaque-config"),
        ("DeviceClass", "gpu.unidra.dev"),
        ("DaemonSet", "unidra-kubelet-plugin"),
        ("Service", "unidra-metrics"),
    ]:
        assert wanted in objects, wanted


def test_the_daemonset_upgrades_without_a_gap_and_listens_where_the_daemon_does() -> None:
    ds = daemonset(kustomize.render(MANIFESTS))
    assert ds["spec"]["updateStrategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    defaults = Settings(node_name="n")
    assert container["livenessProbe"]["grpc"]["port"] == ports["healthcheck"]
    assert container["readinessProbe"]["grpc"]["port"] == ports["healthcheck"]
    assert ports["healthcheck"] == defaults.healthcheck_port
    assert f":{ports['metrics']}" == defaults.metrics_address
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/host/sys"]["readOnly"] and mounts["/host/dev"]["readOnly"]
    assert str(defaults.registrar_dir) in mounts
    assert str(defaults.plugins_dir / defaults.driver_name) in mounts
    assert str(defaults.cdi_root) in mounts
    assert "resources" in container and container["resources"]["limits"]["memory"]
    # terminationGracePeriod leaves room for the daemon's own grace for in-flight calls.
    assert pod["terminationGracePeriodSeconds"] > defaults.shutdown_grace_seconds
    security = container["securityContext"]
    assert security["privileged"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert security["readOnlyRootFilesystem"] is True


def test_the_daemonset_sets_only_settings_the_daemon_reads(everything: Path) -> None:
    known = set(re.findall(r"\[env\s+([A-Z_]+)", _help("kubelet-plugin")))
    known |= {"LD_LIBRARY_PATH"}  # read by the dynamic loader, for NVML
    for directory in variants(everything):
        (container,) = daemonset(kustomize.render(directory))["spec"]["template"]["spec"][
            "containers"
        ]
        assert {e["name"] for e in container["env"]} <= known, directory


def test_privileged_variants_are_consistent(everything: Path) -> None:
    for directory in variants(everything):
        (container,) = daemonset(kustomize.render(directory))["spec"]["template"]["spec"][
            "containers"
        ]
        security = container["securityContext"]
        # The API server refuses privileged with allowPrivilegeEscalation false.
        assert not (security["privileged"] and security["allowPrivilegeEscalation"] is False)


def test_node_selection_covers_every_backends_pci_match() -> None:
    rule = yaml_objects(MANIFESTS / "components/nfd/nodefeaturerule.yaml")[0]
    (term,) = rule["spec"]["rules"]
    published = set()
    for entry in term["matchAny"]:
        (feature,) = entry["matchFeatures"]
        expressions = feature["matchExpressions"]
        classes = tuple(expressions["class"]["value"]) if "class" in expressions else ()
        for vendor in expressions["vendor"]["value"]:
            published.add((vendor, classes))
    wanted = set()
    for name in backends.available_names():
        for match in getattr(backends.load_factory(name), "pci_matches", ()):
            wanted.add((f"{match.vendor:04x}", tuple(f"{c:04x}" for c in match.classes)))
    assert published == wanted
    objects = kustomize.render(MANIFESTS / "overlays/nvidia")
    # The NVIDIA overlay selects the label, and works without NFD's CRD.
    assert not [o for o in objects if o["kind"] == "NodeFeatureRule"]
    affinity = daemonset(objects)["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    (selector,) = affinity["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    ((label, value),) = term["labels"].items()
    assert selector["matchExpressions"] == [{"key": label, "operator": "In", "values": [value]}]


def test_rbac_grants_exactly_the_calls_the_daemon_makes(node, api: FakeApiServer) -> None:  # type: ignore[no-untyped-def]
    role = by_kind(kustomize.render(MANIFESTS))[("ClusterRole", "unidra-kubelet-plugin")]
    granted = _granted(role)
    # Leftover slices of this node (an older instance's): one is reused, the other deleted.
    for stale in ("stale-1", "stale-2"):
        api.create(
            "resource.k8s.io",
            "resourceslices",
            {
                "metadata": {"name": f"node-a-unidra.dev-{stale}"},
                "spec": {
                    "driver": "unidra.dev",
                    "nodeName": "node-a",
                    "pool": {"name": "node-a", "generation": 0, "resourceSliceCount": 2},
                    "devices": [],
                },
            },
        )
    with node.serve(health_min_hold_seconds=0.0) as (instance, plugin):
        wait_until(
            lambda: len(api.list("resource.k8s.io", "resourceslices")) == 1,
            what="the leftover slice to go",
        )
        claim = allocated_claim(api, "rbac", [result("gpu-0000-1b-00-0", "node-a")])
        assert plugin.prepare([claim])[claim[2]].error == ""
        wait_until(lambda: instance.status.writes >= 1, what="the claim status")
        instance.board.report(_fault("gpu-0000-43-00-0"))  # a taint: an in-place slice update
        wait_until(lambda: _tainted(api), what="the taint")
        assert plugin.unprepare([claim])[claim[2]].error == ""
        time.sleep(0.2)
    used = {_verb(r.method, r.path, r.query) for r in api.requests}
    used.discard(None)
    # Writing status.devices is also authorized against a synthetic resource (Kubernetes 1.36),
    # for this driver's name only; the e2e suite proves the real API server demands it.
    assert ("resource.k8s.io", "resourceclaims/status", "update") in used
    used.add(("resource.k8s.io", "resourceclaims/driver", "associated-node:update"))
    assert used == granted
    (driver_rule,) = [r for r in role["rules"] if r["resources"] == ["resourceclaims/driver"]]
    assert driver_rule["resourceNames"] == ["unidra.dev"]
    assert set(kubeapi.PERMISSIONS) == granted  # what `unidra doctor` asks the API server about


def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) of every permission a ClusterRole grants."""
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _fault(device: str):  # type: ignore[no-untyped-def]
    from driver.model import HealthEvent

    return HealthEvent(device, "lost", message="test")


def _tainted(api: FakeApiServer) -> bool:
    return any(
        d.get("taints")
        for s in api.list("resource.k8s.io", "resourceslices")
        for d in s["spec"].get("devices") or []
    )


def _verb(method: str, path: str, query: str) -> tuple[str, str, str] | None:
    """(API group, resource[/subresource], RBAC verb) of a request; None for non-resource URLs."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 4:
        group, rest = parts[1], parts[3:]
    else:
        return None  # /version, discovery
    if rest[:1] == ["namespaces"] and len(rest) > 2:
        rest = rest[2:]
    resource, name, sub = [*rest, None, None][:3]
    if sub:
        resource = f"{resource}/{sub}"
    if method == "GET":
        verb = "get" if name else ("watch" if parse_qs(query).get("watch") else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
    return group, resource, verb


def _help(command: str) -> str:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    return subparsers.choices[command].format_help()  # type: ignore[attr-defined]


def yaml_objects(path: Path) -> list[dict[str, Any]]:
    import yaml

    return [o for o in yaml.safe_load_all(path.read_text()) if o]


# -- the fleet component ----------------------------------------------------------------------


def fleet_objects() -> dict[tuple[str, str], dict[str, Any]]:
    directory = MANIFESTS / "components" / "fleet"
    return by_kind(
        [
            o
            for name in ("rbac.yaml", "deployment.yaml", "service.yaml")
            for o in yaml_objects(directory / name)
        ]
    )


def test_the_fleet_role_grants_exactly_the_reads_the_fleet_makes(
    api: FakeApiServer, tmp_path: Path
) -> None:
    from driver.fleet import service as fleet_service
    from driver.fleet.view import KINDS

    role = fleet_objects()[("ClusterRole", "unidra-fleet")]
    granted = _granted(role)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
    stop = threading.Event()
    options = fleet_service.FleetOptions(kubeconfig=kubeconfig, watch=True, settle_seconds=0.0)
    out = io.StringIO()
    watching = threading.Thread(target=fleet_service.run, args=(options, out, stop))
    watching.start()
    try:
        wait_until(lambda: out.getvalue(), what="the first report")
        wait_until(
            lambda: len({r.path for r in api.requests if "watch=true" in r.query}) == len(KINDS),
            what="a watch of every kind",
        )
    finally:
        stop.set()
        watching.join(timeout=30)
    used = {_verb(r.method, r.path, r.query) for r in api.requests if r.status != 404}
    used.discard(None)
    assert used == granted


def test_the_fleet_deployment_runs_a_real_command_and_is_scraped() -> None:
    objects = fleet_objects()
    deployment = objects[("Deployment", "unidra-fleet")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert (
        pod["serviceAccountName"] == objects[("ServiceAccount", "unidra-fleet")]["metadata"]["name"]
    )
    command = container["command"]
    assert command[:2] == ["unidra", "fleet"]
    args = cli.build_parser().parse_args(command[1:])
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
    assert args.serve_metrics == f":{port}"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and container["securityContext"]["readOnlyRootFilesystem"]
    )
    service = objects[("Service", "unidra-fleet-metrics")]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    monitor = yaml_objects(MANIFESTS / "components/servicemonitor/servicemonitor.yaml")[0]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]
    }


def test_the_dashboard_and_alerts_install_as_components(everything: Path) -> None:
    objects = by_kind(kustomize.render(everything))
    dashboard = objects[("ConfigMap", "unidra-dashboard")]
    assert dashboard["metadata"]["namespace"] == "unidra"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"  # Grafana's sidecar
    source = MANIFESTS / "components/grafana-dashboard/unidra-dashboard.json"
    assert dashboard["data"] == {"unidra-dashboard.json": source.read_text()}  # the file itself
    assert json.loads(dashboard["data"]["unidra-dashboard.json"])["panels"]
    rule = objects[("PrometheusRule", "unidra")]
    assert rule["metadata"]["namespace"] == "unidra"
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} >= {
        "UnidraPluginNotRegistered",
        "UnidraDeviceFailed",
        "UnidraSlicePublicationFailing",
        "UnidraPrepareErrors",
    }
