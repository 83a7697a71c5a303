"""Client disconnects cancel the request's work: EventStreamResponse and until_disconnect,
driven through the ASGI interface directly (the e2e tests cover them behind uvicorn)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.gateway.errors import OpenAIError
from services.gateway.streaming import KEEPALIVE_COMMENT, EventStreamResponse, until_disconnect


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
