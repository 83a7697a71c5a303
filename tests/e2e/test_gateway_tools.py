"""Tool calls and reasoning through the whole stack, on scripted model output.

SmolLM2-135M cannot produce tool calls or ``<think>`` blocks on demand, so this module runs the
real worker server (``services.worker.server.serve``) with a *scripted engine*: a stand-in for
the model (the only double here) that answers with the token ids of a fixed text, chosen by a
``script=NAME`` marker in the prompt, two tokens per chunk. Everything else is real: the
worker's gRPC servicer, a router, the tokenizer service (real tokenizer, real tool-call and
reasoning parsers), history and the gateway, driven with the openai SDK.

``python -m tests.e2e.test_gateway_tools --port P`` starts the scripted worker.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from services.common.net import free_port
from tests.procs import ServiceProcess

MODEL = "SmolLM2-135M-Instruct"
ROOT = Path(__file__).resolve().parents[2]

SCRIPTS = {
    "tool": '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "two_tools": ('[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                  '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]'),
    "think": "<think>The user wants 2+2. That is 4.</think>The answer is 4.",
    "plain": "Hello from the script.",
    # Qwen3-Coder's format: bare-text argument values, typed by the tool's schema.
    "coder": ("Checking.\n<tool_call>\n<function=get_forecast>\n<parameter=city>\n1 Main St\n"
              "</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=hourly>\ntrue\n"
              "</parameter>\n</function>\n</tool_call>"),
}


# ---- the scripted engine (runs in the worker process) ----------------------------------------

class ScriptedEngine:
    """Implements services.worker.engine_api.Engine with fixed answers instead of a model."""

    name = "scripted"
    max_running_requests = 64
    max_total_num_tokens = 1 << 20
    load_seconds = 0.0
    steps = 0
    kv_events = None
    bos_token_id = None

    def __init__(self, model_dir: Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = json.loads((model_dir / "config.json").read_text())
        self.context_length = int(config.get("max_position_embeddings", 8192))
        self.vocab_size = self.tokenizer.get_vocab_size()
        eos = self.tokenizer.token_to_id("<|im_end|>")
        self.eos_token_ids = [eos] if eos is not None else [2]
        self.scripts = {k: self.tokenizer.encode(v, add_special_tokens=False).ids
                        for k, v in SCRIPTS.items()}
        self.running: dict[str, bool] = {}

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    async def generate(self, request_id: str, input_ids: list[int],
                       options: Any) -> AsyncIterator[Any]:
        from services.worker.engine_api import EngineOutput

        prompt = self.tokenizer.decode(input_ids, skip_special_tokens=False)
        # The last marker wins (a chained prompt holds earlier turns' markers too).
        at = {k: prompt.rfind(f"script={k}") for k in SCRIPTS}
        script = max(at, key=lambda k: at[k]) if max(at.values()) >= 0 else "plain"
        ids = self.scripts[script]
        limit = options.max_new_tokens or len(ids) + 1
        self.running[request_id] = True
        out: list[int] = []
        try:
            for i in range(0, len(ids), 2):
                if not self.running.get(request_id):
                    yield EngineOutput(request_id, [], len(input_ids), len(out), finished=True,
                                       finish_reason="abort")
                    return
                step = ids[i:i + 2][:limit - len(out)]
                out += step
                await asyncio.sleep(0.001)
                if len(out) >= limit:
                    yield EngineOutput(request_id, step, len(input_ids), len(out), finished=True,
                                       finish_reason="length", output_ids=list(out))
                    return
                yield EngineOutput(request_id, step, len(input_ids), len(out))
            eos = self.eos_token_ids[0]
            yield EngineOutput(request_id, [eos], len(input_ids), len(out) + 1, finished=True,
                               finish_reason="stop", matched_token_id=eos,
                               output_ids=[*out, eos])
        finally:
            self.running.pop(request_id, None)

    def abort(self, request_id: str, message: str = "aborted") -> bool:
        if request_id in self.running:
            self.running[request_id] = False
            return True
        return False

    def active_requests(self) -> int:
        return len(self.running)

    def loads(self) -> Any:
        from services.worker.engine_api import EngineLoads

        return EngineLoads(len(self.running), 0, 0, self.max_total_num_tokens,
                           self.max_running_requests, 0.0, 0)

    def flush_cache(self) -> tuple[bool, str]:
        return True, "nothing cached"

    def info(self) -> dict[str, Any]:
        return {"engine": self.name}


def _worker_main() -> None:
    from services.common.config import parse_config
    from services.common.logs import setup_logging
    from services.worker.config import WorkerConfig
    from services.worker.server import serve

    config = parse_config(WorkerConfig, sys.argv[1:])
    setup_logging("worker", config.log_level, False, "")
    asyncio.run(serve(config, lambda _config, model_dir: ScriptedEngine(model_dir)))


# ---- the stack -----------------------------------------------------------------------------

def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, trust_env=False, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(log.read_text()[-3000:])


def _start_gateway(targets: dict[str, str], log: Path, *flags: str
                   ) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--port", str(port),
             "--router", targets["router"], "--tokenizer", targets["tokenizer"],
             "--history", targets["history"], *flags],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_http(f"{url}/health", proc, log)
    return url, proc


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def stack_services(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path
                   ) -> Iterator[dict[str, str]]:
    """history, tokenizer, one scripted worker and a router, each a real process: their
    targets, and the url of a gateway with --reasoning-parser qwen3 in front of them."""
    tmp = tmp_path_factory.mktemp("tools")
    worker_port = free_port()
    services = [
        ServiceProcess("history", ["--history-db", f"sqlite+aiosqlite:///{tmp / 'h.db'}"]),
        ServiceProcess("tokenizer"),
    ]
    worker_log = tmp / "worker.log"
    with open(worker_log, "wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.test_gateway_tools", "--port", str(worker_port),
             "--model-path", str(embedded_model_dir)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    gateway: subprocess.Popen[bytes] | None = None
    try:
        for service in services:
            service.start()
        probe = ServiceProcess("worker", port=worker_port, wait_ready=False)
        probe.proc = worker
        probe.log_path = worker_log
        probe.wait_serving()
        router = ServiceProcess("router", ["--worker-urls", f"grpc://127.0.0.1:{worker_port}"])
        services.append(router)
        router.start()
        targets = {"router": router.target, "tokenizer": services[1].target,
                   "history": services[0].target, "tmp": str(tmp)}
        url, gateway = _start_gateway(targets, tmp / "gateway.log", "--reasoning-parser",
                                      "qwen3")
        yield {**targets, "gateway": url}
    finally:
        _stop(gateway)
        _stop(worker)
        for service in reversed(services):
            service.stop()


@pytest.fixture(scope="module")
def stack(stack_services: dict[str, str]) -> str:
    return stack_services["gateway"]


@pytest.fixture(scope="module")
def client(stack: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack}/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=60))


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object",
                                           "properties": {"timezone": {"type": "string"}}}}},
]


def _ask(script: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Please help. script={script}"}]


def test_tool_call_non_stream(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=_ask("tool"), tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_streamed_tool_calls_follow_the_delta_rules(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=_ask("two_tools"), tools=TOOLS)
    chunks = list(client.chat.completions.create(model=MODEL, messages=_ask("two_tools"),
                                                 tools=TOOLS, stream=True))
    seen: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for call in chunk.choices[0].delta.tool_calls or []:
            if call.index not in seen:  # the first delta of a call: id, type and name
                assert call.id and call.type == "function" and call.function.name
                seen[call.index] = {"id": call.id, "name": call.function.name,
                                    "arguments": call.function.arguments or ""}
            else:  # later deltas: arguments only, never the name again
                assert call.id is None and call.function.name is None
                seen[call.index]["arguments"] += call.function.arguments or ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    streamed = [seen[i] for i in sorted(seen)]
    expected = [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in whole.choices[0].message.tool_calls]
    assert [s["name"] for s in streamed] == ["get_weather", "get_time"]
    assert [json.loads(s["arguments"]) for s in streamed] == \
        [json.loads(e["arguments"]) for e in expected]


def test_tool_choice_none_and_plain_text(client: openai.OpenAI) -> None:
    # tool_choice none: no parser, the JSON stays content.
    reply = client.chat.completions.create(model=MODEL, messages=_ask("tool"), tools=TOOLS,
                                           tool_choice="none")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.tool_calls is None
    assert json.loads(reply.choices[0].message.content)["name"] == "get_weather"
    # tools given, the model answers in text: content, finish stop.
    plain = client.chat.completions.create(model=MODEL, messages=_ask("plain"), tools=TOOLS)
    assert plain.choices[0].message.content == SCRIPTS["plain"]
    assert plain.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("extra", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strnig"}}}}}]},
     "tools[0].function.parameters.properties.x.type"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
])
def test_tool_request_errors(stack: str, extra: dict, param: str) -> None:
    body = {"model": MODEL, "messages": _ask("tool"), "tools": TOOLS, **extra}
    reply = httpx.post(f"{stack}/v1/chat/completions", json=body, trust_env=False)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_reasoning_content(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=_ask("think"))
    message = reply.choices[0].message
    assert message.content == "The answer is 4."
    assert message.reasoning_content == "The user wants 2+2. That is 4."  # type: ignore[attr-defined]
    chunks = list(client.chat.completions.create(model=MODEL, messages=_ask("think"),
                                                 stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                        for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert (reasoning, content) == (message.reasoning_content, message.content)  # type: ignore[attr-defined]
    # separate_reasoning=false: the raw text, think tags included, as content.
    raw = client.chat.completions.create(model=MODEL, messages=_ask("think"),
                                         extra_body={"separate_reasoning": False})
    assert raw.choices[0].message.content == SCRIPTS["think"]


def test_qwen3_coder_arguments_typed_by_the_request_schema(
        stack_services: dict[str, str]) -> None:
    """A gateway with --tool-call-parser qwen3_coder: the request's tool schema reaches the
    tokenizer's parser, which types the bare-text values (string, integer, boolean)."""
    url, gateway = _start_gateway(stack_services,
                                  Path(stack_services["tmp"]) / "coder-gateway.log",
                                  "--tool-call-parser", "qwen3_coder")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                               http_client=httpx.Client(trust_env=False, timeout=60))
        tools = [{"type": "function", "function": {"name": "get_forecast", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"},
                                             "days": {"type": "integer"},
                                             "hourly": {"type": "boolean"}}}}}]
        reply = client.chat.completions.create(model=MODEL, messages=_ask("coder"), tools=tools)
        message = reply.choices[0].message
        assert reply.choices[0].finish_reason == "tool_calls"
        assert message.content == "Checking.\n"
        [call] = message.tool_calls
        assert call.function.name == "get_forecast"
        want = {"city": "1 Main St", "days": 3, "hourly": True}
        assert json.loads(call.function.arguments) == want
        chunks = list(client.chat.completions.create(model=MODEL, messages=_ask("coder"),
                                                     tools=tools, stream=True))
        args = "".join(c.function.arguments or "" for chunk in chunks
                       for c in chunk.choices[0].delta.tool_calls or [])
        assert json.loads(args) == want
    finally:
        _stop(gateway)


def test_responses_function_calling(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "name": t["function"]["name"],
              "parameters": t["function"]["parameters"]} for t in TOOLS]
    first = client.responses.create(model=MODEL, input="Weather? script=tool", tools=tools)
    [call] = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] == "Paris"
    events = list(client.responses.create(model=MODEL, input="Weather? script=tool",
                                          tools=tools, stream=True, store=False))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == json.loads(call.arguments)
    assert events[-1].type == "response.completed"
    # The tool's output goes back as a function_call_output item, chained by id.
    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=tools,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 C script=plain"}])
    assert second.status == "completed" and second.output_text == SCRIPTS["plain"]
    assert second.usage.input_tokens > first.usage.input_tokens


if __name__ == "__main__":
    _worker_main()
