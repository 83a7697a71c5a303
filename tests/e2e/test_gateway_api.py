"""The gateway's OpenAI surface beyond chat, end to end: five real services, the real model,
the openai SDK (and raw HTTP where the SDK hides the wire).

Extra gateway processes (same router/tokenizer/history) cover what needs other flags: API keys
as tenants, a dead history service, a gateway restart in the middle of a response chain.
"""

from __future__ import annotations

import gzip
import io
import json
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from services.common.net import free_port
from services.supervisor import Suite, SuiteConfig
from tests.procs import ServiceProcess

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Iterator[Suite]:
    tmp = tmp_path_factory.mktemp("gateway-suite")
    config = SuiteConfig(port=free_port(), log_dir=tmp / "logs",
                         history_db=f"sqlite+aiosqlite:///{tmp / 'history.db'}",
                         startup_timeout=300)
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


def sdk(base_url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=120))


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return sdk(base_url)


@contextmanager
def gateway(suite: Suite, *args: str, env: dict[str, str] | None = None,
            history: str | None = None) -> Iterator[str]:
    """Another gateway process in front of the suite's services."""
    history = history if history is not None else f"127.0.0.1:{suite.ports['history']}"
    proc = ServiceProcess("gateway", [
        "--router", f"127.0.0.1:{suite.ports['router']}",
        "--tokenizer", f"127.0.0.1:{suite.ports['tokenizer']}", "--history", history, *args],
        env=env, wait_ready=False)
    proc.start()
    url = f"http://127.0.0.1:{proc.port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/liveness", trust_env=False, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.proc is not None and proc.proc.poll() is None, proc.logs()
            assert time.monotonic() < deadline, proc.logs()
            time.sleep(0.1)
        yield url
    finally:
        proc.stop()


# ---- conversations ---------------------------------------------------------------------------

