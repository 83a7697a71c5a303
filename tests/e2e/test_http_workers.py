"""HTTP workers end to end: a router whose fleet mixes a gRPC sim worker with two HTTP workers
for one model, behind a gateway, driven through the openai SDK and raw HTTP.

The HTTP workers are real OpenAI-compatible servers: sglmesh gateways (each in front of an
inner router and a sim worker), registered with ``--worker-urls http://...``. The gateway under
test relays to them under router leases (see services/gateway/upstreams.py).
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.http_fleet import MODEL, gateway, router, sdk, sim_worker, wait_workers
from tests.procs import ServiceProcess


@dataclass
class Fleet:
    url: str  # the gateway under test
    grpc_worker: str
    http_workers: list[str]
    http_procs: list[ServiceProcess]


@pytest.fixture(scope="module")
def fleet(embedded_model_dir: Path) -> Iterator[Fleet]:
    with ExitStack() as stack:
        tokenizer = stack.enter_context(ServiceProcess("tokenizer"))
        history = stack.enter_context(ServiceProcess("history", ["--history-backend", "memory"]))
        grpc_w = sim_worker(stack, embedded_model_dir)
        inner_w = sim_worker(stack, embedded_model_dir)
        inner = router(stack, "--worker-urls", f"grpc://{inner_w.target}")
        http = [gateway(stack, "--router", inner.target, "--tokenizer", tokenizer.target)
                for _ in range(2)]
        grpc_url = f"grpc://{grpc_w.target}"
        outer = router(stack, "--worker-urls", grpc_url, *(u for u, _ in http),
                       "--cb-failure-threshold", "2", "--health-failure-threshold", "1")
        url, _ = gateway(stack, "--router", outer.target, "--tokenizer", tokenizer.target,
                         "--history", history.target)
        wait_workers(url, 3)
        yield Fleet(url, grpc_url, [u for u, _ in http], [p for _, p in http])


def test_http_workers_register_with_their_connection_mode(fleet: Fleet) -> None:
    workers = {w["url"]: w for w in wait_workers(fleet.url, 3)}
    assert set(workers) == {fleet.grpc_worker, *fleet.http_workers}
    for url in fleet.http_workers:
        assert workers[url]["connection_mode"] == "CONNECTION_MODE_HTTP"
        assert workers[url]["model_id"] == MODEL  # discovered from the server's /v1/models
    assert workers[fleet.grpc_worker]["connection_mode"] == "CONNECTION_MODE_GRPC"
    models = sdk(fleet.url).models.list()
    assert [m.id for m in models.data] == [MODEL]  # one model, a mixed fleet


def test_chat_spreads_over_grpc_and_http_workers(fleet: Fleet) -> None:
    client = sdk(fleet.url)
    served: Counter[str] = Counter()
    for i in range(9):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": f"question number {i} " + "x" * (i * 7)}])
        reply = raw.parse()
        assert reply.choices[0].message.content is not None
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        # Relayed answers name the HTTP worker; the gRPC path has no such header.
        served[raw.headers.get("x-sglmesh-worker", fleet.grpc_worker)] += 1
    assert set(served) == {fleet.grpc_worker, *fleet.http_workers}, served


def test_a_compressed_body_reaches_http_and_grpc_workers_inflated(fleet: Fleet) -> None:
    served: Counter[str] = Counter()
    for i in range(9):
        body = json.dumps({"model": MODEL, "max_tokens": 2, "messages": [
            {"role": "user", "content": f"{i} compressed question number {i} " + "z" * (i * 7)}]})
        reply = httpx.post(f"{fleet.url}/v1/chat/completions", content=gzip.compress(
            body.encode()), trust_env=False, timeout=60, headers={
            "content-type": "application/json", "content-encoding": "gzip"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] is not None
        served[reply.headers.get("x-sglmesh-worker", fleet.grpc_worker)] += 1
    assert len(served) >= 2, served  # relayed to an HTTP worker and served over gRPC
    refused = httpx.post(f"{fleet.url}/v1/chat/completions", content=b"\x1b\x03",
                         trust_env=False, headers={"content-type": "application/json",
                                                   "content-encoding": "br"})
    assert refused.status_code == 415
    assert refused.json()["error"]["param"] == "content-encoding"


def test_streaming_sse_is_relayed_untouched(fleet: Fleet) -> None:
    seen_http = False
    for i in range(6):  # until an HTTP worker serves one (the policy spreads misses)
        # Prompts that differ from their first character: each is a cache miss ("stream 0",
        # "stream 1", ... would share most of their text and follow the first one's worker).
        body = {"model": MODEL, "stream": True, "max_tokens": 4,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": f"{'uvwxyz'[i] * 24} stream"}]}
        with httpx.stream("POST", f"{fleet.url}/v1/chat/completions", json=body,
                          trust_env=False, timeout=30) as reply:
            assert reply.status_code == 200
            assert reply.headers["content-type"].startswith("text/event-stream")
            text = reply.read().decode()
            worker = reply.headers.get("x-sglmesh-worker")
        frames = [f for f in text.split("\n\n") if f]
        assert frames[-1] == "data: [DONE]" and all(f.startswith("data: ") for f in frames)
        if worker in fleet.http_workers:
            seen_http = True
            break
    assert seen_http
    # The SDK reads the same stream.
    chunks = list(sdk(fleet.url).chat.completions.create(
        model=MODEL, stream=True, max_tokens=4,
        messages=[{"role": "user", "content": "sdk stream"}]))
    assert chunks and chunks[0].choices[0].delta.role == "assistant"


def test_completions_generate_and_responses(fleet: Fleet) -> None:
    client = sdk(fleet.url)
    for i in range(3):
        completion = client.completions.create(model=MODEL, prompt=f"Once {i}", max_tokens=3)
        assert completion.choices[0].text is not None
    # SGLang's native body, relayed as is to HTTP workers (a gateway answers /generate too).
    for i in range(3):
        reply = httpx.post(f"{fleet.url}/generate", trust_env=False, timeout=30, json={
            "text": f"Hello {i}", "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
        assert reply.status_code == 200, reply.text
        assert isinstance(reply.json()["text"], str) and "meta_info" in reply.json()
    # Responses: the chain stays in this gateway's history whichever worker serves each turn.
    first = client.responses.create(model=MODEL, input="Say hi.", max_output_tokens=4)
    second = client.responses.create(model=MODEL, input="Again.", max_output_tokens=4,
                                     previous_response_id=first.id)
    assert second.status in ("completed", "incomplete")
    items = client.responses.input_items.list(second.id)
    assert [i.content[0].text for i in items.data] == ["Again."]


def test_killed_http_worker_under_load(fleet: Fleet) -> None:
    """Bounded load (4 clients x 15 requests); one HTTP worker is killed after the first few:
    every request still succeeds (retries on another worker, then breaker / health)."""
    errors: list[BaseException] = []
    done = Counter[str]()
    started = threading.Event()
    lock = threading.Lock()

    def client_loop(n: int) -> None:
        client = sdk(fleet.url)
        for i in range(15):
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, max_tokens=3,
                    messages=[{"role": "user", "content": f"load {n}-{i}"}])
                raw.parse()
                with lock:
                    done[raw.headers.get("x-sglmesh-worker", "grpc")] += 1
                    if sum(done.values()) >= 8:
                        started.set()
            except openai.APIError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    assert started.wait(60)
    fleet.http_procs[0].stop()  # SIGTERM; the gateway drains and exits
    for t in threads:
        t.join(120)
    assert not errors, errors[:3]
    assert sum(done.values()) == 60
    # The dead worker ends up out of rotation: health checks (every second here) or its
    # breaker notice it; the load above may finish before either has.
    deadline = time.monotonic() + 20
    while True:
        workers = {w["url"]: w for w in httpx.get(f"{fleet.url}/workers",
                                                  trust_env=False).json()["workers"]}
        dead = workers[fleet.http_workers[0]]
        if (dead["health"] == "WORKER_HEALTH_NOT_READY"
                or dead["circuit_state"] == "CIRCUIT_STATE_OPEN"):
            break
        assert time.monotonic() < deadline, dead
        time.sleep(0.25)
