"""The tokenizer service as a real process, over gRPC."""

from __future__ import annotations

import importlib.util
import json
import queue
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from sglmesh.tokenizer.v1 import tokenizer_pb2 as pb
from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc

from services.common.errors import ErrorCode, error_details
from services.common.net import CHANNEL_OPTIONS, free_port
from tests.procs import ServiceProcess


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


@pytest.fixture(scope="module")
def service(tokenizer_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    cache = tmp_path_factory.mktemp("tok-cache")
    metrics_port = free_port()
    with ServiceProcess("tokenizer", ["--tokenizer", f"smollm2={tokenizer_dir}",
                                      "--cache-dir", str(cache), "--workers", "2",
                                      "--metrics-port", str(metrics_port)],
                        ready_timeout=60) as proc:
        proc.metrics_port = metrics_port  # type: ignore[attr-defined]
        yield proc


@pytest.fixture(scope="module")
def stub(service: ServiceProcess) -> Iterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    channel = grpc.insecure_channel(service.target, options=CHANNEL_OPTIONS)
    yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)
    channel.close()


def expect_error(call: Any, code: ErrorCode) -> Any:
    with pytest.raises(grpc.RpcError) as info:
        call()
    details = error_details(info.value)
    assert details.code == code, details
    return details


def test_list_and_info(stub: Any, tokenizer_dir: Path) -> None:
    listed = stub.ListTokenizers(pb.ListTokenizersRequest()).tokenizers
    assert [t.model for t in listed] == ["smollm2"]
    info = stub.GetTokenizerInfo(pb.GetTokenizerInfoRequest(model="smollm2")).tokenizer
    assert info.vocab_size == 49152
    assert list(info.eos_token_ids) == [2]
    assert info.HasField("bos_token_id") and info.bos_token_id == 1
    assert info.pad_token_id == 2
    assert info.has_chat_template
    assert info.source == str(tokenizer_dir)
    assert len(info.fingerprint) == 64


def test_tokenize_detokenize(stub: Any, hf_tokenizer: Any) -> None:
    texts = ["Hello world", "emoji 🎉 and 你好", ""]
    reply = stub.Tokenize(pb.TokenizeRequest(model="smollm2", texts=texts))
    ids = [list(r.token_ids) for r in reply.results]
    assert ids == [hf_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert reply.total_tokens == sum(map(len, ids))
    back = stub.Detokenize(pb.DetokenizeRequest(
        model="smollm2", sequences=[pb.TokenIds(token_ids=i) for i in ids]))
    assert list(back.texts) == texts
    special = stub.Detokenize(pb.DetokenizeRequest(
        model="smollm2", sequences=[pb.TokenIds(token_ids=[1, *ids[0], 2])],
        skip_special_tokens=True))
    assert special.texts == ["Hello world"]


def test_render_chat(stub: Any, hf_tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}]
    reply = stub.RenderChat(pb.RenderChatRequest(model="smollm2",
                                                 messages=[struct(m) for m in messages]))
    plain = [messages[0], {"role": "user", "content": "Capital of France?"}]
    expected = hf_tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    assert reply.prompt == expected
    assert list(reply.token_ids) == hf_tokenizer(expected, add_special_tokens=False)["input_ids"]
    no_prompt = stub.RenderChat(pb.RenderChatRequest(
        model="smollm2", messages=[struct(m) for m in plain], add_generation_prompt=False))
    assert not no_prompt.prompt.endswith("<|im_start|>assistant\n")


def test_render_chat_errors(stub: Any) -> None:
    user = struct({"role": "user", "content": "x"})
    d = expect_error(lambda: stub.RenderChat(pb.RenderChatRequest(model="", messages=[user])),
                     ErrorCode.INVALID_ARGUMENT)
    assert d.metadata["field"] == "model"
    d = expect_error(lambda: stub.RenderChat(pb.RenderChatRequest(model="nope", messages=[user])),
                     ErrorCode.NOT_FOUND)
    assert d.reason == "MODEL_NOT_FOUND"
    d = expect_error(lambda: stub.RenderChat(pb.RenderChatRequest(model="smollm2")),
                     ErrorCode.INVALID_ARGUMENT)
    assert d.metadata["field"] == "messages"
    # the template concatenates content: a missing content is the template's error
    d = expect_error(lambda: stub.RenderChat(pb.RenderChatRequest(
        model="smollm2", messages=[struct({"role": "user"})])), ErrorCode.INVALID_ARGUMENT)
    assert d.reason == "CHAT_TEMPLATE_ERROR"


