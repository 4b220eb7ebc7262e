"""Reads that fail one at a time, for `driver.conformance.check_optional_reads`.

Files: which ones a backend reads is recorded (every `Path.read_text`/`read_bytes` under the
host root during discovery), then each is made missing, unreadable (EACCES), failing (EIO, what
sysfs answers for a dead device) or garbage. Libraries and CLIs: each call the fake saw is made
to fail with the vendor's own errors. Identity reads are left alone: they are the ones a device
may be skipped for.
"""

from __future__ import annotations

import contextlib
import errno
import json
import pathlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from driver.conformance import Fault

# What names a PCI function: without it sysfs shows no device at all.
PCI_IDENTITY = frozenset({"vendor", "device", "class", "dev"})
NVML_ERRORS = ("NotSupported", "Unknown", "NoPermission")


@contextlib.contextmanager
def _patched_reads(wrap: Callable[[Path, Callable[[], Any]], Any]) -> Iterator[None]:
    original_text, original_bytes = pathlib.Path.read_text, pathlib.Path.read_bytes

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        return wrap(self, lambda: original_text(self, *args, **kwargs))  # type: ignore[no-any-return]

    def read_bytes(self: Path) -> bytes:
        return wrap(self, lambda: original_bytes(self))  # type: ignore[no-any-return]

    pathlib.Path.read_text = read_text  # type: ignore[method-assign]
    pathlib.Path.read_bytes = read_bytes  # type: ignore[method-assign]
    try:
        yield
    finally:
        pathlib.Path.read_text = original_text  # type: ignore[method-assign]
        pathlib.Path.read_bytes = original_bytes  # type: ignore[method-assign]


def files_read(root: Path, action: Callable[[], object]) -> list[Path]:
    """Every file under `root` that `action` reads, in first-read order."""
    seen: dict[Path, None] = {}
    resolved_root = root.resolve()

    def record(path: Path, read: Callable[[], Any]) -> Any:
        try:
            resolved = path.resolve()
        except OSError:
            resolved = path
        if resolved.is_relative_to(resolved_root):
            seen.setdefault(resolved, None)
        return read()

    with _patched_reads(record):
        action()
    return list(seen)


def file_faults(
    root: Path, action: Callable[[], object], identity: frozenset[str] = PCI_IDENTITY
) -> list[Fault]:
    """Missing, EACCES, EIO and garbage for every kind of file `action` reads (all files of one
    name at once: every GPU's numa_node together), except identity files."""
    by_name: dict[str, list[Path]] = {}
    for path in files_read(root, action):
        if path.name not in identity and path.is_file():
            by_name.setdefault(path.name, []).append(path)
    faults: list[Fault] = []
    for paths in by_name.values():
        label = f"{len(paths)} x /{paths[0].relative_to(root.resolve())}"
        faults += [
            (f"{label} missing", lambda paths=paths: _missing(paths)),
            (f"{label} EACCES", lambda paths=paths: _failing(paths, errno.EACCES)),
            (f"{label} EIO", lambda paths=paths: _failing(paths, errno.EIO)),
            (f"{label} garbage", lambda paths=paths: _garbage(paths)),
        ]
    return faults


@contextlib.contextmanager
def _missing(paths: list[Path]) -> Iterator[None]:
    for path in paths:
        path.rename(path.with_name(path.name + ".fault-aside"))
    try:
        yield
    finally:
        for path in paths:
            path.with_name(path.name + ".fault-aside").rename(path)


@contextlib.contextmanager
def _failing(paths: list[Path], code: int) -> Iterator[None]:
    broken = set(paths)

    def fail(candidate: Path, read: Callable[[], Any]) -> Any:
        try:
            hit = candidate.resolve() in broken
        except OSError:
            hit = False
        if hit:
            raise OSError(code, f"injected: {errno.errorcode[code]}", str(candidate))
        return read()

    with _patched_reads(fail):
        yield


@contextlib.contextmanager
def _garbage(paths: list[Path]) -> Iterator[None]:
    saved = {path: path.read_bytes() for path in paths}
    for path in paths:
        path.write_bytes(b"garbage\n")
    try:
        yield
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


def library_faults(
    calls: Iterable[str], errors: Iterable[str], install: Callable[[str, str], Callable[[], None]]
) -> list[Fault]:
    """Each call failing with each error: `install(call, error)` breaks it and returns the undo."""
    faults: list[Fault] = []
    for call in dict.fromkeys(calls):
        for error in errors:
            faults.append((f"{call} -> {error}", lambda c=call, e=error: _installed(install, c, e)))
    return faults


@contextlib.contextmanager
def _installed(
    install: Callable[[str, str], Callable[[], None]], call: str, error: str
) -> Iterator[None]:
    undo = install(call, error)
    try:
        yield
    finally:
        undo()


def json_field_faults(path: Path, entries: str, identity: frozenset[str]) -> list[Fault]:
    """A CLI's JSON (written to `path`, printed by a fake CLI) with each non-identity field of
    every entry of `entries` (and each top-level field) missing, "N/A", or null in turn."""
    document = json.loads(path.read_text())
    fields = {key for key in document if key != entries}
    for entry in document.get(entries) or []:
        fields |= {
            f"{entries}.{key}" for key, value in entry.items() if not isinstance(value, dict)
        }
        fields |= {
            f"{entries}.{key}.{inner}"
            for key, value in entry.items()
            if isinstance(value, dict)
            for inner in value
        }
    faults: list[Fault] = []
    for field in sorted(fields - identity):
        for kind in ("missing", "N/A", "null"):
            faults.append((f"{field} {kind}", lambda f=field, k=kind: _json_fault(path, f, k)))
    return faults


@contextlib.contextmanager
def _json_fault(path: Path, field: str, kind: str) -> Iterator[None]:
    saved = path.read_text()
    document = json.loads(saved)
    parts = field.split(".")
    targets = [document] if len(parts) == 1 else list(document.get(parts[0]) or [])
    keys = parts if len(parts) == 1 else parts[1:]
    for target in targets:
        for key in keys[:-1]:
            target = target.get(key, {})
        if keys[-1] in target:
            if kind == "missing":
                del target[keys[-1]]
            else:
                target[keys[-1]] = None if kind == "null" else "N/A"
    path.write_text(json.dumps(document))
    try:
        yield
    finally:
        path.write_text(saved)
