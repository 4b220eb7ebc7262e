"""Reading allocated claims: identity checks, our results, and precise errors for malformed objects."""

from __future__ import annotations

import pytest

from driver import claims
from driver.claims import ClaimRef
from driver.errors import ClaimError

REF = ClaimRef("ns", "c", "uid-1")


def claim(status: object, uid: str = "uid-1") -> dict[str, object]:
    return {"metadata": {"name": "c", "namespace": "ns", "uid": uid}, "status": status}


def allocation(results: list[object], config: list[object] | None = None) -> dict[str, object]:
    return {"allocation": {"devices": {"results": results, "config": config or []}}}


RESULT = {
    "request": "gpu/big",
    "driver": "d",
    "pool": "p",
    "device": "x",
    "adminAccess": True,
    "shareID": "3754b937-84d7-4c7e-8c8c-f8a1cc0301ec",
    "consumedCapacity": {"memory": "30Gi", "computeUnits": "0"},
}


def test_parse_reads_results_config_and_consumers() -> None:
    status = allocation(
        [RESULT],
        [
            {
                "source": "FromClass",
                "requests": ["gpu"],
                "opaque": {"driver": "d", "parameters": {"a": 1}},
            }
        ],
    )
    status["reservedFor"] = [{"resource": "pods", "name": "p1", "uid": "pod-uid"}]
    parsed = claims.parse(claim(status), REF)
    assert parsed.results[0].base_request == "gpu"
    assert parsed.results[0].admin_access
    # As the 1.36 scheduler writes them: a UUID, and every capacity of the shareable device.
    assert parsed.results[0].share_id == "3754b937-84d7-4c7e-8c8c-f8a1cc0301ec"
    assert dict(parsed.results[0].consumed) == {"memory": "30Gi", "computeUnits": "0"}
    assert parsed.config[0].source == "FromClass" and parsed.config[0].parameters == {"a": 1}
    assert parsed.reserved_for[0].uid == "pod-uid"


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (
            claim(allocation([RESULT]), uid="other"),
            "has UID other, but kubelet asked for UID uid-1",
        ),
        (claim({}), "is not allocated"),
        (claim(None), "status is not an object"),
        (claim(allocation(["x"])), r"results\[0\] is not an object"),
        (claim(allocation([{**RESULT, "device": ""}])), r"results\[0\]\.device is missing"),
        (claim(allocation([RESULT], [{"requests": []}])), "only opaque config is supported"),
        # A share ID becomes part of a CDI device name: nothing but a UUID gets there.
        (claim(allocation([{**RESULT, "shareID": "../x"}])), r"shareID '\.\./x' is not a UUID"),
        (claim(allocation([{**RESULT, "shareID": 7}])), "shareID 7 is not a UUID"),
        (
            claim(allocation([{**RESULT, "consumedCapacity": {"memory": 30}}])),
            r"consumedCapacity is not a map of quantities",
        ),
        ({"status": {}}, "metadata is not an object"),
    ],
)
def test_malformed_or_mismatched_claims(obj: dict[str, object], message: str) -> None:
    with pytest.raises(ClaimError, match=message):
        claims.parse(obj, REF)


def test_results_for_filters_driver_and_pool() -> None:
    parsed = claims.parse(
        claim(allocation([RESULT, {**RESULT, "pool": "q"}, {**RESULT, "driver": "e"}])), REF
    )
    assert [r.pool for r in claims.results_for(parsed, "d", "p")] == ["p"]
    with pytest.raises(
        ClaimError, match=r"no devices of driver d in pool z \(it has d/p, d/q, e/p\)"
    ):
        claims.results_for(parsed, "d", "z")
