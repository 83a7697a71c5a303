"""The worker's ``Generate`` over grpclib: HTTP/2 spoken from the event loop itself.

grpc.aio polls its completion queue on a thread of its own and wakes the event loop through
a socket for every completed operation, so a streamed ``Generate`` pays a thread hop per
token. grpclib (h2 on an asyncio protocol) reads the same frames in the loop's own callbacks:
a streamed message costs a frame parse and a future. Side by side on one sim worker
(``benchmarks/worker_transport.py``, c = 1): 0.70x the client CPU and 0.64x the p50 of a
9-message stream, 0.82x the CPU of a one-message call (docs/overhead.md, "The worker stream
over grpclib").

The router's default (``--worker-transport grpclib``; ``grpcio`` reads ``Generate`` on the
worker's grpc.aio channel instead). Stock h2 closes a connection on any GOAWAY and then takes no
frame, so a worker that shut down gracefully would cut off the answers it was streaming; the
connections made here keep reading the streams the worker promised to finish (as grpc.aio does)
and send new calls to a new connection (:class:`_DrainingProcessor`).

Only ``Generate`` — the per-token hot path, once per leg of every request — goes this way.
Every other worker call (health, loads, model info, abort, KV events) stays on the worker's
grpc.aio channel. Failures come back as ``grpc.aio.AioRpcError`` with the worker's code,
message and status details (``grpc-status-details-bin``, which carries its ``ErrorInfo``),
exactly as from grpc.aio, so retries, breakers and the relay of a worker's error to the
caller do not know which transport ran the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import grpc
from grpclib.client import Channel, Handler
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import EventsProcessor, H2Protocol
from grpclib.protocol import Stream as H2Stream
from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from h2.exceptions import H2Error
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from services.common.net import split_host_port
from services.router.relay import GENERATE

# Pings only while calls are open: they find a worker that vanished mid-stream (its TCP
# connection silent) within keepalive_time + keepalive_timeout. Idle connections need none:
# the worker's grpc.aio channel and its health checks watch the worker between requests.
# grpclib's own limits on pings without data match gRPC servers' default ping policy.
_CONFIG = Configuration(
    _keepalive_time=30.0,
    _keepalive_timeout=10.0,
    _keepalive_permit_without_calls=False,
)


class _MessageOrBytes(CodecBase):
    """Protobuf messages; a reply type of ``bytes`` gets the worker's bytes undecoded (the
    router's own ``Generate`` relays them as they came: :mod:`services.router.relay`)."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message.SerializeToString()  # type: ignore[no-any-return]

    def decode(self, data: bytes, message_type: Any) -> Any:
        if message_type is bytes:
            return data
        return message_type.FromString(data)


class _RawStatusDetails(StatusDetailsCodecBase):
    """Keeps ``grpc-status-details-bin`` as its bytes, to hand on unchanged."""

    def encode(self, status: Any, message: str | None, details: Any) -> bytes:
        raise NotImplementedError("a client sends no status details")

    def decode(self, status: Any, message: str | None, data: bytes) -> bytes:
        return data


def _rpc_error(code: grpc.StatusCode, message: str, details: bytes | None = None
               ) -> grpc.aio.AioRpcError:
    trailers = (("grpc-status-details-bin", details),) if details else ()
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), message)


class _DrainingStateMachine(H2ConnectionStateMachine):
    """h2's connection state machine, except that a GOAWAY leaves an open connection open.

    h2 closes the connection on any GOAWAY and then refuses every frame, so the streams a server
    promised to finish (those up to the GOAWAY's ``last_stream_id``: RFC 9113 section 6.8)
    could not be read. Which streams may still be opened is :class:`_DrainingProcessor`'s
    business: none, once a GOAWAY came."""

    _transitions = {
        **H2ConnectionStateMachine._transitions,
        (ConnectionState.CLIENT_OPEN, ConnectionInputs.RECV_GOAWAY):
            (None, ConnectionState.CLIENT_OPEN),
    }