def test_conversation_crud(client: openai.OpenAI) -> None:
    conv = client.conversations.create(
        metadata={"topic": "demo"},
        items=[{"type": "message", "role": "user", "content": "Hello!"}])
    assert conv.id.startswith("conv_") and conv.object == "conversation"
    assert conv.metadata == {"topic": "demo"} and conv.created_at > 1_600_000_000

    assert client.conversations.retrieve(conv.id).id == conv.id
    updated = client.conversations.update(conv.id, metadata={"topic": "changed"})
    assert updated.metadata == {"topic": "changed"}

    added = client.conversations.items.create(conv.id, items=[
        {"type": "message", "role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "How are you?"}])
    assert [i.role for i in added.data] == ["assistant", "user"]
    assert added.first_id == added.data[0].id and added.last_id == added.data[-1].id

    # OpenAI's default order is newest first.
    page = client.conversations.items.list(conv.id)
    assert [i.content[0].text for i in page.data] == ["How are you?", "Hi there.", "Hello!"]
    assert page.data[0].content[0].type == "input_text"
    assert page.data[1].content[0].type == "output_text"
    assert page.has_more is False

    first = client.conversations.items.list(conv.id, order="asc", limit=2)
    assert first.has_more is True and len(first.data) == 2
    rest = client.conversations.items.list(conv.id, order="asc", limit=2, after=first.last_id)
    assert [i.content[0].text for i in rest.data] == ["How are you?"]
    assert rest.has_more is False
    # The SDK's auto-pagination walks the same pages.
    assert len(list(client.conversations.items.list(conv.id, limit=1))) == 3

    item = client.conversations.items.retrieve(first.data[0].id, conversation_id=conv.id)
    assert item.id == first.data[0].id and item.content[0].text == "Hello!"
    after_delete = client.conversations.items.delete(item.id, conversation_id=conv.id)
    assert after_delete.id == conv.id
    assert len(client.conversations.items.list(conv.id).data) == 2
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(item.id, conversation_id=conv.id)

    deleted = client.conversations.delete(conv.id)
    assert deleted.deleted is True and deleted.id == conv.id
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


def test_conversation_errors(base_url: str, client: openai.OpenAI) -> None:
    conv = client.conversations.create()
    cases = [
        ("post", f"/v1/conversations/{conv.id}/items", {"items": [{"role": "robot",
                                                                    "content": "x"}]},
         400, "items[0].role"),
        ("post", f"/v1/conversations/{conv.id}/items", {}, 400, "items"),
        ("get", f"/v1/conversations/{conv.id}/items?limit=500", None, 400, "limit"),
        ("get", f"/v1/conversations/{conv.id}/items?order=up", None, 400, "order"),
        ("post", "/v1/conversations", {"metadata": {"k": 1}}, 400, "metadata"),
        ("get", "/v1/conversations/conv_missing", None, 404, None),
        ("post", f"/v1/conversations/{conv.id}/items",
         {"items": [{"role": "user", "content": [{"type": "input_text"}]}]}, 400,
         "items[0].content[0].text"),
        ("post", f"/v1/conversations/{conv.id}/items",
         {"items": [{"type": "web_search_call", "id": "ws_1"}]}, 400, "items[0].type"),
        ("get", f"/v1/conversations/{conv.id}/items?after=msg_unknown", None, 400, "after"),
    ]
    for method, path, body, status, param in cases:
        reply = httpx.request(method, f"{base_url}{path}", json=body, trust_env=False)
        assert reply.status_code == status, (path, reply.text)
        error = reply.json()["error"]
        assert error["message"] and error["type"]
        if param:
            assert error["param"] == param, (path, error)


def test_api_keys_are_tenants(suite: Suite) -> None:
    # The short env alias; each key sees only its own conversations.
    with gateway(suite, env={"SGLMESH_API_KEYS": "key-a, key-b"}) as url:
        a, b = sdk(url, "key-a"), sdk(url, "key-b")
        conv = a.conversations.create(metadata={"owner": "a"})
        assert a.conversations.retrieve(conv.id).metadata == {"owner": "a"}
        with pytest.raises(openai.NotFoundError):
            b.conversations.retrieve(conv.id)
        with pytest.raises(openai.AuthenticationError):
            sdk(url, "key-c").conversations.retrieve(conv.id)
        reply = httpx.get(f"{url}/v1/models", trust_env=False)
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/liveness", trust_env=False).status_code == 200


def test_storage_unavailable_is_503_with_retry_after(suite: Suite) -> None:
    with gateway(suite, "--history-timeout-secs", "2", history=f"127.0.0.1:{free_port()}") as url:
        reply = httpx.post(f"{url}/v1/conversations", json={}, trust_env=False, timeout=30)
        assert reply.status_code == 503
        assert reply.headers["retry-after"] == "1"
        assert reply.json()["error"]["code"] == "storage_unavailable"
        with pytest.raises(openai.InternalServerError):
            sdk(url).conversations.create()


# ---- responses -------------------------------------------------------------------------------

FRANCE = "What is the capital of France?"


def _prompt_tokens(suite: Suite, messages: list[dict]) -> int:
    """The prompt length the tokenizer service renders for these messages."""
    import grpc
    from google.protobuf import struct_pb2
    from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
    from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc as tok_grpc

    from services.common.net import CHANNEL_OPTIONS

    structs = []
    for message in messages:
        struct = struct_pb2.Struct()
        struct.update(message)
        structs.append(struct)
    with grpc.insecure_channel(f"127.0.0.1:{suite.ports['tokenizer']}",
                               options=CHANNEL_OPTIONS) as channel:
        reply = tok_grpc.TokenizerServiceStub(channel).RenderChat(
            tok_pb.RenderChatRequest(model=MODEL, messages=structs))
    return len(reply.token_ids)


def test_response_non_stream(client: openai.OpenAI, suite: Suite) -> None:
    r = client.responses.create(model=MODEL, input=FRANCE, temperature=0, max_output_tokens=10)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert "Paris" in r.output_text
    assert r.output[0].type == "message" and r.output[0].role == "assistant"
    assert r.usage.input_tokens == _prompt_tokens(suite, [{"role": "user", "content": FRANCE}])
    assert 0 < r.usage.output_tokens <= 10
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens

    again = client.responses.retrieve(r.id)
    assert again.output_text == r.output_text and again.usage.input_tokens == r.usage.input_tokens
    items = client.responses.input_items.list(r.id)
    assert [i.role for i in items.data] == ["user"]
    assert items.data[0].content[0].text == FRANCE

    deleted = client.responses.delete(r.id)
    assert deleted is None  # the SDK returns nothing for a delete
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_response_stream_events(client: openai.OpenAI, base_url: str) -> None:
    whole = client.responses.create(model=MODEL, input=FRANCE, temperature=0,
                                    max_output_tokens=10, store=False)
    events = list(client.responses.create(model=MODEL, input=FRANCE, temperature=0,
                                          max_output_tokens=10, stream=True, store=False))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    terminal = [t for t in types if t in ("response.completed", "response.failed",
                                          "response.incomplete")]
    assert terminal == ["response.completed"] and types[-1] == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text
    grouped = [e.delta for e in client.responses.create(
        model=MODEL, input=FRANCE, temperature=0, max_output_tokens=10, stream=True,
        store=False, extra_body={"stream_interval": 4}) if e.type == "response.output_text.delta"]
    assert "".join(grouped) == text
    assert len(grouped) < sum(e.type == "response.output_text.delta" for e in events)
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == text
    final = events[-1].response
    assert final.usage is not None and final.usage.output_tokens > 0
    assert final.output_text == text
    # On the wire: typed event lines, and no [DONE] sentinel.
    raw = httpx.post(f"{base_url}/v1/responses", trust_env=False, timeout=60, json={
        "model": MODEL, "input": FRANCE, "max_output_tokens": 4, "stream": True,
        "store": False}).text
    assert raw.startswith("event: response.created\ndata: {")
    assert "[DONE]" not in raw
    # store=false: nothing to retrieve.
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(whole.id)


def test_response_logprobs_when_included(client: openai.OpenAI) -> None:
    """include=["message.output_text.logprobs"] returns one entry per output token (with
    top_logprobs alternatives each); streamed, the deltas carry them and the done event has
    them all; not asked, there are none."""
    asked = {"model": MODEL, "input": FRANCE, "temperature": 0, "max_output_tokens": 5,
             "store": False, "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    r = client.responses.create(**asked)
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens == 5
    assert "".join(lp.token for lp in part.logprobs) == part.text
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in part.logprobs)
    assert part.logprobs[0].token == part.logprobs[0].top_logprobs[0].token  # greedy
    events = list(client.responses.create(**asked, stream=True))
    streamed = [lp for e in events if e.type == "response.output_text.delta"
                for lp in e.logprobs]
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert [lp.token for lp in streamed] == [lp.token for lp in done.logprobs] == [
        lp.token for lp in part.logprobs]
    plain = client.responses.create(model=MODEL, input=FRANCE, temperature=0,
                                    max_output_tokens=5, store=False)
    assert plain.output[0].content[0].logprobs == []


def test_response_incomplete_at_max_output_tokens(client: openai.OpenAI) -> None:
    r = client.responses.create(model=MODEL, input="Tell me a long story.", temperature=0,
                                max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3
    events = list(client.responses.create(model=MODEL, input="Tell me a long story.",
                                          temperature=0, max_output_tokens=3, stream=True))
    assert events[-1].type == "response.incomplete"


def test_response_chain_across_gateway_restart(suite: Suite) -> None:
    with gateway(suite) as url:
        first = sdk(url).responses.create(model=MODEL, input="My name is Ada.", temperature=0,
                                          max_output_tokens=8,
                                          instructions="You are terse.")
    with gateway(suite) as url:  # a new process: everything it knows comes from history
        client = sdk(url)
        assert client.responses.retrieve(first.id).output_text == first.output_text
        second = client.responses.create(model=MODEL, input="What is my name?", temperature=0,
                                         max_output_tokens=8,
                                         previous_response_id=first.id)
        third = client.responses.create(model=MODEL, input="And again?", temperature=0,
                                        max_output_tokens=4, previous_response_id=second.id)
    # Instructions are not inherited; the chain's items are.
    expected = [{"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "What is my name?"}]
    assert second.usage.input_tokens == _prompt_tokens(suite, expected)
    assert second.previous_response_id == first.id
    expected += [{"role": "assistant", "content": second.output_text},
                 {"role": "user", "content": "And again?"}]
    assert third.usage.input_tokens == _prompt_tokens(suite, expected)


def test_response_in_conversation(client: openai.OpenAI, suite: Suite) -> None:
    conv = client.conversations.create(items=[{"role": "user", "content": "Hi, I am Bob."},
                                              {"role": "assistant", "content": "Hello Bob!"}])
    r = client.responses.create(model=MODEL, input="What is my name?", temperature=0,
                                max_output_tokens=12, conversation=conv.id)
    assert r.conversation.id == conv.id
    expected = [{"role": "user", "content": "Hi, I am Bob."},
                {"role": "assistant", "content": "Hello Bob!"},
                {"role": "user", "content": "What is my name?"}]
    assert r.usage.input_tokens == _prompt_tokens(suite, expected)
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [i.role for i in items] == ["user", "assistant", "user", "assistant"]
    assert items[-1].content[0].text == r.output_text


def test_background_response_and_cancel(client: openai.OpenAI) -> None:
    done = client.responses.create(model=MODEL, input=FRANCE, temperature=0,
                                   max_output_tokens=8, background=True)
    assert done.status in ("queued", "in_progress") and done.background is True
    deadline = time.monotonic() + 60
    while client.responses.retrieve(done.id).status == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    finished = client.responses.retrieve(done.id)
    assert finished.status in ("completed", "incomplete") and finished.usage.output_tokens > 0

    long = client.responses.create(model=MODEL, input="Count from one to a thousand.",
                                   max_output_tokens=2000, background=True,
                                   extra_body={"ignore_eos": True})
    time.sleep(0.5)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"
    foreground = client.responses.create(model=MODEL, input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(foreground.id)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": "hi", "previous_response_id": "resp_missing"}, 404, None),
    ({"input": "hi", "previous_response_id": "resp_x", "conversation": "conv_x"}, 400,
     "previous_response_id"),
    ({"input": "hi", "background": True, "store": False}, 400, "background"),
    ({"input": 5}, 400, "input"),
    ({"input": [{"role": "wizard", "content": "x"}]}, 400, "input[0].role"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
    ({"input": "hi", "max_output_tokens": 100000}, 400, "max_output_tokens"),
    ({"input": "hi", "temperature": 5}, 400, "temperature"),
    ({"input": "hi", "stream_interval": 0}, 400, "stream_interval"),
    ({"input": "hi", "min_tokens": -1}, 400, "min_tokens"),
    ({"input": "hi", "tool_choice": "required"}, 400, "tool_choice"),
    ({"input": "hi", "tool_choice": {"type": "function"}}, 400, "tool_choice.name"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}],
      "tool_choice": {"type": "function", "name": "g"}}, 400, "tool_choice.name"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, 400,
     "input[0].content[0].text"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]}, 400,
     "input[0].content[0].text"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input[0].type"),
])
def test_response_errors(base_url: str, body: dict, status: int, param: str | None) -> None:
    reply = httpx.post(f"{base_url}/v1/responses", json={"model": MODEL, **body},
                       trust_env=False, timeout=30)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/responses",
                                  "/v1/tokenize"])
