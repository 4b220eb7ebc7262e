"""Where the NVIDIA driver's user-space files live on the host, and how a container gets them.

The driver is not always in /usr/lib/x86_64-linux-gnu: a real H200 host had it in
/usr/local/nvidia/lib64, the GPU operator puts it under /run/nvidia/driver. Each library is
looked for by the soname CUDA loads, in order: below the `nvidia.driver-root` option when it is
set (its own loader cache first), the folder the loaded NVML came from, the host's loader cache
(/etc/ld.so.cache, parsed), then the usual folders.

A container gets every library file bind-mounted, plus its soname: made by
`nvidia-cdi-hook create-symlinks` and `update-ldcache` when the host has the hook, else
mounted a second time under the soname (and in the multiarch folder, which every glibc image
searches), so a loader finds it either way.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from driver.errors import ConfigError
from driver.model import Hook, Mount
from vendors import ldcache
from vendors.host import Host

# Sonames CUDA programs and nvidia-smi cannot run without.
REQUIRED_LIBRARIES = (
    "libcuda.so.1",
    "libnvidia-ml.so.1",
    "libnvidia-ptxjitcompiler.so.1",
    "libnvidia-nvvm.so.4",
)
# The rest of the compute set (what nvidia-container-toolkit mounts for "compute,utility"),
# mounted when present; `{version}` is the driver version.
OPTIONAL_LIBRARIES = (
    "libcudadebugger.so.1",
    "libnvidia-gpucomp.so.{version}",
    "libnvidia-opencl.so.1",
    "libnvidia-cfg.so.1",
    "libnvidia-allocator.so.1",
    "libnvidia-pkcs11-openssl3.so.{version}",
    "libnvidia-pkcs11.so.{version}",
)
REQUIRED_BINARIES = ("nvidia-smi",)
OPTIONAL_BINARIES = ("nvidia-debugdump", "nvidia-cuda-mps-control", "nvidia-cuda-mps-server")
# Roots a driver is installed under, besides the host's own /.
KNOWN_ROOTS = ("/run/nvidia/driver", "/usr/local/nvidia")
LIBRARY_FOLDERS = (
    "usr/lib/x86_64-linux-gnu",
    "usr/lib/aarch64-linux-gnu",
    "usr/lib64",
    "lib64",
    "usr/lib",
    "lib",
)
BINARY_FOLDERS = ("usr/bin", "bin")
HOOKS = ("/usr/bin/nvidia-cdi-hook", "/usr/local/nvidia/toolkit/nvidia-cdi-hook")
PROC_MAPS = Path("/proc/self/maps")
_VERSION = re.compile(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class DriverFiles:
    """The driver's files on the host (host paths, symlinks resolved) and where each was found."""

    root: str
    version: str | None
    libraries: dict[str, str] = field(default_factory=dict)  # soname -> real file
    binaries: dict[str, str] = field(default_factory=dict)  # name -> real file
    sources: dict[str, str] = field(default_factory=dict)  # soname or binary -> how it was found

    @property
    def library_folders(self) -> tuple[str, ...]:
        return _folders(self.libraries)

    def missing(self) -> list[str]:
        """Files a CUDA container needs that were not found."""
        return [
            name
            for name in (*REQUIRED_LIBRARIES, *REQUIRED_BINARIES)
            if name not in {**self.libraries, **self.binaries}
        ]


def kernel_version(host: Host) -> str | None:
    """The loaded kernel module's version, from /proc/driver/nvidia/version."""
    match = _VERSION.search(host.read("/proc/driver/nvidia/version") or "")
    return match.group(1) if match else None


def loaded_library(prefix: str, maps: str) -> str | None:
    """The path this process mapped a library from (`/proc/self/maps`), e.g. NVML loaded by pynvml."""
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        if path.startswith("/") and path.rsplit("/", 1)[-1].startswith(prefix):
            return path
    return None


def nvml_folder(host: Host) -> str | None:
    """The host folder of the NVML this process loaded, if it is on the host."""
    try:
        path = loaded_library("libnvidia-ml.so", PROC_MAPS.read_text())
    except OSError:
        return None
    if path is None:
        return None
    root = str(host.root).rstrip("/")
    if root and path.startswith(root + "/"):
        path = path[len(root) :]
    folder = path.rsplit("/", 1)[0]
    return folder if host.path(folder).is_dir() else None


