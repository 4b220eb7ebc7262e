"""Random and malformed input never crashes the daemon or breaks its state.

- opaque DeviceConfig (with its sharing section) and allocated-claim JSON (with share IDs and
  consumed capacity): the decoders raise only their own errors;
- random shares (share IDs, consumed capacity, sharing configs) prepared through the plugin:
  per-claim errors, never an internal error, and the state stays sound;
- NodePrepareResources/NodeUnprepareResources with random bytes and with random claim names,
  namespaces and UIDs: gRPC errors or per-claim errors, never an internal error, no file outside
  the driver's directories, and the daemon keeps serving;
- the control socket with random lines: an error answer, and it keeps answering.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver import cdi, claims, opaque
from driver.claims import ClaimRef
from driver.demo.apiserver import ApiServer as FakeApiServer
from driver.errors import ClaimError, ConfigError
from driver.kubelet.gen.dra.v1 import api_pb2
from support.claims import allocated_claim, device_config, result
from support.processes import checkpoint_claims
from support.reliability import TALLY, budget

EXAMPLES = settings(
    max_examples=budget("fuzz_examples"),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=80)
UID = "7f1e2d3c-0000-4000-8000-00000000000a"
VALID_CLAIM: dict[str, Any] = {
    "metadata": {"name": "c", "namespace": "default", "uid": UID},
    "status": {
        "allocation": {
            "devices": {
                "results": [
                    {
                        "request": "gpu",
                        "driver": "unidra.dev",
                        "pool": "node-a",
                        "device": "gpu-0",
                        "shareID": "3754b937-84d7-4c7e-8c8c-f8a1cc0301ec",
                        "consumedCapacity": {"memory": "30Gi", "computeUnits": "0"},
                    }
                ],
                "config": [
                    {
                        "source": "FromClaim",
                        "requests": [],
                        "opaque": {
                            "driver": "unidra.dev",
                            "parameters": {
                                "apiVersion": opaque.API_VERSION,
                                "kind": opaque.KIND,
                                "env": {"A": "1"},
                                "sharing": {"strategy": "MPS", "limits": {"memory": "20Gi"}},
                            },
                        },
                    }
                ],
            }
        },
        "reservedFor": [{"resource": "pods", "name": "p", "uid": "pod-1"}],
    },
}


SHARING = st.fixed_dictionaries(
    {},
    optional={
        "strategy": st.sampled_from(["Exclusive", "TimeSlicing", "MPS", "mps"]) | JSON,
        "interval": st.sampled_from(["Default", "Short", "Long", "Fast"]) | JSON,
        "limits": st.dictionaries(
            st.sampled_from(["memory", "computeUnits", "power"]),
            st.sampled_from(["20Gi", "0Gi", "1.5Gi", "1", 1, 0, 33]) | JSON,
            max_size=3,
        )
        | JSON,
    },
)
NEAR_VALID_CONFIG = st.fixed_dictionaries(
    {
        "apiVersion": st.sampled_from([opaque.API_VERSION, "resource.unidra.dev/v2"]),
        "kind": st.sampled_from([opaque.KIND, "Other"]),
    },
    optional={
        "env": st.dictionaries(TEXT, TEXT | JSON, max_size=40),
        "sharing": SHARING | JSON,
        "extra": JSON,
    },
)
SHARE_RESULT = st.fixed_dictionaries(
    {
        "request": st.just("gpu"),
        "driver": st.just("unidra.dev"),
        "pool": st.just("node-a"),
        "device": st.sampled_from(["gpu-0000-1b-00-0", "gpu-0000-43-00-0", "gpu-0000-ff-00-0"]),
    },
    optional={
        # Mostly what the scheduler writes, sometimes anything.
        "shareID": st.one_of(st.uuids().map(str), st.uuids().map(str), TEXT | JSON),
        "consumedCapacity": st.dictionaries(
            st.sampled_from(["memory", "computeUnits", "unidra.dev/memory", "x"]),
            st.sampled_from(["30Gi", "0", "33", "79Gi", "200Gi", "-1", "1.5", "lots"]),
            max_size=3,
        )
        | JSON,
        "adminAccess": st.booleans(),
    },
)


@EXAMPLES
@given(parameters=JSON | NEAR_VALID_CONFIG)
def test_opaque_config_decoding_raises_only_config_errors(parameters: Any) -> None:
    try:
        decoded = opaque.decode(parameters, "parameters")
    except ConfigError:
        TALLY["fuzz: opaque configs rejected"] += 1
        return
    assert all(isinstance(v, str) for v in decoded.env.values())
    TALLY["fuzz: opaque configs accepted"] += 1


@EXAMPLES
@given(data=st.data())
def test_claim_decoding_raises_only_claim_or_config_errors(data: st.DataObject) -> None:
    claim = copy.deepcopy(VALID_CLAIM)
    node: Any = claim
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = data.draw(st.sampled_from(keys))
        if not isinstance(node[key], dict | list) or data.draw(st.booleans()):
            if isinstance(node, dict) and data.draw(st.booleans()):
                del node[key]
            else:
                node[key] = data.draw(JSON)
            break
        node = node[key]
    try:
        parsed = claims.parse(claim, ClaimRef("default", "c", UID))
        opaque.decode_all(parsed.config, "unidra.dev")
    except (ClaimError, ConfigError):
        TALLY["fuzz: damaged claims rejected"] += 1
        return
    TALLY["fuzz: damaged claims accepted"] += 1


def raw_call(plugin, method: str, payload: bytes) -> bytes | grpc.StatusCode:  # type: ignore[no-untyped-def]
    """The answer's bytes, or the gRPC status it failed with."""
    service = api_pb2.DESCRIPTOR.services_by_name["DRAPlugin"].full_name
    call = plugin.channel.unary_unary(
        f"/{service}/{method}", request_serializer=None, response_deserializer=None
    )
    try:
        answer: bytes = call(payload, timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return answer


@pytest.fixture
def watched(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING)
    return caplog


def assert_still_sound(node, plugin, api: FakeApiServer, caplog) -> None:  # type: ignore[no-untyped-def]
    assert "Unexpected error while handling claim" not in caplog.text
    recorded, specs = checkpoint_claims(node), cdi.claim_specs(node.cdi_root, "unidra.dev")
    assert set(recorded) == set(specs)
    for path in node.root.rglob("*"):
        if path.is_file() or path.is_socket():
            assert path.parent in (node.cdi_root, node.plugin_dir, node.registrar_dir, node.root), (
                path
            )
    claim = allocated_claim(
        api, f"after-{len(api.requests)}", [result("gpu-0000-df-00-0", "node-a")]
    )
    assert plugin.prepare([claim])[claim[2]].error == ""
    assert plugin.unprepare([claim])[claim[2]].error == ""


@EXAMPLES
@given(
    payload=st.binary(max_size=300),
    method=st.sampled_from(["NodePrepareResources", "NodeUnprepareResources"]),
)
def test_random_bytes_on_the_dra_socket(
    running, node, api, watched, payload: bytes, method: str
) -> None:  # type: ignore[no-untyped-def]
    _, plugin = running
    answer = raw_call(plugin, method, payload)
    if isinstance(answer, bytes):
        getattr(api_pb2, f"{method}Response").FromString(answer)
    else:  # undecodable request: refused by gRPC before the driver sees it
        assert answer in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT)
    TALLY["fuzz: random DRA payloads"] += 1
    assert_still_sound(node, plugin, api, watched)


