"""Dialling rules and the error model (ErrorInfo survives a real gRPC round trip)."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2

from services.common.config import ServiceConfig
from services.common.errors import ErrorCode, ServiceError, error_details, invalid_argument
from services.common.grpc_server import GrpcServer
from services.common.net import create_channel, dial_host, dial_target, strip_scheme


@pytest.mark.parametrize(("bind", "dial"), [
    ("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("[::]", "::1"), ("", "127.0.0.1"),
    ("10.1.2.3", "10.1.2.3"), ("localhost", "localhost"),
])
def test_wildcard_binds_are_dialled_on_loopback(bind: str, dial: str) -> None:
    assert dial_host(bind) == dial


def test_targets() -> None:
    assert dial_target("::", 5) == "[::1]:5"
    assert dial_target("0.0.0.0", 5) == "127.0.0.1:5"
    assert strip_scheme("grpc://h:1/") == "h:1"
    assert strip_scheme("h:1") == "h:1"


async def _failing_check(request: health_pb2.HealthCheckRequest, context: object) -> None:
    raise invalid_argument("service", "no such service: " + request.service)


def _add_failing(servicer: object, server: grpc.aio.Server) -> None:
    handler = grpc.unary_unary_rpc_method_handler(
        _failing_check, request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("probe.Failing", {"Check": handler}),))


async def test_service_error_reaches_the_client_with_error_info(monkeypatch) -> None:
    # A dead proxy in the environment must not capture internal channels.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("grpc_proxy", "http://127.0.0.1:9")
    server = GrpcServer(ServiceConfig(host="0.0.0.0", port=0), service="probe")
    server.add_service(_add_failing, None, "probe.Failing")
    port = await server.start()
    try:
        channel = create_channel(dial_target("0.0.0.0", port))
        check = channel.unary_unary(
            "/probe.Failing/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await check(health_pb2.HealthCheckRequest(service="x"), timeout=5)
        remote = error_details(exc.value)
        assert remote.code is ErrorCode.INVALID_ARGUMENT
        assert remote.reason == "INVALID_ARGUMENT"
        assert remote.metadata == {"field": "service"}
        assert "no such service: x" in remote.message
        await channel.close()
    finally:
        await server.stop(0)


def test_error_codes_map_to_http() -> None:
    assert ErrorCode.NOT_FOUND.http_status == 404
    assert ErrorCode.UNAVAILABLE.http_status == 503
    assert ErrorCode.from_grpc(grpc.StatusCode.RESOURCE_EXHAUSTED) is ErrorCode.RESOURCE_EXHAUSTED
    error = ServiceError(ErrorCode.NOT_FOUND, "MODEL_NOT_FOUND", "model 'x' not found", {"model": "x"})
    assert error.to_status().code == grpc.StatusCode.NOT_FOUND


def test_free_port_never_hands_out_a_port_twice() -> None:
    """Ports are bound only when a service starts; two services must never be given one port."""
    from services.common.net import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