def locate(host: Host, version: str | None, driver_root: str | None = None) -> DriverFiles:
    """Find the driver's libraries and binaries; `version` None reads it from the kernel module."""
    version = version or kernel_version(host)
    searches: list[tuple[str, list[str], list[ldcache.Entry]]] = []  # (source, folders, cache)
    if driver_root:
        searches.append(
            (
                f"driver root {driver_root}",
                [f"{driver_root}/{f}" for f in LIBRARY_FOLDERS],
                _cache(host, driver_root),
            )
        )
    else:
        loaded = nvml_folder(host)
        if loaded:
            searches.append(("the folder NVML was loaded from", [loaded], []))
        searches.append(("the host's loader cache", [], _cache(host, "/")))
        searches.append(
            (
                "the usual folders",
                [f"{root}/{f}" for root in ("", *KNOWN_ROOTS) for f in LIBRARY_FOLDERS],
                [],
            )
        )
    libraries: dict[str, str] = {}
    sources: dict[str, str] = {}
    for pattern in (*REQUIRED_LIBRARIES, *OPTIONAL_LIBRARIES):
        # Without NVML or the kernel module, the version is the suffix of libcuda's file.
        version = version or _suffix_version(libraries.get("libcuda.so.1"))
        if "{version}" in pattern and not version:
            continue
        soname = pattern.format(version=version)
        for source, folders, cache in searches:
            found = _find_library(host, soname, version, folders, cache, driver_root)
            if found:
                libraries[soname], sources[soname] = found, source
                break
    root = driver_root or _root_of(
        libraries.get("libcuda.so.1") or next(iter(libraries.values()), None)
    )
    bin_folders = [f"{root.rstrip('/')}/{f}" for f in BINARY_FOLDERS]
    bin_folders += [f"{folder.rsplit('/', 1)[0]}/bin" for folder in _folders(libraries)]
    if not driver_root:
        bin_folders += ["/usr/bin", *(f"{r}/{f}" for r in KNOWN_ROOTS for f in BINARY_FOLDERS)]
    binaries: dict[str, str] = {}
    for name in (*REQUIRED_BINARIES, *OPTIONAL_BINARIES):
        for folder in dict.fromkeys(bin_folders):
            real = host.resolve(f"{folder}/{name}")
            if real and host.path(real).is_file():
                binaries[name], sources[name] = real, folder
                break
    return DriverFiles(root, version, libraries, binaries, sources)


def container_edits(host: Host, files: DriverFiles) -> tuple[tuple[Mount, ...], tuple[Hook, ...]]:
    """Mounts (and hooks, with nvidia-cdi-hook) that give a container every soname and binary."""
    hook = next((path for path in HOOKS if host.path(path).is_file()), None)
    multiarch = f"/usr/lib/{platform.machine()}-linux-gnu"
    mounts: list[Mount] = []
    links: list[str] = []
    folders: list[str] = []
    for soname, real in files.libraries.items():
        folder = container_folder(files.root, real.rsplit("/", 1)[0], host)
        filename = real.rsplit("/", 1)[-1]
        mounts.append(Mount(real, f"{folder}/{filename}"))
        folders.append(folder)
        names = [soname, *(("libcuda.so",) if soname == "libcuda.so.1" else ())]
        for name in names:
            if hook:
                links.append(f"{filename if name == soname else soname}::{folder}/{name}")
            else:
                for target in dict.fromkeys((folder, multiarch)):
                    if f"{target}/{name}" != f"{folder}/{filename}":
                        mounts.append(Mount(real, f"{target}/{name}"))
    mounts += [Mount(real, f"/usr/bin/{name}") for name, real in files.binaries.items()]
    hooks = []
    if hook and links:
        args = [arg for link in links for arg in ("--link", link)]
        hooks.append(Hook("createContainer", hook, ("nvidia-cdi-hook", "create-symlinks", *args)))
    if hook and folders:
        args = [arg for folder in dict.fromkeys(folders) for arg in ("--folder", folder)]
        hooks.append(Hook("createContainer", hook, ("nvidia-cdi-hook", "update-ldcache", *args)))
    return tuple(dict.fromkeys(mounts)), tuple(hooks)


def container_folder(root: str, host_folder: str, host: Host) -> str:
    """Where a host library folder appears in the container.

    A driver root holding a whole file system (/run/nvidia/driver/usr/lib/...) is stripped, as
    nvidia-ctk does; a flat install (/usr/local/nvidia/lib64) keeps its path, which the CUDA
    images put on their library path.
    """
    if root != "/" and host_folder.startswith(root + "/") and host.path(f"{root}/usr").is_dir():
        return host_folder[len(root) :]
    return host_folder


def _cache(host: Host, root: str) -> list[ldcache.Entry]:
    try:
        data = host.path(f"{root.rstrip('/')}/etc/ld.so.cache").read_bytes()
    except OSError:
        return []
    return ldcache.parse(data)


def _find_library(
    host: Host,
    soname: str,
    version: str | None,
    folders: list[str],
    cache: list[ldcache.Entry],
    driver_root: str | None,
) -> str | None:
    candidates = []
    cached = ldcache.lookup(cache, soname)
    if cached:
        candidates.append(f"{driver_root or ''}{cached}")
    base = soname.split(".so", 1)[0]
    for folder in folders:
        candidates.append(f"{folder}/{soname}")
        if version:
            candidates.append(f"{folder}/{base}.so.{version}")
    for candidate in candidates:
        real = host.resolve(candidate)
        if real and host.path(real).is_file():
            return real
    return None


def driver_root(option: str | None) -> str | None:
    """The `nvidia.driver-root` option: an absolute host path, or ConfigError naming what is accepted."""
    if not option:
        return None
    path = PurePosixPath(option)
    if not path.is_absolute() or ".." in path.parts:
        raise ConfigError(
            "--backend-option",
            f"nvidia.driver-root={option}: expected an absolute host path such as /run/nvidia/driver",
        )
    return str(path)


def _suffix_version(path: str | None) -> str | None:
    match = re.search(r"\.so\.(\d+\.\d+(?:\.\d+)?)$", path or "")
    return match.group(1) if match else None


def _folders(libraries: dict[str, str]) -> tuple[str, ...]:
    return tuple(sorted({path.rsplit("/", 1)[0] for path in libraries.values()}))


def _root_of(path: str | None) -> str:
    for root in KNOWN_ROOTS:
        if path and path.startswith(root + "/"):
            return root
    return "/"