@pytest.mark.parametrize(("content", "says"), [
    (b'{"model": "m", "messages": [', "could not parse the JSON body"),
    (b"\xff\xfe{}", "could not parse the JSON body"),
    (b'[{"model": "m"}]', "must be a JSON object"),
    (b"", "Missing required parameter"),
])
def test_a_body_that_is_not_a_json_object_is_a_clear_400(base_url: str, path: str,
                                                          content: bytes, says: str) -> None:
    reply = httpx.post(f"{base_url}{path}", content=content, trust_env=False, timeout=30,
                       headers={"content-type": "application/json", "x-request-id": "bad-1"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert reply.headers["x-request-id"] == "bad-1"


# ---- completions, /generate, tokenize, embeddings --------------------------------------------

PROMPT = "The capital of France is"


def test_completions(client: openai.OpenAI, base_url: str) -> None:
    one = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert one.choices[0].text and one.choices[0].finish_reason == "length"
    tokens = httpx.post(f"{base_url}/v1/tokenize", json={"model": MODEL, "prompt": PROMPT},
                        trust_env=False).json()
    assert one.usage.prompt_tokens == tokens["count"] == len(tokens["tokens"])
    assert one.usage.completion_tokens == 4
    # Token ids in, the same answer out; a list of prompts gives one choice per prompt.
    by_ids = client.completions.create(model=MODEL, prompt=tokens["tokens"], max_tokens=4,
                                       temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    both = client.completions.create(model=MODEL, prompt=[PROMPT, "One, two,"], max_tokens=4,
                                     temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == one.choices[0].text
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == one.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    grouped = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                             temperature=0, stream=True,
                                             extra_body={"stream_interval": 4}))
    assert "".join(c.choices[0].text for c in grouped) == one.choices[0].text
    assert len(grouped) < len(streamed)


@pytest.mark.parametrize(("extra", "param"), [
    ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"logprobs": 2}, "logprobs"),
    ({"prompt": []}, "prompt"), ({"prompt": [1, "a"]}, "prompt"), ({"regex": "("}, "regex"),
    ({"stream_interval": 0}, "stream_interval"),
    # Token ids the worker contract cannot carry, or the vocabulary does not hold.
    ({"prompt": [-1]}, "prompt"), ({"prompt": [2 ** 40]}, "prompt"), ({"prompt": [10 ** 8]}, "prompt"),
])
def test_completions_rejects_clearly(base_url: str, extra: dict, param: str) -> None:
    reply = httpx.post(f"{base_url}/v1/completions", trust_env=False, timeout=30,
                       json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **extra})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"text": "hi", "sampling_params": {"max_new_tokens": -3}}, "sampling_params.max_new_tokens"),
    ({"text": "hi", "sampling_params": {"stop_token_ids": [-1]}},
     "sampling_params.stop_token_ids"),
    ({"text": "hi", "sampling_params": {"logit_bias": {"5": "x"}}}, "sampling_params.logit_bias"),
    ({"text": "hi", "sampling_params": {"json_schema": "{not json"}},
     "sampling_params.json_schema"),
    ({"input_ids": [10 ** 8]}, "input_ids"),
])
def test_native_generate_names_the_bad_field(base_url: str, body: dict, param: str) -> None:
    reply = httpx.post(f"{base_url}/generate", json=body, trust_env=False, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_native_generate(base_url: str, client: openai.OpenAI) -> None:
    expected = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4,
                                         temperature=0).choices[0].text
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    reply = httpx.post(f"{base_url}/generate", json=body, trust_env=False, timeout=60).json()
    assert reply["text"] == expected
    assert reply["meta_info"]["finish_reason"] == {"type": "length"}
    assert reply["meta_info"]["completion_tokens"] == 4
    lines = httpx.post(f"{base_url}/generate", json={**body, "stream": True}, trust_env=False,
                       timeout=60).text.strip().split("\n\n")
    assert lines[-1] == "data: [DONE]"
    import json as _json
    assert _json.loads(lines[-2][6:])["text"] == expected
    bad = httpx.post(f"{base_url}/generate", trust_env=False, timeout=30,
                     json={"text": PROMPT, "sampling_params": {"max_new_tokenz": 4}})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "sampling_params.max_new_tokenz"
    # SGLang's per-request stream interval: the same text in fewer streamed events.
    grouped = httpx.post(f"{base_url}/generate", trust_env=False, timeout=60, json={
        **body, "stream": True, "sampling_params": {**body["sampling_params"],
                                                    "stream_interval": 4}}).text
    events = grouped.strip().split("\n\n")
    assert _json.loads(events[-2][6:])["text"] == expected and len(events) < len(lines)
    zero = httpx.post(f"{base_url}/generate", trust_env=False, timeout=30, json={
        "text": PROMPT, "sampling_params": {"stream_interval": 0}})
    assert zero.status_code == 400
    assert zero.json()["error"]["param"] == "sampling_params.stream_interval"


