"""A client that goes away cancels its request's work (and with it the gRPC calls it made: the
router relays an Abort to the worker).

Both helpers run the work in the request's own task and start one watcher task that waits for
``http.disconnect`` and cancels it. Starlette's ``StreamingResponse`` does the same with an anyio
task group and cancel scopes per response, several per cent of a streamed request's CPU
(docs/overhead.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Coroutine, Generator, Mapping
from typing import Any, TypeVar

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


class _Resumed:
    """Awaits a coroutine that was already stepped once and is waiting on ``waiting_on``
    (what its first step yielded to the event loop)."""

    def __init__(self, step: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self._step = step
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        waiting_on = self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except BaseException as exc:  # noqa: BLE001 - a cancel for the step: passed on
                try:
                    waiting_on = self._step.throw(exc)
                except StopIteration as done:
                    return done.value
                continue
            try:
                waiting_on = self._step.send(sent)
            except StopIteration as done:
                return done.value


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _steppable(awaitable: Awaitable[T]) -> Coroutine[Any, Any, T]:
    """``awaitable`` as something with ``send``/``throw`` (an async generator's ``asend`` and
    a coroutine are; a future or another awaitable gets a coroutine around it)."""
    if hasattr(awaitable, "send") and hasattr(awaitable, "throw"):
        return awaitable  # type: ignore[return-value]
    return _awaited(awaitable)


async def _abandon(step: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
    """Ends a step that is in flight as a cancelled task would: what it waits on is cancelled
    and the producer gets a CancelledError there, so its clean-up runs (awaits included)."""
    if isinstance(waiting_on, asyncio.Future):
        waiting_on.cancel()
    try:
        waiting_on = step.throw(asyncio.CancelledError())
    except (StopIteration, StopAsyncIteration, asyncio.CancelledError):
        return
    try:
        await _Resumed(step, waiting_on)
    except (StopAsyncIteration, asyncio.CancelledError):
        pass


async def ready_batches(items: AsyncIterator[T]) -> AsyncGenerator[list[T], None]:
    """``items`` in lists of what was ready together: a list ends where taking the next item
    would wait. A stream whose items come one at a time (a GPU's tokens) gets lists of one,
    each as soon as its item is there; items that were ready together (worker messages read
    in one socket read, a backlog under load) go on as one list, so as one socket write, as
    hyper's buffered body writes do for SMG. An error after ready items comes after them."""
    batch: list[T] = []
    while True:
        step = _steppable(items.__anext__())
        try:
            waiting_on = step.send(None)
        except StopIteration as ready:
            batch.append(ready.value)
            continue
        except StopAsyncIteration:
            if batch:
                yield batch
            return
        except BaseException:
            if batch:
                yield batch
            raise
        if batch:
            try:
                yield batch
            except BaseException:
                await _abandon(step, waiting_on)
                raise
            batch = []
        try:
            batch.append(await _Resumed(step, waiting_on))
        except StopAsyncIteration:
            return


KEEPALIVE_COMMENT = b": keepalive\n\n"


class KeepAlive:
    """Sends an SSE comment on a stream that has sent nothing for a whole ``interval``, so that
    proxies with an idle timeout keep it open through a long queue wait or prefill (SMG's
    --sse-keepalive-secs). One timer per stream, ticking every ``interval``; the sender only
    bumps ``frames`` (per-frame cost: one increment); a task only when a comment is due."""

    def __init__(self, send: Send, interval: float) -> None:
        self._send = send
        self.interval = interval
        self.frames = 0
        self._seen = 0
        self._loop = asyncio.get_running_loop()
        self._pending: asyncio.Task[None] | None = None
        self._timer = self._loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        if self.frames == self._seen and (self._pending is None or self._pending.done()):
            self._pending = self._loop.create_task(self._comment())
        self._seen = self.frames
        self._timer = self._loop.call_later(self.interval, self._tick)

    async def _comment(self) -> None:
        try:
            await self._send({"type": "http.response.body", "body": KEEPALIVE_COMMENT,
                              "more_body": True})
        except Exception:  # noqa: BLE001 - the client is gone: the stream's own send says so
            pass

    def stop(self) -> None:
        self._timer.cancel()
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()


class EventStreamResponse(Response):
    """A ``text/event-stream`` body from an async iterator of frames, frames that are ready
    together in one write (:func:`ready_batches`); a client disconnect cancels the iterator
    where it waits and closes it. ``keepalive`` > 0: a comment after that many idle seconds
    (:class:`KeepAlive`)."""

    media_type = "text/event-stream"

    def __init__(self, frames: AsyncIterator[str | bytes], status_code: int = 200,
                 headers: Mapping[str, str] | None = None, keepalive: float = 0.0) -> None:
        self.frames = frames
        self.status_code = status_code
        self.background = None
        self.keepalive = keepalive
        self.init_headers({"cache-control": "no-cache", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keeper: KeepAlive | None = None
        batches = ready_batches(self.frames)
        with DisconnectWatch(receive) as watch:
            try:
                try:
                    await send({"type": "http.response.start", "status": self.status_code,
                                "headers": self.raw_headers})
                    if self.keepalive > 0:
                        keeper = KeepAlive(send, self.keepalive)
                    async for frames in batches:
                        body = b"".join(f.encode() if isinstance(f, str) else f for f in frames)
                        await send({"type": "http.response.body", "more_body": True,
                                    "body": body})
                        if keeper is not None:
                            keeper.frames += 1
                    if keeper is not None:
                        keeper.stop()
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                finally:
                    if keeper is not None:
                        keeper.stop()
                    await batches.aclose()  # first: it may hold the frames' next step
                    aclose = getattr(self.frames, "aclose", None)
                    if aclose is not None:
                        await aclose()  # the frames' own clean-up (e.g. cancel the gRPC calls)
            except asyncio.CancelledError:
                if not watch.disconnected:
                    raise
                watch.absorb()
            except OSError:
                pass  # the client is gone (servers of ASGI spec 2.4 raise on send)
