"""``--backend openai``: a gateway proxying to one OpenAI-compatible provider, through the openai
SDK. The provider is a real local OpenAI-compatible server started here (an sglmesh gateway with
an API key, in front of a router and a sim worker), never the internet.

What must hold: chat/completions/embeddings go to the provider with the provider's key; the
Responses API and conversations are served by this gateway with its own history (the provider
only ever sees assembled chat messages: its /v1/responses and /v1/conversations are never hit).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.http_fleet import MODEL, gateway, router, sdk, sim_worker, wait_workers
from tests.procs import ServiceProcess

PROVIDER_KEY = "sk-provider-test"


@dataclass
class Setup:
    url: str  # the proxying gateway
    provider: str  # the provider's root url


@pytest.fixture(scope="module")
def setup(embedded_model_dir: Path) -> Iterator[Setup]:
    with ExitStack() as stack:
        tokenizer = stack.enter_context(ServiceProcess("tokenizer"))
        history = stack.enter_context(ServiceProcess("history", ["--history-backend", "memory"]))
        worker = sim_worker(stack, embedded_model_dir)
        provider_router = router(stack, "--worker-urls", f"grpc://{worker.target}")
        provider, _ = gateway(stack, "--router", provider_router.target, "--tokenizer",
                              tokenizer.target, "--api-key", PROVIDER_KEY)  # no history
        wait_workers(provider, 1, key=PROVIDER_KEY)
        url, _ = gateway(stack, "--backend", "openai", "--worker-urls", f"{provider}/v1",
                         "--history", history.target,
                         env={"SGLMESH_GATEWAY_PROVIDER_API_KEY": PROVIDER_KEY})
        yield Setup(url, provider)


def provider_hits(setup: Setup, route: str) -> float:
    """Requests the provider served on ``route`` (its own Prometheus counter)."""
    text = httpx.get(f"{setup.provider}/metrics", trust_env=False).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("sglmesh_gateway_requests_total{") and f'route="{route}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_chat_and_stream_proxied(setup: Setup) -> None:
    client = sdk(setup.url)  # the client's key is the gateway's business (none here)
    assert [m.id for m in client.models.list().data] == [MODEL]
    before = provider_hits(setup, "/v1/chat/completions")
    reply = client.chat.completions.create(
        model=MODEL, max_tokens=4, store=True, metadata={"k": "v"},
        messages=[{"role": "user", "content": "Hello provider"}])
    assert reply.choices[0].message.content is not None and reply.usage is not None
    chunks = list(client.chat.completions.create(
        model=MODEL, max_tokens=4, stream=True, messages=[{"role": "user", "content": "Hi"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert provider_hits(setup, "/v1/chat/completions") == before + 2
    completion = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=3)
    assert completion.choices[0].text is not None
    ready = httpx.get(f"{setup.url}/readiness", trust_env=False)
    assert ready.status_code == 200 and ready.json()["backend"] == "openai"


def test_responses_and_conversations_stay_in_sglmesh_history(setup: Setup) -> None:
    client = sdk(setup.url)
    first = client.responses.create(model=MODEL, input="My name is Ada.", max_output_tokens=4)
    assert first.status in ("completed", "incomplete") and first.usage is not None
    second = client.responses.create(model=MODEL, input="What is my name?",
                                     previous_response_id=first.id, max_output_tokens=4)
    assert client.responses.retrieve(second.id).id == second.id
    stream = client.responses.create(model=MODEL, input="Stream please.", stream=True,
                                     previous_response_id=second.id, max_output_tokens=4)
    kinds = [event.type for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed",
                                                             "response.incomplete")

    conv = client.conversations.create(items=[{"role": "user", "content": "Remember 42."}])
    reply = client.responses.create(model=MODEL, input="Which number?", conversation=conv.id,
                                    max_output_tokens=4)
    items = client.conversations.items.list(conv.id, order="asc")
    assert items.data[0].content[0].text == "Remember 42."
    assert items.data[1].content[0].text == "Which number?"
    assert items.data[-1].id.startswith("msg") and reply.output
    # The provider only ever saw chat completions (assembled messages), never state.
    assert provider_hits(setup, "/v1/responses") == 0
    assert provider_hits(setup, "/v1/conversations") == 0
    assert provider_hits(setup, "/v1/responses/{response_id}") == 0


def test_unsupported_routes_and_provider_errors(setup: Setup) -> None:
    for path, body in (("/generate", {"text": "x"}),
                       ("/v1/rerank", {"model": MODEL, "query": "q", "documents": ["d"]})):
        reply = httpx.post(f"{setup.url}{path}", json=body, trust_env=False)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["code"] == "unsupported_by_backend"
    # The provider's own errors come back with its status and message.
    with pytest.raises(openai.BadRequestError) as info:
        sdk(setup.url).chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert re.search("messages", str(info.value))


def test_wrong_provider_key_is_a_clear_401(setup: Setup) -> None:
    with gateway_with_key(setup, "sk-wrong") as url:
        with pytest.raises(openai.AuthenticationError):
            sdk(url).chat.completions.create(
                model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x"}])


def gateway_with_key(setup: Setup, key: str):  # type: ignore[no-untyped-def]
    from tests.e2e.http_fleet import gateway_proc

    class _Ctx:
        def __enter__(self) -> str:
            self._cm = gateway_proc("--backend", "openai", "--worker-urls",
                                    f"{setup.provider}/v1", "--provider-api-key", key)
            return self._cm.__enter__()[0]

        def __exit__(self, *exc: object) -> None:
            self._cm.__exit__(*exc)

    return _Ctx()
