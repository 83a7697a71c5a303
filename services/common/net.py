"""Addresses: how a service is dialled, and gRPC channels that never go through a proxy."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

import grpc

# Wildcard binds are dialled on loopback: 0.0.0.0 is not an address to connect to.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1", "*": "127.0.0.1", "": "127.0.0.1"}

# Internal channels: no HTTP proxy ever (a grpc_proxy/http_proxy in the environment must not
# capture loopback or service traffic), HTTP/2 keepalive, generous message and window sizes.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.enable_http_proxy", 0),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def dial_host(host: str) -> str:
    """The host to connect to for a service bound on ``host``."""
    return _WILDCARDS.get(host, host)


def format_target(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed."""
    try:
        if ipaddress.ip_address(host.strip("[]")).version == 6:
            return f"[{host.strip('[]')}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def dial_target(host: str, port: int) -> str:
    """The gRPC target that reaches a service bound on ``host:port``."""
    return format_target(dial_host(host), port)


def strip_scheme(url: str) -> str:
    """``grpc://h:p`` -> ``h:p``; a bare ``h:p`` is returned as is."""
    for scheme in ("grpc://", "grpcs://", "http://", "https://"):
        if url.startswith(scheme):
            return url[len(scheme):].rstrip("/")
    return url.rstrip("/")


def create_channel(
    target: str, interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None
) -> grpc.aio.Channel:
    """An insecure async channel to an internal service, proxy-free, with trace propagation."""
    from services.common.telemetry import client_interceptors

    all_interceptors = list(client_interceptors()) + list(interceptors or [])
    return grpc.aio.insecure_channel(
        strip_scheme(target), options=CHANNEL_OPTIONS, interceptors=all_interceptors
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tests and the local supervisor)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
