"""The liveness probe's gRPC health service: SERVING while both plugin sockets answer, NOT_SERVING
(with the failing socket named) as soon as one stops, as kubelet's grpc probe would see it."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from driver import daemon


def check(instance: daemon.Daemon, service: str = "") -> str:
    assert instance.liveness is not None
    with grpc.insecure_channel(f"127.0.0.1:{instance.liveness.port}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_serving_while_both_sockets_answer(running) -> None:  # type: ignore[no-untyped-def]
    instance, _ = running
    assert check(instance) == "SERVING"
    assert check(instance, "registration") == check(instance, "dra") == "SERVING"


def test_a_dra_socket_that_stops_answering_fails_the_probe(running) -> None:  # type: ignore[no-untyped-def]
    instance, _ = running
    instance.servers.dra.path.unlink()  # e.g. someone cleaned /var/lib/kubelet/plugins
    assert check(instance) == "NOT_SERVING"
    assert check(instance, "dra") == "NOT_SERVING"
    assert check(instance, "registration") == "SERVING"


def test_a_registration_socket_that_stops_answering_fails_the_probe(running) -> None:  # type: ignore[no-untyped-def]
    instance, _ = running
    instance.servers.registration.stop(0)
    assert check(instance) == "NOT_SERVING"
    assert check(instance, "registration") == "NOT_SERVING"


def test_the_probe_can_be_turned_off(node) -> None:  # type: ignore[no-untyped-def]
    instance = daemon.start(node.settings(healthcheck_port=None))
    try:
        assert instance.liveness is None
    finally:
        instance.stop()
