"""A throw-away Kubernetes cluster on this machine, from real binaries: etcd, control plane, one kubelet.

The kubelet runs pods on `fakecri`, an in-memory CRI runtime that logs the CDI devices it is given,
so no container runtime is needed. Everything lives in one temporary directory and on free
loopback ports; `stop()` ends every process. The end-to-end tests, `unidra demo --kube-bin` and
`hack/bench --side-by-side` use it.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from driver.errors import FatalError
from driver.pki import Authority, signing_key

BINARIES = (
    "labetcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kubectl",
    "fakecri",
)
# The kubelet gets the DRA gates by name: AllAlpha would turn on node features that need a real runtime.
KUBELET_GATES = (
    "DynamicResourceAllocation",
    "DRAAdminAccess",
    "DRAConsumableCapacity",
    "DRADeviceBindingConditions",
    "DRADeviceTaintRules",
    "DRADeviceTaints",
    "DRAExtendedResource",
    "DRAListTypeAttributes",
    "DRAPartitionableDevices",
    "DRAPrioritizedList",
    "DRAResourceClaimDeviceStatus",
    "ResourceHealthStatus",
    "ResourceHealthStatusMessage",
    "DRAWorkloadResourceClaims",
    "GenericWorkload",  # without it the 1.36 kubelet panics at start
)
CONTROL_PLANE_GATES = "AllAlpha=true,AllBeta=true"
SERVICE_ISSUER = "https://kubernetes.default.svc.cluster.local"
UMOUNT = shutil.which("umount") or "/usr/bin/umount"


class ClusterUnavailable(FatalError):
    """The binaries (or openssl) needed for a local cluster are missing; the message says which."""


def missing_binaries(directory: Path) -> list[str]:
    """The binaries a local cluster needs that `directory` lacks (empty: all there)."""
    return [
        name
        for name in BINARIES
        if not (directory / name).is_file() or not os.access(directory / name, os.X_OK)
    ]


def stop_process(
    process: subprocess.Popen[Any], grace: float = 10.0, signum: int = signal.SIGTERM
) -> int:
    """Send `signum`, wait up to `grace` seconds, then kill: nothing outlives whoever started it.
    Returns the exit code (negative: the signal that ended it)."""
    if process.poll() is None:
        process.send_signal(signum)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Component:
    """One running binary, its command line and its log file."""

    name: str
    argv: list[str]
    log: Path
    env: Mapping[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    _log_file: IO[bytes] | None = None

    def start(self, cwd: Path) -> None:
        # Each component gets an empty working directory: a kubelet removing a container deletes
        # files matching the container's log path in its working directory.
        cwd.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=dict(self.env) if self.env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        if self.process is not None:
            stop_process(self.process, grace)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class LocalCluster:
    """A local Kubernetes cluster: start(), use its kubeconfigs and kubelet directories, stop()."""

    bin_dir: Path
    workdir: Path
    node_name: str = "node-a"
    # Without a kubelet the node is only a Node object: enough for drivers driven by a test client.
    kubelet: bool = True
    components: dict[str, Component] = field(default_factory=dict)
    api_port: int = 0

    def __post_init__(self) -> None:
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise ClusterUnavailable(
                f"{self.bin_dir} lacks {', '.join(missing)}; point it at a directory with the "
                "Kubernetes binaries (see tests/e2e/README.md)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)

    # -- paths others need ---------------------------------------------------------------------

    @property
    def admin_kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubelet_root(self) -> Path:
        return self.workdir / "kubelet"

    @property
    def registrar_dir(self) -> Path:
        return self.kubelet_root / "plugins_registry"

    @property
    def plugins_dir(self) -> Path:
        return self.kubelet_root / "plugins"

    @property
    def container_log(self) -> Path:
        """fakecri's record: one JSON line per CreateContainer call, with the CDI devices it got."""
        return self.workdir / "containers.jsonl"

    # -- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        """Start every component and return once the node is Ready and kubelet has cleaned its slices."""
        deadline = time.monotonic() + timeout
        try:
            self._make_credentials()
            self._start_control_plane(deadline)
            if self.kubelet:
                self._start_node(deadline)
            else:
                self.kubectl("create", "-f", "-", input=json.dumps(_node_object(self.node_name)))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for name in reversed(list(self.components)):
            self.components[name].stop()
        # kubelet bind-mounts its root directory and mounts pods' tmpfs volumes; none may outlive it.
        for mount_point in mounts_under(self.workdir):
            subprocess.run([UMOUNT, "--lazy", mount_point], capture_output=True, check=False)

    def restart_kubelet(self, timeout: float = 60.0) -> None:
        """Stop and start the kubelet, as an operator restarting it on a node would."""
        kubelet = self.components["kubelet"]
        kubelet.stop()
        marker = len(kubelet.output())
        kubelet.start(self.workdir / "run" / "kubelet")
        self._wait(
            "kubelet to delete its ResourceSlices after the restart",
            lambda: "Deleted ResourceSlices" in kubelet.output()[marker:],
            time.monotonic() + timeout,
        )

    # -- clients -------------------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        kubeconfig: Path | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [
                str(self.bin_dir / "kubectl"),
                "--kubeconfig",
                str(kubeconfig or self.admin_kubeconfig),
                *args,
            ],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def get_json(self, path: str) -> Any:
        """GET an API path as the cluster admin; None if the object does not exist."""
        status, answer = self.request("GET", path)
        return None if status == 404 else answer

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One JSON request as the cluster admin: (status, decoded answer); FatalError unless 2xx or 404."""
        status, data = self._call(method, path, body, timeout=10)
        if status != 404 and not 200 <= status < 300:
            raise FatalError(f"{method} {path}: the API server answered {status}: {data[:300]!r}")
        return status, json.loads(data) if data else None

    def token_kubeconfig(self, name: str, token: str) -> Path:
        """A kubeconfig that authenticates with a bearer token (a service account's, say)."""
        path = self.workdir / f"{name}.kubeconfig"
        _write_kubeconfig(path, self.server, self.ca.ca.cert, name, {"token": token})
        return path

    # -- internals -----------------------------------------------------------------------------

    def _make_credentials(self) -> None:
        pki = self.workdir / "pki"
        self.ca = Authority(pki)
        self.api_port = free_port()
        self.serving = self.ca.issue(
            "apiserver",
            "kube-apiserver",
            server_names=(
                "127.0.0.1",
                "localhost",
                "10.0.0.1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ),
            client=False,
        )
        self.sa_key = signing_key(pki / "service-accounts.key")
        users = {
            "admin": self.ca.issue("admin", "unidra-e2e-admin", ("system:masters",)),
            "controller-manager": self.ca.issue(
                "controller-manager", "system:kube-controller-manager"
            ),
            "scheduler": self.ca.issue("scheduler", "system:kube-scheduler"),
            "kubelet": self.ca.issue("kubelet", f"system:node:{self.node_name}", ("system:nodes",)),
        }
        self.kubelet_serving = self.ca.issue(
            "kubelet-serving", self.node_name, server_names=("127.0.0.1", "localhost")
        )
        self.apiserver_kubelet_client = self.ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
        )
        for user, pair in users.items():
            _write_kubeconfig(
                self.workdir / f"{user}.kubeconfig",
                self.server,
                self.ca.ca.cert,
                user,
                {"client-certificate": str(pair.cert), "client-key": str(pair.key)},
            )
        self.admin = users["admin"]

    def _start_control_plane(self, deadline: float) -> None:
        etcd_port, peer_port = free_port(), free_port()
        self._launch(
            "etcd",
            [
                "labetcd",
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-url",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-url",
                f"http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
            ],
        )
        pki = self.ca.directory
        self._launch(
            "kube-apiserver",
            [
                "kube-apiserver",
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                # Loopback is refused as the advertised address; this one is never dialled.
                "--advertise-address=10.255.255.1",
                f"--client-ca-file={self.ca.ca.cert}",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--kubelet-client-certificate={self.apiserver_kubelet_client.cert}",
                f"--kubelet-client-key={self.apiserver_kubelet_client.key}",
                f"--service-account-issuer={SERVICE_ISSUER}",
                f"--service-account-key-file={self.sa_key}",
                f"--service-account-signing-key-file={self.sa_key}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                f"--feature-gates={CONTROL_PLANE_GATES}",
                "--runtime-config=api/all=true",
                f"--cert-dir={pki}",
            ],
        )
        self._wait("kube-apiserver /readyz", self._ready, deadline)
        self._launch(
            "kube-controller-manager",
            [
                "kube-controller-manager",
                f"--kubeconfig={self.workdir / 'controller-manager.kubeconfig'}",
                f"--service-account-private-key-file={self.sa_key}",
                f"--root-ca-file={self.ca.ca.cert}",
                f"--cluster-signing-cert-file={self.ca.ca.cert}",
                f"--cluster-signing-key-file={self.ca.ca.key}",
                "--use-service-account-credentials=true",
                # All of them: one of this tree's controllers publishes the ConfigMap that pods'
                # projected service-account volumes expect.
                "--controllers=*",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--feature-gates={CONTROL_PLANE_GATES}",
            ],
        )
        self._launch(
            "kube-scheduler",
            [
                "kube-scheduler",
                f"--kubeconfig={self.workdir / 'scheduler.kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--feature-gates={CONTROL_PLANE_GATES}",
            ],
        )

    def _start_node(self, deadline: float) -> None:
        cri = self.workdir / "cri.sock"
        self._launch(
            "fakecri",
            [
                "fakecri",
                "--endpoint",
                f"unix://{cri}",
                "--container-log",
                str(self.container_log),
            ],
        )
        self._wait("fakecri's socket", cri.exists, deadline)
        config = self.workdir / "kubelet-config.yaml"
        config.write_text(yaml.safe_dump(self._kubelet_config(cri)))
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        self._launch(
            "kubelet",
            [
                "kubelet",
                f"--config={config}",
                f"--kubeconfig={self.workdir / 'kubelet.kubeconfig'}",
                f"--root-dir={self.kubelet_root}",
                f"--cert-dir={self.workdir / 'kubelet-pki'}",
                f"--hostname-override={self.node_name}",
                "--v=2",
                # "Registered DRA plugin" is logged at level 3.
                "--vmodule=dra_plugin_manager=3",
            ],
        )
        kubelet = self.components["kubelet"]
        self._wait("the node to be Ready", self._node_ready, deadline)
        # kubelet deletes the node's ResourceSlices at start; a driver started earlier loses its first ones.
        self._wait(
            "kubelet to delete the node's ResourceSlices",
            lambda: "Deleted ResourceSlices" in kubelet.output(),
            deadline,
        )

    def _kubelet_config(self, cri: Path) -> dict[str, Any]:
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": f"unix://{cri}",
            "imageServiceEndpoint": f"unix://{cri}",
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "failCgroupV1": False,
            "localStorageCapacityIsolation": False,
            "resolvConf": "",
            "address": "127.0.0.1",
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            "tlsCertFile": str(self.kubelet_serving.cert),
            "tlsPrivateKeyFile": str(self.kubelet_serving.key),
            "podLogsDir": str(self.workdir / "pod-logs"),
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(self.ca.ca.cert)},
            },
            "authorization": {"mode": "Webhook"},
            "featureGates": dict.fromkeys(KUBELET_GATES, True),
            # Pods in tests come and go quickly; kubelet's defaults are tuned for real nodes.
            "syncFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
        }

    def _launch(self, name: str, argv: Sequence[str]) -> None:
        binary = str(self.bin_dir / argv[0])
        component = Component(name, [binary, *argv[1:]], self.logs / f"{name}.log")
        self.components[name] = component
        component.start(self.workdir / "run" / name)

    @functools.cached_property
    def _tls(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca.ca.cert))
        context.load_cert_chain(str(self.admin.cert), str(self.admin.key))
        return context

    def _call(self, method: str, path: str, body: Any, timeout: float) -> tuple[int, bytes]:
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.api_port, context=self._tls, timeout=timeout
        )
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload else {}
            connection.request(method, path, body=payload, headers=headers)
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()

    def _ready(self) -> bool:
        try:
            return self._call("GET", "/readyz", None, timeout=2)[0] == 200
        except OSError:
            return False

    def _node_ready(self) -> bool:
        try:
            node = self.get_json(f"/api/v1/nodes/{self.node_name}")
        except OSError:
            return False
        conditions = (node or {}).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def _wait(self, what: str, done: Callable[[], bool], deadline: float) -> None:
        while not done():
            for component in self.components.values():
                if not component.running():
                    tail = component.output()[-3000:]
                    raise FatalError(
                        f"{component.name} exited while waiting for {what}; its log ends:\n{tail}"
                    )
            if time.monotonic() > deadline:
                raise FatalError(f"timed out waiting for {what}; logs in {self.logs}")
            time.sleep(0.2)


def _write_kubeconfig(
    path: Path, server: str, ca: Path, user: str, credentials: Mapping[str, str]
) -> None:
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": user, "user": dict(credentials)}],
        "contexts": [{"name": user, "context": {"cluster": "local", "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)


def _node_object(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
    }


def mounts_under(directory: Path) -> list[str]:
    """Mount points at or below `directory`, innermost first."""
    prefix = str(directory.resolve())
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    # Field 5 is the mount point, with spaces and the like escaped as octal.
    points = {
        line.split()[4].encode().decode("unicode_escape") for line in table.splitlines() if line
    }
    inside = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    return sorted(inside, key=lambda p: p.count("/"), reverse=True)
