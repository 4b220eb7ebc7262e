"""A 404 says what is missing: a deleted claim is not an unknown node."""

from __future__ import annotations

import pytest

from driver import kubeapi
from driver.claims import ClaimRef
from driver.demo.apiserver import ApiServer as FakeApiServer


def test_an_unknown_node_is_not_called_a_deleted_claim(api: FakeApiServer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = kubeapi.build_client(api.write_kubeconfig(tmp_path / "kubeconfig"))
    with pytest.raises(kubeapi.NotFound) as node:
        kubeapi.SliceApi(client).node_uid("ghost")
    assert "no Node named 'ghost'" in str(node.value) and "claim" not in str(node.value)
    with pytest.raises(kubeapi.NotFound) as claim:
        kubeapi.ClaimReader(client)(ClaimRef("default", "gone", "uid"), timeout=5.0)
    assert "not found (the claim was deleted)" in str(claim.value)
