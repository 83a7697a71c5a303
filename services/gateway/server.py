"""HTTP routes (thin): parse, authenticate, call a serving class, shape the answer."""

from __future__ import annotations

import inspect
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.metrics import child
from services.common.telemetry import server_span
from services.gateway.backends import Backends
from services.gateway.body import inflated
from services.gateway.config import GatewayConfig
from services.gateway.dashboard import install_dashboard
from services.gateway.direct_routes import DirectRoutes
from services.gateway.errors import OpenAIError, invalid
from services.gateway.http_backends import install_http_backends
from services.gateway.metrics import HTTP_LATENCY, HTTP_REQUESTS
from services.gateway.openapi import documented, install_openapi
from services.gateway.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    ConversationCreateRequest,
    ConversationItemsRequest,
    ConversationUpdateRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    ModelCard,
    ModelList,
    NativeGenerateRequest,
    ResponsesRequest,
    TokenizeRequest,
    WorkerAddRequest,
)
from services.gateway.serving_admin import AdminService
from services.gateway.serving_chat import ChatCompletionService, _gather, new_request_id
from services.gateway.serving_completions import PromptService, new_completion_id
from services.gateway.serving_conversations import ConversationService
from services.gateway.serving_responses import ResponsesService
from services.gateway.storage import DEFAULT_TENANT, Storage, tenant_for_key
from services.gateway.streaming import EventStreamResponse, until_disconnect

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Other headers clients use for the same purpose, in order of preference.
REQUEST_ID_HEADERS = (REQUEST_ID_HEADER, "x-correlation-id", "x-client-request-id", "request-id")
# A request id travels to every service as gRPC metadata, whose values are printable ASCII.
_REQUEST_ID_CHARS = re.compile(r"[ -~]{1,200}")
# Routes open without an API key: probes, metrics and the schema.
OPEN_PATHS = ("/health", "/liveness", "/readiness", "/metrics", "/openapi.json")


def error_response(error: OpenAIError, request_id: str = "") -> JSONResponse:
    headers = error.headers()
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param(loc: tuple[Any, ...]) -> str:
    """Pydantic's error location as OpenAI names a parameter: messages[0].role."""
    out = ""
    for part in loc:
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            continue  # pydantic names the union member it tried; clients know the field
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def validation_error(exc: ValidationError) -> OpenAIError:
    first = exc.errors()[0]
    param = _param(first["loc"])
    if first["type"] == "missing":
        return invalid(param, f"Missing required parameter: '{param}'.")
    return invalid(param, f"Invalid value for '{param}': {first['msg']}.")


def too_large(size: int | str, limit: int) -> OpenAIError:
    return OpenAIError(413, f"Request body is {size} bytes; the limit is {limit} "
                            "(--max-payload-size).", code="payload_too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body (inflated if the client compressed it); 413 over ``limit`` (checked on
    content-length, then while reading)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large(declared, limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}", limit)
        chunks.append(chunk)
    body = inflated(b"".join(chunks), request.scope["headers"], limit)
    request._body = body  # later reads (and receive()) see the body as consumed
    return body


def _unparsable(detail: object) -> OpenAIError:
    return invalid(None, f"We could not parse the JSON body of your request: {detail}.")


_NOT_AN_OBJECT = "The request body must be a JSON object."


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object body (``{}`` when empty)."""
    body = await read_body(request, limit)
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _unparsable(exc) from exc
    if not isinstance(data, dict):
        raise invalid(None, _NOT_AN_OBJECT)
    return data


async def parse_body(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The body validated as ``model``: parsed and validated in one pass by pydantic-core."""
    body = await read_body(request, limit)
    try:
        return model.model_validate_json(body) if body else model.model_validate({})
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise _unparsable(first["msg"]) from exc
        if first["type"] == "model_type" and not first["loc"]:
            raise invalid(None, _NOT_AN_OBJECT) from exc
        raise validation_error(exc) from exc