def test_template_error_message(stub: Any, tokenizer_dir: Path) -> None:
    loaded = stub.LoadTokenizer(pb.LoadTokenizerRequest(
        model="strict", local_path=str(tokenizer_dir),
        chat_template="{% if messages|length > 1 %}{{ raise_exception('Only one message!') }}"
                      "{% endif %}{{ messages[0].content }}"))
    assert loaded.tokenizer.model == "strict" and loaded.tokenizer.has_chat_template
    msgs = [struct({"role": "user", "content": "a"}), struct({"role": "user", "content": "b"})]
    d = expect_error(lambda: stub.RenderChat(pb.RenderChatRequest(model="strict", messages=msgs)),
                     ErrorCode.INVALID_ARGUMENT)
    assert d.message == "Only one message!"
    one = stub.RenderChat(pb.RenderChatRequest(model="strict", messages=msgs[:1]))
    assert one.prompt == "a"
    # the other model keeps its own template
    assert "<|im_start|>" in stub.RenderChat(pb.RenderChatRequest(
        model="smollm2", messages=msgs[:1])).prompt


def test_errors(stub: Any, tmp_path: Path) -> None:
    d = expect_error(lambda: stub.Tokenize(pb.TokenizeRequest(model="", texts=["x"])),
                     ErrorCode.INVALID_ARGUMENT)
    assert d.metadata["field"] == "model"
    d = expect_error(lambda: stub.GetTokenizerInfo(pb.GetTokenizerInfoRequest(model="ghost")),
                     ErrorCode.NOT_FOUND)
    assert d.metadata["model"] == "ghost"
    expect_error(lambda: stub.Detokenize(pb.DetokenizeRequest(
        model="smollm2", sequences=[pb.TokenIds(token_ids=[10**6])])), ErrorCode.INVALID_ARGUMENT)
    d = expect_error(lambda: stub.LoadTokenizer(pb.LoadTokenizerRequest(
        model="x", local_path=str(tmp_path))), ErrorCode.INVALID_ARGUMENT)
    assert "tokenizer.json" in d.message
    d = expect_error(lambda: stub.LoadTokenizer(pb.LoadTokenizerRequest(model="x")),
                     ErrorCode.INVALID_ARGUMENT)
    assert d.metadata["field"] == "source"


def decode_stream(stub: Any,
                  requests: list[pb.DecodeStreamRequest]) -> list[pb.DecodeStreamResponse]:
    return list(stub.DecodeStream(iter(requests)))


def start(**kwargs: Any) -> pb.DecodeStreamRequest:
    return pb.DecodeStreamRequest(start=pb.DecodeStart(model="smollm2", **kwargs))


def tokens(ids: list[int], index: int = 0, finished: bool = False) -> pb.DecodeStreamRequest:
    return pb.DecodeStreamRequest(tokens=pb.DecodeTokens(index=index, token_ids=ids,
                                                         finished=finished))


def test_decode_stream_lockstep(stub: Any, hf_tokenizer: Any) -> None:
    text = "Paris is lovely 🎉 in spring."
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"] + [2]
    requests: queue.Queue[pb.DecodeStreamRequest | None] = queue.Queue()

    def gen() -> Iterator[pb.DecodeStreamRequest]:
        while (item := requests.get()) is not None:
            yield item

    requests.put(start())
    responses = stub.DecodeStream(gen())
    out = []
    for n, tid in enumerate(ids):
        requests.put(tokens([tid], finished=n == len(ids) - 1))
        out.append(next(responses))  # exactly one answer per tokens message
    requests.put(None)
    assert list(responses) == []
    assert "".join(r.text for r in out) == text  # special tokens skipped by default
    assert not any(r.stopped for r in out)


