"""Admin (workers, loads, cache) through the router's RouterAdminService, and the probes."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf import json_format
from sglmesh.router.v1 import router_admin_pb2 as admin_pb
from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from services.gateway.backends import Backends
from services.gateway.errors import OpenAIError, from_grpc, invalid
from services.gateway.serving_chat import MODEL_KEY, REQUEST_ID_KEY

_WORKER_TYPES = {"regular": admin_pb.WORKER_TYPE_REGULAR, "prefill": admin_pb.WORKER_TYPE_PREFILL,
                 "decode": admin_pb.WORKER_TYPE_DECODE}


def to_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


class AdminService:
    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    async def _admin(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self.backends.router_admin, method)(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, "router") from exc

    async def list_workers(self, model_id: str | None) -> dict[str, Any]:
        reply = await self._admin("ListWorkers", admin_pb.ListWorkersRequest(
            model_id=model_id or ""))
        return {"workers": [to_json(w) for w in reply.workers], "total": len(reply.workers)}

    async def add_worker(self, body: dict[str, Any]) -> dict[str, Any]:
        url = body.get("url")
        if not isinstance(url, str) or not url:
            raise invalid("url", "Missing required parameter: 'url'.")
        kind = body.get("worker_type", "regular")
        if kind not in _WORKER_TYPES:
            raise invalid("worker_type", f"Invalid 'worker_type': one of {sorted(_WORKER_TYPES)}.")
        labels = body.get("labels") or {}
        if not isinstance(labels, dict):
            raise invalid("labels", "Invalid 'labels': expected an object of strings.")
        request = admin_pb.AddWorkerRequest(
            url=url, worker_type=_WORKER_TYPES[kind],
            labels={str(k): str(v) for k, v in labels.items()},
            model_id=str(body.get("model_id") or ""))
        if body.get("bootstrap_port") is not None:
            request.bootstrap_port = int(body["bootstrap_port"])
        reply = await self._admin("AddWorker", request)
        return {"status": "accepted", "job": to_json(reply.job)}

    async def get_worker(self, url: str) -> dict[str, Any]:
        reply = await self._admin("GetWorker", admin_pb.GetWorkerRequest(url=url))
        return to_json(reply.worker)

    async def remove_worker(self, url: str) -> dict[str, Any]:
        reply = await self._admin("RemoveWorker", admin_pb.RemoveWorkerRequest(url=url))
        return {"status": "accepted", "job": to_json(reply.job)}

    async def loads(self, model_id: str | None) -> dict[str, Any]:
        reply = await self._admin("GetLoads", admin_pb.GetLoadsRequest(model_id=model_id or ""))
        return {"loads": [to_json(load) for load in reply.loads]}

    async def flush_cache(self, url: str | None) -> tuple[int, dict[str, Any]]:
        reply = await self._admin("FlushCache", admin_pb.FlushCacheRequest(url=url or ""))
        results = [to_json(r) for r in reply.results]
        ok = all(r.success for r in reply.results)
        return (200 if ok else 500), {"success": ok, "results": results}

    # ---- probes ----------------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Router and tokenizer SERVING, and some model has a ready worker."""
        b = self.backends
        router, tokenizer = await asyncio.gather(b.health_of("router"), b.health_of("tokenizer"))
        checks = {"router": router, "tokenizer": tokenizer}
        try:
            models = await b.models()
            ready = {m.id: m.ready_workers for m in models.values()}
        except OpenAIError:
            ready = {}
        ok = all(v == "SERVING" for v in checks.values()) and any(ready.values())
        return ok, {"status": "ok" if ok else "unavailable", "services": checks,
                    "ready_workers": ready}

    async def deep_health(self, request_id: str) -> tuple[bool, dict[str, Any]]:
        """Every service answers, and a worker completes a 1-token generation via the router."""
        ok, body = await self.readiness()
        if self.backends.history_channel is not None:
            body["services"]["history"] = await self.backends.health_of("history")
            ok = ok and body["services"]["history"] == "SERVING"
        generation: dict[str, Any] = {"ok": False}
        model_id = next((m for m, n in body["ready_workers"].items() if n), None)
        if model_id is not None:
            try:
                generation = await self._one_token(model_id, request_id)
            except (TimeoutError, OpenAIError, grpc.aio.AioRpcError) as exc:
                generation = {"ok": False, "model": model_id,
                              "error": getattr(exc, "message", None) or str(exc)}
        body["generation"] = generation
        ok = ok and generation["ok"]
        body["status"] = "ok" if ok else "unavailable"
        return ok, body

    async def _one_token(self, model_id: str, request_id: str) -> dict[str, Any]:
        model = await self.backends.model(model_id)
        await self.backends.ensure_tokenizer(model)
        tokens = await self.backends.tokenizer.Tokenize(tok_pb.TokenizeRequest(
            model=model.id, texts=["Hi"], add_special_tokens=True), timeout=10)
        ids = list(tokens.results[0].token_ids) or [1]
        call = self.backends.scheduler.Generate(pb.GenerateRequest(
            request_id=f"health-{request_id}", tokenized=pb.TokenizedInput(input_ids=ids),
            sampling_params=pb.SamplingParams(temperature=0, top_p=1, top_k=-1,
                                              max_new_tokens=1, repetition_penalty=1),
            stream=False), metadata=((MODEL_KEY, model.id), (REQUEST_ID_KEY, request_id)),
            timeout=30)
        worker = ""
        tokens_out = 0
        try:
            async for response in call:
                if response.HasField("complete"):
                    tokens_out = response.complete.completion_tokens or len(
                        response.complete.output_ids)
                elif response.HasField("chunk"):
                    tokens_out = response.chunk.completion_tokens
            initial = await call.initial_metadata()
            worker = dict(initial or {}).get("x-sglmesh-worker", "")
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, "router") from exc
        return {"ok": tokens_out >= 1, "model": model.id, "worker": worker,
                "completion_tokens": tokens_out}
