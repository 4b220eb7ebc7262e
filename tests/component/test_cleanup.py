"""`unidra cleanup` after an uninstall: this driver's CDI specs, checkpoint, lock and sockets go,
other drivers' files stay, and it refuses while an instance still runs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from driver import cdi, cli
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.kubelet import client as kubelet
from support.claims import allocated_claim, result


def cleanup(node, capsys, *extra: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    code = cli.main(
        [
            "cleanup",
            f"--kubelet-registrar-directory-path={node.registrar_dir}",
            f"--kubelet-plugins-directory-path={node.plugins_dir}",
            f"--cdi-root={node.cdi_root}",
            *extra,
        ]
    )
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def stale(path: Path) -> None:
    """A socket file whose process is gone."""
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))


def test_cleanup_removes_only_this_drivers_state(node, api: FakeApiServer, capsys) -> None:  # type: ignore[no-untyped-def]
    other_spec = (
        node.cdi_root / "k8s.gpu.nvidia.com-claim_0b9e7c1a-0000-4e4e-9a9a-000000000001.json"
    )
    other_socket_dir = node.plugins_dir / "gpu.nvidia.com"
    with node.serve(pod_uid="0b9e7c1a-1111-4e4e-9a9a-000000000001") as (_, plugin):
        claim = allocated_claim(api, "left-behind", [result("gpu-0000-1b-00-0", "node-a")])
        assert plugin.prepare([claim])[claim[2]].error == ""
        code, output = cleanup(node, capsys)
        assert code == 1 and "still running on this node" in output
    # The DaemonSet is gone; the claim's spec and the checkpoint stay behind, and a killed
    # instance would also leave its sockets.
    stale(node.registrar_dir / "unidra.dev-0b9e7c1a-2222-4e4e-9a9a-000000000002-reg.sock")
    stale(node.plugin_dir / "dra-0b9e7c1a-2222-4e4e-9a9a-000000000002.sock")
    assert (node.plugin_dir / "checkpoint.json").exists()
    assert cdi.claim_specs(node.cdi_root, "unidra.dev")
    other_spec.write_text("{}")
    other_socket_dir.mkdir()
    code, output = cleanup(node, capsys)
    assert code == 0, output
    assert list(node.plugin_dir.iterdir()) == []
    assert not cdi.claim_specs(node.cdi_root, "unidra.dev")
    assert not list(node.registrar_dir.glob("unidra.dev-*"))
    assert other_spec.exists() and other_socket_dir.is_dir()
    assert "file(s) of unidra.dev removed" in output


def test_cleanup_of_a_clean_node_is_a_no_op(node, capsys) -> None:  # type: ignore[no-untyped-def]
    code, output = cleanup(node, capsys)
    assert code == 0 and "0 file(s)" in output


@pytest.mark.parametrize("flag", ["--force"])
def test_force_cleans_even_with_a_running_instance(node, capsys, flag: str) -> None:  # type: ignore[no-untyped-def]
    with node.serve():
        code, _ = cleanup(node, capsys, flag)
        assert code == 0
    assert kubelet.find_registration_sockets(node.registrar_dir) == []


def test_dry_run_lists_and_removes_nothing(node, api: FakeApiServer, capsys) -> None:  # type: ignore[no-untyped-def]
    with node.serve() as (_, plugin):
        claim = allocated_claim(api, "kept", [result("gpu-0000-1b-00-0", "node-a")])
        assert plugin.prepare([claim])[claim[2]].error == ""
    (spec,) = cdi.claim_specs(node.cdi_root, "unidra.dev").values()
    code, output = cleanup(node, capsys, "--dry-run")
    assert code == 0, output
    assert f"would remove {spec}" in output
    assert f"would remove {node.plugin_dir / 'checkpoint.json'}" in output
    assert spec.exists() and (node.plugin_dir / "checkpoint.json").exists()