def test_tokenize_detokenize(base_url: str) -> None:
    tokens = httpx.post(f"{base_url}/v1/tokenize", json={"model": MODEL, "prompt": "Hello world"},
                        trust_env=False).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0
    text = httpx.post(f"{base_url}/v1/detokenize",
                      json={"model": MODEL, "tokens": tokens["tokens"]}, trust_env=False).json()
    assert text == {"text": "Hello world"}
    bad = httpx.post(f"{base_url}/v1/detokenize", json={"model": MODEL, "tokens": ["a"]},
                     trust_env=False)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    unknown = httpx.post(f"{base_url}/v1/detokenize", json={"model": MODEL, "tokens": [10 ** 8]},
                         trust_env=False)  # out of the vocabulary: the tokenizer's check
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tokens"
    missing = httpx.post(f"{base_url}/v1/tokenize", json={"model": "nope", "prompt": "x"},
                         trust_env=False)
    assert missing.status_code == 404


def test_embeddings_on_a_generation_model_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model=MODEL, input="hello")
    assert exc.value.body["param"] == "model"
    assert exc.value.body["code"] == "model_not_embedding"


# ---- chat completeness -------------------------------------------------------------------------

CHAT = [{"role": "user", "content": FRANCE}]


def test_chat_n_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, n=2,
                                           max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy
    assert reply.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0, n=2,
                                                 max_tokens=6, stream=True))
    texts = {0: "", 1: ""}
    finish = {}
    for chunk in chunks:
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finish[choice.index] = choice.finish_reason
    assert texts == {0: reply.choices[0].message.content, 1: reply.choices[1].message.content}
    assert finish == {0: "length", 1: "length"}


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0,
                                           max_tokens=3, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert len(content) == 3
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    # Greedy: the chosen token is the most likely one.
    assert content[0].token == content[0].top_logprobs[0].token
    streamed = list(client.chat.completions.create(model=MODEL, messages=CHAT, temperature=0,
                                                   max_tokens=3, logprobs=True, stream=True))
    tokens = [t.token for c in streamed if c.choices[0].logprobs
              for t in c.choices[0].logprobs.content or []]
    assert tokens == [t.token for t in content]


