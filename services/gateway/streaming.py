"""A client that goes away cancels its request's work (and with it the gRPC calls it made: the
router relays an Abort to the worker).

Both helpers run the work in the request's own task and start one watcher task that waits for
``http.disconnect`` and cancels it. Starlette's ``StreamingResponse`` does the same with an anyio
task group and cancel scopes per response, several per cent of a streamed request's CPU
(docs/overhead.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Mapping
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from services.gateway.errors import OpenAIError

T = TypeVar("T")


class DisconnectWatch:
    """While open, a client disconnect cancels the task that opened it (``disconnected`` tells
    that cancellation from any other)."""

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._owner: asyncio.Task[object] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.disconnected = False

    async def _watch(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                if self._owner is not None:
                    self._owner.cancel()
                return

    def __enter__(self) -> DisconnectWatch:
        self._owner = asyncio.current_task()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
        self._owner = None

    def absorb(self) -> None:
        """Called on the CancelledError this watch caused: the owner carries on (to answer or
        to return), so the cancel request is withdrawn."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or a 499 if the client disconnects first (``work`` is cancelled)."""
    with DisconnectWatch(request.receive) as watch:
        try:
            return await work
        except asyncio.CancelledError:
            if not watch.disconnected:
                raise
            watch.absorb()
    raise OpenAIError(499, "The client closed the request.", code="client_closed_request")


class EventStreamResponse(Response):
    """A ``text/event-stream`` body from an async iterator of frames; a client disconnect
    cancels the iterator where it waits and closes it."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[str | bytes], status_code: int = 200,
                 headers: Mapping[str, str] | None = None) -> None:
        self.frames = frames
        self.status_code = status_code
        self.background = None
        self.init_headers({"cache-control": "no-cache", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with DisconnectWatch(receive) as watch:
            try:
                try:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                    async for frame in self.frames:
                        await send({"type": "http.response.body", "more_body": True,
                                    "body": frame.encode() if isinstance(frame, str) else frame})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                finally:
                    aclose = getattr(self.frames, "aclose", None)
                    if aclose is not None:
                        await aclose()  # the frames' own clean-up (e.g. cancel the gRPC calls)
            except asyncio.CancelledError:
                if not watch.disconnected:
                    raise
                watch.absorb()
            except OSError:
                pass  # the client is gone (servers of ASGI spec 2.4 raise on send)
