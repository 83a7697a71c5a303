"""HTTP upstreams: HTTP workers (under router leases) and one OpenAI-compatible provider.

The gateway's own pipeline (render, tokenize, route ``Generate`` over gRPC, decode) serves gRPC
workers. Two kinds of upstream take HTTP instead, and the gateway relays to them:

* **HTTP workers** (an SGLang HTTP server, any OpenAI-compatible server) registered with the
  router. For a model with HTTP workers (``ServedModel.http_workers``), the gateway asks the
  router for a worker (``RouterLeaseService.AcquireWorker``: the model's policy over every
  routable worker, gRPC and HTTP alike, with the request's text as routing input; admission and
  in-flight load held by the lease), relays the client's body untouched (OpenAI JSON, or
  SGLang's native body for ``/generate``) and the answer chunk by chunk (SSE untouched), then
  releases the lease with the outcome (``ReleaseWorker``: breaker outcome; the router says
  whether and when to retry on another worker). When the lease names a gRPC worker, the
  gateway hands it back unused and runs its own pipeline pinned to that worker
  (``x-sglmesh-target-worker``), so a mixed fleet is one pool under one policy.
* **--backend openai**: every chat, completion, embedding and response goes to one provider
  (``{base}/chat/completions`` ...) with the provider's API key; ``store`` is never
  forwarded. Responses are assembled here (history, ``previous_response_id`` chains,
  conversations stay in sglmesh) and sent to the provider as chat completions.

:class:`UpstreamMiddleware` takes the relayed routes before the facade sees them; anything it
does not relay (gRPC-only models, unknown models, bad JSON) goes on to the facade unchanged.
:class:`HttpGeneration` is the same relay as a stream of chat deltas, so the Responses API
runs on HTTP upstreams with its usual code.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import httpx
from opentelemetry import propagate
from sglmesh.router.v1 import router_admin_pb2 as admin_pb
from sglmesh.router.v1 import router_lease_pb2 as lease_pb
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.body import inflated
from services.gateway.errors import OpenAIError, from_grpc
from services.gateway.streaming import EventStreamResponse

if TYPE_CHECKING:
    from services.gateway.backends import Backends, ServedModel
    from services.gateway.serving_chat import Delta, Generation, GenerationResult

log = logging.getLogger(__name__)

# The gRPC worker a request is pinned to after a lease chose it (read by Generation and the
# Embed calls; set by the middleware for the facade's handling of that one request).
PINNED_WORKER: contextvars.ContextVar[str] = contextvars.ContextVar("sglmesh_pinned_worker",
                                                                    default="")
WORKER_HEADER = "x-sglmesh-worker"
ROUTING_KEY_HEADERS = ("x-sglmesh-routing-key", "x-smg-routing-key")

# POST routes the relay serves, and what kind of request each is.
RELAYED = {"/v1/chat/completions": "chat", "/v1/completions": "completions",
           "/v1/embeddings": "embeddings", "/generate": "generate", "/v1/rerank": "rerank",
           "/rerank": "rerank"}
# Paths on an HTTP worker (its root url) and on a provider (its OpenAI base url).
WORKER_PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions",
                "embeddings": "/v1/embeddings", "generate": "/generate", "rerank": "/v1/rerank"}
PROVIDER_PATHS = {"chat": "/chat/completions", "completions": "/completions",
                  "embeddings": "/embeddings"}
_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def status_code_name(status: int) -> str:
    """An HTTP status as a gRPC status code name (the router's breaker and retry vocabulary)."""
    if status < 400:
        return "OK"
    return {408: "DEADLINE_EXCEEDED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
            502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
            401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
            409: "ABORTED", 499: "CANCELLED"}.get(
        status, "INVALID_ARGUMENT" if status < 500 else "INTERNAL")


def routing_text(kind: str, body: dict[str, Any]) -> str:
    """The text a policy routes on (SMG's ``request_text``): chat messages, the prompt, the
    query. Prefix-stable: an earlier turn of a conversation is a prefix of a later one."""
    if kind == "chat":
        parts = []
        for message in body.get("messages") or []:
            if not isinstance(message, dict):
                continue
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role', '')}: {content or ''}\n")
        return "".join(parts)
    value = body.get({"completions": "prompt", "embeddings": "input", "generate": "text",
                      "rerank": "query"}.get(kind, ""))
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]
    return value if isinstance(value, str) else ""


def without_store(body: dict[str, Any]) -> dict[str, Any]:
    """The body an upstream gets: ``store`` is sglmesh's business (history), never the
    provider's (it would keep a copy of the conversation)."""
    return {k: v for k, v in body.items() if k != "store"}