@pytest.mark.parametrize(("extra", "param"), [
    # Checked in the gateway, before any service sees the request.
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strng"}}}}}},
     "response_format.json_schema.schema.properties.a.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(unclosed"}}}},
     "response_format.json_schema.schema.pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"$ref": "#/$defs/missing"}}}},
     "response_format.json_schema.schema.$ref"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"regex": "[a-"}, "regex"),
    ({"top_logprobs": 2}, "top_logprobs"),
    # Valid, but the torch worker has no grammar backend: a 400 naming the field.
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object"}}}}, "response_format"),
])
def test_chat_constraints_are_checked(base_url: str, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, **extra}
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=body, trust_env=False,
                       timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


# ---- admin, probes, OpenAPI --------------------------------------------------------------------

def test_admin_endpoints(base_url: str, suite: Suite) -> None:
    from urllib.parse import quote

    url = f"grpc://127.0.0.1:{suite.ports['worker-0']}"
    workers = httpx.get(f"{base_url}/workers", trust_env=False).json()["workers"]
    assert [w["url"] for w in workers] == [url]
    one = httpx.get(f"{base_url}/workers/{quote(url, safe='')}", trust_env=False).json()
    assert one["url"] == url and one["model_id"] == MODEL
    loads = httpx.get(f"{base_url}/get_loads", trust_env=False).json()["loads"]
    assert [load["url"] for load in loads] == [url]
    flushed = httpx.post(f"{base_url}/flush_cache", trust_env=False, timeout=30)
    assert flushed.status_code == 200 and flushed.json()["success"] is True
    bad = httpx.post(f"{base_url}/workers", json={}, trust_env=False)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
    bad = httpx.post(f"{base_url}/workers", json={"url": "ftp://h:1"}, trust_env=False)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "url"
    assert "unsupported scheme" in bad.json()["error"]["message"]
    missing = httpx.get(f"{base_url}/workers/{quote('grpc://127.0.0.1:1', safe='')}",
                        trust_env=False)
    assert missing.status_code == 404
    # Register the same worker under a second address, then remove it.
    alias = f"grpc://localhost:{suite.ports['worker-0']}"
    added = httpx.post(f"{base_url}/workers", json={"url": alias}, trust_env=False)
    assert added.status_code == 202 and added.json()["job"]["kind"] == "JOB_KIND_ADD_WORKER"
    deadline = time.monotonic() + 30
    while alias not in [w["url"] for w in httpx.get(f"{base_url}/workers",
                                                    trust_env=False).json()["workers"]]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    removed = httpx.delete(f"{base_url}/workers/{quote(alias, safe='')}", trust_env=False)
    assert removed.status_code == 202
    while alias in [w["url"] for w in httpx.get(f"{base_url}/workers",
                                                trust_env=False).json()["workers"]]:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_probes(base_url: str, suite: Suite) -> None:
    assert httpx.get(f"{base_url}/liveness", trust_env=False).status_code == 200
    assert httpx.get(f"{base_url}/readiness", trust_env=False).status_code == 200
    deep = httpx.get(f"{base_url}/health?full=1", trust_env=False, timeout=60)
    assert deep.status_code == 200, deep.text
    body = deep.json()
    assert body["services"] == {"router": "SERVING", "tokenizer": "SERVING",
                                "history": "SERVING"}
    assert body["generation"]["ok"] is True and body["generation"]["completion_tokens"] == 1
    # Nothing behind it: alive, not ready, deep health fails, API calls are 503 + Retry-After.
    dead = f"127.0.0.1:{free_port()}"
    with gateway(suite, "--router", dead, "--tokenizer", dead, history=dead) as url:
        assert httpx.get(f"{url}/liveness", trust_env=False).status_code == 200
        assert httpx.get(f"{url}/readiness", trust_env=False, timeout=30).status_code == 503
        deep = httpx.get(f"{url}/health?full=1", trust_env=False, timeout=30)
        assert deep.status_code == 503 and deep.json()["generation"]["ok"] is False
        models = httpx.get(f"{url}/v1/models", trust_env=False, timeout=30)
        assert models.status_code == 503 and models.headers["retry-after"] == "1"
        assert models.json()["error"]["type"] == "service_unavailable"