def test_decode_stream_stop_and_choices(stub: Any, hf_tokenizer: Any) -> None:
    def enc(t: str) -> list[int]:
        return list(hf_tokenizer(t, add_special_tokens=False)["input_ids"])

    a, b = enc("one two STOP three"), enc("alpha beta")
    reqs = [start(stop=["STOP"], skip_special_tokens=False)]
    for i in range(max(len(a), len(b))):
        if i < len(a):
            reqs.append(tokens(a[i:i + 1], index=0))
        if i < len(b):
            reqs.append(tokens(b[i:i + 1], index=1, finished=i == len(b) - 1))
    out = decode_stream(stub, reqs)
    assert len(out) == len(reqs) - 1
    text0 = "".join(r.text for r in out if r.index == 0)
    text1 = "".join(r.text for r in out if r.index == 1)
    assert text0 == "one two "
    assert text1 == "alpha beta"
    stops = [r for r in out if r.index == 0 and r.stopped]
    assert stops and stops[0].matched_stop == "STOP"
    assert not any(r.stopped for r in out if r.index == 1)


def test_decode_stream_no_stop_trim_and_flush(stub: Any, hf_tokenizer: Any) -> None:
    ids = list(hf_tokenizer("done </s", add_special_tokens=False)["input_ids"])
    out = decode_stream(stub, [start(stop=["</stop>"], no_stop_trim=True), tokens(ids),
                               tokens([], finished=True)])
    assert out[0].text == "done " and out[1].text == "</s"
    ids = list(hf_tokenizer("x</stop>y", add_special_tokens=False)["input_ids"])
    out = decode_stream(stub, [start(stop=["</stop>"], no_stop_trim=True), tokens(ids)])
    assert out[0].text == "x</stop>" and out[0].stopped and out[0].matched_stop == "</stop>"


def test_decode_stream_reasoning(stub: Any, hf_tokenizer: Any) -> None:
    ids = list(hf_tokenizer("<think>hmm, 2+2</think>\n\nIt is 4.",
                            add_special_tokens=False)["input_ids"])
    reqs = [start(reasoning_parser="qwen3")] + [tokens([i]) for i in ids]
    reqs.append(tokens([], finished=True))
    out = decode_stream(stub, reqs)
    assert "".join(r.reasoning_text for r in out) == "hmm, 2+2"
    assert "".join(r.text for r in out) == "It is 4."


def test_decode_stream_prompt_context(stub: Any, hf_tokenizer: Any) -> None:
    prompt = list(hf_tokenizer("The capital of France is", add_special_tokens=False)["input_ids"])
    ids = list(hf_tokenizer(" Paris", add_special_tokens=False)["input_ids"])
    out = decode_stream(stub, [start(prompt_token_ids=prompt), tokens(ids, finished=True)])
    assert out[0].text == " Paris"


def test_decode_stream_renders_the_chat_first(stub: Any, hf_tokenizer: Any) -> None:
    """A start with ``render``: the first answer is RenderChat's, then decoding goes on with
    the prompt's tail as context (one call where the gateway used to make two)."""
    messages = [struct({"role": "user", "content": "Capital of France?"})]
    render = pb.RenderChatRequest(model="smollm2", messages=messages)
    answer = hf_tokenizer(" Paris.", add_special_tokens=False)["input_ids"]
    out = decode_stream(stub, [start(render=render, stop=["."]),
                               tokens(answer, finished=True)])
    assert out[0].rendered == stub.RenderChat(render) and not out[0].text
    assert "".join(r.text for r in out[1:]) == " Paris" and out[-1].stopped
    # A template the messages break is the same error as RenderChat's, before any decoding.
    bad = pb.RenderChatRequest(model="smollm2", messages=[struct({"role": "user"})])
    d = expect_error(lambda: decode_stream(stub, [start(render=bad)]),
                     ErrorCode.INVALID_ARGUMENT)
    assert d.reason == "CHAT_TEMPLATE_ERROR"


@pytest.mark.parametrize("requests, field", [
    ([tokens([1])], "start"),
    ([start(reasoning_parser="nope")], "reasoning_parser"),
    ([start(tool_parser="nope")], "tool_parser"),
    ([start(), start()], "start"),
    ([start(), tokens([10**7])], "tokens.token_ids"),
    ([start(), tokens([5], finished=True), tokens([5])], "tokens.index"),
])
def test_decode_stream_errors(stub: Any, requests: list[pb.DecodeStreamRequest],
                              field: str) -> None:
    d = expect_error(lambda: decode_stream(stub, requests), ErrorCode.INVALID_ARGUMENT)
    assert d.metadata["field"] == field