@dataclass
class Upstream:
    """Where one attempt goes: an HTTP worker under a lease, a gRPC worker (pin), a provider."""

    url: str
    base: str  # where the kind's path is appended
    paths: dict[str, str]
    grpc: bool = False
    lease_id: str = ""
    attempt: int = 0
    headers: dict[str, str] = field(default_factory=dict)


class UpstreamPool:
    """Selects upstreams and takes their outcomes: router leases, or the one provider."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends
        self._pending: set[asyncio.Task[Any]] = set()

    async def acquire(self, model: str, request_id: str, text: str, routing_key: str,
                      exclude: list[str], attempt: int) -> Upstream:
        b = self.backends
        if b.provider:
            return Upstream(b.provider, b.provider, PROVIDER_PATHS, attempt=attempt,
                            headers=b.provider_headers())
        try:
            reply = await b.router_leases.AcquireWorker(lease_pb.AcquireWorkerRequest(
                model_id=model, request_id=request_id, routing_text=text,
                routing_key=routing_key, exclude_urls=exclude, attempt=attempt), timeout=60)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, "router") from exc
        lease = reply.lease
        return Upstream(lease.url, lease.url, WORKER_PATHS,
                        grpc=lease.connection_mode != admin_pb.CONNECTION_MODE_HTTP,
                        lease_id=lease.id, attempt=attempt)

    async def release(self, up: Upstream, code: str, relayed: bool, message: str = ""
                      ) -> tuple[bool, float]:
        """Hands the outcome back; (retry, backoff seconds)."""
        if not up.lease_id:  # provider: the gateway's own, simpler retry rule
            retry = (code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                              "INTERNAL") and not relayed
                     and up.attempt < self.backends.config.provider_max_retries)
            return retry, 0.2 * 2 ** up.attempt
        try:
            reply = await self.backends.router_leases.ReleaseWorker(
                lease_pb.ReleaseWorkerRequest(id=up.lease_id, status_code=code, relayed=relayed,
                                              message=message[:500]), timeout=10)
        except grpc.aio.AioRpcError as exc:
            log.warning("lease %s of %s not released: %s", up.lease_id, up.url, exc.details())
            return False, 0.0
        return reply.retry, reply.backoff.ToNanoseconds() / 1e9

    def release_later(self, up: Upstream, code: str, relayed: bool, message: str = "") -> None:
        """Releases without waiting (from a stream's cleanup, where the task may be cancelled)."""
        task = asyncio.ensure_future(self.release(up, code, relayed, message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


@dataclass
class Opened:
    """An upstream answer whose status and headers are in (body not read), or a gRPC pin."""

    upstream: Upstream
    response: httpx.Response | None = None


def _headers(up: Upstream, request_id: str) -> dict[str, str]:
    headers = {"content-type": "application/json", **up.headers}
    if request_id:
        headers["x-request-id"] = request_id
    propagate.inject(headers)  # W3C traceparent: one trace across the relay
    return headers


async def open_upstream(pool: UpstreamPool, kind: str, model: str, body: bytes,
                        request_id: str, text: str, routing_key: str = "") -> Opened:
    """Acquire -> send -> (retry on another worker while the router allows) -> the answer.

    A connection failure or a 408/429/5xx answer before anything is relayed is released as a
    failed attempt; the router decides whether to retry (backoff, attempts left, breaker).
    The last failure stands when no retry is left."""
    exclude: list[str] = []
    attempt = 0
    client = pool.backends.http
    while True:
        up = await pool.acquire(model, request_id, text, routing_key, exclude, attempt)
        if up.grpc:
            return Opened(up)
        path = up.paths.get(kind)
        if path is None:
            await pool.release(up, "CANCELLED", False)
            raise OpenAIError(400, f"{kind} is not supported by the upstream "
                                   f"{'provider' if not up.lease_id else 'worker'}.",
                              code="unsupported_by_backend")
        request = client.build_request("POST", up.base + path, content=body,
                                       headers=_headers(up, request_id))
        failure: OpenAIError | None = None
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            code, failure = "DEADLINE_EXCEEDED", OpenAIError(
                504, f"upstream {up.url} timed out: {exc!r}", code="upstream_timeout")
        except httpx.HTTPError as exc:
            code, failure = "UNAVAILABLE", OpenAIError(
                502, f"upstream {up.url} is unreachable: {exc!r}", code="upstream_unavailable")
        else:
            if response.status_code not in _RETRYABLE_STATUS:
                return Opened(up, response)
            code = status_code_name(response.status_code)
            content = await response.aread()
            await response.aclose()
            failure = _upstream_error(response.status_code, content, up.url)
        retry, backoff = await pool.release(up, code, False, failure.message)
        if not retry:
            raise failure
        exclude.append(up.url)
        attempt += 1
        await asyncio.sleep(backoff)


def _upstream_error(status: int, content: bytes, url: str) -> OpenAIError:
    """An upstream's error answer as the gateway's error (its message kept)."""
    message = content.decode(errors="replace")[:1000]
    code: str | None = "upstream_error"
    try:
        data = json.loads(content)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict):
            message, code = str(err.get("message") or message), err.get("code") or code
        elif isinstance(data, dict) and data.get("detail"):
            message = str(data["detail"])
        elif isinstance(data, dict) and data.get("message"):
            message = str(data["message"])
    except ValueError:
        pass
    return OpenAIError(status, message or f"upstream {url} answered HTTP {status}",
                       code=str(code) if code else None)


async def relay(pool: UpstreamPool, opened: Opened, request_id: str) -> Response:
    """The upstream's answer to the client: SSE chunk by chunk, anything else in one piece."""
    up, response = opened.upstream, opened.response
    assert response is not None
    out_headers = {"x-request-id": request_id} if request_id else {}
    if up.lease_id:
        out_headers[WORKER_HEADER] = up.url
    content_type = response.headers.get("content-type", "application/json")
    code = status_code_name(response.status_code)
    if not content_type.startswith("text/event-stream"):
        try:
            content = await response.aread()
        except httpx.HTTPError as exc:
            await response.aclose()
            await pool.release(up, "UNAVAILABLE", True, repr(exc))
            raise OpenAIError(502, f"upstream {up.url} failed mid-answer: {exc!r}",
                              code="upstream_unavailable") from exc
        await response.aclose()
        await pool.release(up, code, True)
        return Response(content, status_code=response.status_code, media_type=content_type,
                        headers=out_headers)

    async def chunks() -> AsyncIterator[bytes]:
        end, message = "CANCELLED", "client went away"
        try:
            async for chunk in response.aiter_raw():
                yield chunk
            end, message = code, ""
        except httpx.HTTPError as exc:
            end, message = "UNAVAILABLE", repr(exc)
            error = OpenAIError(502, f"upstream {up.url} failed mid-stream: {exc!r}",
                                code="upstream_unavailable")
            yield f"data: {json.dumps(error.body())}\n\n".encode()
        finally:
            await response.aclose()
            pool.release_later(up, end, True, message)

    return EventStreamResponse(chunks(), status_code=response.status_code, headers=out_headers,
                               keepalive=pool.backends.config.sse_keepalive_secs)


# ---- the Responses API (and any chat-delta consumer) on HTTP upstreams ------------------------

class HttpGeneration:
    """A chat completion on an HTTP upstream, as the chat pipeline's :class:`Generation`
    surface: ``deltas()``, ``result``, ``lockstep``, ``index``. Streams from the upstream
    (``stream_options.include_usage``) and turns each chunk into a Delta."""

    def __init__(self, pool: UpstreamPool, model: ServedModel, body: dict[str, Any],
                 request_id: str, grpc_fallback: Callable[[str], Awaitable[Generation]],
                 index: int = 0) -> None:
        from services.gateway.serving_chat import GenerationResult

        self.pool = pool
        self.model = model
        self.request_id = request_id
        self.index = index
        self.lockstep = True
        self.result: GenerationResult = GenerationResult()
        self._grpc_fallback = grpc_fallback
        body = without_store(body)
        body.update(stream=True, stream_options={"include_usage": True})
        self.body = body

    async def deltas(self) -> AsyncIterator[Delta]:
        from services.gateway.serving_chat import Delta, ToolCallPart

        opened = await open_upstream(self.pool, "chat", self.model.id,
                                     json.dumps(self.body).encode(), self.request_id,
                                     routing_text("chat", self.body))
        up = opened.upstream
        if opened.response is None:  # the lease chose a gRPC worker: the gateway's pipeline
            await self.pool.release(up, "CANCELLED", False)
            generation = await self._grpc_fallback(up.url)
            generation.lockstep = self.lockstep
            self.result = generation.result
            async for delta in generation.deltas():
                yield delta
            return
        response = opened.response
        end, relayed = "CANCELLED", False
        try:
            if response.status_code != 200:
                content = await response.aread()
                end = status_code_name(response.status_code)
                raise _upstream_error(response.status_code, content, up.url)
            called: set[int] = set()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                relayed = True
                if "error" in chunk:
                    err = chunk["error"] if isinstance(chunk["error"], dict) else {}
                    end = "INTERNAL"
                    raise OpenAIError(502, str(err.get("message") or chunk["error"]),
                                      code=err.get("code") or "upstream_error")
                usage = chunk.get("usage")
                if usage:
                    self.result.prompt_tokens = usage.get("prompt_tokens") or 0
                    self.result.completion_tokens = usage.get("completion_tokens") or 0
                    details = usage.get("prompt_tokens_details") or {}
                    self.result.cached_tokens = details.get("cached_tokens") or 0
                for choice in chunk.get("choices") or []:
                    piece = choice.get("delta") or {}
                    calls = []
                    for call in piece.get("tool_calls") or []:
                        fn = call.get("function") or {}
                        index = int(call.get("index", 0))
                        first = index not in called
                        called.add(index)
                        calls.append(ToolCallPart(
                            index, (call.get("id") or "") if first else "",
                            (fn.get("name") or "") if first else "", fn.get("arguments") or ""))
                    if calls:
                        self.result.tool_calls = max(self.result.tool_calls, len(called))
                    logprobs = (choice.get("logprobs") or {}).get("content") or []
                    out = Delta(piece.get("content") or "", piece.get("reasoning_content") or "",
                                calls, logprobs, index=self.index)
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
                        self.result.finish_reason = "stop" if reason == "tool_calls" else reason
                    if out:
                        yield out
            end = "OK"
        except httpx.HTTPError as exc:
            end = "UNAVAILABLE"
            raise OpenAIError(502, f"upstream {up.url} failed mid-stream: {exc!r}",
                              code="upstream_unavailable") from exc
        finally:
            await response.aclose()
            self.pool.release_later(up, end, relayed or end != "CANCELLED")


# ---- the middleware: relayed routes ----------------------------------------------------------

def _json_error(error: OpenAIError, request_id: str) -> JSONResponse:
    headers = error.headers()
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class UpstreamMiddleware:
    """Relays the requests that go to HTTP upstreams; passes everything else on (pure ASGI).

    Sits inside authentication and telemetry. The body is read once and replayed to the
    facade when the request is not relayed."""

    def __init__(self, app: ASGIApp, backends: Callable[[], Backends],
                 pool: Callable[[], UpstreamPool], max_payload: int) -> None:
        self.app = app
        self.backends = backends
        self.pool = pool
        self.max_payload = max_payload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = RELAYED.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST" or not await self._relaying():
            await self.app(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False
        request_id = str(scope.get("state", {}).get("request_id", ""))
        try:
            plain = inflated(body, scope["headers"], self.max_payload)
        except OpenAIError as exc:
            await _json_error(exc, request_id)(scope, receive, send)
            return
        if plain is not body:
            # Inflated once, here: the relay forwards plain JSON, the facade reads it as sent.
            body, size = plain, len(plain)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-encoding"]

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            decision = await self._decide(kind, body, size)
        except OpenAIError as exc:
            await _json_error(exc, request_id)(scope, replay, send)
            return
        if decision is None:
            await self.app(scope, replay, send)
            return
        model, data = decision
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        routing_key = next((headers[h] for h in ROUTING_KEY_HEADERS if headers.get(h)), "")
        backends = self.backends()
        if backends.provider and "store" in data:
            data = without_store(data)
            body = json.dumps(data).encode()
        pool = self.pool()
        try:
            opened = await open_upstream(pool, kind, model, body, request_id,
                                         routing_text(kind, data), routing_key)
            if opened.response is None:
                # The policy chose a gRPC worker: the facade serves it, pinned to that worker.
                await pool.release(opened.upstream, "CANCELLED", False)
                token = PINNED_WORKER.set(opened.upstream.url)
                try:
                    await self.app(scope, replay, send)
                finally:
                    PINNED_WORKER.reset(token)
                return
            response = await relay(pool, opened, request_id)
        except OpenAIError as exc:
            response = _json_error(exc, request_id)
        await response(scope, replay, send)

    async def _relaying(self) -> bool:
        """Whether any request may be relayed: a provider, or a model with HTTP workers (from
        the cached model list). A gRPC-only fleet's requests pass through unread."""
        backends = self.backends()
        if backends.provider:
            return True
        try:
            models = await backends.models()
        except OpenAIError:
            return False  # the facade reports the router's state
        return any(m.http_workers for m in models.values())

    async def _decide(self, kind: str, body: bytes, size: int
                      ) -> tuple[str, dict[str, Any]] | None:
        """(model, parsed body) when the request is relayed; None: the facade serves it."""
        if size > self.max_payload:
            return None  # the facade answers 413
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        backends = self.backends()
        if backends.provider:
            if kind not in PROVIDER_PATHS:
                raise OpenAIError(400, f"{kind} is not available with --backend openai (the "
                                       "provider serves chat, completions, embeddings and "
                                       "responses).", code="unsupported_by_backend")
            if not isinstance(data.get("model"), str):
                return None  # the facade names the missing parameter
            return data["model"], data
        name = data.get("model")
        try:
            if isinstance(name, str) and name:
                served = await backends.model(name)
            elif kind == "generate":
                models = await backends.models()
                if len(models) != 1:
                    return None
                served = next(iter(models.values()))
            else:
                return None
        except OpenAIError as exc:
            if exc.status == 404:
                return None
            raise
        return (served.id, data) if served.http_workers else None