class TelemetryMiddleware:
    """Per HTTP request: a server span (continuing a client's traceparent), metrics, request id.

    Pure ASGI so the span and the timing cover a streamed body to its last byte.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.tracer = trace.get_tracer("sglmesh.gateway")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        by_name = dict(headers)
        header = next((h for h in REQUEST_ID_HEADERS if by_name.get(h)), "")
        request_id = by_name[header][:200] if header else ""
        app: ASGIApp = self.app
        if request_id and not _REQUEST_ID_CHARS.fullmatch(request_id):
            # Refused here (traced and counted as any 400, under an id of ours), not by the
            # first gRPC call, which would fail it as an internal error.
            app = error_response(invalid(header, f"{header} must be printable ASCII "
                                                 "(characters from space to ~)",
                                         "invalid_request_id"))
            request_id = ""
        request_id = request_id or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        route = scope["path"]
        status_holder = {"status": 500}
        started = time.perf_counter()

        span_holder: list[Any] = []

        def annotate(status: int) -> str:
            """Status and matched route on the span."""
            matched = scope.get("route")
            path = getattr(matched, "path", None) or "unmatched"
            span = span_holder[0] if span_holder else None
            if span is not None and span.is_recording():
                span.set_attribute("http.status_code", status)
                span.set_attribute("http.route", path)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            return path

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                if not any(k.lower() == b"x-request-id" for k, _ in message["headers"]):
                    message["headers"] = [*message["headers"],
                                          (REQUEST_ID_HEADER.encode(), request_id.encode())]
                annotate(message["status"])
            await send(message)

        with server_span(self.tracer, f"{scope['method']} {route}", headers,
                         {"http.method": scope["method"], "http.route": route}) as span:
            span.set_attribute("sglmesh.request_id", request_id)
            span_holder.append(span)
            try:
                await app(scope, receive, send_wrapper)
            finally:
                status = status_holder["status"]
                route = annotate(status)
                if not route.startswith("/metrics"):
                    child(HTTP_REQUESTS, route, str(status)).inc()
                    child(HTTP_LATENCY, route).observe(time.perf_counter() - started)


def _worker_url(raw: str) -> str:
    """A worker url from a path: percent-encoded or raw (``grpc:/h:p`` after slash merging)."""
    from urllib.parse import unquote

    url = unquote(raw)
    for scheme in ("grpc:/", "http:/", "https:/"):
        if url.startswith(scheme) and not url.startswith(scheme + "/"):
            url = scheme + "/" + url[len(scheme):]
    return url


class HeadAsGet:
    """A HEAD request is answered as its GET (uvicorn sends the headers without the body):
    load balancers and uptime checks probe with HEAD."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}  # the server keeps its own scope: HEAD
        await self.app(scope, receive, send)


