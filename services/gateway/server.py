"""HTTP routes (thin): parse, authenticate, call a serving class, shape the answer."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.telemetry import extract_context
from services.gateway.backends import Backends
from services.gateway.config import GatewayConfig
from services.gateway.errors import OpenAIError, invalid
from services.gateway.metrics import HTTP_LATENCY, HTTP_REQUESTS
from services.gateway.protocol import ChatCompletionRequest, ModelCard, ModelList
from services.gateway.serving_chat import ChatCompletionService, new_request_id

REQUEST_ID_HEADER = "x-request-id"


def error_response(error: OpenAIError, request_id: str = "") -> JSONResponse:
    headers = error.headers()
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _param(loc: tuple[Any, ...]) -> str:
    """Pydantic's error location as OpenAI names a parameter: messages[0].role."""
    out = ""
    for part in loc:
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


async def parse_body(request: Request, model: type[BaseModel], limit: int) -> Any:
    body = await request.body()
    if len(body) > limit:
        raise OpenAIError(413, f"Request body is {len(body)} bytes; the limit is {limit}.")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(None, f"We could not parse the JSON body of your request: {exc}.") from exc
    if not isinstance(data, dict):
        raise invalid(None, "The request body must be a JSON object.")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
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
        request_id = dict(headers).get(REQUEST_ID_HEADER) or new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        route = scope["path"] if scope["path"].startswith("/v1/") else scope["path"]
        status_holder = {"status": 500}
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"],
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        with self.tracer.start_as_current_span(
            f"{scope['method']} {route}", context=extract_context(headers), kind=SpanKind.SERVER,
            attributes={"http.method": scope["method"], "http.route": route,
                        "sglmesh.request_id": request_id},
        ) as span:
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                status = status_holder["status"]
                span.set_attribute("http.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                if not route.startswith("/metrics"):
                    HTTP_REQUESTS.labels(route, str(status)).inc()
                    HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)


def create_app(config: GatewayConfig) -> FastAPI:
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backends = Backends(config)
        state["backends"] = backends
        state["chat"] = ChatCompletionService(backends)
        yield
        await backends.close()

    app = FastAPI(title="sglmesh gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(TelemetryMiddleware)

    def request_id(request: Request) -> str:
        return str(request.scope.get("state", {}).get("request_id") or new_request_id())

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                           ) -> Response:
        if config.api_keys and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            key = auth[7:] if auth.lower().startswith("bearer ") else ""
            if key not in config.api_keys:
                return error_response(OpenAIError(
                    401, "Incorrect API key provided." if key else "Missing API key.",
                    code="invalid_api_key"), request_id(request))
        return await call_next(request)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc, request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"Unknown route {request.method} {request.url.path}" if exc.status_code == 404
                   else str(exc.detail))
        return error_response(OpenAIError(exc.status_code, message), request_id(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, ChatCompletionRequest, config.max_request_bytes)
        rid = request_id(request)
        if not rid.startswith("chatcmpl-"):
            rid = f"chatcmpl-{rid}"
        chat: ChatCompletionService = state["chat"]
        if body.stream:
            frames = await chat.stream(body, rid)
            return StreamingResponse(frames, media_type="text/event-stream",
                                     headers={"cache-control": "no-cache"})
        result = await chat.complete(body, rid)
        return JSONResponse(result.model_dump(exclude_none=False))

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

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 when the router and tokenizer are serving and some model has a ready worker."""
        backends: Backends = state["backends"]
        checks: dict[str, str] = {}
        for name, channel in (("router", backends.router_channel),
                              ("tokenizer", backends.tokenizer_channel)):
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2)
                checks[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                checks[name] = exc.code().name
        try:
            models = await backends.models()
            ready = {m.id: m.ready_workers for m in models.values()}
        except OpenAIError:
            ready = {}
        ok = all(v == "SERVING" for v in checks.values()) and any(ready.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "services": checks,
                             "ready_workers": ready}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app
