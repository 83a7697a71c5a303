"""The walking skeleton end to end: five real services, the real model, the openai SDK.

The suite runs with a dead HTTP proxy in every service's environment and the gateway bound to
0.0.0.0: internal gRPC channels must never go through a proxy, and wildcard binds are dialled
on loopback.
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
from sglmesh.router.v1 import router_admin_pb2 as admin_pb
from sglmesh.router.v1 import router_admin_pb2_grpc as admin_grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import CHANNEL_OPTIONS, free_port
from services.supervisor import Suite, SuiteConfig

MODEL = "SmolLM2-135M-Instruct"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
DEAD_PROXY = "http://127.0.0.1:9"  # discard port: nothing answers there


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Iterator[Suite]:
    tmp = tmp_path_factory.mktemp("suite")
    config = SuiteConfig(
        host="0.0.0.0", port=free_port(), log_dir=tmp / "logs",
        history_db=f"sqlite+aiosqlite:///{tmp / 'history.db'}",
        trace_file=str(tmp / "spans.jsonl"), startup_timeout=300,
    )
    env = {"http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY, "grpc_proxy": DEAD_PROXY,
           "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "no_proxy": "", "NO_PROXY": "",
           "SGLMESH_MODEL_CACHE": str(embedded_model_dir.parent)}
    suite = Suite(config, out=io.StringIO(), env=env)
    try:
        suite.start()
        yield suite
    finally:
        suite.stop()
    assert all(not child.alive() for child in suite.children)


@pytest.fixture(scope="module")
def base_url(suite: Suite) -> str:
    return f"http://127.0.0.1:{suite.ports['gateway']}"


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=120))


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_greedy_answer_non_stream(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert reply.usage.prompt_tokens > 10
    assert 0 < reply.usage.completion_tokens <= 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_usage_counts_match_the_tokenizer(client: openai.OpenAI, suite: Suite) -> None:
    from google.protobuf import struct_pb2
    from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
    from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc as tok_grpc

    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0)
    with grpc.insecure_channel(f"127.0.0.1:{suite.ports['tokenizer']}",
                               options=CHANNEL_OPTIONS) as channel:
        stub = tok_grpc.TokenizerServiceStub(channel)
        message = struct_pb2.Struct()
        message.update(FRANCE[0])
        prompt = stub.RenderChat(tok_pb.RenderChatRequest(model=MODEL, messages=[message]))
        answer = stub.Tokenize(tok_pb.TokenizeRequest(
            model=MODEL, texts=[reply.choices[0].message.content]))
    assert reply.usage.prompt_tokens == len(prompt.token_ids)
    # The answer's tokens plus the end-of-turn token that stopped it.
    assert reply.usage.completion_tokens == answer.total_tokens + 1


def test_stream_equals_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                           max_tokens=24)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                 max_tokens=24, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no usage unless asked


def test_stream_interval_sends_fewer_larger_chunks(client: openai.OpenAI) -> None:
    """SGLang's per-request stream_interval (an extra field): the worker sends the first token
    at once, then 4 per message, so at most 1 + 5 content chunks carry the same 20 tokens of
    text that one chunk per token does."""
    messages = [{"role": "user", "content": "Tell me a long story."}]

    def stream(**extra: object) -> list[str]:
        chunks = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=20, stream=True,
            extra_body=extra)
        return [c.choices[0].delta.content for c in chunks
                if c.choices and c.choices[0].delta.content]

    each, grouped = stream(), stream(stream_interval=4)
    assert "".join(grouped) == "".join(each)
    assert len(each) > 10 and len(grouped) <= 6


def test_stream_usage_only_when_asked(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None and usage_chunk.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert "Paris" in text


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
        temperature=0, max_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stop_string_is_not_emitted(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0,
                                           stop=["Paris"])
    assert reply.choices[0].finish_reason == "stop"
    assert "Paris" not in reply.choices[0].message.content
    assert reply.choices[0].message.content.startswith("The capital of France is")


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": MODEL, "messages": FRANCE, "temperature": 3}, 400, "temperature"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user"}], "top_p": -1}, 400, "top_p"),
    ({"model": "no-such-model", "messages": FRANCE}, 404, "model"),
    ({"model": MODEL, "messages": FRANCE, "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": MODEL, "messages": FRANCE, "stream_interval": 0}, 400, "stream_interval"),
    ({"model": MODEL, "messages": FRANCE, "seed": 2 ** 64}, 400, "seed"),
    ({"model": MODEL, "messages": FRANCE, "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": FRANCE, "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ({"model": MODEL, "messages": [{"role": "user", "content": None}]}, 400,
     "messages[0].content"),
    ({"model": MODEL, "messages": [*FRANCE, {"role": "assistant"}]}, 400,
     f"messages[{len(FRANCE)}].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"text": "hi"}]}]}, 400,
     "messages[0].content[0].type"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages[0].content[0].text"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     400, "messages[0].content[0].text"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url"}]}]}, 400,
     "messages[0].content[1].image_url"),
])
def test_bad_requests_name_the_parameter(base_url: str, body: dict, status: int,
                                         param: str) -> None:
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, trust_env=False)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["param"] == param
    assert error["message"] and error["type"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_number_that_is_not_finite_is_named_as_such(base_url: str, value: str) -> None:
    # Written by hand: json.dumps would not put a bare NaN or Infinity there on purpose.
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 1, "top_p": 0.5}).replace("0.5", value)
    reply = httpx.post(f"{base_url}/v1/chat/completions", content=body, trust_env=False,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "top_p" and "finite" in error["message"]


def test_malformed_json_is_a_400(base_url: str) -> None:
    reply = httpx.post(f"{base_url}/v1/chat/completions", content=b"{not json",
                       headers={"content-type": "application/json"}, trust_env=False)
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "invalid_request_error"


def test_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=-1)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=FRANCE)


def _worker_active(suite: Suite) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{suite.ports['worker-0']}",
                               options=CHANNEL_OPTIONS) as channel:
        info = pb_grpc.SglangSchedulerStub(channel).GetServerInfo(pb.GetServerInfoRequest(),
                                                                  timeout=10)
        return info.active_requests


def _router_in_flight(suite: Suite) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{suite.ports['router']}",
                               options=CHANNEL_OPTIONS) as channel:
        loads = admin_grpc.RouterAdminServiceStub(channel).GetLoads(admin_pb.GetLoadsRequest(),
                                                                    timeout=10)
        return sum(load.in_flight_requests for load in loads.loads)


def test_client_disconnect_aborts_the_worker_request(base_url: str, suite: Suite) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": 2000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count from one to a thousand."}]}
    with httpx.Client(trust_env=False, timeout=60) as http, \
            http.stream("POST", f"{base_url}/v1/chat/completions", json=body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if seen >= 3:
                    break
        assert _worker_active(suite) == 1
    # The connection is closed: the gateway cancels, the router relays an Abort.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (_worker_active(suite) or _router_in_flight(suite)):
        time.sleep(0.2)
    assert _worker_active(suite) == 0
    assert _router_in_flight(suite) == 0


def test_one_request_is_one_trace(client: openai.OpenAI, suite: Suite) -> None:
    client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=4,
                                   extra_headers={"x-request-id": "trace-probe"})
    spans_file = Path(suite.config.trace_file)
    deadline = time.monotonic() + 10
    while True:
        spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
        root = [s for s in spans if s["attributes"].get("sglmesh.request_id") == "trace-probe"]
        if root:
            trace_id = root[0]["trace_id"]
            services = {s["service"] for s in spans if s["trace_id"] == trace_id}
            if {"sglmesh-gateway", "sglmesh-tokenizer", "sglmesh-router",
                    "sglmesh-worker"} <= services or time.monotonic() > deadline:
                break
        elif time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert root, "the gateway recorded no span for the request"
    assert {"sglmesh-gateway", "sglmesh-tokenizer", "sglmesh-router",
            "sglmesh-worker"} <= services


def test_health_and_metrics(base_url: str, suite: Suite, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=1)
    health = httpx.get(f"{base_url}/health", trust_env=False).json()
    assert health["status"] == "ok"
    metrics = httpx.get(f"{base_url}/metrics", trust_env=False).text
    assert 'sglmesh_gateway_requests_total{route="/v1/chat/completions",status="200"}' in metrics
    assert set(suite.metrics_ports) >= {"history", "router", "tokenizer"}
    for name, port in suite.metrics_ports.items():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
        if name != "history":  # history is not on the chat path yet
            assert "sglmesh_grpc_server_requests_total{" in text, name


def test_grafana_dashboard_queries_only_exported_metrics(base_url: str, suite: Suite) -> None:
    """Every metric deploy/grafana/sglmesh.json queries is declared by some running service."""
    import re

    exported: set[str] = set()
    for port in [suite.ports["gateway"], *suite.metrics_ports.values()]:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
        exported |= set(re.findall(r"^# TYPE (\w+) ", text, re.M))
    dashboard = json.loads((Path(__file__).resolve().parents[2] / "deploy" / "grafana"
                            / "sglmesh.json").read_text())
    queried = {re.sub(r"_(bucket|sum|count)$", "", name)
               for panel in dashboard["panels"] for target in panel["targets"]
               for name in re.findall(r"\bsglmesh_\w+", target["expr"])}
    queried = {name.removesuffix("_total") for name in queried}
    exported = {name.removesuffix("_total") for name in exported}
    assert len(queried) >= 15
    assert queried <= exported, sorted(queried - exported)
