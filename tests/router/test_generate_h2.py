"""The worker's Generate over grpclib (services.router.generate_h2) against real gRPC servers:
the same messages as grpc.aio, the worker's errors unchanged, cancel reaching the worker, a
worker that is down, goes away mid-stream or comes back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.config import ServiceConfig
from services.common.errors import ErrorCode, ServiceError, error_details, invalid_argument
from services.common.grpc_server import GrpcServer
from services.common.net import create_channel, free_port
from services.router.generate_h2 import GenerateChannel
from services.router.relay import SERVICE
from tests.router.fleet import gen, sim_config, sim_fleet

pytestmark = pytest.mark.asyncio


class _Scripted(pb_grpc.SglangSchedulerServicer):
    """A worker whose Generate does what the request id says: ``fail``: INVALID_ARGUMENT with
    an ErrorInfo naming a field; ``unavailable``: UNAVAILABLE; ``slow``: one message, then one
    every 50 ms until cancelled; ``paced``: ``max_new_tokens`` messages 50 ms apart; otherwise
    ``max_new_tokens`` at once; ``echo...``: one chunk holding the prompt's ids. It records the
    metadata and whether a call ended cancelled."""

    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}
        self.cancelled = asyncio.Event()

    async def Generate(self, request: pb.GenerateRequest, context: Any
                       ) -> AsyncIterator[pb.GenerateResponse]:
        self.metadata = {k: v for k, v in context.invocation_metadata() or ()}
        if request.request_id == "fail":
            raise invalid_argument("sampling_params.stream_interval", "must be >= 1")
        if request.request_id == "unavailable":
            raise ServiceError(ErrorCode.UNAVAILABLE, "LOADING", "the model is still loading")
        if request.request_id.startswith("echo"):
            yield pb.GenerateResponse(request_id=request.request_id, chunk=pb.GenerateStreamChunk(
                token_ids=request.tokenized.input_ids))
            return
        slow = request.request_id in ("slow", "paced")
        count = request.sampling_params.max_new_tokens
        try:
            for i in range(10_000 if request.request_id == "slow" else count):
                yield pb.GenerateResponse(request_id=request.request_id,
                                          chunk=pb.GenerateStreamChunk(token_ids=[i]))
                if slow:
                    await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


@asynccontextmanager
async def scripted_worker(port: int = 0) -> AsyncIterator[tuple[_Scripted, GrpcServer]]:
    servicer = _Scripted()
    server = GrpcServer(ServiceConfig(host="127.0.0.1", port=port))
    server.add_service(pb_grpc.add_SglangSchedulerServicer_to_server, servicer, SERVICE)
    await server.start()
    await server.set_serving(True)
    try:
        yield servicer, server
    finally:
        await server.stop(0)


async def collect(channel: GenerateChannel, request: pb.GenerateRequest,
                  metadata: tuple[tuple[str, str], ...] = (), raw: bool = False) -> list[Any]:
    return [r async for r in channel.generate(request, metadata, raw)]


async def test_same_messages_and_bytes_as_grpc_aio_from_a_sim_worker() -> None:
    async with sim_fleet(sim_config()) as (worker,):
        target = f"127.0.0.1:{worker.port}"
        h2 = GenerateChannel(target)
        aio = create_channel(target)
        try:
            request = gen(range(1, 40), "same", max_new=6)
            via_aio = [r async for r in pb_grpc.SglangSchedulerStub(aio).Generate(request)]
            via_h2 = await collect(h2, request)
            raw = await collect(h2, request, raw=True)
        finally:
            h2.close()
            await aio.close()
    # 6 chunks, then the finish; the later calls find the prompt cached, nothing else differs
    assert len(via_aio) == 7 and [uncached(r) for r in via_h2] == via_aio
    assert via_h2[0].chunk.cached_tokens > 0
    assert raw == [r.SerializeToString() for r in via_h2]


def uncached(response: pb.GenerateResponse) -> pb.GenerateResponse:
    copy = pb.GenerateResponse()
    copy.CopyFrom(response)
    getattr(copy, copy.WhichOneof("response")).ClearField("cached_tokens")
    return copy


async def test_metadata_reaches_the_worker_and_empty_values_are_left_out() -> None:
    async with scripted_worker() as (servicer, server):
        channel = GenerateChannel(f"127.0.0.1:{server.port}")
        try:
            replies = await collect(channel, gen([1, 2], "meta", max_new=3),
                                    (("x-request-id", "req-42"), ("x-empty", "")))
        finally:
            channel.close()
    assert [r.chunk.token_ids[0] for r in replies] == [0, 1, 2]
    assert servicer.metadata["x-request-id"] == "req-42"
    assert "x-empty" not in servicer.metadata


async def test_a_worker_error_keeps_its_code_message_and_error_info() -> None:
    async with scripted_worker() as (_, server):
        channel = GenerateChannel(f"127.0.0.1:{server.port}")
        try:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await collect(channel, gen([1], "fail"))
            with pytest.raises(grpc.aio.AioRpcError) as loading:
                await collect(channel, gen([1], "unavailable"))
        finally:
            channel.close()
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(failed.value)
    assert details.message == "must be >= 1"
    assert details.metadata.get("field") == "sampling_params.stream_interval"
    assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_details(loading.value).reason == "LOADING"


async def test_requests_and_replies_larger_than_the_flow_control_windows_arrive_whole() -> None:
    """Long prompts (a ~1 MB request against HTTP/2's 64 KiB initial windows), several at once
    on one connection, and replies as large come back intact."""
    async with scripted_worker() as (_, server):
        channel = GenerateChannel(f"127.0.0.1:{server.port}")
        try:
            prompts = {f"echo{i}": [(i * 7 + n) % 49152 for n in range(300_000)]
                       for i in range(4)}
            replies = await asyncio.gather(*(collect(channel, gen(ids, rid))
                                             for rid, ids in prompts.items()))
        finally:
            channel.close()
    for (rid, ids), reply in zip(prompts.items(), replies, strict=True):
        assert [r.request_id for r in reply] == [rid]
        assert list(reply[0].chunk.token_ids) == ids


async def test_closing_the_stream_cancels_the_call_on_the_worker() -> None:
    async with scripted_worker() as (servicer, server):
        channel = GenerateChannel(f"127.0.0.1:{server.port}")
        try:
            stream = channel.generate(gen([1], "slow"), ())
            assert (await anext(stream)).chunk.token_ids == [0]
            await stream.aclose()
            await asyncio.wait_for(servicer.cancelled.wait(), 1.0)
            # and a reader's task cancelled mid-read does the same
            servicer.cancelled.clear()

            async def read_all() -> None:
                async for _ in channel.generate(gen([1], "slow"), ()):
                    pass

            task = asyncio.create_task(read_all())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(servicer.cancelled.wait(), 1.0)
            # the connection is still good for the next call
            assert len(await collect(channel, gen([1], "after", max_new=2))) == 2
        finally:
            channel.close()


async def test_a_worker_that_is_down_is_unavailable() -> None:
    channel = GenerateChannel(f"127.0.0.1:{free_port()}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await collect(channel, gen([1], "down"))
    finally:
        channel.close()
    assert down.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in (down.value.details() or "")


async def test_a_worker_gone_mid_stream_is_unavailable_and_a_restarted_one_is_reached() -> None:
    port = free_port()
    channel = GenerateChannel(f"127.0.0.1:{port}")
    try:
        async with scripted_worker(port) as (_, server):
            stream = channel.generate(gen([1], "slow"), ())
            await anext(stream)
            await server.stop(0)
            with pytest.raises(grpc.aio.AioRpcError) as gone:
                async for _ in stream:
                    pass
        assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
        async with scripted_worker(port):
            assert len(await collect(channel, gen([1], "again", max_new=3))) == 3
    finally:
        channel.close()


async def test_a_graceful_worker_shutdown_lets_streams_in_flight_finish_on_both_transports(
) -> None:
    """A worker stopping with a grace period (GOAWAY, then its calls run to their end) costs no
    answer in flight; a call made meanwhile fails at once, and once the worker is back on its
    port the same channel reaches it over a new connection."""
    port = free_port()
    outcomes: dict[str, Any] = {}
    for transport in ("grpcio", "grpclib"):
        async with scripted_worker(port) as (_, server):
            target = f"127.0.0.1:{port}"
            aio = create_channel(target)
            h2 = GenerateChannel(target)
            request = gen([1], "paced", max_new=6)
            stream = (h2.generate(request, ()) if transport == "grpclib"
                      else pb_grpc.SglangSchedulerStub(aio).Generate(request).__aiter__())
            got = [await anext(stream)]
            stopping = asyncio.create_task(server.stop(5.0))
            await asyncio.sleep(0.1)
            if transport == "grpclib":
                with pytest.raises(grpc.aio.AioRpcError) as meanwhile:
                    await asyncio.wait_for(collect(h2, gen([1], "meanwhile", max_new=2)), 2.0)
                assert meanwhile.value.code() == grpc.StatusCode.UNAVAILABLE
            try:
                got += [r async for r in stream]
                outcomes[transport] = len(got)
            except grpc.aio.AioRpcError as exc:
                outcomes[transport] = exc.code()
            await stopping
        if transport == "grpclib":
            async with scripted_worker(port):
                assert len(await collect(h2, gen([1], "back", max_new=3))) == 3
        h2.close()
        await aio.close()
    assert outcomes == {"grpcio": 6, "grpclib": 6}


class _GoawayServer:
    """A hand-written HTTP/2 gRPC server (h2) that, once two calls are open, sends a graceful
    GOAWAY whose ``last_stream_id`` takes only the first, answers that one and then waits for
    the client to close the connection. (A grpcio server's first GOAWAY promises every stream,
    so it cannot produce this case.)"""

    def __init__(self) -> None:
        self.answered: str = ""
        self.client_closed = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        bodies: dict[int, bytes] = {}
        ended: list[int] = []
        while len(ended) < 2:
            data = await reader.read(65536)
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.append(event.stream_id)
            writer.write(conn.data_to_send())
        first = min(ended)
        # Written by hand: h2 itself would close its side of the connection on a GOAWAY.
        writer.write(hyperframe.frame.GoAwayFrame(0, last_stream_id=first).serialize())
        request = pb.GenerateRequest.FromString(bodies[first][5:])
        reply = pb.GenerateResponse(request_id=request.request_id,
                                    chunk=pb.GenerateStreamChunk(token_ids=[7])).SerializeToString()
        conn.send_headers(first, [(":status", "200"), ("content-type", "application/grpc")])
        conn.send_data(first, b"\0" + len(reply).to_bytes(4, "big") + reply)
        conn.send_headers(first, [("grpc-status", "0")], end_stream=True)
        writer.write(conn.data_to_send())
        self.answered = request.request_id
        while await reader.read(65536):
            pass
        self.client_closed.set()
        writer.close()


async def test_after_a_goaway_calls_the_worker_did_not_take_are_unavailable_the_rest_finish(
) -> None:
    server = _GoawayServer()
    listener = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    channel = GenerateChannel(f"127.0.0.1:{port}")
    try:
        calls = {rid: asyncio.create_task(collect(channel, gen([1], rid, max_new=1)))
                 for rid in ("a", "b")}
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        outcome = dict(zip(calls, results, strict=True))
        # the connection is closed by the client once its last stream ended
        await asyncio.wait_for(server.client_closed.wait(), 2.0)
    finally:
        channel.close()
        listener.close()
    taken = outcome.pop(server.answered)
    assert [r.chunk.token_ids[0] for r in taken] == [7]
    (refused,) = outcome.values()
    assert isinstance(refused, grpc.aio.AioRpcError)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert "GOAWAY" in (refused.details() or "")
