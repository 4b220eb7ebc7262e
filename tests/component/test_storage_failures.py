"""A disk that refuses (full, read-only, no permission) leaves no partial state.

A prepare whose record cannot be written removes its CDI spec before answering; an unprepare
that cannot update the record leaves the spec, so kubelet's retry finds the claim as it was.
Each failure reaches kubelet as that claim's error, naming the path and the cause, and is
logged once, without a traceback. The errors come from a seam in front of the file system for
every errno, and from a real full and read-only tmpfs where the test may mount one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from driver import cdi, durable
from driver.demo.apiserver import ApiServer as FakeApiServer
from support.claims import allocated_claim, result
from support.processes import checkpoint_claims

GPU = "gpu-0000-1b-00-0"
CAUSES = {
    errno.ENOSPC: "No space left on device (ENOSPC)",
    errno.EROFS: "Read-only file system (EROFS)",
    errno.EACCES: "Permission denied (EACCES)",
}
EVERY_CAUSE = pytest.mark.parametrize("code", CAUSES, ids=[errno.errorcode[c] for c in CAUSES])


@contextlib.contextmanager
def refusing(monkeypatch: pytest.MonkeyPatch, directory: Path, code: int) -> Iterator[None]:
    """Creating or removing files in `directory` fails with `code`, as the kernel would say it."""
    real_mkstemp, real_unlink = tempfile.mkstemp, os.unlink

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        if Path(kwargs.get("dir", "")) == directory:
            raise OSError(code, os.strerror(code), str(directory))
        return real_mkstemp(*args, **kwargs)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).parent == directory:
            raise OSError(code, os.strerror(code), str(path))
        real_unlink(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "mkstemp", mkstemp)
        patch.setattr(os, "unlink", unlink)
        yield


def spec_exists(node, uid: str) -> bool:  # type: ignore[no-untyped-def]
    return uid in cdi.claim_specs(node.cdi_root, "unidra.dev")


def logged_once(caplog: pytest.LogCaptureFixture, text: str) -> None:
    """Exactly one log record mentions `text`, and it carries no traceback."""
    records = [
        r
        for r in caplog.records
        if r.name.startswith("driver") and text in r.getMessage() + repr(r.__dict__)
    ]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is None and records[0].levelno == logging.WARNING


@EVERY_CAUSE
def test_a_prepare_that_cannot_be_recorded_leaves_no_spec(  # type: ignore[no-untyped-def]
    running, node, api: FakeApiServer, monkeypatch, caplog, code: int
) -> None:
    _, plugin = running
    claim = allocated_claim(api, "unrecorded", [result(GPU, "node-a")])
    checkpoint = node.plugin_dir / "checkpoint.json"
    with refusing(monkeypatch, node.plugin_dir, code):
        answer = plugin.prepare([claim])[claim[2]]
    assert answer.error == f"cannot write {checkpoint}: {CAUSES[code]}"
    assert not spec_exists(node, claim[2])
    assert claim[2] not in checkpoint_claims(node)
    logged_once(caplog, str(checkpoint))
    assert plugin.prepare([claim])[claim[2]].error == ""  # the disk is fixed: kubelet's retry
    assert spec_exists(node, claim[2])


def test_a_record_that_landed_before_its_directory_sync_failed_keeps_its_spec(  # type: ignore[no-untyped-def]
    running, node, api: FakeApiServer, monkeypatch
) -> None:
    _, plugin = running
    claim = allocated_claim(api, "half-durable", [result(GPU, "node-a")])
    real_sync = durable.sync_directory

    def sync_directory(directory: Path) -> None:
        if directory == node.plugin_dir:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_sync(directory)

    with monkeypatch.context() as patch:
        patch.setattr(durable, "sync_directory", sync_directory)
        answer = plugin.prepare([claim])[claim[2]]
    assert answer.error.endswith("Input/output error (EIO)"), answer.error
    # The rename happened: the claim is recorded, so its spec must stay for the retry.
    assert claim[2] in checkpoint_claims(node) and spec_exists(node, claim[2])
    assert plugin.prepare([claim])[claim[2]].error == ""


@EVERY_CAUSE
def test_an_unprepare_that_cannot_update_the_record_keeps_the_spec(  # type: ignore[no-untyped-def]
    running, node, api: FakeApiServer, monkeypatch, caplog, code: int
) -> None:
    _, plugin = running
    claim = allocated_claim(api, "kept", [result(GPU, "node-a")])
    prepared = plugin.prepare([claim])
    with refusing(monkeypatch, node.plugin_dir, code):
        answer = plugin.unprepare([claim])[claim[2]]
    assert answer.error == f"cannot write {node.plugin_dir / 'checkpoint.json'}: {CAUSES[code]}"
    assert spec_exists(node, claim[2]) and claim[2] in checkpoint_claims(node)
    assert plugin.prepare([claim]) == prepared  # still prepared, exactly as before
    assert plugin.unprepare([claim])[claim[2]].error == ""
    assert not spec_exists(node, claim[2]) and checkpoint_claims(node) == {}


@EVERY_CAUSE
def test_a_refusing_cdi_root_fails_the_claim_by_name(  # type: ignore[no-untyped-def]
    running, node, api: FakeApiServer, monkeypatch, caplog, code: int
) -> None:
    _, plugin = running
    claim = allocated_claim(api, "no-spec", [result(GPU, "node-a")])
    spec = cdi.spec_path(node.cdi_root, "unidra.dev", claim[2])
    with refusing(monkeypatch, node.cdi_root, code):
        answer = plugin.prepare([claim])[claim[2]]
    assert answer.error == f"cannot write {spec}: {CAUSES[code]}"
    assert claim[2] not in checkpoint_claims(node)
    logged_once(caplog, str(spec))
    assert plugin.prepare([claim])[claim[2]].error == ""
    # The spec cannot be removed: the record goes, and the retry removes the spec.
    with refusing(monkeypatch, node.cdi_root, code):
        answer = plugin.unprepare([claim])[claim[2]]
    assert answer.error == f"cannot remove {spec}: {CAUSES[code]}"
    assert claim[2] not in checkpoint_claims(node)
    assert plugin.unprepare([claim])[claim[2]].error == ""
    assert not spec_exists(node, claim[2])


@pytest.fixture
def small_tmpfs(node) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """The plugins directory and the CDI root on 1 MiB tmpfs mounts (skipped without the right to mount)."""
    mounted = []
    try:
        for path in (node.plugins_dir, node.cdi_root):
            path.mkdir(parents=True)
            mount = ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(path)]
            run = subprocess.run(mount, capture_output=True, check=False)
            if run.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here: {run.stderr.decode().strip()}")
            mounted.append(path)
        yield
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Use up the file system's free space."""
    filler = directory / "filler"
    with open(filler, "wb") as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 65536)
            handle.flush()
    return filler


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def test_a_really_full_plugins_directory_and_a_read_only_cdi_root(  # type: ignore[no-untyped-def]
    small_tmpfs, node, api: FakeApiServer
) -> None:
    claim = allocated_claim(api, "real", [result(GPU, "node-a")])
    with node.serve() as (_, plugin):
        filler = fill(node.plugin_dir)
        answer = plugin.prepare([claim])[claim[2]]
        assert answer.error.endswith("No space left on device (ENOSPC)"), answer.error
        assert cdi.claim_specs(node.cdi_root, "unidra.dev") == {}
        filler.unlink()
        assert plugin.prepare([claim])[claim[2]].error == ""

        filler = fill(node.plugin_dir)
        answer = plugin.unprepare([claim])[claim[2]]
        assert answer.error.endswith("No space left on device (ENOSPC)"), answer.error
        assert spec_exists(node, claim[2]) and claim[2] in checkpoint_claims(node)
        filler.unlink()

        remount(node.cdi_root, "ro")
        try:
            answer = plugin.unprepare([claim])[claim[2]]
            assert answer.error.endswith("Read-only file system (EROFS)"), answer.error
            assert spec_exists(node, claim[2])
        finally:
            remount(node.cdi_root, "rw")
        assert plugin.unprepare([claim])[claim[2]].error == ""
        assert cdi.claim_specs(node.cdi_root, "unidra.dev") == {}
        assert checkpoint_claims(node) == {}
