"""The gateway's gRPC clients of the router, tokenizer and history services."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sglmesh.history.v1 import history_pb2_grpc
from sglmesh.router.v1 import router_admin_pb2 as admin_pb
from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc
from sglmesh.router.v1 import router_lease_pb2_grpc as lease_grpc
from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc as tok_grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import create_channel
from services.gateway.config import EMBEDDED, GatewayConfig
from services.gateway.embedded import EmbeddedRouter, EmbeddedTokenizer
from services.gateway.errors import OpenAIError, from_grpc


@dataclass(frozen=True)
class ServedModel:
    id: str
    created: int
    max_context_length: int
    ready_workers: int
    tokenizer_worker_url: str
    is_generation: bool = True
    http_workers: int = 0  # > 0: requests select a worker by lease (HTTP workers in the fleet)
    is_reranker: bool = False


class Backends:
    """Channels and stubs, plus the short-lived model list and tokenizer bootstrapping."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        # An embedded router / tokenizer has no channel: its stubs are set by start().
        self.embedded_router = (EmbeddedRouter(config.router_args)
                                if config.router == EMBEDDED else None)
        self.embedded_tokenizer = (EmbeddedTokenizer(config.tokenizer_args)
                                   if config.tokenizer == EMBEDDED else None)
        self.router_channel = None if self.embedded_router else create_channel(config.router)
        self.tokenizer_channel = (None if self.embedded_tokenizer
                                  else create_channel(config.tokenizer))
        if self.router_channel is not None:
            self.scheduler: Any = pb_grpc.SglangSchedulerStub(self.router_channel)
            self.router_admin: Any = admin_grpc.RouterAdminServiceStub(self.router_channel)
            self.router_leases: Any = lease_grpc.RouterLeaseServiceStub(self.router_channel)
        # Relayed HTTP (HTTP workers, --backend openai); never through a proxy for workers.
        self.http = httpx.AsyncClient(
            trust_env=config.backend == "openai", follow_redirects=False,
            timeout=httpx.Timeout(config.upstream_timeout_secs, connect=10.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))
        if self.tokenizer_channel is not None:
            self.tokenizer: Any = tok_grpc.TokenizerServiceStub(self.tokenizer_channel)
        self.history_channel = create_channel(config.history) if config.history else None
        self.history = (history_pb2_grpc.HistoryServiceStub(self.history_channel)
                        if self.history_channel else None)
        self._models: dict[str, ServedModel] = {}
        self._models_at = 0.0
        self._models_lock = asyncio.Lock()
        self._loaded_tokenizers: set[str] = set()
        self._tokenizer_lock = asyncio.Lock()

    @property
    def provider(self) -> str:
        """The provider's OpenAI base url with --backend openai, else ''."""
        return self.config.worker_urls[0] if self.config.backend == "openai" else ""

    def provider_headers(self) -> dict[str, str]:
        key = self.config.provider_api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    async def _provider_models(self) -> dict[str, ServedModel]:
        try:
            reply = await self.http.get(f"{self.provider}/models", headers=self.provider_headers(),
                                        timeout=10)
        except httpx.HTTPError as exc:
            raise OpenAIError(502, f"The provider did not answer GET /models: {exc!r}",
                              code="upstream_unavailable") from exc
        if reply.status_code != 200:
            raise OpenAIError(502, f"The provider answered GET /models with HTTP "
                                   f"{reply.status_code}", code="upstream_error")
        data = reply.json().get("data") or []
        return {m["id"]: ServedModel(m["id"], int(m.get("created") or 0),
                                     int(m.get("max_model_len") or 0), 1, "", True, 1)
                for m in data if isinstance(m, dict) and m.get("id")}

    async def start(self) -> None:
        """Starts an embedded router and tokenizer (nothing to do for remote ones)."""
        if self.embedded_tokenizer is not None:
            await self.embedded_tokenizer.start()
            self.tokenizer = self.embedded_tokenizer.stub
        if self.embedded_router is not None:
            await self.embedded_router.start()
            self.scheduler = self.embedded_router.scheduler
            self.router_admin = self.embedded_router.admin
            self.router_leases = self.embedded_router.leases

    async def close(self) -> None:
        await self.http.aclose()
        for embedded in (self.embedded_router, self.embedded_tokenizer):
            if embedded is not None:
                await embedded.stop()
        for channel in (self.router_channel, self.tokenizer_channel, self.history_channel):
            if channel is not None:
                await channel.close()

    async def health_of(self, service: str) -> str:
        """A grpc.health serving status name for "router", "tokenizer" or "history"."""
        channel = {"router": self.router_channel, "tokenizer": self.tokenizer_channel,
                   "history": self.history_channel}[service]
        if channel is None:
            embedded = {"router": self.embedded_router,
                        "tokenizer": self.embedded_tokenizer}.get(service)
            return "SERVING" if embedded is not None else "NOT_CONFIGURED"
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)

    async def models(self, refresh: bool = False) -> dict[str, ServedModel]:
        """The router's models, cached for ``models_cache_secs``."""
        async with self._models_lock:
            if refresh or time.monotonic() - self._models_at > self.config.models_cache_secs:
                if self.provider:
                    self._models = await self._provider_models()
                    self._models_at = time.monotonic()
                    return self._models
                try:
                    reply = await self.router_admin.ListModels(
                        admin_pb.ListModelsRequest(), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    raise from_grpc(exc, "router") from exc
                self._models = {
                    m.id: ServedModel(m.id, m.create_time.seconds, m.max_context_length,
                                      m.ready_worker_count, m.tokenizer_worker_url,
                                      m.is_generation, m.http_worker_count, m.is_reranker)
                    for m in reply.models
                }
                self._models_at = time.monotonic()
            return self._models

    async def model(self, model_id: str) -> ServedModel:
        models = await self.models()
        if model_id not in models:
            models = await self.models(refresh=True)
        if model_id not in models and self.provider:
            # The provider may serve models its list does not name (aliases): let it decide.
            return ServedModel(model_id, 0, 0, 1, "", True, 1)
        if model_id not in models:
            raise OpenAIError(404, f"The model `{model_id}` does not exist.", param="model",
                              code="model_not_found")
        return models[model_id]

    async def ensure_tokenizer(self, model: ServedModel) -> None:
        """Makes sure the tokenizer service has the model's tokenizer (fetched from a worker)."""
        if model.id in self._loaded_tokenizers:
            return
        async with self._tokenizer_lock:
            if model.id in self._loaded_tokenizers:
                return
            try:
                await self.tokenizer.GetTokenizerInfo(
                    tok_pb.GetTokenizerInfoRequest(model=model.id), timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise from_grpc(exc, "tokenizer") from exc
                try:
                    await self.tokenizer.LoadTokenizer(
                        tok_pb.LoadTokenizerRequest(
                            model=model.id, worker_target=model.tokenizer_worker_url),
                        timeout=120)
                except grpc.aio.AioRpcError as load_exc:
                    raise from_grpc(load_exc, "tokenizer") from load_exc
            self._loaded_tokenizers.add(model.id)

    def forget_tokenizer(self, model_id: str) -> None:
        self._loaded_tokenizers.discard(model_id)
