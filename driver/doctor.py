"""`unidra doctor`: check a node's prerequisites and say exactly what is missing and how to fix it.

Each check returns findings; nothing here changes the node or the cluster. The checks read
exactly the directories the daemon writes (the DaemonSet mounts those, not their parents) and
the host trees it reads under `host_root`, the container runtime's configuration where it is
visible, the vendor stacks (by constructing each backend the PCI bus calls for), a running
daemon's control sockets, and, with credentials, the API server: the versions it serves, the
node, the credentials' own access (SelfSubjectAccessReview) and, by a dry-run write, which
gated ResourceSlice fields it keeps.
"""

from __future__ import annotations

import enum
import os
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driver import backends, control, inventory, kubeapi, pci
from driver.backends import BackendContext
from driver.errors import FatalError, UnidraError
from driver.kubelet import sockets
from driver.settings import DEFAULT_DRIVER_NAME


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"
    SKIP = "skip"


@dataclass(frozen=True)
class Finding:
    status: Status
    check: str
    detail: str


@dataclass(frozen=True)
class Target:
    """The node as the daemon would see it with the same flags."""

    host_root: Path
    registrar_dir: Path
    plugins_dir: Path
    cdi_root: Path
    driver_name: str
    node_name: str
    vendors: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, str]] | None = None
    partitions: bool = False

    @property
    def plugin_dir(self) -> Path:
        return self.plugins_dir / self.driver_name


def run(target: Target, api: Callable[[], kubeapi.Preflight] | None = None) -> list[Finding]:
    """Every check, in the order an operator would fix them."""
    return [
        *directories(target),
        *socket_paths(target),
        *runtime_cdi(target.host_root, target.cdi_root),
        *vendor_stacks(target),
        *nvidia_driver(target),
        *running_daemon(target),
        *api_server(target, api),
    ]


def failed(findings: Iterable[Finding]) -> bool:
    return any(f.status is Status.FAIL for f in findings)


# -- directories ---------------------------------------------------------------------------------


def directories(target: Target) -> list[Finding]:
    """The directories the daemon writes and the host trees it reads, as the DaemonSet mounts them."""
    return [
        _directory(
            "kubelet registration directory",
            target.registrar_dir,
            "kubelet's plugin watcher looks there; mount the host's directory at the same path",
        ),
        _directory(
            "plugin directory",
            target.plugin_dir,
            "the DRA socket and the checkpoint live there; mount the host's directory at the same path",
            creatable=True,
        ),
        _directory(
            "CDI directory",
            target.cdi_root,
            "the container runtime reads CDI specs from it; mount the host's /var/run/cdi",
            creatable=True,
        ),
        *(
            _readable(check, target.host_root / tree, why)
            for check, tree, why in (
                ("host sysfs", "sys", "PCI devices, NUMA and sensors; mount the host's /sys"),
                ("host devfs", "dev", "device numbers for CDI specs; mount the host's /dev"),
            )
            if target.vendors != ("simulated",)  # simulated devices read neither
        ),
    ]


def _directory(check: str, path: Path, why: str, creatable: bool = False) -> Finding:
    """`path` must be a writable directory, or (when `creatable`) one the daemon can create."""
    if path.is_dir():
        if os.access(path, os.W_OK | os.X_OK):
            return Finding(Status.OK, check, f"{path} is writable")
        return Finding(Status.FAIL, check, f"{path} is not writable by uid {os.geteuid()}: {why}")
    if path.exists():
        return Finding(Status.FAIL, check, f"{path} exists but is not a directory")
    parent = next((p for p in path.parents if p.exists()), Path("/"))
    if creatable and os.access(parent, os.W_OK | os.X_OK):
        return Finding(Status.OK, check, f"{path} does not exist yet; it will be created")
    return Finding(Status.FAIL, check, f"{path} does not exist: {why}")


def _readable(check: str, path: Path, why: str) -> Finding:
    if path.is_dir() and os.access(path, os.R_OK | os.X_OK):
        return Finding(Status.OK, check, f"{path} is readable")
    return Finding(Status.FAIL, check, f"{path} is not a readable directory: {why}")


def socket_paths(target: Target) -> list[Finding]:
    """The longest socket paths (with a pod UID) must fit the 108-byte AF_UNIX limit."""
    uid = "00000000-0000-0000-0000-000000000000"
    try:
        longest = [
            sockets.registration_socket(target.registrar_dir, target.driver_name, uid),
            sockets.dra_socket(target.plugin_dir, uid),
        ]
    except FatalError as err:
        return [Finding(Status.FAIL, "socket paths", str(err))]
    size = max(len(os.fsencode(p)) for p in longest)
    return [
        Finding(Status.OK, "socket paths", f"at most {size} of {sockets.MAX_SOCKET_PATH} bytes")
    ]


