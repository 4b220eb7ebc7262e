"""The DRA gRPC services (v1 and v1beta1): protobuf <-> domain translation and per-claim errors only.

One bad claim never fails the whole call: every requested claim UID gets exactly one entry,
carrying either devices or an error kubelet shows in the pod's events.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any, Protocol

import grpc

from driver.checkpoint import PreparedDevice
from driver.claims import ClaimRef
from driver.errors import UnidraError
from driver.kubelet.gen.dra.v1 import api_pb2 as v1_pb2
from driver.kubelet.gen.dra.v1 import api_pb2_grpc as v1_grpc
from driver.kubelet.gen.dra.v1beta1 import api_pb2 as v1beta1_pb2
from driver.kubelet.gen.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc

log = logging.getLogger(__name__)

# Advertised in registration, in preference order: kubelet takes the first one it knows.
DRA_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")


class ClaimHandler(Protocol):
    def prepare(self, ref: ClaimRef) -> tuple[PreparedDevice, ...]: ...

    def unprepare(self, ref: ClaimRef) -> None: ...


class DRAPluginServicer:
    """NodePrepareResources / NodeUnprepareResources for one API version (its pb2 module)."""

    def __init__(self, pb2: ModuleType, handler: ClaimHandler, share_ids: bool) -> None:
        self.pb2 = pb2
        self.handler = handler
        self.share_ids = share_ids

    def NodePrepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self.pb2.NodePrepareResourcesResponse()
        for claim in request.claims:
            if claim.uid in response.claims:
                continue
            entry = response.claims[claim.uid]
            try:
                devices = self.handler.prepare(_ref(claim))
            except Exception as err:
                entry.error = _describe("prepare", claim, err)
                continue
            entry.devices.extend(self._device(device) for device in devices)
        return response

    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        response = self.pb2.NodeUnprepareResourcesResponse()
        for claim in request.claims:
            if claim.uid in response.claims:
                continue
            entry = response.claims[claim.uid]
            try:
                self.handler.unprepare(_ref(claim))
            except Exception as err:
                entry.error = _describe("unprepare", claim, err)
        return response

    def _device(self, device: PreparedDevice) -> Any:
        message = self.pb2.Device(
            request_names=[device.base_request] if device.base_request else [],
            pool_name=device.pool,
            device_name=device.device,
            cdi_device_ids=list(device.cdi_ids),
        )
        if self.share_ids and device.share_id:
            message.share_id = device.share_id
        return message


def add_dra_services(server: grpc.Server, handler: ClaimHandler) -> None:
    """Serve both kubelet DRA API versions on one server."""
    v1_grpc.add_DRAPluginServicer_to_server(
        DRAPluginServicer(v1_pb2, handler, share_ids=True), server
    )
    v1beta1_grpc.add_DRAPluginServicer_to_server(
        DRAPluginServicer(v1beta1_pb2, handler, share_ids=False), server
    )


def _ref(claim: Any) -> ClaimRef:
    return ClaimRef(namespace=claim.namespace, name=claim.name, uid=claim.uid)


def _describe(operation: str, claim: Any, err: Exception) -> str:
    where = {"claim": f"{claim.namespace}/{claim.name}", "uid": claim.uid, "operation": operation}
    if isinstance(err, UnidraError):
        log.warning("Claim failed", extra={**where, "error": str(err)})
        return str(err)
    log.exception("Unexpected error while handling claim", extra=where)
    return f"internal error in the Unidra driver ({type(err).__name__}: {err}); see the driver log"
