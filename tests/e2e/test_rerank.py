"""``/v1/rerank`` and ``/rerank`` end to end, through httpx.

The reranker is ``services.worker.sim_rerank``: a SIMULATED cross-encoder worker (word-overlap
scores; no reranker model runs on this CPU box). It speaks the real worker contract (``Embed``
with ``is_cross_encoder``), so the gateway -> router -> worker path is the real one. The sim
generative worker stands for a model that is not a reranker (the 400 path). The HTTP case puts
a gateway (an OpenAI-compatible server with /v1/rerank) behind a second router as an HTTP
worker: the request is forwarded to it untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.http_fleet import MODEL, gateway, router, sim_worker, wait_workers
from tests.procs import ServiceProcess

RERANKER = "sim-reranker"
QUERY = "capital of France"
DOCS = ["Berlin is the capital of Germany.", "Paris is the capital of France.",
        "Bananas are yellow.", "France borders Spain."]


@dataclass
class Setup:
    grpc_gateway: str  # router with the gRPC reranker and a generative worker
    http_gateway: str  # router whose only worker is an HTTP reranker server
    http_worker: str


@pytest.fixture(scope="module")
def setup(embedded_model_dir: Path) -> Iterator[Setup]:
    with ExitStack() as stack:
        tokenizer = stack.enter_context(ServiceProcess("tokenizer"))
        reranker = stack.enter_context(ServiceProcess(
            "worker.sim_rerank", ["--served-model-name", RERANKER]))
        generative = sim_worker(stack, embedded_model_dir)
        main_router = router(stack, "--worker-urls", f"grpc://{reranker.target}",
                             f"grpc://{generative.target}")
        url, _ = gateway(stack, "--router", main_router.target, "--tokenizer", tokenizer.target)
        wait_workers(url, 2)
        rerank_router = router(stack, "--worker-urls", f"grpc://{reranker.target}")
        http_worker, _ = gateway(stack, "--router", rerank_router.target, "--tokenizer",
                                 tokenizer.target)
        wait_workers(http_worker, 1)
        outer = router(stack, "--worker-urls", http_worker)
        http_url, _ = gateway(stack, "--router", outer.target, "--tokenizer", tokenizer.target)
        wait_workers(http_url, 1)
        yield Setup(url, http_url, http_worker)


def rerank(base: str, path: str = "/v1/rerank", **body: object) -> httpx.Response:
    return httpx.post(f"{base}{path}", json={"model": RERANKER, "query": QUERY,
                                             "documents": DOCS, **body},
                      trust_env=False, timeout=30)


def test_rerank_sorts_by_relevance(setup: Setup) -> None:
    reply = rerank(setup.grpc_gateway)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["model"] == RERANKER and data["object"] == "rerank"
    results = data["results"]
    assert [r["index"] for r in results][0] == 1  # "Paris is the capital of France."
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(results) == len(DOCS)
    assert results[0]["document"] == {"text": DOCS[1]}
    assert data["usage"]["prompt_tokens"] > 0

    top = rerank(setup.grpc_gateway, "/rerank", top_n=2, return_documents=False).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in results[:2]]
    assert all("document" not in r for r in top["results"])


def test_rerank_errors(setup: Setup) -> None:
    reply = httpx.post(f"{setup.grpc_gateway}/v1/rerank", trust_env=False, timeout=30,
                       json={"model": MODEL, "query": QUERY, "documents": DOCS})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "model_not_reranker" and error["param"] == "model"
    assert "not a reranker" in error["message"]
    for body, param in (({"query": ""}, "query"), ({"documents": []}, "documents"),
                        ({"documents": ["a", 3]}, "documents[1]"), ({"top_n": 0}, "top_n"),
                        ({"return_documents": "yes"}, "return_documents")):
        bad = rerank(setup.grpc_gateway, **body)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
    missing = httpx.post(f"{setup.grpc_gateway}/v1/rerank", json={"model": "nope", "query": "q",
                                                                  "documents": ["d"]},
                         trust_env=False)
    assert missing.status_code == 404


def test_rerank_forwarded_to_http_worker(setup: Setup) -> None:
    direct = rerank(setup.grpc_gateway).json()
    reply = rerank(setup.http_gateway, top_n=3)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-sglmesh-worker"] == setup.http_worker
    results = reply.json()["results"]
    assert [r["index"] for r in results] == [r["index"] for r in direct["results"][:3]]
    # The worker's own 400 comes back as is.
    bad = rerank(setup.http_gateway, query="")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "query"