# -- container runtime ---------------------------------------------------------------------------


def runtime_cdi(host_root: Path, cdi_root: Path) -> list[Finding]:
    """Whether containerd or CRI-O will resolve CDI device IDs, from their configuration files."""
    findings = []
    containerd = host_root / "etc/containerd/config.toml"
    if containerd.is_file():
        findings.append(_containerd(_toml(containerd), containerd, cdi_root))
    crio = [
        host_root / "etc/crio/crio.conf",
        *sorted((host_root / "etc/crio/crio.conf.d").glob("*.conf")),
    ]
    crio = [p for p in crio if p.is_file()]
    if crio:
        findings.append(_crio(crio, cdi_root))
    if not findings:
        # The DaemonSet does not mount the host's /etc, so in its pod this cannot be judged.
        hint = (
            ""
            if host_root == Path("/")
            else "; the DaemonSet does not mount the host's /etc: run `unidra doctor` on the node, "
            f"or mount the host's /etc/containerd or /etc/crio under {host_root / 'etc'}"
        )
        findings.append(
            Finding(
                Status.SKIP,
                "container runtime CDI",
                f"no containerd or CRI-O configuration in {host_root / 'etc'}: not checked{hint}",
            )
        )
    return findings


def _toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        return {"_error": str(err)}


def _containerd(config: Mapping[str, Any], path: Path, cdi_root: Path) -> Finding:
    check = "containerd CDI"
    if "_error" in config:
        return Finding(Status.WARN, check, f"cannot read {path}: {config['_error']}")
    plugins = config.get("plugins", {})
    version = int(config.get("version", 1))
    # Config version 3 is containerd 2.x, where CDI is on unless turned off; version 2 may be
    # 1.7 (off by default) or 2.x (on by default).
    section = "io.containerd.cri.v1.runtime" if version >= 3 else "io.containerd.grpc.v1.cri"
    cri = plugins.get(section, {})
    dirs = cri.get("cdi_spec_dirs", ["/etc/cdi", "/var/run/cdi"])
    if cri.get("enable_cdi", True) is False:
        return Finding(
            Status.FAIL,
            check,
            f'{path}: CDI is off; set enable_cdi = true under [plugins."{section}"] '
            "and restart containerd",
        )
    if str(cdi_root) not in dirs:
        return Finding(
            Status.FAIL,
            check,
            f"{path}: cdi_spec_dirs {dirs} does not include {cdi_root}, where Unidra writes its specs",
        )
    if version < 3 and "enable_cdi" not in cri:
        return Finding(
            Status.WARN,
            check,
            f"{path} (config version {version}) does not set enable_cdi: CDI is on by default "
            'in containerd 2.x but off in 1.7; set enable_cdi = true under [plugins."io.containerd.grpc.v1.cri"]',
        )
    return Finding(Status.OK, check, f"enabled in {path}, specs read from {', '.join(dirs)}")


def _crio(paths: Sequence[Path], cdi_root: Path) -> Finding:
    check = "CRI-O CDI"
    dirs: list[str] = ["/etc/cdi", "/var/run/cdi"]
    for path in paths:  # drop-ins override the main file, in name order
        config = _toml(path)
        if "_error" in config:
            return Finding(Status.WARN, check, f"cannot read {path}: {config['_error']}")
        dirs = config.get("crio", {}).get("runtime", {}).get("cdi_spec_dirs", dirs)
    if str(cdi_root) not in dirs:
        return Finding(
            Status.FAIL,
            check,
            f"cdi_spec_dirs {dirs} does not include {cdi_root}; add it under [crio.runtime]",
        )
    return Finding(
        Status.OK, check, f"CRI-O resolves CDI (always on since 1.23) from {', '.join(dirs)}"
    )


# -- vendor stacks -------------------------------------------------------------------------------


