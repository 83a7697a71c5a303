"""Gateway side of HTTP upstreams and rerank: routing text, status mapping, bodies, config."""

from __future__ import annotations

import pytest

from services.gateway.config import GatewayConfig
from services.gateway.errors import OpenAIError
from services.gateway.serving_rerank import parse_rerank, rank
from services.gateway.upstreams import (
    _upstream_error,
    routing_text,
    status_code_name,
    without_store,
)


def test_routing_text_is_prefix_stable_across_turns() -> None:
    turn1 = {"messages": [{"role": "system", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    turn2 = {"messages": [*turn1["messages"], {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "more"}]}
    assert routing_text("chat", turn1) == "system: be brief\nuser: hi\n"
    assert routing_text("chat", turn2).startswith(routing_text("chat", turn1))
    assert routing_text("completions", {"prompt": ["a", "b"]}) == "a"
    assert routing_text("generate", {"text": "t"}) == "t"
    assert routing_text("rerank", {"query": "q"}) == "q"
    assert routing_text("generate", {"input_ids": [1, 2]}) == ""


def test_status_mapping_and_upstream_errors() -> None:
    assert status_code_name(503) == "UNAVAILABLE" and status_code_name(429) == \
        "RESOURCE_EXHAUSTED" and status_code_name(404) == "NOT_FOUND"
    err = _upstream_error(400, b'{"error": {"message": "bad", "code": "x"}}', "http://w")
    assert (err.status, err.message, err.code) == (400, "bad", "x")
    assert _upstream_error(502, b"gateway down", "http://w").message == "gateway down"
    assert _upstream_error(422, b'{"detail": "nope"}', "http://w").message == "nope"


def test_store_never_reaches_an_upstream() -> None:
    assert without_store({"model": "m", "store": True, "metadata": {"a": "b"}}) == {
        "model": "m", "metadata": {"a": "b"}}


def test_http_generation_body() -> None:
    from services.gateway.backends import ServedModel
    from services.gateway.upstreams import HttpGeneration

    async def fallback(url: str):  # type: ignore[no-untyped-def]
        raise AssertionError

    g = HttpGeneration(None, ServedModel("m", 0, 0, 1, ""),  # type: ignore[arg-type]
                       {"model": "m", "store": True, "messages": []}, "r", fallback)
    assert "store" not in g.body and g.body["stream"] is True
    assert g.body["stream_options"] == {"include_usage": True}


def test_rerank_parsing_and_ranking() -> None:
    model, query, docs, top_n, ret = parse_rerank(
        {"model": "m", "query": "q", "documents": ["a", {"text": "b"}], "top_n": 1})
    assert (model, query, docs, top_n, ret) == ("m", "q", ["a", "b"], 1, True)
    for body, param in (({}, "model"), ({"model": "m"}, "query"),
                        ({"model": "m", "query": "q", "documents": "x"}, "documents"),
                        ({"model": "m", "query": "q", "documents": ["a"], "top_n": True},
                         "top_n")):
        with pytest.raises(OpenAIError) as info:
            parse_rerank(body)
        assert info.value.status == 400 and info.value.param == param
    results = rank([0.1, 0.9, 0.9, 0.0], ["a", "b", "c", "d"], 3, True)
    assert [r["index"] for r in results] == [1, 2, 0]  # ties keep document order
    assert results[0] == {"index": 1, "relevance_score": 0.9, "document": {"text": "b"}}
    assert "document" not in rank([1.0], ["a"], None, False)[0]


def test_backend_flags() -> None:
    config = GatewayConfig(backend="openai", worker_urls=["https://p.example/v1/"])
    assert config.worker_urls == ["https://p.example/v1"]
    for kw in ({"backend": "openai"}, {"backend": "openai", "worker_urls": ["p:1"]},
               {"backend": "vllm"}, {"worker_urls": ["http://p"]},
               {"backend": "openai", "worker_urls": ["http://a", "http://b"]}):
        with pytest.raises(ValueError):
            GatewayConfig(**kw)  # type: ignore[arg-type]