@EXAMPLES
@given(refs=st.lists(st.tuples(TEXT, TEXT, TEXT | st.uuids().map(str)), min_size=1, max_size=4))
def test_random_claim_references(
    running, node, api, watched, refs: list[tuple[str, str, str]]
) -> None:  # type: ignore[no-untyped-def]
    _, plugin = running
    answers = plugin.prepare(refs)
    assert set(answers) == {uid for _, _, uid in refs}
    assert all(a.error and "internal error" not in a.error for a in answers.values()), answers
    plugin.unprepare(refs)
    TALLY["fuzz: random claim references"] += len(refs)
    assert_still_sound(node, plugin, api, watched)


@EXAMPLES
@given(
    results=st.lists(SHARE_RESULT, min_size=1, max_size=3),
    section=st.one_of(st.none(), st.none(), SHARING, JSON),
)
def test_random_shares_through_the_plugin(
    running, node, api, watched, results: list[dict[str, Any]], section: Any
) -> None:  # type: ignore[no-untyped-def]
    _, plugin = running
    config = [] if section is None else [device_config({"sharing": section})]
    claim = allocated_claim(api, f"share-{len(api.requests)}", results, config=config)
    answer = plugin.prepare([claim])[claim[2]]
    assert "internal error" not in answer.error, answer.error
    TALLY["fuzz: random shares " + ("refused" if answer.error else "prepared")] += 1
    assert plugin.unprepare([claim])[claim[2]].error == ""
    assert_still_sound(node, plugin, api, watched)


@EXAMPLES
@given(line=st.binary(min_size=1, max_size=200).filter(lambda b: b"\n" not in b))
def test_random_lines_on_the_control_socket(running, node, line: bytes) -> None:  # type: ignore[no-untyped-def]
    path = Path(node.plugin_dir) / "control.sock"
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(os.fspath(path))
        client.sendall(line + b"\n")
        answer = client.makefile("rb").readline()
    assert b'"error"' in answer or b'"devices"' in answer
    TALLY["fuzz: random control-socket lines"] += 1