def vendor_stacks(target: Target) -> list[Finding]:
    """Construct every backend the PCI bus (or --vendors) calls for and discover its devices."""
    names: Sequence[str] = target.vendors
    findings = []
    if not names:
        picked, not_picked = backends.detect(target.host_root)
        names = picked
        findings += [
            Finding(Status.SKIP, f"backend {name}", reason)
            for name, reason in sorted(not_picked.items())
        ]
    options = target.options or {}
    built, failures = backends.create_all(
        names,
        lambda name: BackendContext(
            host_root=target.host_root, node_name=target.node_name, options=options.get(name, {})
        ),
    )
    found = inventory.discover(built)
    failures.update(found.failures)
    for backend in built:
        if backend.name in failures:
            continue
        count = sum(1 for d in found.devices if found.backend_of(d) is backend)
        source = getattr(backend, "source", "")
        via = f" via {source}" if source else ""
        status = Status.OK if count else Status.WARN
        detail = f"{count} devices{via}" if count else f"no devices found{via}"
        findings.append(Finding(status, f"backend {backend.name}", detail))
    findings += [
        Finding(Status.FAIL, f"backend {name}", reason) for name, reason in sorted(failures.items())
    ]
    if not names:
        findings.append(
            Finding(Status.WARN, "accelerators", "no supported accelerator on this node's PCI bus")
        )
    return findings


# -- the NVIDIA driver's files -------------------------------------------------------------------


def nvidia_driver(target: Target) -> list[Finding]:
    """Where the NVIDIA driver's user-space files are, and whether a CUDA container gets all it loads."""
    from vendors.host import Host
    from vendors.nvidia import NvidiaBackend, driver_files

    if target.vendors and "nvidia" not in target.vendors:
        return []
    if not target.vendors and not pci.select(pci.scan(target.host_root), NvidiaBackend.pci_matches):
        return []
    check = "NVIDIA driver files"
    root = driver_files.driver_root((target.options or {}).get("nvidia", {}).get("driver-root"))
    files = driver_files.locate(Host(target.host_root), None, root)
    if not files.libraries:
        return [
            Finding(
                Status.FAIL,
                check,
                f"no NVIDIA driver libraries under {target.host_root} (loader cache, "
                f"{', '.join(driver_files.KNOWN_ROOTS)}, the usual folders): install the driver, "
                "or name its root with --backend-option nvidia.driver-root=/run/nvidia/driver "
                "(in the DaemonSet: add manifests/components/nvidia-gpu-operator, which mounts "
                "that root and sets the option)",
            )
        ]
    where = (
        f"driver {files.version or '(version unknown)'}, root {files.root}, libraries in "
        f"{', '.join(files.library_folders)} (libcuda.so.1 from "
        f"{files.sources.get('libcuda.so.1', 'nowhere')})"
    )
    missing = files.missing()
    if missing:
        return [
            Finding(
                Status.WARN, check, f"{where}; a CUDA container would lack {', '.join(missing)}"
            )
        ]
    return [Finding(Status.OK, check, where)]


# -- the daemon and the API server ---------------------------------------------------------------


def running_daemon(target: Target) -> list[Finding]:
    answering = len(control.answering(sockets.control_sockets(target.plugin_dir)))
    if answering:
        return [
            Finding(
                Status.OK, "daemon", f"{answering} instance(s) answering in {target.plugin_dir}"
            )
        ]
    return [
        Finding(
            Status.WARN,
            "daemon",
            f"no running instance answers in {target.plugin_dir} (fine before installing)",
        )
    ]


def api_server(target: Target, api: Callable[[], kubeapi.Preflight] | None) -> list[Finding]:
    check = "API server"
    if api is None:
        return [
            Finding(
                Status.SKIP,
                check,
                "no credentials: pass --kubeconfig, or run inside the cluster",
            )
        ]
    try:
        preflight = api()
        version, served = preflight.server_version()
    except UnidraError as err:
        return [Finding(Status.FAIL, check, f"unreachable: {err}")]
    if "v1" not in served:
        return [
            Finding(
                Status.FAIL,
                check,
                f"{version} does not serve resource.k8s.io/v1 (serves {', '.join(served) or 'none'}); "
                "Unidra needs Kubernetes 1.34 or newer with DynamicResourceAllocation",
            )
        ]
    findings = [Finding(Status.OK, check, f"{version}, resource.k8s.io/v1 served")]
    try:
        findings.append(_node(target, preflight))
        findings.append(_access(preflight, target.driver_name))
        findings += features(target, preflight)
    except UnidraError as err:
        findings.append(Finding(Status.FAIL, check, str(err)))
    return findings


def _node(target: Target, preflight: kubeapi.Preflight) -> Finding:
    if preflight.node_exists(target.node_name):
        return Finding(Status.OK, "node", f"{target.node_name} exists")
    return Finding(
        Status.FAIL,
        "node",
        f"no Node named {target.node_name!r} in the cluster: --node-name (NODE_NAME) must be the "
        "node's name in Kubernetes (`kubectl get nodes`)",
    )