def test_openapi_describes_every_endpoint(base_url: str) -> None:
    paths = httpx.get(f"{base_url}/openapi.json", trust_env=False).json()["paths"]
    expected = {
        "/v1/chat/completions": {"post"}, "/v1/completions": {"post"},
        "/v1/embeddings": {"post"}, "/v1/tokenize": {"post"}, "/v1/detokenize": {"post"},
        "/generate": {"post"}, "/v1/models": {"get"}, "/v1/models/{model_id}": {"get"},
        "/v1/responses": {"post"}, "/v1/responses/{response_id}": {"get", "delete"},
        "/v1/responses/{response_id}/cancel": {"post"},
        "/v1/responses/{response_id}/input_items": {"get"},
        "/v1/conversations": {"post"},
        "/v1/conversations/{conversation_id}": {"get", "post", "delete"},
        "/v1/conversations/{conversation_id}/items": {"get", "post"},
        "/v1/conversations/{conversation_id}/items/{item_id}": {"get", "delete"},
        "/workers": {"get", "post"}, "/workers/{url}": {"get", "delete"},
        "/get_loads": {"get"}, "/flush_cache": {"post"}, "/liveness": {"get"},
        "/readiness": {"get"}, "/health": {"get"}, "/metrics": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, paths[path].keys())


