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


def ours(*results: dict[str, object]) -> claims.AllocatedClaim:
    return claims.parse(claim(allocation(list(results))), REF)


def gpu(device: str, request: str = "gpu", **extra: object) -> dict[str, object]:
    return {"request": request, "driver": "d", "pool": "p", "device": device, **extra}


def test_a_device_listed_twice_in_one_claim_is_refused() -> None:
    twice = ours(gpu("gpu-0", "a"), gpu("gpu-1", "b"), gpu("gpu-0", "c"))
    with pytest.raises(ClaimError, match="lists device gpu-0 twice \\(requests a and c\\)"):
        claims.results_for(twice, "d", "p")


def test_shares_of_one_device_are_distinct_but_one_share_twice_is_not() -> None:
    one, two = "5e1f0000-0000-4000-8000-000000000001", "5e1f0000-0000-4000-8000-000000000002"
    shares = ours(gpu("gpu-0", shareID=one), gpu("gpu-0", shareID=two))
    assert len(claims.results_for(shares, "d", "p")) == 2
    same = ours(gpu("gpu-0", shareID=one), gpu("gpu-0", "other", shareID=one))
    with pytest.raises(ClaimError, match=f"lists device gpu-0 with shareID {one} twice"):
        claims.results_for(same, "d", "p")


def test_names_and_uids_are_cut_to_the_api_maximums_in_messages() -> None:
    ref = ClaimRef("n" * 100_000, "c" * 100_000, "u" * 100_000)
    namespace, name = str(ref).split("/")
    assert namespace == "n" * 63 + "...(+99937 characters)"
    assert name == "c" * 253 + "...(+99747 characters)"
    assert ref.shown_uid == "u" * 36 + "...(+99964 characters)"
    short = ClaimRef("default", "c", "0b9e7c1a-1111-4e4e-9a9a-000000000001")
    assert str(short) == "default/c" and short.shown_uid == short.uid
    with pytest.raises(ClaimError) as refused:
        claims.parse(claim(allocation([RESULT]), uid="x" * 5000), ref)
    assert len(str(refused.value)) < 600