def _access(preflight: kubeapi.Preflight, driver: str) -> Finding:
    """Every call the daemon makes, asked of the API server for these credentials."""
    denied = []
    for group, resource, verb in kubeapi.PERMISSIONS:
        name = driver if resource in kubeapi.NAMED_BY_DRIVER else ""
        allowed, _ = preflight.allowed(group, resource, verb, name)
        if not allowed:
            denied.append(f"{verb} {resource}" + (f".{group}" if group else ""))
    if denied:
        return Finding(
            Status.FAIL,
            "permissions",
            f"these credentials may not {', '.join(denied)}; the driver's ClusterRole "
            "(manifests/base/rbac.yaml) grants them",
        )
    named = ", ".join(
        f"{verb} on {resource} named {driver}"
        for _, resource, verb in kubeapi.PERMISSIONS
        if resource in kubeapi.NAMED_BY_DRIVER
    )
    return Finding(
        Status.OK,
        "permissions",
        f"all {len(kubeapi.PERMISSIONS)} API calls of the driver allowed, including {named}",
    )


@dataclass(frozen=True)
class Feature:
    """A gated ResourceSlice field: its check, gate, field, and what is lost without it."""

    check: str
    gate: str
    field: str
    without: str

    def status_when_off(self, target: Target) -> Status:
        if self.field == "consumesCounters":
            return Status.FAIL if target.partitions else Status.SKIP
        if self.field == "taints":
            return Status.WARN  # health still reaches the stream, claim status and metrics
        return Status.SKIP  # nothing Unidra publishes needs it yet


FEATURES = (
    Feature("device taints", "DRADeviceTaints", "taints", "unhealthy devices get no taint"),
    Feature(
        "partitions",
        "DRAPartitionableDevices",
        "consumesCounters",
        "--partitions cannot publish MIG or compute partitions",
    ),
    Feature(
        "consumable capacity",
        "DRAConsumableCapacity",
        "allowMultipleAllocations",
        "claims cannot share a device by capacity",
    ),
)


def features(target: Target, preflight: kubeapi.Preflight) -> list[Finding]:
    """Which gated fields the API server keeps: a dry-run create of probe slices, nothing stored."""
    devices, counters = _probe_slices(target)
    try:
        kept = (preflight.dry_run(devices)["spec"].get("devices") or [{}])[0]
        counters_kept = bool(preflight.dry_run(counters)["spec"].get("sharedCounters"))
    except UnidraError as err:
        return [Finding(Status.WARN, "feature gates", f"cannot probe with a dry-run write: {err}")]
    findings = []
    for feature in FEATURES:
        on = feature.field in kept and (feature.field != "consumesCounters" or counters_kept)
        if on:
            findings.append(Finding(Status.OK, feature.check, f"{feature.gate} is on"))
        else:
            findings.append(
                Finding(
                    feature.status_when_off(target),
                    feature.check,
                    f"{feature.gate} is off in the API server (it drops the field): {feature.without}",
                )
            )
    return findings


def _probe_slices(target: Target) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two slices as the daemon would write them, using every gated field once."""
    driver = target.driver_name or DEFAULT_DRIVER_NAME
    pool = {"name": target.node_name, "generation": 0, "resourceSliceCount": 2}

    def spec(**fields: Any) -> dict[str, Any]:
        return {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceSlice",
            "metadata": {"generateName": f"{target.node_name}-{driver}-doctor-"},
            "spec": {"driver": driver, "nodeName": target.node_name, "pool": pool, **fields},
        }

    device = {
        "name": "doctor-probe",
        "capacity": {"memory": {"value": "1Gi"}},
        "taints": [{"key": f"{driver}/unhealthy", "value": "probe", "effect": "NoSchedule"}],
        "allowMultipleAllocations": True,
        "consumesCounters": [
            {"counterSet": "doctor-probe", "counters": {"memory": {"value": "1Gi"}}}
        ],
    }
    counters = [{"name": "doctor-probe", "counters": {"memory": {"value": "1Gi"}}}]
    return spec(devices=[device]), spec(sharedCounters=counters)


def report(findings: Sequence[Finding]) -> str:
    width = max(len(f.check) for f in findings)
    lines = [f"{f.status.value:<4}  {f.check:<{width}}  {f.detail}" for f in findings]
    problems = sum(1 for f in findings if f.status is Status.FAIL)
    lines.append(f"{problems} problem(s) to fix" if problems else "no problems found")
    return "\n".join(lines)
