"""The DRA gRPC services (v1 and v1beta1): protobuf <-> domain translation and per-claim errors only.

One bad claim never fails the whole call: every requested claim UID gets exactly one entry,
carrying either devices or an error kubelet shows in the pod's events. The claims of one call
run side by side under one Deadline, so a slow API server costs a call one timeout, not one per
claim, and a claim still running when the budget is spent gets its own retryable error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from types import ModuleType
from typing import Any, Protocol, TypeVar

import grpc

from driver.checkpoint import PreparedDevice
from driver.claims import ClaimRef, shown
from driver.deadlines import Deadline, DeadlineExceeded
from driver.errors import UnidraError
from driver.kubelet.gen.dra.v1 import api_pb2 as v1_pb2
from driver.kubelet.gen.dra.v1 import api_pb2_grpc as v1_grpc
from driver.kubelet.gen.dra.v1beta1 import api_pb2 as v1beta1_pb2
from driver.kubelet.gen.dra.v1beta1 import api_pb2_grpc as v1beta1_grpc

log = logging.getLogger(__name__)

# Advertised in registration, in preference order: kubelet takes the first one it knows.
DRA_SERVICES = ("v1.DRAPlugin", "v1beta1.DRAPlugin")
# Claims of all calls in progress that run at once; more wait their turn inside their deadline.
CLAIM_WORKERS = 16
MAX_INTERNAL_ERROR = 512

T = TypeVar("T")


class ClaimHandler(Protocol):
    def prepare(self, ref: ClaimRef, deadline: Deadline) -> tuple[PreparedDevice, ...]: ...

    def unprepare(self, ref: ClaimRef, deadline: Deadline) -> None: ...


class ClaimRunner:
    """Runs the claims of a call side by side; each gets its result or its own error by the deadline."""

    def __init__(self, workers: int = CLAIM_WORKERS) -> None:
        self._pool = futures.ThreadPoolExecutor(workers, thread_name_prefix="claim")

    def run(
        self,
        refs: Sequence[ClaimRef],
        work: Callable[[ClaimRef, Deadline], T],
        deadline: Deadline,
        operation: str,
    ) -> dict[str, T | Exception]:
        if len(refs) == 1:  # the common case needs no hand-over to another thread
            return {refs[0].uid: _outcome(work, refs[0], deadline)}
        pending = {ref.uid: self._pool.submit(_outcome, work, ref, deadline) for ref in refs}
        futures.wait(pending.values(), timeout=deadline.remaining() + 0.1)
        outcomes: dict[str, T | Exception] = {}
        for ref in refs:
            future = pending[ref.uid]
            if future.done():
                outcomes[ref.uid] = future.result()
            else:
                # Still waiting for the API server or a lock; it gives up at the deadline itself.
                outcomes[ref.uid] = DeadlineExceeded(
                    f"{operation} of claim {ref}: no answer within the call's "
                    f"{deadline.budget:.3g} s budget; kubelet retries"
                )
        return outcomes

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _outcome(
    work: Callable[[ClaimRef, Deadline], T], ref: ClaimRef, deadline: Deadline
) -> T | Exception:
    try:
        return work(ref, deadline)
    except Exception as err:
        return err


class CallObserver(Protocol):
    def __call__(self, operation: str, seconds: float, outside_claims: float) -> None:
        """One call took `seconds` in its handler, `outside_claims` of them not in its claims' work."""
        ...


class DRAPluginServicer:
    """NodePrepareResources / NodeUnprepareResources for one API version (its pb2 module)."""

    def __init__(
        self,
        pb2: ModuleType,
        handler: ClaimHandler,
        runner: ClaimRunner,
        share_ids: bool,
        observe: CallObserver | None = None,
    ) -> None:
        self.pb2 = pb2
        self.handler = handler
        self.runner = runner
        self.share_ids = share_ids
        self.observe = observe

    def NodePrepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        response = self.pb2.NodePrepareResourcesResponse()
        outcomes, in_claims = self._run(request, context, self.handler.prepare, "prepare")
        for ref, outcome in outcomes:
            entry = response.claims[ref.uid]
            if isinstance(outcome, Exception):
                entry.error = _describe("prepare", ref, outcome)
            else:
                entry.devices.extend(self._device(device) for device in outcome)
        self._observe("prepare", started, in_claims)
        return response

    def NodeUnprepareResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        started = time.perf_counter()
        response = self.pb2.NodeUnprepareResourcesResponse()
        outcomes, in_claims = self._run(request, context, self.handler.unprepare, "unprepare")
        for ref, outcome in outcomes:
            entry = response.claims[ref.uid]  # an empty entry is a success
            if isinstance(outcome, Exception):
                entry.error = _describe("unprepare", ref, outcome)
        self._observe("unprepare", started, in_claims)
        return response

    def _observe(self, operation: str, started: float, in_claims: float) -> None:
        if self.observe is not None:
            seconds = time.perf_counter() - started
            self.observe(operation, seconds, seconds - in_claims)

    def _run(
        self,
        request: Any,
        context: grpc.ServicerContext,
        work: Callable[[ClaimRef, Deadline], T],
        operation: str,
    ) -> tuple[list[tuple[ClaimRef, T | Exception]], float]:
        """Each requested claim once, with its outcome, under one deadline for the whole call;
        and the seconds the claims took."""
        refs: dict[str, ClaimRef] = {}
        for claim in request.claims:  # kubelet wants exactly one entry per UID
            refs.setdefault(claim.uid, ClaimRef(claim.namespace, claim.name, claim.uid))
        deadline = Deadline.for_call(context.time_remaining())
        started = time.perf_counter()
        outcomes = self.runner.run(list(refs.values()), work, deadline, operation)
        in_claims = time.perf_counter() - started
        return [(ref, outcomes[ref.uid]) for ref in refs.values()], in_claims

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


def add_dra_services(
    server: grpc.Server,
    handler: ClaimHandler,
    runner: ClaimRunner,
    observe: CallObserver | None = None,
) -> None:
    """Serve both kubelet DRA API versions on one server."""
    v1_grpc.add_DRAPluginServicer_to_server(
        DRAPluginServicer(v1_pb2, handler, runner, share_ids=True, observe=observe), server
    )
    v1beta1_grpc.add_DRAPluginServicer_to_server(
        DRAPluginServicer(v1beta1_pb2, handler, runner, share_ids=False, observe=observe), server
    )


def _describe(operation: str, ref: ClaimRef, err: Exception) -> str:
    where = {"claim": str(ref), "uid": ref.shown_uid, "operation": operation}
    if isinstance(err, UnidraError):
        log.warning("Claim failed", extra={**where, "error": str(err)})
        return str(err)
    log.error(
        "Unexpected error while handling claim",
        extra=where,
        exc_info=(type(err), err, err.__traceback__),
    )
    detail = shown(f"{type(err).__name__}: {err}", MAX_INTERNAL_ERROR)
    return f"internal error in the Unidra driver ({detail}); see the driver log"
