"""Socket files on a shared directory: a live one is never removed, a stale one is, and a
server removes only the file it bound."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from driver.errors import FatalError
from driver.socket_files import SocketFile, clear_stale, remove_any, served
from support.unix import listening, stale


@pytest.fixture
def short_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="s", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_only_sockets_are_touched(short_dir: Path) -> None:
    assert clear_stale(short_dir / "absent.sock") is False
    (short_dir / "file.sock").write_text("x")
    with pytest.raises(FatalError, match="is not a socket"):
        clear_stale(short_dir / "file.sock")
    with pytest.raises(FatalError, match="is not a socket"):
        remove_any(short_dir / "file.sock")
    assert (short_dir / "file.sock").read_text() == "x"


def test_a_stale_socket_is_removed(short_dir: Path) -> None:
    stale(short_dir / "dra.sock")
    assert not served(short_dir / "dra.sock")
    assert clear_stale(short_dir / "dra.sock") is True
    assert not (short_dir / "dra.sock").exists()


def test_a_live_socket_is_never_removed(short_dir: Path) -> None:
    path = short_dir / "dra.sock"
    with listening(path):
        inode = os.lstat(path).st_ino
        with pytest.raises(FatalError, match=f"{path} is served by another live process"):
            clear_stale(path)
        assert os.lstat(path).st_ino == inode


def test_a_server_removes_only_the_file_it_bound(short_dir: Path) -> None:
    path = short_dir / "dra.sock"
    with listening(path):
        ours = SocketFile.bound_at(path)
    os.unlink(path)
    with listening(path):  # another process bound the path since
        assert ours.remove() is False
        assert path.exists()
    theirs = SocketFile.bound_at(path)
    assert theirs.remove() is True
    assert not path.exists()
    assert theirs.remove() is False  # already gone
