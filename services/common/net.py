"""Addresses: how a service is dialled, and gRPC channels that never go through a proxy."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any

import grpc

from services.common.telemetry import with_trace_metadata

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


def split_host_port(url: str) -> tuple[str, int]:
    """``grpc://h:p``, ``h:p`` or ``[v6]:p`` -> (host, port); port 0 when there is none."""
    host, _, port = strip_scheme(url).rpartition(":")
    return host.strip("[]"), int(port or 0)


def create_channel(
    target: str, interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None
) -> grpc.aio.Channel:
    """An insecure async channel to an internal service, proxy-free, with trace propagation.

    Every call made through it carries the current trace context (``traceparent``) in its
    metadata. That is done when the call starts (:class:`TracingChannel`), not by grpc.aio
    client interceptors, which cost an extra task and queue hop per call and per message.
    """
    channel = grpc.aio.insecure_channel(
        strip_scheme(target), options=CHANNEL_OPTIONS, interceptors=list(interceptors or ())
    )
    return TracingChannel(channel)


class _TracedCall:
    """A multi-callable that adds the current trace context to the call's metadata."""

    __slots__ = ("_callable",)

    def __init__(self, callable_: Any) -> None:
        self._callable = callable_

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["metadata"] = with_trace_metadata(kwargs.get("metadata"))
        return self._callable(*args, **kwargs)


class TracingChannel(grpc.aio.Channel):
    """A grpc.aio channel whose calls propagate the caller's trace context (W3C headers).

    Generated stubs ask the channel for one multi-callable per method when they are built;
    each is wrapped once, so a call costs one metadata merge and nothing per message.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _TracedCall(self._channel.unary_unary(*args, **kwargs))

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _TracedCall(self._channel.unary_stream(*args, **kwargs))

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _TracedCall(self._channel.stream_unary(*args, **kwargs))

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _TracedCall(self._channel.stream_stream(*args, **kwargs))

    async def __aenter__(self) -> TracingChannel:
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self._channel.close(None)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()


# Ports this process handed out: a port is only bound when the service it is for starts, so the
# OS may offer the same free port twice in between (a router once got history's port).
_handed_out: set[int] = set()


def reserve_port(port: int) -> None:
    """Marks ``port`` as taken by this process, so :func:`free_port` never returns it."""
    _handed_out.add(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago and that this process has not handed out before
    (for tests and the local supervisor)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