class _DrainingProcessor(EventsProcessor):
    """grpclib's event handling, except for a graceful GOAWAY (``NO_ERROR``, how a gRPC server
    that stops with a grace period says so): new calls go to a new connection, streams the
    server will not process (above ``last_stream_id``) end as UNAVAILABLE, safe to retry, and
    the rest run to their end; the connection closes when the last one is done. A GOAWAY with
    an error ends every stream at once, as grpclib does."""

    draining = False

    def process_connection_terminated(self, event: ConnectionTerminated) -> None:
        if event.error_code != ErrorCodes.NO_ERROR:
            super().process_connection_terminated(event)
            return
        self.draining = True
        self.handler.close()  # the channel's next call connects anew
        reason = "the worker is shutting down (GOAWAY) before it took the call"
        for stream_id, stream in list(self.streams.items()):
            if stream_id > (event.last_stream_id or 0):
                stream.__terminated__(reason)
        self._close_if_drained()

    def register(self, stream: H2Stream) -> Any:
        release = super().register(stream)

        def release_stream() -> None:
            release()
            self._close_if_drained()

        return release_stream

    def _close_if_drained(self) -> None:
        if self.draining and not self.streams:
            self.close("drained after GOAWAY")


class _DrainingProtocol(H2Protocol):
    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        h2 = self.connection._connection  # grpclib's H2Connection; grpclib is pinned < 0.5
        machine = _DrainingStateMachine()
        machine.state = h2.state_machine.state
        h2.state_machine = machine
        self.processor = _DrainingProcessor(self.handler, self.connection)


class _DrainingChannel(Channel):
    """A grpclib channel whose connections finish their streams through a graceful GOAWAY."""

    def _protocol_factory(self) -> H2Protocol:
        return _DrainingProtocol(Handler(), self._config, self._h2_config)


def _raise_for_status(stream: Any) -> None:
    """The worker's status for a stream that ended: its trailers (or trailers-only headers).

    grpclib reads them when the call is left only while the connection is still open, so a
    worker that failed or cancelled the call and then closed the connection (one shutting
    down) would pass for a complete answer; a stream that ended without any status is not one
    either."""
    ended = stream._stream  # grpclib's HTTP/2 stream (grpclib is pinned < 0.5)
    if ended.trailers is None and "grpc-status" not in dict(ended.headers or ()):
        raise _rpc_error(grpc.StatusCode.UNAVAILABLE,
                         "the worker ended the stream without a gRPC status")
    stream._maybe_raise()  # GRPCError for any status but OK


class GenerateChannel:
    """``Generate`` calls to one worker over one HTTP/2 connection, made on first use (and
    again after the connection is lost) on the event loop that uses it."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._host, self._port = split_host_port(target)
        self._channel: Channel | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _open(self) -> Channel:
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop:
            # A channel belongs to the loop it was made on (tests run several loops).
            if self._channel is not None and not self._loop.is_closed():  # type: ignore[union-attr]
                self._channel.close()
            self._channel = _DrainingChannel(self._host, self._port, codec=_MessageOrBytes(),
                                    status_details_codec=_RawStatusDetails(), config=_CONFIG)
            self._loop = loop
        return self._channel

    async def generate(self, request: pb.GenerateRequest, metadata: Sequence[tuple[str, str]],
                       raw: bool = False) -> AsyncGenerator[Any, None]:
        """The worker's responses (their bytes with ``raw``); a failed call raises
        ``grpc.aio.AioRpcError``; closing the generator or cancelling its reader resets the
        stream, which cancels the call on the worker."""
        reply_type: Any = bytes if raw else pb.GenerateResponse
        try:
            async with self._open().request(
                    GENERATE, Cardinality.UNARY_STREAM, pb.GenerateRequest, reply_type,
                    metadata=[(k, v) for k, v in metadata if v]) as stream:
                await stream.send_message(request, end=True)
                async for reply in stream:
                    yield reply
                _raise_for_status(stream)
        except GRPCError as exc:
            raise _rpc_error(grpc.StatusCode[exc.status.name], exc.message or "",
                             exc.details) from None
        except StreamTerminatedError as exc:
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE,
                             f"connection to worker {self.target} lost: {exc}") from None
        except OSError as exc:  # refused, reset, unreachable, name not resolved
            raise _rpc_error(grpc.StatusCode.UNAVAILABLE,
                             f"worker {self.target} unreachable: {exc}") from None
        except (ProtocolError, H2Error) as exc:
            raise _rpc_error(grpc.StatusCode.INTERNAL,
                             f"HTTP/2 protocol error with worker {self.target}: {exc}") from None

    def close(self) -> None:
        if self._channel is not None and self._loop is not None and not self._loop.is_closed():
            self._channel.close()
        self._channel = None
