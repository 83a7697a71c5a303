"""Wires HTTP upstreams into the gateway app: the relay middleware, rerank routes, and the
provider's probes (``--backend openai``). Called once from ``server.create_app``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway.config import GatewayConfig
from services.gateway.openapi import documented
from services.gateway.protocol import RerankRequest
from services.gateway.serving_rerank import RerankService
from services.gateway.upstreams import UpstreamMiddleware


class ProviderProbes:
    """``--backend openai``: /readiness and /health answer from the provider (GET /models),
    not from the router and tokenizer, which this gateway does not use."""

    def __init__(self, app: ASGIApp, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "GET"
                or scope["path"] not in ("/readiness", "/health")):
            await self.app(scope, receive, send)
            return
        from services.gateway.errors import OpenAIError

        backends = self.state["backends"]
        try:
            models = await backends.models(refresh=True)
            body: dict[str, Any] = {"status": "ok", "backend": "openai",
                                    "provider": backends.provider, "models": sorted(models)}
            status = 200
        except OpenAIError as exc:
            body = {"status": "unavailable", "backend": "openai",
                    "provider": backends.provider, "error": exc.message}
            status = 503
        await JSONResponse(body, status_code=status)(scope, receive, send)


def install_http_backends(app: FastAPI, state: dict[str, Any], config: GatewayConfig) -> None:
    """Call before the authentication middleware is added (so it runs inside it)."""
    app.add_middleware(UpstreamMiddleware, backends=lambda: state["backends"],
                       pool=lambda: state["chat"].pool, max_payload=config.max_payload_size)
    if config.backend == "openai":
        app.add_middleware(ProviderProbes, state=state)

    async def rerank(request: Request) -> JSONResponse:
        """Cross-encoder reranking: {model, query, documents, top_n, return_documents}."""
        from services.gateway.server import read_json
        from services.gateway.streaming import until_disconnect

        body = await read_json(request, config.max_payload_size)
        request_id = str(request.scope.get("state", {}).get("request_id", ""))
        service = state.get("rerank")
        if service is None:
            service = state["rerank"] = RerankService(state["backends"])
        return JSONResponse(await until_disconnect(request, service.rerank(body, request_id)))

    for path in ("/v1/rerank", "/rerank"):
        app.add_api_route(path, rerank, methods=["POST"], tags=["rerank"],
                          name=f"rerank{path.replace('/', '_')}",
                          **documented(RerankRequest))
