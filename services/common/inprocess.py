"""In-process stubs: a servicer called directly, through the surface of a grpc.aio stub.

A deployment that wants the lowest overhead runs the tokenizer and the router inside the
gateway process (``--tokenizer embedded``, ``--router embedded``). The gateway keeps calling
``stub.RenderChat(request, timeout=..., metadata=...)`` and friends; :func:`local_stub` answers
those calls by running the servicer's method on the caller's event loop, with no
serialisation, no HTTP/2 and no second process. Errors come back as the
``grpc.aio.AioRpcError`` a remote call would raise (same code, message and ErrorInfo), so the
caller's error mapping does not know the difference.

Only what sglmesh's callers use is implemented: awaiting a unary call, iterating or reading a
streaming one, ``write`` / ``done_writing`` / ``read`` on a bidirectional one, ``cancel``,
``done``, ``initial_metadata`` and ``trailing_metadata``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator
from typing import Any, Protocol

import grpc
from grpc.aio import Metadata

from services.common.errors import ServiceError

log = logging.getLogger(__name__)

_DETAILS_KEY = "grpc-status-details-bin"
_EOF = object()


class LocalAbort(Exception):
    """What ``context.abort`` raises in-process (grpc raises its own AbortError remotely)."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, Any], ...] = ()) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing_metadata = tuple(trailing_metadata)


def rpc_error(exc: BaseException, method: str) -> grpc.aio.AioRpcError:
    """The AioRpcError a remote call of ``method`` would have raised for ``exc``."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc  # an upstream call failed: relayed unchanged, as the server wrapper does
    if isinstance(exc, ServiceError):
        status = exc.to_status()
        return grpc.aio.AioRpcError(status.code, Metadata(),
                                    Metadata(*status.trailing_metadata), status.details)
    if isinstance(exc, LocalAbort):
        trailers = [(k, v) for k, v in exc.trailing_metadata if k == _DETAILS_KEY]
        return grpc.aio.AioRpcError(exc.code, Metadata(), Metadata(*trailers), exc.details)
    if isinstance(exc, NotImplementedError):
        return grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, Metadata(), Metadata(),
                                    f"{method} is not implemented")
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(),
                                    "Deadline Exceeded")
    log.error("unhandled error in %s", method, exc_info=exc)
    return grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, Metadata(), Metadata(),
                                f"internal error: {exc}")


class LocalContext:
    """The part of ``grpc.aio.ServicerContext`` sglmesh's servicers use."""

    def __init__(self, metadata: Any, timeout: float | None) -> None:
        self._metadata = tuple(metadata or ())
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.initial_metadata: tuple[tuple[str, Any], ...] = ()
        self.cancelled_flag = False

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._metadata

    async def send_initial_metadata(self, metadata: Any) -> None:
        self.initial_metadata = tuple(metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Any = ()) -> None:
        raise LocalAbort(code, details, tuple(trailing_metadata))

    async def abort_with_status(self, status: grpc.Status) -> None:
        raise LocalAbort(status.code, status.details, tuple(status.trailing_metadata))

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def set_details(self, details: str) -> None:
        self._details = details

    def details(self) -> str:
        return self._details

    @property
    def deadline(self) -> float | None:
        """``time.monotonic()`` at which the call times out (None: never)."""
        return self._deadline

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def cancelled(self) -> bool:
        return self.cancelled_flag

    def done(self) -> bool:
        return self.cancelled_flag

    def peer(self) -> str:
        return "in-process"


def _status_error(context: LocalContext, method: str) -> grpc.aio.AioRpcError | None:
    """A servicer that returned normally but set a non-OK code (``context.set_code``)."""
    code = context.code()
    if code is None or code == grpc.StatusCode.OK:
        return None
    return grpc.aio.AioRpcError(code, Metadata(), Metadata(), context.details())


class _Call:
    """State shared by every kind of local call."""

    def __init__(self, method: str, metadata: Any, timeout: float | None) -> None:
        self.method = method
        self.context = LocalContext(metadata, timeout)
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return self.context.cancelled_flag

    async def initial_metadata(self) -> Metadata:
        return Metadata(*self.context.initial_metadata)

    async def trailing_metadata(self) -> Metadata:
        return Metadata()

    def _raise_if_cancelled(self) -> None:
        if self.context.cancelled_flag:
            raise asyncio.CancelledError(f"{self.method} was cancelled")


class UnaryUnaryCall(_Call):
    def __init__(self, behavior: Callable[..., Any], request: Any, method: str, metadata: Any,
                 timeout: float | None) -> None:
        super().__init__(method, metadata, timeout)
        self._behavior = behavior
        self._request = request
        self._timeout = timeout

    def cancel(self) -> bool:
        self.context.cancelled_flag = True
        return not self._done

    async def _run(self) -> Any:
        try:
            if self._timeout is None:
                response = await self._behavior(self._request, self.context)
            else:
                async with asyncio.timeout(self._timeout):
                    response = await self._behavior(self._request, self.context)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if not isinstance(exc, Exception):
                raise
            raise rpc_error(exc, self.method) from exc
        finally:
            self._done = True
        error = _status_error(self.context, self.method)
        if error is not None:
            raise error
        return response

    def __await__(self) -> Generator[Any, None, Any]:
        return self._run().__await__()


