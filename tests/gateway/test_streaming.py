"""Client disconnects cancel the request's work: EventStreamResponse and until_disconnect,
driven through the ASGI interface directly (the e2e tests cover them behind uvicorn)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.gateway.errors import OpenAIError
from services.gateway.streaming import (
    KEEPALIVE_COMMENT,
    EventStreamResponse,
    ready_batches,
    until_disconnect,
)


class Client:
    """The ASGI server's side: records what was sent; ``leave()`` makes receive() disconnect."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self.gone.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent)


class FakeRequest:
    def __init__(self, client: Client) -> None:
        self.receive = client.receive


async def test_stream_sends_every_frame_then_ends() -> None:
    async def frames() -> AsyncIterator[str]:
        yield "data: 1\n\n"
        yield b"data: 2\n\n"  # type: ignore[misc]

    client = Client()
    await EventStreamResponse(frames())({"type": "http"}, client.receive, client.send)
    start = client.sent[0]
    assert start["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"cache-control", b"no-cache") in start["headers"]
    assert client.body == b"data: 1\n\ndata: 2\n\n"
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_disconnect_mid_stream_closes_the_frames_and_returns() -> None:
    closed = asyncio.Event()
    waiting = asyncio.Event()

    async def frames() -> AsyncIterator[str]:
        try:
            yield "data: first\n\n"
            waiting.set()
            await asyncio.sleep(3600)  # a worker that never answers
            yield "data: never\n\n"
        finally:
            closed.set()  # where the gRPC calls are cancelled

    client = Client()
    serving = asyncio.ensure_future(
        EventStreamResponse(frames())({"type": "http"}, client.receive, client.send))
    await waiting.wait()
    client.leave()
    await asyncio.wait_for(serving, 5)  # returns normally: the disconnect is not an error
    assert closed.is_set()
    assert client.body == b"data: first\n\n"
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancel_from_elsewhere_still_propagates() -> None:
    async def frames() -> AsyncIterator[str]:
        yield "data: first\n\n"
        await asyncio.sleep(3600)
        yield "data: never\n\n"

    client = Client()
    serving = asyncio.ensure_future(
        EventStreamResponse(frames())({"type": "http"}, client.receive, client.send))
    while not client.sent[1:]:
        await asyncio.sleep(0)
    serving.cancel()  # e.g. the server shutting down
    with pytest.raises(asyncio.CancelledError):
        await serving


async def test_until_disconnect_returns_the_result_and_stops_watching() -> None:
    client = Client()

    async def work() -> str:
        await asyncio.sleep(0)
        return "answer"

    assert await until_disconnect(FakeRequest(client), work()) == "answer"  # type: ignore[arg-type]
    client.leave()  # after the answer: nothing is cancelled any more
    await asyncio.sleep(0.01)


async def test_until_disconnect_cancels_the_work_with_a_499() -> None:
    client = Client()
    cancelled = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    asyncio.get_running_loop().call_later(0.01, client.leave)
    with pytest.raises(OpenAIError) as caught:
        await until_disconnect(FakeRequest(client), work())  # type: ignore[arg-type]
    assert caught.value.status == 499
    assert cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_an_idle_stream_gets_keepalive_comments_and_a_busy_one_none() -> None:
    """A worker that takes 0.35 s for its next token (queue, long prefill): with a 0.1 s
    keepalive the client receives comment lines meanwhile, never after the end."""
    async def slow() -> AsyncIterator[str]:
        yield "data: 1\n\n"
        await asyncio.sleep(0.35)
        yield "data: 2\n\n"

    client = Client()
    await EventStreamResponse(slow(), keepalive=0.1)({"type": "http"}, client.receive,
                                                     client.send)
    body = client.body
    assert body.startswith(b"data: 1\n\n") and body.endswith(b"data: 2\n\n")
    assert body.count(KEEPALIVE_COMMENT) >= 2
    assert body.replace(KEEPALIVE_COMMENT, b"") == b"data: 1\n\ndata: 2\n\n"
    ended = len(client.sent)
    await asyncio.sleep(0.25)
    assert len(client.sent) == ended and client.sent[-1]["more_body"] is False

    async def busy() -> AsyncIterator[str]:
        for n in range(6):
            await asyncio.sleep(0.03)
            yield f"data: {n}\n\n"

    client = Client()
    await EventStreamResponse(busy(), keepalive=0.1)({"type": "http"}, client.receive,
                                                     client.send)
    assert KEEPALIVE_COMMENT not in client.body


async def test_frames_ready_together_go_out_in_one_write_and_a_waiting_one_at_once() -> None:
    """Worker messages read in one socket read become one body write; a frame whose
    successor is not there yet is written before that successor arrives."""
    written = asyncio.Event()

    async def frames() -> AsyncIterator[str]:
        for n in range(3):
            yield f"data: {n}\n\n"  # all three ready at once
        await asyncio.sleep(0.01)
        yield "data: 3\n\n"
        yield "data: 4\n\n"
        # the frames above are written before anything more arrives
        await asyncio.wait_for(written.wait(), 2)
        yield "data: 5\n\n"

    client = Client()

    async def send(message: dict[str, Any]) -> None:
        await client.send(message)
        if message.get("body", b"").startswith(b"data: 3"):
            written.set()

    await EventStreamResponse(frames())({"type": "http"}, client.receive, send)
    bodies = [m["body"] for m in client.sent[1:]]
    assert bodies == [b"data: 0\n\ndata: 1\n\ndata: 2\n\n", b"data: 3\n\ndata: 4\n\n",
                      b"data: 5\n\n", b""]


async def collect_batches(items: AsyncIterator[Any]) -> list[list[Any]]:
    return [batch async for batch in ready_batches(items)]


async def test_ready_batches_keeps_order_and_hands_each_item_on_before_waiting() -> None:
    async def one_at_a_time() -> AsyncIterator[int]:
        for n in range(3):
            await asyncio.sleep(0.005)
            yield n

    assert await collect_batches(one_at_a_time()) == [[0], [1], [2]]

    async def bursts() -> AsyncIterator[int]:
        yield 0
        yield 1
        await asyncio.sleep(0)
        yield 2
        await asyncio.sleep(0.005)
        yield 3

    assert await collect_batches(bursts()) == [[0, 1], [2], [3]]

    class NotAGenerator:  # __anext__ returning a future, not a coroutine
        def __init__(self) -> None:
            self.left = 2

        def __aiter__(self) -> NotAGenerator:
            return self

        def __anext__(self) -> asyncio.Future[int]:
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            if self.left:
                self.left -= 1
                future.set_result(self.left)
            else:
                future.set_exception(StopAsyncIteration())
            return future

    assert await collect_batches(NotAGenerator()) == [[1, 0]]


async def test_ready_batches_hands_on_ready_items_before_an_error() -> None:
    async def fails_after_two() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise ValueError("worker went away")

    got: list[list[int]] = []
    with pytest.raises(ValueError, match="worker went away"):
        async for batch in ready_batches(fails_after_two()):
            got.append(batch)
    assert got == [[1, 2]]


async def test_ready_batches_passes_a_cancel_to_the_waiting_producer() -> None:
    cancelled = asyncio.Event()
    waiting = asyncio.Event()

    async def producer() -> AsyncIterator[int]:
        yield 1
        try:
            waiting.set()
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        yield 2

    got: list[list[int]] = []

    async def consume() -> None:
        async for batch in ready_batches(producer()):
            got.append(batch)

    task = asyncio.create_task(consume())
    await waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled.is_set() and got == [[1]]


async def test_closing_ready_batches_mid_stream_lets_the_producer_clean_up_and_close() -> None:
    """A consumer that stops (the client is gone) while the next item is awaited: the
    producer's clean-up runs, awaits included, and the producer can be closed after."""
    log: list[str] = []

    async def producer() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.sleep(3600)
            yield 2
        finally:
            await asyncio.sleep(0)  # e.g. cancelling its gRPC calls
            log.append("cleaned up")

    items = producer()
    batches = ready_batches(items)
    assert await anext(batches) == [1]
    await asyncio.sleep(0.01)  # the step for item 2 is in flight
    await batches.aclose()
    assert log == ["cleaned up"]
    await items.aclose()  # no "already running"
