"""A command run as in the DaemonSet's container, with no container runtime: the same mounts.

From a rendered DaemonSet, `layout` derives the container's view: a read-only root (the image:
this machine's /usr, /etc, the Python environment and the Unidra the tests import, bound
read-only), each hostPath volume at its
mountPath with its readOnly flag, emptyDirs as tmpfs, and the projected service-account token
at /var/run/secrets/kubernetes.io/serviceaccount. `run` builds that view in a private mount
namespace (`unshare --mount`, root only, through pod_enter.py), chroots into it and runs the
command there; every mount ends with the command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e2e.plugin import NAMESPACE, daemonset_pod, pod_token

import driver

if TYPE_CHECKING:
    from driver.localcluster import LocalCluster

ENTER = Path(__file__).with_name("pod_enter.py")
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class Mount:
    target: str  # the path in the container
    source: str = ""  # a host path to bind; empty for a tmpfs
    read_only: bool = False
    size: str = ""  # a tmpfs's size, as mount(8) takes it


def layout(
    daemonset: Mapping[str, Any], container: str, host_path: Callable[[str], Path]
) -> tuple[list[Mount], bool]:
    """The container's mounts, from the DaemonSet's volumes and volumeMounts, and whether its
    root filesystem is read-only. `host_path` maps a hostPath to this machine's directory, which
    is made when the volume's type says DirectoryOrCreate."""
    spec = daemonset["spec"]["template"]["spec"]
    (found,) = [c for c in spec["containers"] if c["name"] == container]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = []
    for mount in found.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        read_only = bool(mount.get("readOnly", False))
        if "hostPath" in volume:
            source = host_path(volume["hostPath"]["path"])
            if volume["hostPath"].get("type") == "DirectoryOrCreate":
                source.mkdir(mode=0o755, parents=True, exist_ok=True)  # as kubelet does
            mounts.append(Mount(mount["mountPath"], str(source), read_only))
        elif "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit", "")
            mounts.append(Mount(mount["mountPath"], "", read_only, _tmpfs_size(size)))
        else:
            raise ValueError(f"volume {mount['name']}: only hostPath and emptyDir are laid out")
    context = found.get("securityContext", {})
    return mounts, bool(context.get("readOnlyRootFilesystem", False))


def container_env(
    daemonset: Mapping[str, Any], container: str, fields: Mapping[str, str]
) -> dict[str, str]:
    """The container's environment: its values, and `fields` for its fieldRefs (by fieldPath)."""
    (found,) = [
        c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == container
    ]
    env = {}
    for item in found.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


def run(
    mounts: Sequence[Mount],
    read_only_root: bool,
    token: str,
    ca: Path,
    argv: Sequence[str],
    env: Mapping[str, str],
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """`argv` in the container's view, as kubelet would start it: the token and CA projected."""
    with tempfile.TemporaryDirectory(prefix="pod-") as scratch:
        secrets = Path(scratch) / "secrets"
        secrets.mkdir()
        (secrets / "token").write_text(token)
        (secrets / "ca.crt").write_bytes(ca.read_bytes())
        # The image: the interpreter, the venv and the Unidra this test imports, wherever they are.
        installed = str(Path(driver.__file__).resolve().parents[1])
        image = [
            Mount(p, p, read_only=True)
            for p in sorted({"/usr", "/etc", sys.base_prefix, sys.prefix, installed})
            if Path(p).is_dir()
        ]
        runtime = [Mount("/proc", "/proc"), Mount("/dev", "/dev")]
        plan = {
            "root": str(Path(scratch) / "root"),
            "links": {
                n: os.readlink(f"/{n}") for n in os.listdir("/") if Path(f"/{n}").is_symlink()
            },
            "mounts": [
                asdict(m) for m in [*image, *runtime, *mounts, Mount(TOKEN_DIR, str(secrets), True)]
            ],
            "read_only_root": read_only_root,
            "argv": [sys.executable, *argv],
            "env": {
                "PATH": "/usr/local/bin:/usr/bin:/bin",
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONPATH": installed,
                **env,
            },
        }
        (Path(scratch) / "root").mkdir()
        plan_file = Path(scratch) / "plan.json"
        plan_file.write_text(json.dumps(plan))
        return subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                sys.executable,
                str(ENTER),
                str(plan_file),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def run_in_pod(
    cluster: LocalCluster,
    daemonset: Mapping[str, Any],
    pod_uid: str,
    token: str,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python argv` in the kubelet plugin's container of `daemonset` on the cluster's node: its
    hostPaths are the cluster's kubelet and CDI directories, its API server the cluster's."""

    def host_path(path: str) -> Path:
        for prefix, local in (
            ("/var/lib/kubelet", cluster.kubelet_root),
            ("/var/run/cdi", cluster.workdir / "cdi"),
        ):
            if path == prefix or path.startswith(prefix + "/"):
                return local / path.removeprefix(prefix).lstrip("/")
        return Path(path)

    mounts, read_only_root = layout(daemonset, "plugin", host_path)
    fields = {"spec.nodeName": cluster.node_name, "metadata.uid": pod_uid}
    kubelet_env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(cluster.api_port),
    }
    return run(
        mounts,
        read_only_root,
        token,
        cluster.ca.ca.cert,
        argv,
        {**container_env(daemonset, "plugin", fields), **kubelet_env, **(env or {})},
    )


def _tmpfs_size(quantity: str) -> str:
    """A Kubernetes quantity (16Mi) as mount(8)'s tmpfs size (16m)."""
    for suffix, unit in (("Ki", "k"), ("Mi", "m"), ("Gi", "g")):
        if quantity.endswith(suffix):
            return quantity.removesuffix(suffix) + unit
    return quantity


def doctor_in_pod(
    cluster: LocalCluster,
    daemonset: Mapping[str, Any],
    namespace: str = NAMESPACE,
    account: str = "unidra",
    token: str | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[int, dict[str, tuple[str, str]]]:
    """`unidra doctor -o json` in the pod's view, with the token of `account` bound to the
    DaemonSet's pod unless `token` is given: (exit code, {check: (status, detail)})."""
    pod = daemonset_pod(cluster, namespace)
    assert pod is not None, f"the DaemonSet in {namespace} has no pod on the node"
    done = run_in_pod(
        cluster,
        daemonset,
        pod["metadata"]["uid"],
        token or pod_token(cluster, namespace, account),
        ("-m", "driver", "doctor", "-o", "json"),
        env,
    )
    assert done.stdout.startswith("["), done.stderr
    findings = {f["check"]: (f["status"], f["detail"]) for f in json.loads(done.stdout)}
    return done.returncode, findings
