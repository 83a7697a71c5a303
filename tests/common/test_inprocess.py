"""In-process stubs (``services.common.inprocess``) behave like grpc.aio calls to callers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common.errors import ErrorCode, error_details, invalid_argument
from services.common.inprocess import LocalStub

SERVICE = "sglmesh.test.v1.CounterService"


class Counter:
    """Counts up; remembers how its streams ended (the servicer's ``finally``)."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.started = asyncio.Event()

    async def Check(self, request: int, context: Any) -> str:
        if request < 0:
            raise invalid_argument("value", "value must be >= 0")
        md = dict(context.invocation_metadata())
        return f"{request}:{md.get('x-request-id', '')}"

    async def Count(self, request: int, context: Any) -> AsyncIterator[int]:
        try:
            await context.send_initial_metadata((("x-worker", "w1"),))
            for i in range(request):
                self.started.set()
                yield i
                await asyncio.sleep(0)
            if request == 2:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
        finally:
            self.ended.append("count")

    async def Echo(self, requests: AsyncIterator[int], context: Any) -> AsyncIterator[int]:
        try:
            async for value in requests:
                yield value * 10
        finally:
            self.ended.append("echo")


def _add(servicer: Counter, server: Any) -> None:
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(servicer.Check),
        "Count": grpc.unary_stream_rpc_method_handler(servicer.Count),
        "Echo": grpc.stream_stream_rpc_method_handler(servicer.Echo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


@pytest.fixture
def counter() -> Counter:
    return Counter()


@pytest.fixture
def stub(counter: Counter) -> Any:
    return LocalStub(_add, counter, SERVICE)


async def test_unary_answers_and_errors_like_a_remote_call(stub: Any) -> None:
    assert await stub.Check(3, metadata=(("x-request-id", "r1"),)) == "3:r1"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Check(-1, timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(exc.value)
    assert details.code is ErrorCode.INVALID_ARGUMENT and details.metadata["field"] == "value"


async def test_server_stream_iterates_and_relays_an_abort(stub: Any, counter: Counter) -> None:
    call = stub.Count(3)
    assert [i async for i in call] == [0, 1, 2] and call.done()
    assert dict(await call.initial_metadata()) == {"x-worker": "w1"}
    aborted = stub.Count(2)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        [i async for i in aborted]
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and exc.value.details() == "gone"
    assert counter.ended == ["count", "count"]


async def test_cancel_from_another_task_ends_the_read_and_the_servicer(
        stub: Any, counter: Counter) -> None:
    call = stub.Count(10**9)
    got: list[int] = []

    async def read() -> None:
        async for i in call:
            got.append(i)

    reader = asyncio.ensure_future(read())
    await counter.started.wait()
    assert call.cancel() and call.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert counter.ended == ["count"] and call.done() and 0 < len(got) < 10**9


async def test_cancel_with_no_read_in_flight_closes_the_servicer(stub: Any,
                                                                 counter: Counter) -> None:
    call = stub.Count(5)
    assert await call.read() == 0
    call.cancel()
    for _ in range(5):
        await asyncio.sleep(0)
    assert counter.ended == ["count"]
    with pytest.raises(asyncio.CancelledError):
        await call.read()


async def test_bidi_write_read_and_half_close(stub: Any, counter: Counter) -> None:
    call = stub.Echo()
    await call.write(1)
    assert await call.read() == 10
    await call.write(2)
    assert await call.read() == 20
    await call.done_writing()
    assert call.done() and counter.ended == ["echo"]
    assert await call.read() is grpc.aio.EOF


class Summing:
    """A lockstep stream: 0 opens it (no answer), then each value is answered with the running
    sum; a negative value is a bad request; 99 waits until released."""

    def __init__(self, ended: list[str], release: asyncio.Event) -> None:
        self.total: int | None = None
        self.ended = ended
        self.release = release

    async def handle(self, request: int) -> int | None:
        if self.total is None:
            self.total = 0
            return None
        if request < 0:
            raise invalid_argument("value", "value must be >= 0")
        if request == 99:
            await self.release.wait()
        self.total += request
        return self.total

    def finish(self, ok: bool) -> None:
        self.ended.append("ok" if ok else "failed")


class Summer:
    lockstep_methods = {"Sum": "open_sum"}

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.release = asyncio.Event()

    def open_sum(self) -> Summing:
        return Summing(self.ended, self.release)

    async def Sum(self, requests: AsyncIterator[int], context: Any) -> AsyncIterator[int]:
        raise AssertionError("the in-process stub calls open_sum, not the generator")
        yield 0  # pragma: no cover


def _add_summer(servicer: Summer, server: Any) -> None:
    handlers = {"Sum": grpc.stream_stream_rpc_method_handler(servicer.Sum)}
    server.add_registered_method_handlers(SERVICE, handlers)


@pytest.fixture
def summer() -> Summer:
    return Summer()


@pytest.fixture
def sum_stub(summer: Summer) -> Any:
    return LocalStub(_add_summer, summer, SERVICE)


async def test_lockstep_answers_each_write_and_ends_on_half_close(sum_stub: Any,
                                                                    summer: Summer) -> None:
    call = sum_stub.Sum(metadata=(("x-request-id", "r1"),))
    await call.write(0)  # the opening: no answer of its own
    await call.write(2)
    assert await call.read() == 2
    await call.write(3)
    assert await call.read() == 5
    assert summer.ended == []
    await call.done_writing()
    assert call.done() and summer.ended == ["ok"]
    assert await call.read() is grpc.aio.EOF
    with pytest.raises(asyncio.InvalidStateError):
        await call.write(1)


async def test_lockstep_read_before_write_waits_for_it(sum_stub: Any) -> None:
    call = sum_stub.Sum()
    await call.write(0)
    reader = asyncio.ensure_future(call.read())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not reader.done()
    await call.write(7)
    assert await asyncio.wait_for(reader, 5) == 7


async def test_lockstep_error_is_the_remote_status_and_ends_the_stream(
        sum_stub: Any, summer: Summer) -> None:
    call = sum_stub.Sum()
    await call.write(0)
    await call.write(-1)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_details(exc.value).metadata["field"] == "value"
    assert call.done() and summer.ended == ["failed"]


async def test_lockstep_cancel_ends_a_waiting_read_once(sum_stub: Any, summer: Summer) -> None:
    call = sum_stub.Sum()
    await call.write(0)
    await call.write(99)  # handled, and blocked, inside the read
    reader = asyncio.ensure_future(call.read())
    for _ in range(3):
        await asyncio.sleep(0)
    assert call.cancel() and not call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert call.cancelled() and summer.ended == ["failed"]


async def test_lockstep_deadline_fails_the_read(sum_stub: Any, summer: Summer) -> None:
    call = sum_stub.Sum(timeout=0.05)
    await call.write(0)
    await call.write(99)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call.read()
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert summer.ended == ["failed"]
