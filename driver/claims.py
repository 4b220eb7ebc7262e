"""Read a ResourceClaim as allocated: which devices of ours it holds and the opaque config it carries.

Pure functions over the claim's JSON (resource.k8s.io/v1); fetching it is driver.kubeapi's job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from driver.errors import ClaimError

# The API's limits: namespaces, device and request names are DNS labels, claim names DNS
# subdomains, UIDs the server's UUIDs. Anything longer names no real object, so errors and logs
# show at most this much of it: a 100,000-character name from a broken client must not flood them.
MAX_LABEL = 63
MAX_NAME = 253
MAX_UID = 36


def shown(text: str, limit: int) -> str:
    """`text` cut to `limit` characters for errors and logs, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...(+{len(text) - limit} characters)"


_SHARE_ID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


@dataclass(frozen=True, slots=True)
class ClaimRef:
    """A claim as kubelet names it in NodePrepareResources."""

    namespace: str
    name: str
    uid: str

    def __str__(self) -> str:
        return f"{shown(self.namespace, MAX_LABEL)}/{shown(self.name, MAX_NAME)}"

    @property
    def shown_uid(self) -> str:
        """The UID as errors and logs show it."""
        return shown(self.uid, MAX_UID)


@dataclass(frozen=True, slots=True)
class AllocationResult:
    """One allocated device (`status.allocation.devices.results[]`)."""

    request: str
    driver: str
    pool: str
    device: str
    admin_access: bool = False
    share_id: str | None = None
    # What a share consumed of each capacity (`consumedCapacity`), as quantity strings.
    consumed: tuple[tuple[str, str], ...] = ()

    @property
    def base_request(self) -> str:
        """The main request name: `gpu` for a `gpu/big` subrequest, as containers reference it."""
        return self.request.split("/", 1)[0]


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    """One opaque config entry (`status.allocation.devices.config[]`)."""

    index: int
    source: str
    requests: tuple[str, ...]
    driver: str
    parameters: object

    @property
    def path(self) -> str:
        return f"status.allocation.devices.config[{self.index}]"


@dataclass(frozen=True, slots=True)
class Consumer:
    """An object the claim is reserved for (`status.reservedFor[]`), usually a pod."""

    resource: str
    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class AllocatedClaim:
    ref: ClaimRef
    results: tuple[AllocationResult, ...]
    config: tuple[ConfigEntry, ...]
    reserved_for: tuple[Consumer, ...]


def parse(obj: Mapping[str, object], ref: ClaimRef) -> AllocatedClaim:
    """Check that the fetched object is the claim kubelet meant and that it is allocated."""
    meta = _mapping(obj.get("metadata"), "metadata")
    uid = meta.get("uid")
    if uid != ref.uid:
        raise ClaimError(
            f"claim {ref} has UID {shown(str(uid), MAX_UID)}, but kubelet asked for UID "
            f"{ref.shown_uid}: the claim was deleted and recreated"
        )
    status = _mapping(obj.get("status"), "status")
    allocation = status.get("allocation")
    if not allocation:
        raise ClaimError(f"claim {ref} is not allocated (status.allocation is empty)")
    devices = _mapping(
        _mapping(allocation, "status.allocation").get("devices"), "status.allocation.devices"
    )
    results = tuple(
        _result(item, f"status.allocation.devices.results[{i}]")
        for i, item in enumerate(_list(devices.get("results"), "status.allocation.devices.results"))
    )
    config = tuple(
        _config(item, i)
        for i, item in enumerate(_list(devices.get("config"), "status.allocation.devices.config"))
    )
    reserved = tuple(
        _consumer(item, f"status.reservedFor[{i}]")
        for i, item in enumerate(_list(status.get("reservedFor"), "status.reservedFor"))
    )
    return AllocatedClaim(ref=ref, results=results, config=config, reserved_for=reserved)


def results_for(claim: AllocatedClaim, driver: str, pool: str) -> tuple[AllocationResult, ...]:
    """The results of this driver in this node's pool; a claim with none of them is an error."""
    ours = tuple(r for r in claim.results if r.driver == driver and r.pool == pool)
    if ours:
        _refuse_duplicates(claim.ref, ours)
        return ours
    elsewhere = sorted(
        {f"{shown(r.driver, MAX_LABEL)}/{shown(r.pool, MAX_NAME)}" for r in claim.results}
    )
    where = ", ".join(elsewhere) if elsewhere else "no devices at all"
    raise ClaimError(
        f"claim {claim.ref} has no devices of driver {driver} in pool {pool} (it has {where})"
    )


def _refuse_duplicates(ref: ClaimRef, results: tuple[AllocationResult, ...]) -> None:
    """One allocation of a device per claim, except shares of one device (each with its shareID)."""
    seen: dict[tuple[str, str | None], AllocationResult] = {}
    for result in results:
        key = (result.device, result.share_id)
        first = seen.get(key)
        if first is None:
            seen[key] = result
        else:
            share = f" with shareID {shown(result.share_id, MAX_UID)}" if result.share_id else ""
            raise ClaimError(
                f"claim {ref} lists device {shown(result.device, MAX_LABEL)}{share} twice "
                f"(requests {shown(first.request, MAX_LABEL)} and {shown(result.request, MAX_LABEL)}); "
                "a device is allocated at most once per claim"
            )


def _result(item: object, path: str) -> AllocationResult:
    data = _mapping(item, path)
    share_id = data.get("shareID")
    if share_id is not None and not (isinstance(share_id, str) and _SHARE_ID.match(share_id)):
        # It becomes part of CDI device names: only the UUIDs the scheduler writes are accepted.
        raise ClaimError(f"malformed claim: {path}.shareID {share_id!r} is not a UUID")
    consumed = data.get("consumedCapacity") or {}
    if not isinstance(consumed, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in consumed.items()
    ):
        raise ClaimError(f"malformed claim: {path}.consumedCapacity is not a map of quantities")
    return AllocationResult(
        request=_string(data, "request", path),
        driver=_string(data, "driver", path),
        pool=_string(data, "pool", path),
        device=_string(data, "device", path),
        admin_access=data.get("adminAccess") is True,
        share_id=share_id or None,
        consumed=tuple(sorted(consumed.items())),
    )


def _consumer(item: object, path: str) -> Consumer:
    data = _mapping(item, path)
    return Consumer(
        resource=str(data.get("resource", "")),
        name=str(data.get("name", "")),
        uid=str(data.get("uid", "")),
    )


def _config(item: object, index: int) -> ConfigEntry:
    path = f"status.allocation.devices.config[{index}]"
    data = _mapping(item, path)
    opaque = data.get("opaque")
    if opaque is None:
        raise ClaimError(f"{path}: only opaque config is supported")
    opaque_data = _mapping(opaque, f"{path}.opaque")
    return ConfigEntry(
        index=index,
        source=str(data.get("source", "")),
        requests=tuple(str(r) for r in _list(data.get("requests"), f"{path}.requests")),
        driver=_string(opaque_data, "driver", f"{path}.opaque"),
        parameters=opaque_data.get("parameters"),
    )


def _mapping(value: object, path: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ClaimError(f"malformed claim: {path} is not an object")
    return value


def _list(value: object, path: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ClaimError(f"malformed claim: {path} is not a list")
    return value


def _string(data: Mapping[str, object], key: str, path: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise ClaimError(f"malformed claim: {path}.{key} is missing")
    return value