class _StreamingCall(_Call):
    """A call whose responses come from the servicer's async generator, stepped by the reader.

    The generator runs in whichever task reads; ``cancel()`` from another task cancels the
    reading task, which is what grpc.aio does to a pending read (CancelledError). A deadline
    (``timeout``) is one timer per call, armed by the first read: when it passes, the read in
    flight (or the next one) raises DEADLINE_EXCEEDED and the generator is closed."""

    def __init__(self, method: str, metadata: Any, timeout: float | None) -> None:
        super().__init__(method, metadata, timeout)
        self._responses: AsyncIterator[Any] | None = None
        self._reader: asyncio.Task[Any] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._expired = False

    def _finish(self) -> None:
        self._done = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _interrupt(self) -> None:
        """Ends the generator: cancel the read in flight, or close it if nobody is reading."""
        reader, current = self._reader, asyncio.current_task()
        if reader is not None and reader is not current and not reader.done():
            reader.cancel()  # the read in flight ends as CancelledError, the generator closes
        elif self._responses is not None and reader is None:
            # Nobody is inside the generator: close it (runs its finally, e.g. an abort).
            closer = asyncio.ensure_future(self._responses.aclose())  # type: ignore[attr-defined]
            closer.add_done_callback(_log_close_error)

    def cancel(self) -> bool:
        if self._done:
            return False
        self.context.cancelled_flag = True
        self._finish()
        self._interrupt()
        return True

    def _expire(self) -> None:
        self._expiry = None
        if not self._done:
            self._expired = True
            self._interrupt()
            if self._reader is None:
                self._finish()

    @staticmethod
    def _deadline_error() -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, Metadata(), Metadata(),
                                    "Deadline Exceeded")

    async def read(self) -> Any:
        if self._expired:
            raise self._deadline_error()
        self._raise_if_cancelled()
        if self._done:
            return grpc.aio.EOF
        deadline = self.context.deadline
        if deadline is not None and self._expiry is None:
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_at(loop.time() + deadline - time.monotonic(), self._expire)
        self._reader = asyncio.current_task()
        try:
            return await self._next()
        except asyncio.CancelledError:
            self._finish()
            if self._expired and self._reader is not None:
                self._reader.uncancel()  # our own timer's cancel: the read fails instead
                raise self._deadline_error() from None
            raise
        except grpc.aio.AioRpcError:
            self._finish()
            raise
        except Exception as exc:
            self._finish()
            raise rpc_error(exc, self.method) from exc
        finally:
            self._reader = None

    async def _next(self) -> Any:
        """The next response (EOF at the end), read in the reading task."""
        if self._responses is None:
            return grpc.aio.EOF
        try:
            return await anext(self._responses)
        except StopAsyncIteration:
            self._finish()
            error = _status_error(self.context, self.method)
            if error is not None:
                raise error from None
            return grpc.aio.EOF

    def __aiter__(self) -> _StreamingCall:
        return self

    async def __anext__(self) -> Any:
        response = await self.read()
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        return response


