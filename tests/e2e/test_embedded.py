"""``sglmesh up --embedded``: the router and the tokenizer inside the gateway process.

Real processes (gateway, history, one torch worker with the real model), the openai SDK. The
gateway's code is the same as with split services; these tests check that the in-process
stubs keep what the gRPC hop gave: answers, error statuses naming the field, cancellation
reaching the worker, probes, and one trace from the client to the worker.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import CHANNEL_OPTIONS, free_port
from services.supervisor import Suite, SuiteConfig

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
LONG = {"model": MODEL, "max_tokens": 2000, "ignore_eos": True, "stream": True,
        "messages": [{"role": "user", "content": "Count from one to a thousand."}]}


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Iterator[Suite]:
    tmp = tmp_path_factory.mktemp("embedded")
    config = SuiteConfig(port=free_port(), log_dir=tmp / "logs", embedded=True,
                         history_db=f"sqlite+aiosqlite:///{tmp / 'history.db'}",
                         trace_file=str(tmp / "spans.jsonl"), startup_timeout=300)
    suite = Suite(config, out=io.StringIO(),
                  env={"SGLMESH_MODEL_CACHE": str(embedded_model_dir.parent)})
    try:
        suite.start()
        yield suite
    finally:
        suite.stop()


@pytest.fixture(scope="module")
def base_url(suite: Suite) -> str:
    return f"http://127.0.0.1:{suite.ports['gateway']}"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=120))


def test_only_the_gateway_serves(suite: Suite) -> None:
    names = sorted(child.name.split("-")[0] for child in suite.children)
    assert names == ["gateway", "history", "worker"]


def test_chat_stream_and_non_stream_agree(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_errors_keep_their_status_and_field(base_url: str, client: openai.OpenAI) -> None:
    # Raised by the in-process tokenizer (a ServiceError naming the field).
    bad = httpx.post(f"{base_url}/v1/detokenize", json={"model": MODEL, "tokens": ["a"]},
                     trust_env=False)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    # Raised by the in-process router's admin API.
    missing = httpx.get(f"{base_url}/workers/grpc%3A%2F%2F127.0.0.1%3A9", trust_env=False)
    assert missing.status_code == 404, missing.text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=FRANCE)
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, input="hello")
    assert exc.value.body["param"] == "model"


def _worker_active(suite: Suite) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{suite.ports['worker-0']}",
                               options=CHANNEL_OPTIONS) as channel:
        return pb_grpc.SglangSchedulerStub(channel).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=10).active_requests


def _router_in_flight(base_url: str) -> int:
    workers = httpx.get(f"{base_url}/workers", trust_env=False, timeout=10).json()["workers"]
    return sum(int(w["in_flight_requests"]) for w in workers)


def _eventually_idle(suite: Suite, base_url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _worker_active(suite) == 0 and _router_in_flight(base_url) == 0:
            return True
        time.sleep(0.1)
    return False


def test_stream_disconnect_aborts_the_worker_and_releases_the_load(suite: Suite,
                                                                    base_url: str) -> None:
    assert _eventually_idle(suite, base_url, 15)
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=LONG, trust_env=False,
                      timeout=60) as reply:
        lines = reply.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert _worker_active(suite) == 1 and _router_in_flight(base_url) == 1
    # The client hung up after a few chunks of 2000 tokens: the worker must stop at once.
    assert _eventually_idle(suite, base_url, 5)


def test_probes(base_url: str) -> None:
    ready = httpx.get(f"{base_url}/readiness", trust_env=False, timeout=10)
    assert ready.status_code == 200
    assert ready.json()["services"] == {"router": "SERVING", "tokenizer": "SERVING"}
    deep = httpx.get(f"{base_url}/health?full=1", trust_env=False, timeout=60)
    assert deep.status_code == 200 and deep.json()["generation"]["ok"], deep.text


def test_one_trace_from_the_client_to_the_worker(suite: Suite, base_url: str) -> None:
    trace_id, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    reply = httpx.post(f"{base_url}/v1/chat/completions", trust_env=False, timeout=120, json={
        "model": MODEL, "max_tokens": 3, "messages": FRANCE},
        headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
    assert reply.status_code == 200
    path = Path(suite.config.trace_file)
    def chain_from(span: dict[str, str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
        """The (service, name) of each ancestor of ``span``, and the root it reached."""
        chain = []
        while span["parent_span_id"] in by_id:
            span = by_id[span["parent_span_id"]]
            chain.append((span["service"], span["name"]))
        return chain, span

    # Each process exports its spans in its own batches: wait until the worker's span and its
    # whole chain up to the client's span are in the file.
    deadline = time.monotonic() + 15
    while True:
        spans = [s for s in map(json.loads, path.read_text().splitlines())
                 if s["trace_id"] == trace_id] if path.exists() else []
        by_id = {s["span_id"]: s for s in spans}
        generate = [s for s in spans if s["service"] == "sglmesh-worker"
                    and s["name"].endswith("/Generate")]
        if generate and chain_from(generate[0])[1]["parent_span_id"] == client_span:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert generate, spans

    chain, span = chain_from(generate[0])
    # worker Generate <- router.attempt (in the gateway process) <- ... <- the HTTP span,
    # whose parent is the client's span.
    assert chain[0] == ("sglmesh-gateway", "router.attempt"), chain
    assert chain[-1][0] == "sglmesh-gateway" and span["parent_span_id"] == client_span, chain
