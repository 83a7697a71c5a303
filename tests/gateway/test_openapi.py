"""/openapi.json describes the bodies, answers and errors of the routes (the routes read their
bodies themselves, so FastAPI alone would leave the bodies out)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from services.gateway.config import GatewayConfig
from services.gateway.server import create_app


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(GatewayConfig()).openapi()


BODIES = {
    ("/v1/chat/completions", "post"): "ChatCompletionRequest",
    ("/v1/completions", "post"): "CompletionRequest",
    ("/generate", "post"): "NativeGenerateRequest",
    ("/v1/embeddings", "post"): "EmbeddingRequest",
    ("/v1/tokenize", "post"): "TokenizeRequest",
    ("/v1/detokenize", "post"): "DetokenizeRequest",
    ("/v1/responses", "post"): "ResponsesRequest",
    ("/v1/conversations", "post"): "ConversationCreateRequest",
    ("/v1/conversations/{conversation_id}", "post"): "ConversationUpdateRequest",
    ("/v1/conversations/{conversation_id}/items", "post"): "ConversationItemsRequest",
    ("/workers", "post"): "WorkerAddRequest",
    ("/v1/rerank", "post"): "RerankRequest",
}


def test_every_body_is_described(document: dict[str, Any]) -> None:
    for (path, method), model in BODIES.items():
        body = document["paths"][path][method]["requestBody"]
        assert body["required"] is True
        ref = body["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}", path
    chat = document["components"]["schemas"]["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(chat["required"])
    assert {"tools", "tool_choice", "response_format", "stream_options", "top_k"} <= \
        set(chat["properties"])
    assert document["components"]["schemas"]["TokenizeRequest"]["required"] == ["model",
                                                                                "prompt"]


def test_answers_streams_and_errors(document: dict[str, Any]) -> None:
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionResponse")
    assert "text/event-stream" in chat["200"]["content"]
    for status in ("400", "401", "404", "413", "429", "503"):
        assert chat[status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"), status
    error = document["components"]["schemas"]["ErrorDetail"]
    assert list(error["properties"]) == ["message", "type", "param", "code"]
    # the gateway never answers FastAPI's 422, so the document does not promise one
    assert not any("422" in op.get("responses", {})
                   for path in document["paths"].values() for op in path.values())


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    text = json.dumps(document)
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert refs and refs <= set(document["components"]["schemas"])
