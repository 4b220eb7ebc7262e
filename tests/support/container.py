"""A container as a runtime would make it from a claim's CDI spec, and a dynamic loader searching it.

`resolve` lays the spec's edits out in an empty root: device nodes as placeholder files, each
mount as a link to its host file (which must exist under the host root), and the two
nvidia-cdi-hook hooks done as the hook does them (`create-symlinks` makes the links,
`update-ldcache` adds folders to the loader cache). `find_library` then searches like glibc's
loader: LD_LIBRARY_PATH, the loader cache, then the trusted system folders.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driver import cdi

# LD_LIBRARY_PATH of NVIDIA's CUDA images (nvidia/cuda, Ubuntu and UBI alike).
CUDA_IMAGE_LIBRARY_PATH = ("/usr/local/nvidia/lib", "/usr/local/nvidia/lib64")
# glibc's trusted folders on Debian and Ubuntu (multiarch), searched without any configuration.
SYSTEM_FOLDERS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib", "/usr/lib")
# PATH of the CUDA images.
CUDA_IMAGE_PATH = (
    "/usr/local/nvidia/bin",
    "/usr/local/cuda/bin",
    "/usr/local/bin",
    "/usr/bin",
    "/bin",
)


@dataclass
class Container:
    root: Path
    ld_cache_folders: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    other_hooks: list[list[str]] = field(default_factory=list)  # run by the runtime, not here

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def find_library(
        self, soname: str, library_path: tuple[str, ...] = CUDA_IMAGE_LIBRARY_PATH
    ) -> str | None:
        """The container path the loader would open for `soname`, or None."""
        for folder in (*library_path, *self.ld_cache_folders, *SYSTEM_FOLDERS):
            if self.path(f"{folder}/{soname}").is_file():  # follows links, as the loader does
                return f"{folder}/{soname}"
        return None

    def find_program(self, name: str, path: tuple[str, ...] = CUDA_IMAGE_PATH) -> str | None:
        for folder in path:
            if self.path(f"{folder}/{name}").is_file():
                return f"{folder}/{name}"
        return None


def claim_spec(backend: Any, devices: list[Any]) -> dict[str, Any]:
    """The CDI spec a claim on `devices` of one backend gets, as prepare writes it."""
    uid = "a4aefb74-52bd-4e94-8790-317e60438277"
    entries = [
        cdi.CdiDevice(cdi.device_name(uid, d.name), backend.device_edits(d)) for d in devices
    ]
    return cdi.build_claim_spec("unidra.dev", entries, backend.shared_edits(devices))


def view(backend: Any, devices: list[Any], host_root: Path, root: Path) -> Container:
    """What a container given a claim on `devices` sees."""
    return resolve(claim_spec(backend, devices), host_root, root)


def resolve(spec: dict[str, Any], host_root: Path, root: Path) -> Container:
    """Apply a claim spec's edits (the common ones, then every device's) to an empty `root`."""
    container = Container(root)
    edits = [spec.get("containerEdits") or {}, *(d["containerEdits"] for d in spec["devices"])]
    for edit in edits:
        container.env += edit.get("env") or []
        for node in edit.get("deviceNodes") or []:
            target = container.path(node["path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"{node.get('type', 'c')} {node.get('major')}:{node.get('minor')}\n")
        for mount in edit.get("mounts") or []:
            source = host_root / mount["hostPath"].lstrip("/")
            assert source.exists(), f"mount source {mount['hostPath']} is not on the host"
            _link(container.path(mount["containerPath"]), str(source))
        for hook in edit.get("hooks") or []:
            _run_hook(container, hook["args"])
    return container


def _run_hook(container: Container, args: list[str]) -> None:
    if args[0] != "nvidia-cdi-hook":
        container.other_hooks.append(args)
        return
    options = list(zip(args[2::2], args[3::2], strict=True))
    if args[1] == "create-symlinks":
        for flag, value in options:
            assert flag == "--link", args
            target, link = value.split("::")
            _link(container.path(link), target)
    elif args[1] == "update-ldcache":
        container.ld_cache_folders += [value for flag, value in options if flag == "--folder"]
    else:
        raise AssertionError(f"unknown nvidia-cdi-hook command {args[1]}")


def _link(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        path.unlink()
    path.symlink_to(target)
