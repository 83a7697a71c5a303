"""The router's client of one HTTP worker: an SGLang HTTP server or any OpenAI-compatible server.

Same surface as :class:`services.router.worker_client.WorkerClient` for what the router itself
does with a worker (discovery, health, loads, abort, flush), so registration, the health state
machine, the load monitor and the admin API need no second code path. The request itself does
not go through the router: the gateway relays it under a lease (``services.router.leases``), so
:meth:`generate` refuses.

Discovery: ``/v1/models`` (the id clients name, ``max_model_len``), ``/get_model_info``
(SGLang: ``is_generation``, architectures), ``/get_server_info`` (SGLang: context length, dp
size); a server that answers none of them (nor ``/health``) does not register.
Health: ``GET --health-check-endpoint`` (``/health``; ``/health_generate`` for SGLang's deep
check). Loads: ``/v1/loads`` (SMG / newer SGLang) or ``/get_load`` (SGLang), when present.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from services.router.resilience import UpstreamError
from services.router.workers import EngineLoad, ModelCard


def status_code_name(status: int) -> str:
    """An HTTP status as the gRPC status code name the breaker and retry rules use
    (SMG retries 408, 429, 500, 502, 503, 504)."""
    if status < 400:
        return "OK"
    return {408: "DEADLINE_EXCEEDED", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
            502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
            401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
            409: "ABORTED", 499: "CANCELLED"}.get(
        status, "INVALID_ARGUMENT" if status < 500 else "INTERNAL")


class HttpWorkerClient:
    """httpx client for one HTTP worker url (``http://host:port``, no trailing slash)."""

    def __init__(self, url: str, health_endpoint: str = "/health", api_key: str = "") -> None:
        self.url = url.rstrip("/")
        self.health_endpoint = health_endpoint if health_endpoint.startswith("/") \
            else f"/{health_endpoint}"
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # Never through a proxy: workers are on the cluster network or loopback.
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, trust_env=False,
                                      timeout=httpx.Timeout(30.0))
        self._loads_path: str | None = ""  # "" = not probed yet, None = the worker has none

    async def _get_json(self, path: str, timeout: float) -> Any:
        """The JSON of ``GET path``; None when the worker does not serve it (404/405/...)."""
        try:
            reply = await self.http.get(path, timeout=timeout)
        except httpx.HTTPError as exc:
            raise UpstreamError("UNAVAILABLE", f"GET {self.url}{path}: {exc!r}", exc) from exc
        if reply.status_code != 200:
            if reply.status_code >= 500:
                raise UpstreamError(status_code_name(reply.status_code),
                                    f"GET {self.url}{path}: HTTP {reply.status_code}")
            return None
        try:
            return reply.json()
        except ValueError:
            return None

    async def model_card(self, timeout: float) -> ModelCard:
        """Discovery, waiting for the server to come up for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self._discover(min(10.0, max(0.5, deadline - time.monotonic())))
            except UpstreamError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _discover(self, timeout: float) -> ModelCard:
        models = await self._get_json("/v1/models", timeout)
        info = await self._get_json("/get_model_info", timeout)
        server = await self._get_json("/get_server_info", timeout)
        info = info if isinstance(info, dict) else {}
        server = server if isinstance(server, dict) else {}
        first: dict[str, Any] = {}
        if isinstance(models, dict) and isinstance(models.get("data"), list) and models["data"]:
            first = models["data"][0] if isinstance(models["data"][0], dict) else {}
        model_id = str(first.get("id") or server.get("served_model_name")
                       or info.get("model_path") or "")
        if not model_id:
            raise UpstreamError("UNAVAILABLE", f"{self.url} answers neither /v1/models nor "
                                               "/get_model_info with a model")
        context = first.get("max_model_len") or server.get("context_length") or 0
        archs = info.get("architectures") or []
        labels = info.get("num_labels") or 0
        return ModelCard(
            model_id=model_id,
            max_context_length=int(context) if isinstance(context, int | float) else 0,
            is_generation=bool(info.get("is_generation", True)),
            architectures=tuple(str(a) for a in archs) if isinstance(archs, list) else (),
            num_labels=int(labels) if isinstance(labels, int) else 0,
        )

    async def server_info(self, timeout: float) -> dict[str, object]:
        """SGLang's ``/get_server_info`` (dp size ...); {} when absent. The PD role is dropped:
        PD over HTTP workers is not supported."""
        try:
            info = await self._get_json("/get_server_info", timeout)
        except UpstreamError:
            return {}
        if not isinstance(info, dict):
            return {}
        info.pop("disaggregation_mode", None)
        info.pop("kv_events", None)
        return info

    async def health_check(self, timeout: float) -> tuple[bool, str]:
        try:
            reply = await self.http.get(self.health_endpoint, timeout=timeout)
        except httpx.HTTPError as exc:
            return False, f"UNAVAILABLE: GET {self.health_endpoint}: {exc!r}"
        if reply.status_code == 200:
            return True, f"GET {self.health_endpoint}: 200"
        return False, f"{status_code_name(reply.status_code)}: GET {self.health_endpoint}: " \
                      f"HTTP {reply.status_code}"

    async def get_loads(self, timeout: float) -> EngineLoad:
        if self._loads_path is None:
            raise UpstreamError("UNIMPLEMENTED", f"{self.url} serves no load endpoint")
        paths = [self._loads_path] if self._loads_path else ["/v1/loads", "/get_load"]
        for path in paths:
            body = await self._get_json(path, timeout)
            if body is not None:
                self._loads_path = path
                return parse_loads(body)
        self._loads_path = None
        raise UpstreamError("UNIMPLEMENTED", f"{self.url} serves no load endpoint")

    async def generate(self, *args: object, **kwargs: object) -> AsyncGenerator[Any, None]:
        raise UpstreamError("UNIMPLEMENTED", f"{self.url} is an HTTP worker: the gateway relays "
                                             "its requests under a lease")
        yield  # pragma: no cover - makes this an async generator

    async def kv_events(self, start_sequence_number: int) -> AsyncGenerator[Any, None]:
        raise UpstreamError("UNIMPLEMENTED", "HTTP workers publish no KV events")
        yield  # pragma: no cover

    async def abort(self, request_id: str, reason: str, timeout: float) -> bool:
        """SGLang's ``POST /abort_request``; False where the server has none."""
        try:
            reply = await self.http.post("/abort_request", json={"rid": request_id},
                                         timeout=timeout)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    async def flush_cache(self, timeout: float) -> tuple[bool, str]:
        try:
            reply = await self.http.post("/flush_cache", timeout=timeout)
        except httpx.HTTPError as exc:
            return False, f"UNAVAILABLE: {exc!r}"
        return reply.status_code == 200, f"HTTP {reply.status_code}: {reply.text[:200]}"

    async def close(self) -> None:
        await self.http.aclose()


def parse_loads(body: Any) -> EngineLoad:
    """``/v1/loads`` ({"loads": [per rank]}) or ``/get_load`` ([per rank]) -> one EngineLoad."""
    ranks = body.get("loads", [body]) if isinstance(body, dict) else body
    load = EngineLoad(source="poll", update_time=time.monotonic())
    if not isinstance(ranks, list):
        return load
    for rank in ranks:
        if not isinstance(rank, dict):
            continue
        running = rank.get("num_running_reqs", rank.get("num_reqs", 0)) or 0
        waiting = rank.get("num_waiting_reqs", 0) or 0
        if "num_reqs" in rank and "num_running_reqs" not in rank:
            running = max(0, running - waiting)  # /get_load's num_reqs counts both
        load.running_requests += int(running)
        load.waiting_requests += int(waiting)
        load.gen_throughput += float(rank.get("gen_throughput", 0) or 0)
        load.token_usage = max(load.token_usage, float(rank.get("token_usage", 0) or 0))
    return load
