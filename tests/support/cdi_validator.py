"""A strict CDI spec checker written from the CDI specification (SPEC.md), as a runtime's CDI library checks.

It rejects unknown fields, versions below what the content needs, bad names and bad edits, so a
spec that passes here is one containerd's or CRI-O's CDI cache would load.
"""

from __future__ import annotations

import re
from typing import Any

KNOWN_VERSIONS = ("0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0")
HOOK_NAMES = {
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
}
_VENDOR = re.compile(r"^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_CLASS = re.compile(r"^[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?$")
_DEVICE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?$")

SPEC_FIELDS = {"cdiVersion", "kind", "annotations", "devices", "containerEdits"}
DEVICE_FIELDS = {"name", "annotations", "containerEdits"}
EDIT_FIELDS = {"env", "deviceNodes", "hooks", "mounts", "intelRdt", "additionalGids", "netDevices"}
NODE_FIELDS = {
    "path",
    "hostPath",
    "type",
    "major",
    "minor",
    "fileMode",
    "permissions",
    "uid",
    "gid",
}
MOUNT_FIELDS = {"hostPath", "containerPath", "options", "type"}
HOOK_FIELDS = {"hookName", "path", "args", "env", "timeout"}


class InvalidSpec(Exception):
    pass


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def required_version(spec: dict[str, Any]) -> str:
    """Independent re-statement of the spec's version table (for cross-checking driver.cdi)."""
    edits = [d.get("containerEdits", {}) for d in spec["devices"]] + [
        spec.get("containerEdits", {})
    ]
    version = "0.3.0"
    if any(m.get("type") for e in edits for m in e.get("mounts", [])):
        version = "0.4.0"
    if any(not d["name"][0].isalpha() for d in spec["devices"]) or any(
        n.get("hostPath") for e in edits for n in e.get("deviceNodes", [])
    ):
        version = "0.5.0"
    if (
        spec.get("annotations")
        or any(d.get("annotations") for d in spec["devices"])
        or "." in spec["kind"].split("/")[1]
    ):
        version = "0.6.0"
    if any(e.get("intelRdt") or e.get("additionalGids") for e in edits):
        version = "0.7.0"
    if any(e.get("netDevices") for e in edits):
        version = "1.1.0"
    return version


def validate(spec: Any) -> None:
    if not isinstance(spec, dict):
        raise InvalidSpec("spec is not an object")
    _only(spec, SPEC_FIELDS, "spec")
    version = spec.get("cdiVersion")
    if version not in KNOWN_VERSIONS:
        raise InvalidSpec(f"unknown cdiVersion {version!r}")
    kind = spec.get("kind", "")
    vendor, _, cls = kind.partition("/")
    if not _VENDOR.match(vendor) or not _CLASS.match(cls):
        raise InvalidSpec(f"invalid kind {kind!r}")
    devices = spec.get("devices")
    if not isinstance(devices, list) or not devices:
        raise InvalidSpec("a spec needs at least one device")
    names = set()
    for device in devices:
        _only(device, DEVICE_FIELDS, "device")
        name = device.get("name", "")
        if not _DEVICE.match(name):
            raise InvalidSpec(f"invalid device name {name!r}")
        if name in names:
            raise InvalidSpec(f"duplicate device name {name!r}")
        names.add(name)
        edits = device.get("containerEdits")
        if not edits:
            raise InvalidSpec(f"device {name!r} has no container edits")
        _edits(edits)
    if "containerEdits" in spec:
        _edits(spec["containerEdits"])
    if _version_key(version) < _version_key(required_version(spec)):
        raise InvalidSpec(f"cdiVersion {version} is below the required {required_version(spec)}")


def _only(obj: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(obj) - allowed
    if unknown:
        raise InvalidSpec(f"unknown {what} fields {sorted(unknown)}")


def _edits(edits: dict[str, Any]) -> None:
    _only(edits, EDIT_FIELDS, "containerEdits")
    for item in edits.get("env", []):
        if not isinstance(item, str) or item.find("=") <= 0:
            raise InvalidSpec(f"invalid env entry {item!r}")
    for node in edits.get("deviceNodes", []):
        _only(node, NODE_FIELDS, "deviceNode")
        if not str(node.get("path", "")).startswith("/"):
            raise InvalidSpec(f"device node path {node.get('path')!r} is not absolute")
        if node.get("type", "") not in ("", "b", "c", "u", "p"):
            raise InvalidSpec(f"invalid device node type {node.get('type')!r}")
        for number in ("major", "minor"):
            if not isinstance(node.get(number, 0), int) or node.get(number, 0) < 0:
                raise InvalidSpec(f"invalid device {number} {node.get(number)!r}")
        permissions = node.get("permissions", "")
        if permissions not in ("", "none") and permissions.strip("rwm"):
            raise InvalidSpec(f"invalid permissions {permissions!r}")
    for mount in edits.get("mounts", []):
        _only(mount, MOUNT_FIELDS, "mount")
        if not mount.get("hostPath") or not mount.get("containerPath"):
            raise InvalidSpec("mount needs hostPath and containerPath")
    for hook in edits.get("hooks", []):
        _only(hook, HOOK_FIELDS, "hook")
        if hook.get("hookName") not in HOOK_NAMES or not hook.get("path"):
            raise InvalidSpec(f"invalid hook {hook!r}")
