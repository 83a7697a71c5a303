"""``/v1/rerank`` and ``/rerank``: score documents against a query with a cross-encoder.

Request ``{model, query, documents, top_n?, return_documents?}``; answer ``{id, object, model,
results: [{index, relevance_score, document?: {text}}], usage}``, results sorted by
``relevance_score`` (highest first; ties keep document order), at most ``top_n``.

gRPC workers: one ``Embed`` per document with ``is_cross_encoder`` and ``texts = [query,
document]``; the reply's single ``embedding`` value is the score (SGLang's cross-encoder
contract). HTTP workers get the body forwarded untouched by the relay (``upstreams.py``) and
their answer is returned as is. A model that is not a reranker is a 400 naming ``model``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from services.gateway.backends import Backends
from services.gateway.errors import OpenAIError, from_grpc, invalid
from services.gateway.upstreams import PINNED_WORKER

MODEL_KEY = "x-sglmesh-model"
REQUEST_ID_KEY = "x-request-id"
TARGET_WORKER_KEY = "x-sglmesh-target-worker"
MAX_DOCUMENTS = 1000


def parse_rerank(body: dict[str, Any]) -> tuple[str, str, list[str], int | None, bool]:
    """Checked (model, query, documents, top_n, return_documents); 400 naming the field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "Missing required parameter: 'model'.")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise invalid("query", "Invalid 'query': expected a non-empty string.")
    raw = body.get("documents")
    if not isinstance(raw, list) or not raw:
        raise invalid("documents", "Invalid 'documents': expected a non-empty list of strings.")
    if len(raw) > MAX_DOCUMENTS:
        raise invalid("documents", f"Invalid 'documents': at most {MAX_DOCUMENTS} documents.")
    documents = []
    for i, doc in enumerate(raw):
        if isinstance(doc, dict) and isinstance(doc.get("text"), str):
            doc = doc["text"]
        if not isinstance(doc, str):
            raise invalid(f"documents[{i}]", f"Invalid 'documents[{i}]': expected a string "
                                             "(or {\"text\": string}).")
        documents.append(doc)
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool)
                              or top_n < 1):
        raise invalid("top_n", "Invalid 'top_n': expected a positive integer.")
    return_documents = body.get("return_documents", True)
    if not isinstance(return_documents, bool):
        raise invalid("return_documents", "Invalid 'return_documents': expected a boolean.")
    return model, query, documents, top_n, return_documents


def rank(scores: list[float], documents: list[str], top_n: int | None,
         return_documents: bool) -> list[dict[str, Any]]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if top_n is not None:
        order = order[:top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if return_documents:
            item["document"] = {"text": documents[i]}
        results.append(item)
    return results


class RerankService:
    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    async def rerank(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        name, query, documents, top_n, return_documents = parse_rerank(body)
        if self.backends.provider:
            raise OpenAIError(400, "rerank is not available with --backend openai.",
                              code="unsupported_by_backend")
        model = await self.backends.model(name)
        if not model.is_reranker:
            kind = "a generative model" if model.is_generation else "not a cross-encoder"
            raise OpenAIError(400, f"The model `{model.id}` is not a reranker ({kind}); "
                                   "/v1/rerank needs a cross-encoder model "
                                   "(*ForSequenceClassification).", param="model",
                              code="model_not_reranker")
        metadata: tuple[tuple[str, str], ...] = ((MODEL_KEY, model.id),
                                                 (REQUEST_ID_KEY, request_id))
        if PINNED_WORKER.get():
            metadata += ((TARGET_WORKER_KEY, PINNED_WORKER.get()),)

        async def score(i: int, doc: str) -> pb.EmbedResponse:
            try:
                return await self.backends.scheduler.Embed(pb.EmbedRequest(
                    request_id=f"{request_id}-{i}", is_cross_encoder=True, texts=[query, doc]),
                    metadata=metadata, timeout=120)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNIMPLEMENTED,
                                  grpc.StatusCode.INVALID_ARGUMENT):
                    raise OpenAIError(400, f"The model `{model.id}` could not score the "
                                           f"documents ({exc.details()}).", param="model",
                                      code="model_not_reranker") from exc
                raise from_grpc(exc, "router") from exc

        tasks = [asyncio.ensure_future(score(i, d)) for i, d in enumerate(documents)]
        try:
            replies = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        scores = [float(r.embedding[0]) if r.embedding else 0.0 for r in replies]
        tokens = sum(r.prompt_tokens for r in replies)
        return {"id": request_id, "object": "rerank", "created": int(time.time()),
                "model": model.id, "results": rank(scores, documents, top_n, return_documents),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
