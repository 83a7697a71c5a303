"""The worker's ``Generate`` over grpclib: HTTP/2 spoken from the event loop itself.

grpc.aio polls its completion queue on a thread of its own and wakes the event loop through
a socket for every completed operation, so a streamed ``Generate`` pays a thread hop per
token. grpclib (h2 on an asyncio protocol) reads the same frames in the loop's own callbacks:
a streamed message costs a frame parse and a future. Side by side on one sim worker
(``benchmarks/worker_transport.py``, c = 1): 0.70x the client CPU and 0.64x the p50 of a
9-message stream, 0.82x the CPU of a one-message call (docs/overhead.md, "The worker stream
over grpclib").

Opt-in (the router's ``--worker-transport grpclib``) because of one thing it cannot do: h2
accepts no frame after a GOAWAY, so when a worker shuts down gracefully its streams in flight
end at once (UNAVAILABLE; retried elsewhere if nothing was relayed yet) where grpc.aio lets them
finish within the worker's grace period: each worker restart costs the answers it was
streaming. Use it where that is worth the saving.

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
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
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
            self._channel = Channel(self._host, self._port, codec=_MessageOrBytes(),
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