def test_decode_stream_unknown_model(stub: Any) -> None:
    reqs = [pb.DecodeStreamRequest(start=pb.DecodeStart(model="ghost")), tokens([5])]
    expect_error(lambda: decode_stream(stub, reqs), ErrorCode.NOT_FOUND)
    reqs = [pb.DecodeStreamRequest(start=pb.DecodeStart(model=""))]
    d = expect_error(lambda: decode_stream(stub, reqs), ErrorCode.INVALID_ARGUMENT)
    assert d.metadata["field"] == "model"


def test_concurrent_calls(stub: Any) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(20):
                r = stub.Tokenize(pb.TokenizeRequest(model="smollm2", texts=[f"text {n}"] * 8))
                assert r.total_tokens > 0
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_chat_template_flag(tokenizer_dir: Path, tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    with ServiceProcess("tokenizer", ["--tokenizer", f"m={tokenizer_dir}",
                                      "--chat-template", str(template)],
                        ready_timeout=60) as proc:
        channel = grpc.insecure_channel(proc.target, options=CHANNEL_OPTIONS)
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        reply = stub.RenderChat(pb.RenderChatRequest(
            model="m", messages=[struct({"role": "user", "content": "hi"})]))
        channel.close()
    assert reply.prompt == "[user] hi\n"


WORKER_MISSING = importlib.util.find_spec("services.worker.__main__") is None


@pytest.mark.skipif(WORKER_MISSING, reason="services/worker/__main__.py is not there yet")
def test_tokenizer_from_worker(tokenizer_dir: Path, tmp_path: Path, hf_tokenizer: Any) -> None:
    with ServiceProcess("worker", [], ready_timeout=300) as worker:
        cache = tmp_path / "cache"
        with ServiceProcess("tokenizer", ["--tokenizer", f"smol=grpc://{worker.target}",
                                          "--cache-dir", str(cache)], ready_timeout=120) as tok:
            channel = grpc.insecure_channel(tok.target, options=CHANNEL_OPTIONS)
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            info = stub.GetTokenizerInfo(pb.GetTokenizerInfoRequest(model="smol")).tokenizer
            assert info.source == f"grpc://{worker.target}"
            assert info.vocab_size == 49152 and list(info.eos_token_ids) == [2]
            assert info.has_chat_template
            assert any(p.is_dir() for p in cache.iterdir())
            reply = stub.Tokenize(pb.TokenizeRequest(model="smol", texts=["Hello 🎉"]))
            assert list(reply.results[0].token_ids) == \
                hf_tokenizer("Hello 🎉", add_special_tokens=False)["input_ids"]
            # LoadTokenizer with a worker target, under a second model id
            again = stub.LoadTokenizer(pb.LoadTokenizerRequest(model="smol2",
                                                               worker_target=worker.target))
            assert again.tokenizer.fingerprint == info.fingerprint
            channel.close()


def test_unreachable_worker(stub: Any) -> None:
    from services.common.net import free_port

    d = expect_error(lambda: stub.LoadTokenizer(pb.LoadTokenizerRequest(
        model="w", worker_target=f"127.0.0.1:{free_port()}")), ErrorCode.UNAVAILABLE)
    assert d.reason == "WORKER_UNAVAILABLE"
    listed = [t.model for t in stub.ListTokenizers(pb.ListTokenizersRequest()).tokenizers]
    assert "w" not in listed and "smollm2" in listed


def test_bad_startup_source_exits(tmp_path: Path) -> None:
    proc = ServiceProcess("tokenizer", ["--tokenizer", f"m={tmp_path / 'missing'}"],
                          ready_timeout=30)
    with pytest.raises(RuntimeError, match="not a directory"):
        proc.start()
    proc.stop()


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


def test_decode_stream_tool_calls(stub: Any, hf_tokenizer: Any) -> None:
    output = ('Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
              '</tool_call>')
    ids = hf_tokenizer(output, add_special_tokens=False)["input_ids"]
    reqs = [start(tool_parser="hermes", tools=[struct(WEATHER_TOOL)])]
    reqs += [tokens([i], finished=n == len(ids) - 1) for n, i in enumerate(ids)]
    replies = decode_stream(stub, reqs)
    assert len(replies) == len(ids)
    deltas = [c for r in replies for c in r.tool_calls]
    assert "".join(r.text for r in replies) == "Sure."
    assert deltas[0].name == "get_weather" and deltas[0].id.startswith("call_")
    assert all(not d.name and not d.id and d.tool_index == 0 for d in deltas[1:])
    assert json.loads("".join(d.arguments for d in deltas)) == {"city": "Paris"}


def _streamed_calls(stub: Any, hf_tokenizer: Any, output: str, **start_args: Any
                    ) -> tuple[str, list[tuple[str, Any]]]:
    ids = hf_tokenizer(output, add_special_tokens=False)["input_ids"]
    reqs = [start(**start_args)]
    reqs += [tokens([i], finished=n == len(ids) - 1) for n, i in enumerate(ids)]
    replies = decode_stream(stub, reqs)
    calls: dict[int, list[str]] = {}
    for delta in (c for r in replies for c in r.tool_calls):
        entry = calls.setdefault(delta.tool_index, [delta.name, ""])
        entry[1] += delta.arguments
    return ("".join(r.text for r in replies),
            [(name, json.loads(args)) for name, args in calls.values()])


def test_decode_stream_typed_tag_arguments(stub: Any, hf_tokenizer: Any) -> None:
    """qwen3_coder writes argument values as bare text: the tool's schema types them."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"},
                                         "days": {"type": "integer"}}}}}
    output = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n42 Street\n</parameter>\n"
              "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    text, calls = _streamed_calls(stub, hf_tokenizer, output, tool_parser="qwen3_coder",
                                  tools=[struct(tool)])
    assert text == ""
    assert calls == [("get_weather", {"city": "42 Street", "days": 3})]


def test_decode_stream_default_parser_falls_back_to_json(stub: Any, hf_tokenizer: Any) -> None:
    """No parser named, a model name no format is known for: JSON calls are still calls."""
    output = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    text, calls = _streamed_calls(stub, hf_tokenizer, output, tools=[struct(WEATHER_TOOL)])
    assert (text, calls) == ("", [("get_weather", {"city": "Paris"})])


def test_tool_validation_over_grpc(stub: Any) -> None:
    bad = {"type": "function", "function": {"name": "ok", "parameters": {"type": "list"}}}
    details = expect_error(lambda: decode_stream(
        stub, [start(tool_parser="hermes", tools=[struct(WEATHER_TOOL), struct(bad)])]),
        ErrorCode.INVALID_ARGUMENT)
    assert "tools[1].function.parameters.type" in details.message
    details = expect_error(lambda: stub.RenderChat(pb.RenderChatRequest(
        model="smollm2", messages=[struct({"role": "user", "content": "hi"})],
        tools=[struct({"type": "function", "function": {"name": "a b"}})])),
        ErrorCode.INVALID_ARGUMENT)
    assert "tools[0].function.name" in details.message


def scrape(port: int) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    body = opener.open(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith("sglmesh_tokenizer_"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_cache_and_request_metrics(stub: Any, service: ServiceProcess) -> None:
    messages = [struct({"role": "system", "content": "Be brief."})]
    for n in range(4):
        messages.append(struct({"role": "user", "content": f"question {n}"}))
        stub.RenderChat(pb.RenderChatRequest(model="smollm2", messages=messages))
        messages.append(struct({"role": "assistant", "content": f"answer {n}"}))
    stub.Tokenize(pb.TokenizeRequest(model="smollm2", texts=["same text", "same text"]))
    m = scrape(service.metrics_port)  # type: ignore[attr-defined]
    assert m['sglmesh_tokenizer_cache_hits_total{cache="prefix",model="smollm2"}'] >= 3
    assert m['sglmesh_tokenizer_cache_hits_total{cache="exact",model="smollm2"}'] >= 1
    assert m['sglmesh_tokenizer_cache_misses_total{cache="exact",model="smollm2"}'] >= 5
    assert m['sglmesh_tokenizer_cache_bytes{cache="prefix",model="smollm2"}'] > 0
    assert m['sglmesh_tokenizer_prefix_cache_reused_tokens_total{model="smollm2"}'] > 0
    assert m['sglmesh_tokenizer_requests_total{method="RenderChat",outcome="ok"}'] >= 4
    assert m['sglmesh_tokenizer_request_duration_seconds_count{method="Tokenize"}'] >= 1
    assert m['sglmesh_tokenizer_loaded_models'] >= 1
    assert any(k.startswith('sglmesh_tokenizer_requests_total{method="DecodeStream"')
               for k in m)