# ---- behaviour: payload limit, back-pressure, disconnect, request ids ------------------------

def test_payload_limit_is_413(suite: Suite) -> None:
    with gateway(suite, "--max-payload-size", "2000") as url:
        big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}
        reply = httpx.post(f"{url}/v1/chat/completions", json=big, trust_env=False)
        assert reply.status_code == 413
        assert reply.json()["error"]["code"] == "payload_too_large"

        def chunks() -> Iterator[bytes]:  # no content-length: counted while reading
            yield b'{"model": "m", "messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"y" * 500
            yield b'"}]}'

        reply = httpx.post(f"{url}/v1/chat/completions", content=chunks(), trust_env=False,
                           headers={"content-type": "application/json"})
        assert reply.status_code == 413
        small = httpx.post(f"{url}/v1/chat/completions", trust_env=False, timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert small.status_code == 200
        # A compressed body is held to the limit once inflated: 3 kB of "x" gzip to ~50 bytes.
        bomb = gzip.compress(json.dumps(big).encode())
        reply = httpx.post(f"{url}/v1/chat/completions", content=bomb, trust_env=False,
                           headers={"content-type": "application/json",
                                    "content-encoding": "gzip"})
        assert len(bomb) < 2000 and reply.status_code == 413
        assert reply.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_body_is_inflated(base_url: str, encoding: str) -> None:
    body = json.dumps({"model": MODEL, "prompt": PROMPT}).encode()
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    reply = httpx.post(f"{base_url}/v1/tokenize", content=packed, trust_env=False,
                       headers={"content-type": "application/json", "content-encoding": encoding})
    plain = httpx.post(f"{base_url}/v1/tokenize", content=body, trust_env=False,
                       headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text
    assert reply.json() == plain.json()


@pytest.mark.parametrize(("encoding", "content", "status"), [
    ("br", b"\x1b\x03", 415),  # an encoding the gateway does not take
    ("gzip", b"not gzip at all", 400),
])
def test_a_body_that_cannot_be_inflated_is_refused_naming_the_header(
        base_url: str, encoding: str, content: bytes, status: int) -> None:
    reply = httpx.post(f"{base_url}/v1/chat/completions", content=content, trust_env=False,
                       headers={"content-type": "application/json",
                                "content-encoding": encoding})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == "content-encoding" and error["type"] == "invalid_request_error"


def test_head_is_answered_like_get_without_a_body(base_url: str) -> None:
    for path in ("/liveness", "/health", "/v1/models"):
        head = httpx.head(f"{base_url}{path}", trust_env=False)
        get = httpx.get(f"{base_url}{path}", trust_env=False)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


def test_a_method_a_route_does_not_take_is_a_405_with_allow(base_url: str) -> None:
    reply = httpx.get(f"{base_url}/v1/chat/completions", trust_env=False)
    assert reply.status_code == 405
    assert reply.headers["allow"] == "POST"
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and "allowed: POST" in error["message"]


LONG = {"model": MODEL, "max_tokens": 2000, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Count from one to a thousand."}]}


def _worker_active(suite: Suite) -> int:
    import grpc
    from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
    from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

    from services.common.net import CHANNEL_OPTIONS

    with grpc.insecure_channel(f"127.0.0.1:{suite.ports['worker-0']}",
                               options=CHANNEL_OPTIONS) as channel:
        return pb_grpc.SglangSchedulerStub(channel).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=10).active_requests


def _wait_idle(suite: Suite, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while _worker_active(suite) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _worker_active(suite) == 0


def test_non_stream_disconnect_cancels_the_generation(base_url: str, suite: Suite) -> None:
    _wait_idle(suite)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json=LONG, trust_env=False, timeout=4)
    # The client hung up on a non-streaming request: the gateway cancels, the worker aborts.
    _wait_idle(suite, timeout=5)


@pytest.mark.parametrize("embedded", [False, True], ids=["split", "embedded"])
def test_request_timeout_ends_the_generation_with_a_504(suite: Suite, embedded: bool) -> None:
    """--request-timeout-secs 3: a 2000-token generation is cut at the deadline: 504 before
    any output, an SSE error event after it started; either way the worker aborts it. (3 s,
    not less: the streamed case needs its first token before the deadline on a busy machine.)"""
    flags = ["--request-timeout-secs", "3"]
    if embedded:
        flags += ["--router", "embedded", "--router-args",
                  f"--worker-urls grpc://127.0.0.1:{suite.ports['worker-0']}",
                  "--tokenizer", "embedded"]
    _wait_idle(suite)
    with gateway(suite, *flags) as url:
        deadline = time.monotonic() + 30  # the embedded router has health-checked its worker
        while httpx.get(f"{url}/readiness", trust_env=False, timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        started = time.monotonic()
        reply = httpx.post(f"{url}/v1/chat/completions", json=LONG, trust_env=False,
                           timeout=60)
        assert reply.status_code == 504, reply.text
        assert reply.json()["error"]["type"] == "timeout_error"
        assert time.monotonic() - started < 15
        _wait_idle(suite, timeout=10)
        with httpx.stream("POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True},
                          trust_env=False, timeout=60) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert '"content"' in events[1] and '"error"' in events[-1], events[-3:]
        assert json.loads(events[-1][6:])["error"]["type"] == "timeout_error"
        _wait_idle(suite, timeout=10)


def test_back_pressure_is_429_with_retry_after(suite: Suite) -> None:
    import threading

    router = ServiceProcess("router", [
        "--worker-urls", f"grpc://127.0.0.1:{suite.ports['worker-0']}",
        "--max-concurrent-requests", "1", "--queue-size", "0"])
    router.start()
    try:
        with gateway(suite, "--router", router.target) as url:
            deadline = time.monotonic() + 30  # the new router has health-checked its worker
            while httpx.get(f"{url}/readiness", trust_env=False, timeout=10).status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            started, release = threading.Event(), threading.Event()

            def hold() -> None:  # one long streaming request holds the only slot
                with httpx.Client(trust_env=False, timeout=60) as http, http.stream(
                        "POST", f"{url}/v1/chat/completions", json={**LONG, "stream": True}
                ) as stream:
                    for line in stream.iter_lines():
                        if '"content"' in line:
                            started.set()
                            release.wait(60)
                            break

            holder = threading.Thread(target=hold)
            holder.start()
            assert started.wait(60)
            try:
                reply = httpx.post(f"{url}/v1/chat/completions", trust_env=False, timeout=30,
                                   json={**LONG, "max_tokens": 1})
                assert reply.status_code == 429, reply.text
                assert reply.headers["retry-after"] == "1"
                assert reply.json()["error"]["type"] == "rate_limit_error"
                with pytest.raises(openai.RateLimitError):
                    sdk(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
            finally:
                release.set()
                holder.join(30)
    finally:
        router.stop()
    _wait_idle(suite)


def test_request_ids(base_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    echoed = httpx.post(f"{base_url}/v1/chat/completions", json=body, trust_env=False,
                        timeout=60, headers={"x-request-id": "my-id-1"})
    assert echoed.headers["x-request-id"] == "my-id-1"
    assert echoed.json()["id"] == "chatcmpl-my-id-1"
    other = httpx.get(f"{base_url}/v1/models", trust_env=False,
                      headers={"x-correlation-id": "corr-7"})
    assert other.headers["x-request-id"] == "corr-7"
    generated = httpx.get(f"{base_url}/v1/models", trust_env=False)
    assert len(generated.headers["x-request-id"]) > 20
    error = httpx.get(f"{base_url}/v1/conversations/conv_nope", trust_env=False,
                      headers={"x-request-id": "err-1"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "err-1"
    # An id gRPC metadata cannot carry is the client's error (it was a 500 from the first
    # service call), named, before any work; the response gets an id of ours.
    for header, value in (("x-request-id", "caf\xe9-1"), ("x-correlation-id", "a\tb")):
        refused = httpx.post(f"{base_url}/v1/chat/completions", json=body, trust_env=False,
                             timeout=60, headers={header: value.encode("latin-1")})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == header
        assert refused.json()["error"]["code"] == "invalid_request_id"
        assert refused.headers["x-request-id"].isascii()