def _log_close_error(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("closing a cancelled in-process stream failed", exc_info=task.exception())


class UnaryStreamCall(_StreamingCall):
    def __init__(self, behavior: Callable[..., AsyncIterator[Any]], request: Any, method: str,
                 metadata: Any, timeout: float | None) -> None:
        super().__init__(method, metadata, timeout)
        self._responses = behavior(request, self.context)


class _BidiCall(_StreamingCall):
    """The writing side shared by the bidirectional calls: ``_accept`` takes a request,
    ``_end_input`` tells the servicer no more will come."""

    def __init__(self, method: str, metadata: Any, timeout: float | None) -> None:
        super().__init__(method, metadata, timeout)
        self._closed_writing = False

    def _accept(self, request: Any) -> None:
        raise NotImplementedError

    def _end_input(self) -> None:
        raise NotImplementedError

    async def write(self, request: Any) -> None:
        self._raise_if_cancelled()
        if self._done or self._closed_writing:
            raise asyncio.InvalidStateError(f"{self.method}: the call is closed for writing")
        self._accept(request)

    async def done_writing(self) -> None:
        if not self._closed_writing:
            self._closed_writing = True
            self._end_input()
        if not self._done:
            # Let the servicer see the end of input and finish (as a half-closed remote would).
            try:
                while (await self.read()) is not grpc.aio.EOF:
                    pass
            except grpc.aio.AioRpcError:
                pass


class StreamStreamCall(_BidiCall):
    def __init__(self, behavior: Callable[..., AsyncIterator[Any]], method: str, metadata: Any,
                 timeout: float | None) -> None:
        super().__init__(method, metadata, timeout)
        self._requests: asyncio.Queue[Any] = asyncio.Queue()
        self._responses = behavior(self._request_iterator(), self.context)

    async def _request_iterator(self) -> AsyncIterator[Any]:
        while True:
            request = await self._requests.get()
            if request is _EOF:
                return
            yield request

    def _accept(self, request: Any) -> None:
        self._requests.put_nowait(request)

    def _end_input(self) -> None:
        self._requests.put_nowait(_EOF)


class LockstepHandler(Protocol):
    """One bidirectional stream of a servicer method that answers every request with at most
    one response (declared in the servicer's ``lockstep_methods``)."""

    async def handle(self, request: Any) -> Any:
        """The answer to ``request``, or None when it has none (e.g. a stream's opening)."""

    def finish(self, ok: bool) -> None:
        """The stream ended: cleanly (``ok``), failed or cancelled. Called once."""


class LockstepCall(_BidiCall):
    """A bidirectional call on a :class:`LockstepHandler`: a written request is handled when
    the caller reads, directly in the reading task, with no generator and no queue between
    caller and servicer (a third of StreamStreamCall's cost per message, which the gateway
    pays per streamed chunk for its decode stream). Cancel and deadline as for any stream."""

    def __init__(self, handler: LockstepHandler, method: str, metadata: Any,
                 timeout: float | None) -> None:
        super().__init__(method, metadata, timeout)
        self._handler = handler
        self._pending: deque[Any] = deque()
        self._wakeup: asyncio.Future[None] | None = None

    def _finish(self, ok: bool = False) -> None:
        if not self._done:
            self._handler.finish(ok)
        super()._finish()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _accept(self, request: Any) -> None:
        self._pending.append(request)
        self._wake()

    def _end_input(self) -> None:
        self._wake()

    async def _next(self) -> Any:
        while True:
            if self._pending:
                response = await self._handler.handle(self._pending.popleft())
                if response is not None:
                    return response
            elif self._closed_writing:
                self._finish(ok=True)
                return grpc.aio.EOF
            else:  # a read before the next write: wait for it
                self._wakeup = asyncio.get_running_loop().create_future()
                try:
                    await self._wakeup
                finally:
                    self._wakeup = None


class _Capture:
    """Stands in for a grpc server to read a generated ``add_*_to_server``'s method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def method_handlers(add_to_server: Callable[[Any, Any], None], servicer: Any
                    ) -> dict[str, grpc.RpcMethodHandler]:
    """The method handlers a generated ``add_*_to_server`` registers for ``servicer``."""
    capture = _Capture()
    add_to_server(servicer, capture)
    return capture.handlers


class LocalStub:
    """A stub whose methods call ``servicer`` directly (see the module docstring)."""

    def __init__(self, add_to_server: Callable[[Any, Any], None], servicer: Any,
                 service: str = "") -> None:
        lockstep: dict[str, str] = getattr(servicer, "lockstep_methods", {})
        for name, handler in method_handlers(add_to_server, servicer).items():
            method = f"/{service}/{name}"
            if name in lockstep:
                setattr(self, name, _lockstep_callable(method, getattr(servicer, lockstep[name])))
            else:
                setattr(self, name, _multicallable(method, handler))


def _lockstep_callable(method: str, open_handler: Callable[[], LockstepHandler]
                       ) -> Callable[..., LockstepCall]:
    def call_lockstep(timeout: float | None = None, metadata: Any = None,
                      **_: Any) -> LockstepCall:
        return LockstepCall(open_handler(), method, metadata, timeout)
    return call_lockstep


def _multicallable(method: str, handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        def call_unary(request: Any, timeout: float | None = None, metadata: Any = None,
                       **_: Any) -> UnaryUnaryCall:
            return UnaryUnaryCall(unary, request, method, metadata, timeout)
        return call_unary
    if handler.unary_stream is not None:
        server_stream = handler.unary_stream

        def call_server_stream(request: Any, timeout: float | None = None,
                               metadata: Any = None, **_: Any) -> UnaryStreamCall:
            return UnaryStreamCall(server_stream, request, method, metadata, timeout)
        return call_server_stream
    if handler.stream_stream is not None:
        bidi = handler.stream_stream

        def call_bidi(timeout: float | None = None, metadata: Any = None,
                      **_: Any) -> StreamStreamCall:
            return StreamStreamCall(bidi, method, metadata, timeout)
        return call_bidi

    def unsupported(*_: Any, **__: Any) -> Any:
        raise NotImplementedError(f"{method}: client-streaming calls are not used in-process")
    return unsupported


__all__ = ["LocalAbort", "LocalContext", "LocalStub", "LockstepCall", "LockstepHandler",
           "method_handlers", "rpc_error"]