class AuthMiddleware:
    """Bearer API keys (pure ASGI); the key's hash is the request's history tenant."""

    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.api_keys = set(api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["tenant"] = DEFAULT_TENANT
        if self.api_keys and not scope["path"].startswith(OPEN_PATHS):
            auth = ""
            for k, v in scope["headers"]:
                if k == b"authorization":
                    auth = v.decode("latin-1")
            key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if key not in self.api_keys:
                error = OpenAIError(401, "Incorrect API key provided." if key
                                    else "Missing API key (Authorization: Bearer KEY).",
                                    code="invalid_api_key")
                await error_response(error, str(state.get("request_id", "")))(
                    scope, receive, send)
                return
            state["tenant"] = tenant_for_key(key)
        await self.app(scope, receive, send)


# FastAPI >= 0.16x traces every request, dependency and serialisation itself once a tracer
# provider is set. TelemetryMiddleware already makes the request's span (with the request id)
# and /metrics has the gateway's metrics: FastAPI's would double both, on every request.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False,
                   "operation_spans": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


def create_app(config: GatewayConfig) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends = Backends(config)
        await backends.start()
        storage = Storage(backends.history, config.history_timeout_secs)
        state["backends"] = backends
        state["chat"] = ChatCompletionService(backends, config.tool_call_parser,
                                              config.reasoning_parser)
        state["conversations"] = ConversationService(storage)
        state["prompts"] = PromptService(backends)
        state["admin"] = AdminService(backends)
        state["responses"] = ResponsesService(state["chat"], storage, state["conversations"])
        yield
        await backends.close()

    OpenAIError.retry_after = config.retry_after_secs
    app = FastAPI(title="sglmesh gateway", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="OpenAI-compatible HTTP API over the sglmesh gRPC services.",
                  **_NO_NATIVE_TELEMETRY)
    # Innermost: the plain POST endpoints, called without FastAPI's per-request machinery.
    app.add_middleware(DirectRoutes, fastapi=app)
    # HTTP workers and --backend openai: relayed inside authentication.
    install_http_backends(app, state, config)
    # Outermost first: telemetry (request id, span) wraps authentication.
    app.add_middleware(AuthMiddleware, api_keys=config.api_keys)
    app.add_middleware(TelemetryMiddleware)
    app.add_middleware(HeadAsGet)
    install_dashboard(app, lambda: state["backends"])
    max_payload = config.max_payload_size
    keepalive = config.sse_keepalive_secs

    def request_id(request: Request) -> str:
        return str(request.scope.get("state", {}).get("request_id") or new_request_id())

    def tenant(request: Request) -> str:
        return str(request.scope.get("state", {}).get("tenant") or DEFAULT_TENANT)

    def idempotency_key(request: Request) -> str:
        """A client's retry key; a request id alone is no promise that two requests are one."""
        return request.headers.get("idempotency-key", "")[:200]

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc, request_id(request))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(OpenAIError(500, f"Internal error: {type(exc).__name__}: {exc}"),
                              request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        allowed = (exc.headers or {}).get("Allow", "")
        if exc.status_code == 404:
            message = f"Unknown route {request.method} {request.url.path}"
        elif exc.status_code == 405 and allowed:
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        else:
            message = str(exc.detail)
        response = error_response(OpenAIError(exc.status_code, message), request_id(request))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.post("/v1/chat/completions", tags=["chat"],
              **documented(ChatCompletionRequest, ChatCompletionResponse, stream=True))
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest, max_payload)
        rid = request_id(request)
        if not rid.startswith("chatcmpl-"):
            rid = f"chatcmpl-{rid}"
        chat: ChatCompletionService = state["chat"]
        if body.stream:
            frames = await chat.stream(body, rid)
            return EventStreamResponse(frames, keepalive=keepalive)
        result = await until_disconnect(request, chat.complete(body, rid))
        return Response(result.model_dump_json(), media_type="application/json")

    # ---- completions, native generate, tokenize, embeddings ------------------------------------

    @app.post("/v1/completions", tags=["completions"],
              **documented(CompletionRequest, stream=True))
    async def completions(request: Request) -> Response:
        body = await parse_body(request, CompletionRequest, max_payload)
        rid = request_id(request)
        if not rid.startswith("cmpl-"):
            rid = f"cmpl-{rid}" if request.headers.get(REQUEST_ID_HEADER) else new_completion_id()
        prompts: PromptService = state["prompts"]
        if body.stream:
            frames = await until_disconnect(request, prompts.stream(body, rid))
            return EventStreamResponse(frames, keepalive=keepalive)
        return JSONResponse(await until_disconnect(request, prompts.complete(body, rid)))

    @app.post("/generate", tags=["sglang"], **documented(NativeGenerateRequest, stream=True))
    async def generate(request: Request) -> Response:
        """SGLang's native generate: {text | input_ids, sampling_params, stream, rid}."""
        body = await read_json(request, max_payload)
        prompts: PromptService = state["prompts"]
        generations, stream, batch = await until_disconnect(
            request, prompts.generate(body, request_id(request)))
        if stream:
            return EventStreamResponse(prompts.native_stream(generations), keepalive=keepalive)
        results = await until_disconnect(request, _gather(
            PromptService.native_result(g) for g in generations))
        return JSONResponse(results if batch else results[0])

    @app.post("/v1/tokenize", tags=["tokenizer"], **documented(TokenizeRequest))
    async def tokenize(request: Request) -> JSONResponse:
        body = await read_json(request, max_payload)
        prompts: PromptService = state["prompts"]
        return JSONResponse(await prompts.tokenize_endpoint(body, request_id(request)))

    @app.post("/v1/detokenize", tags=["tokenizer"], **documented(DetokenizeRequest))
    async def detokenize(request: Request) -> JSONResponse:
        body = await read_json(request, max_payload)
        prompts: PromptService = state["prompts"]
        return JSONResponse(await prompts.detokenize_endpoint(body, request_id(request)))

    @app.post("/v1/embeddings", tags=["embeddings"], **documented(EmbeddingRequest))
    async def embeddings(request: Request) -> JSONResponse:
        body = await read_json(request, max_payload)
        prompts: PromptService = state["prompts"]
        return JSONResponse(await until_disconnect(
            request, prompts.embeddings(body, request_id(request))))

    # ---- responses ---------------------------------------------------------------------------

    @app.post("/v1/responses", tags=["responses"],
              **documented(ResponsesRequest, stream=True))
    async def create_response(request: Request) -> Response:
        body = await parse_body(request, ResponsesRequest, max_payload)
        responses: ResponsesService = state["responses"]
        rid = request_id(request)
        ctx = await until_disconnect(request, responses.prepare(
            tenant(request), body, rid, idempotency_key(request)))
        if body.background:
            return JSONResponse(await responses.start_background(ctx, rid))
        if body.stream:
            return EventStreamResponse(responses.stream(ctx, rid), keepalive=keepalive)
        return JSONResponse(await until_disconnect(request, responses.complete(ctx, rid)))

    @app.get("/v1/responses/{response_id}", tags=["responses"])
    async def get_response(request: Request, response_id: str) -> JSONResponse:
        responses: ResponsesService = state["responses"]
        return JSONResponse(await responses.get(tenant(request), response_id,
                                                request_id(request)))

    @app.delete("/v1/responses/{response_id}", tags=["responses"])
    async def delete_response(request: Request, response_id: str) -> JSONResponse:
        responses: ResponsesService = state["responses"]
        return JSONResponse(await responses.delete(tenant(request), response_id,
                                                   request_id(request)))

    @app.post("/v1/responses/{response_id}/cancel", tags=["responses"])
    async def cancel_response(request: Request, response_id: str) -> JSONResponse:
        responses: ResponsesService = state["responses"]
        return JSONResponse(await responses.cancel(tenant(request), response_id,
                                                   request_id(request)))

    @app.get("/v1/responses/{response_id}/input_items", tags=["responses"])
    async def list_response_input_items(request: Request, response_id: str,
                                        after: str | None = None, limit: str | None = None,
                                        order: str | None = None) -> JSONResponse:
        responses: ResponsesService = state["responses"]
        return JSONResponse(await responses.input_items(tenant(request), response_id, after,
                                                        limit, order, request_id(request)))

    # ---- conversations -----------------------------------------------------------------------

    @app.post("/v1/conversations", tags=["conversations"],
              **documented(ConversationCreateRequest))
    async def create_conversation(request: Request) -> JSONResponse:
        body = await read_json(request, max_payload)
        conv: ConversationService = state["conversations"]
        return JSONResponse(await conv.create(tenant(request), body, idempotency_key(request),
                                              request_id(request)))

    @app.get("/v1/conversations/{conversation_id}", tags=["conversations"])
    async def get_conversation(request: Request, conversation_id: str) -> JSONResponse:
        conv: ConversationService = state["conversations"]
        return JSONResponse(await conv.get(tenant(request), conversation_id, request_id(request)))

    @app.post("/v1/conversations/{conversation_id}", tags=["conversations"],
              **documented(ConversationUpdateRequest))
    async def update_conversation(request: Request, conversation_id: str) -> JSONResponse:
        body = await read_json(request, max_payload)
        conv: ConversationService = state["conversations"]
        return JSONResponse(await conv.update(tenant(request), conversation_id, body,
                                              request_id(request)))

    @app.delete("/v1/conversations/{conversation_id}", tags=["conversations"])
    async def delete_conversation(request: Request, conversation_id: str) -> JSONResponse:
        conv: ConversationService = state["conversations"]
        return JSONResponse(await conv.delete(tenant(request), conversation_id,
                                              request_id(request)))

    @app.post("/v1/conversations/{conversation_id}/items", tags=["conversations"],
              **documented(ConversationItemsRequest))
    async def create_conversation_items(request: Request, conversation_id: str) -> JSONResponse:
        body = await read_json(request, max_payload)
        conv: ConversationService = state["conversations"]
        return JSONResponse(await conv.create_items(tenant(request), conversation_id, body,
                                                    idempotency_key(request),
                                                    request_id(request)))

    @app.get("/v1/conversations/{conversation_id}/items", tags=["conversations"])
    async def list_conversation_items(request: Request, conversation_id: str,
                                      after: str | None = None, limit: str | None = None,
                                      order: str | None = None) -> JSONResponse:
        conv: ConversationService = state["conversations"]
        return JSONResponse(await conv.list_items(tenant(request), conversation_id, after, limit,
                                                  order, request_id(request)))

    @app.get("/v1/conversations/{conversation_id}/items/{item_id}", tags=["conversations"])
    async def get_conversation_item(request: Request, conversation_id: str,
                                    item_id: str) -> JSONResponse:
        conv: ConversationService = state["conversations"]
        return JSONResponse(await conv.get_item(tenant(request), conversation_id, item_id,
                                                request_id(request)))

    @app.delete("/v1/conversations/{conversation_id}/items/{item_id}", tags=["conversations"])
    async def delete_conversation_item(request: Request, conversation_id: str,
                                       item_id: str) -> JSONResponse:
        conv: ConversationService = state["conversations"]
        return JSONResponse(await conv.delete_item(tenant(request), conversation_id, item_id,
                                                   request_id(request)))

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        models = await state["backends"].models()
        return ModelList(data=[ModelCard(id=m.id, created=m.created,
                                         max_model_len=m.max_context_length or None)
                               for m in models.values()])

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> ModelCard:
        m = await state["backends"].model(model_id)
        return ModelCard(id=m.id, created=m.created, max_model_len=m.max_context_length or None)

    @app.get("/liveness", tags=["probes"])
    async def liveness() -> JSONResponse:
        """200 while the process serves HTTP."""
        return JSONResponse({"status": "ok"})

    @app.get("/readiness", tags=["probes"])
    async def readiness() -> JSONResponse:
        """200 when the router and tokenizer are SERVING and some model has a ready worker."""
        ok, body = await state["admin"].readiness()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/health", tags=["probes"])
    async def health(request: Request, full: str | None = None) -> JSONResponse:
        """Readiness; ``?full=1``: also history, and a 1-token generation on a worker."""
        admin: AdminService = state["admin"]
        if full not in (None, "", "0", "false"):
            ok, body = await admin.deep_health(request_id(request))
        else:
            ok, body = await admin.readiness()
        headers = {} if ok else OpenAIError(503, "").headers()
        return JSONResponse(body, status_code=200 if ok else 503, headers=headers)

    # ---- admin (RouterAdminService) --------------------------------------------------------------

    @app.get("/workers", tags=["admin"])
    async def list_workers(model_id: str | None = None) -> JSONResponse:
        return JSONResponse(await state["admin"].list_workers(model_id))

    @app.post("/workers", tags=["admin"], **documented(WorkerAddRequest))
    async def add_worker(request: Request) -> JSONResponse:
        body = await read_json(request, max_payload)
        return JSONResponse(await state["admin"].add_worker(body), status_code=202)

    @app.get("/workers/{url:path}", tags=["admin"])
    async def get_worker(url: str) -> JSONResponse:
        return JSONResponse(await state["admin"].get_worker(_worker_url(url)))

    @app.delete("/workers/{url:path}", tags=["admin"])
    async def remove_worker(url: str) -> JSONResponse:
        return JSONResponse(await state["admin"].remove_worker(_worker_url(url)),
                            status_code=202)

    @app.get("/get_loads", tags=["admin"])
    async def get_loads(model_id: str | None = None) -> JSONResponse:
        return JSONResponse(await state["admin"].loads(model_id))

    @app.post("/flush_cache", tags=["admin"])
    async def flush_cache(url: str | None = None) -> JSONResponse:
        status, body = await state["admin"].flush_cache(url)
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    install_openapi(app)
    return app
