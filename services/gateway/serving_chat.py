"""``/v1/chat/completions``: validate -> render + tokenize -> route + generate -> decode.

One code path for streaming and non-streaming: the worker always streams; the tokenizer's
DecodeStream turns each chunk into text, reasoning and tool-call deltas in lock-step; the
non-streaming answer is the sum of the deltas. ``n > 1`` fans out into n generations (one
Generate call each, its own request id ``<id>-<index>`` and seed ``seed + index``), merged by
choice index.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from pydantic_core import to_json
from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from services.common.structs import to_struct
from services.gateway.backends import Backends, ServedModel
from services.gateway.errors import OpenAIError, from_grpc, invalid
from services.gateway.items import check_part_payload
from services.gateway.metrics import TTFT, record_usage
from services.gateway.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    Usage,
)
from services.gateway.schema import check_json_schema
from services.gateway.upstreams import PINNED_WORKER, HttpGeneration, UpstreamPool

log = logging.getLogger(__name__)

MODEL_KEY = "x-sglmesh-model"
REQUEST_ID_KEY = "x-request-id"
TARGET_WORKER_KEY = "x-sglmesh-target-worker"
# The decoder needs a few prompt tokens of context for the first output token's spacing (what
# /v1/completions sends; a chat's rendered start lets the tokenizer keep the same tail itself).
PROMPT_CONTEXT_TOKENS = 8

# A worker's INVALID_ARGUMENT field -> the request parameter it came from.
_WORKER_FIELDS = {
    "return_logprob": "logprobs",
    "top_logprobs_num": "top_logprobs",
    "sampling_params.n": "n",
    "sampling_params.max_new_tokens": "max_tokens",
    "sampling_params.min_new_tokens": "min_tokens",
    "sampling_params.stop_token_ids": "stop_token_ids",
}
_CONSTRAINT_FIELDS = {"sampling_params.json_schema", "sampling_params.regex",
                      "sampling_params.ebnf_grammar", "sampling_params.structural_tag"}


@dataclass
class ToolCallPart:
    """One streamed fragment of a tool call: id and name only on a call's first fragment."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class Delta:
    """What one worker chunk added to one choice."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallPart] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    index: int = 0

    def __bool__(self) -> bool:
        return bool(self.text or self.reasoning or self.tool_calls or self.logprobs)


@dataclass
class GenerationResult:
    """The end state of one generation."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    matched_stop: str | int | None = None
    tool_calls: int = 0


@dataclass
class Generation:
    """One running generation: a router Generate call paired with a tokenizer DecodeStream."""

    backends: Backends
    request_id: str
    model: ServedModel
    generate_request: pb.GenerateRequest
    decode_start: tok_pb.DecodeStart
    index: int = 0
    constraint_param: str = "response_format"
    # The request field the prompt's token ids came from (a worker names its own field).
    prompt_param: str = "messages"
    # Decode each chunk as it arrives (streaming). Off: decode once at the end, one tokenizer
    # round trip instead of one per chunk (the worker applies stop strings itself; the
    # tokenizer still trims them and parses tools/reasoning over the whole output).
    lockstep: bool = True
    result: GenerationResult = field(default_factory=GenerationResult)
    # A gRPC worker a lease chose (mixed gRPC + HTTP fleets); "" lets the router's policy pick.
    target_worker: str = ""
    # A decode stream already opened with ``decode_start`` (and its rendered prompt read).
    decode_call: Any = None

    async def deltas(self) -> AsyncIterator[Delta]:
        metadata: tuple[tuple[str, str], ...] = (
            (MODEL_KEY, self.model.id), (REQUEST_ID_KEY, self.request_id))
        target = self.target_worker or PINNED_WORKER.get()
        if target:
            metadata += ((TARGET_WORKER_KEY, target),)
        # Decoded once at the end: one message from the worker (its complete, with every output
        # id) instead of one per token, each a gRPC read in the router and here.
        self.generate_request.stream = self.lockstep
        decode_call = self.decode_call
        opened = decode_call is not None
        if decode_call is None:
            decode_call = self.backends.tokenizer.DecodeStream(metadata=metadata)
        # --request-timeout-secs bounds the generation (a gRPC deadline: the router aborts the
        # worker's request when it passes; the client gets a 504 or an SSE error event).
        generate_call = self.backends.scheduler.Generate(
            self.generate_request, metadata=metadata,
            timeout=self.backends.config.request_timeout_secs)
        completed = False
        pending: list[int] = []
        try:
            if not opened:
                try:
                    if self.decode_start.HasField("render"):
                        await open_rendered(decode_call, self.decode_start)
                    else:
                        await decode_call.write(tok_pb.DecodeStreamRequest(
                            start=self.decode_start))
                except grpc.aio.AioRpcError as exc:
                    raise tokenizer_error(exc) from exc
            # Streaming from a tokenizer service batches what arrived during a chunk's decode
            # round trip. Otherwise nothing can arrive meanwhile (the worker sends one message,
            # or an in-process decode never yields to the loop) and a reader task would only
            # add a task switch per chunk.
            batches = (_batches(generate_call)
                       if self.lockstep and self.backends.embedded_tokenizer is None
                       else _one_by_one(generate_call))
            async for batch in batches:
                ids: list[int] = []
                logprobs: list[dict[str, Any]] = []
                for response in batch:
                    if response.HasField("chunk"):
                        chunk = response.chunk
                        self.result.prompt_tokens = chunk.prompt_tokens
                        self.result.completion_tokens = chunk.completion_tokens
                        self.result.cached_tokens = chunk.cached_tokens
                        ids += chunk.token_ids
                        if chunk.HasField("output_logprobs"):
                            logprobs += await self._logprobs(chunk.output_logprobs)
                    elif response.HasField("complete"):
                        done = response.complete
                        self._complete(done)
                        if not self.generate_request.stream:  # no chunks came: all ids are here
                            ids += done.output_ids
                            if done.HasField("output_logprobs"):
                                logprobs += await self._logprobs(done.output_logprobs)
                if not self.lockstep:
                    pending += ids
                    if logprobs:
                        yield Delta(logprobs=logprobs, index=self.index)
                    continue
                if not ids:
                    continue
                decoded = await self._decode(decode_call, ids, finished=False)
                delta = self._delta(decoded)
                delta.logprobs = logprobs
                if delta:
                    yield delta
                if decoded.stopped:
                    self.result.finish_reason = "stop"
                    self.result.matched_stop = decoded.matched_stop
                    completed = True
                    return  # finally cancels the generation: the stop string ended it
            decoded = await self._decode(decode_call, pending, finished=True)
            delta = self._delta(decoded)
            if delta:
                yield delta
            if decoded.stopped:
                self.result.finish_reason = "stop"
                self.result.matched_stop = decoded.matched_stop
            completed = True
        except grpc.aio.AioRpcError as exc:
            raise self._worker_error(exc) from exc
        finally:
            if not completed or not generate_call.done():
                generate_call.cancel()  # the router relays this as an Abort to the worker
            if completed and not decode_call.done():
                # Half-close: the tokenizer ends the stream (cancel() would make grpc format a
                # traceback for its debug log on every request).
                try:
                    await decode_call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    decode_call.cancel()
            else:
                decode_call.cancel()

    def _complete(self, done: pb.GenerateComplete) -> None:
        self.result.finish_reason = done.finish_reason or "stop"
        self.result.prompt_tokens = done.prompt_tokens or self.result.prompt_tokens
        self.result.completion_tokens = done.completion_tokens or self.result.completion_tokens
        self.result.cached_tokens = done.cached_tokens or self.result.cached_tokens
        if done.HasField("matched_token_id"):
            self.result.matched_stop = done.matched_token_id
        elif done.HasField("matched_stop_str"):
            self.result.matched_stop = done.matched_stop_str

    def _delta(self, decoded: tok_pb.DecodeStreamResponse) -> Delta:
        calls = [ToolCallPart(c.tool_index, c.id, c.name, c.arguments)
                 for c in decoded.tool_calls]
        if calls:
            self.result.tool_calls = max(self.result.tool_calls,
                                         max(c.index for c in calls) + 1)
        return Delta(decoded.text, decoded.reasoning_text, calls, index=self.index)

    def _worker_error(self, exc: grpc.aio.AioRpcError) -> OpenAIError:
        error = from_grpc(exc, "router")
        if error.status == 400 and error.param:
            if error.param == "tokenized.input_ids":
                error.param = self.prompt_param
            elif error.param in _CONSTRAINT_FIELDS:
                error.message = (f"Invalid '{self.constraint_param}': the worker cannot apply "
                                 f"it: {error.message}")
                error.param = self.constraint_param
            else:
                error.param = _WORKER_FIELDS.get(
                    error.param, error.param.removeprefix("sampling_params."))
        return error

    async def _decode(self, call: Any, token_ids: Any, finished: bool
                      ) -> tok_pb.DecodeStreamResponse:
        try:
            await call.write(tok_pb.DecodeStreamRequest(
                tokens=tok_pb.DecodeTokens(index=0, token_ids=token_ids, finished=finished)))
            response = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise tokenizer_error(exc) from exc
        if response is grpc.aio.EOF:
            raise OpenAIError(502, "tokenizer closed the decode stream early")
        return response  # type: ignore[no-any-return]

    async def _logprobs(self, lp: pb.OutputLogProbs) -> list[dict[str, Any]]:
        """OpenAI ``logprobs.content`` entries; token strings from the tokenizer."""
        ids = list(lp.token_ids)
        tops = [list(t.token_ids) for t in lp.top_logprobs]
        every = sorted({*ids, *(i for t in tops for i in t)})
        if not every:
            return []
        try:
            reply = await self.backends.tokenizer.Detokenize(tok_pb.DetokenizeRequest(
                model=self.model.id, sequences=[tok_pb.TokenIds(token_ids=[i]) for i in every],
                skip_special_tokens=False), timeout=30)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, "tokenizer") from exc
        text = dict(zip(every, reply.texts, strict=True))

        def entry(token_id: int, value: float) -> dict[str, Any]:
            token = text[token_id]
            return {"token": token, "logprob": value, "bytes": list(token.encode())}

        out = []
        for pos, (token_id, value) in enumerate(zip(ids, lp.token_logprobs, strict=False)):
            top = lp.top_logprobs[pos] if pos < len(lp.top_logprobs) else None
            item = entry(token_id, value)
            item["top_logprobs"] = ([entry(i, v) for i, v in zip(top.token_ids, top.values,
                                                                  strict=False)]
                                    if top is not None else [])
            out.append(item)
        return out


def tokenizer_error(exc: grpc.aio.AioRpcError) -> OpenAIError:
    """A tokenizer failure as the client's error, named by the request field it came from."""
    error = from_grpc(exc, "tokenizer")
    if error.param == "tool_parser":
        error.param = "tools"
    elif error.param == "reasoning_parser":
        error.param = "separate_reasoning"
    return error


async def open_rendered(call: Any, start: tok_pb.DecodeStart) -> tok_pb.RenderChatResponse:
    """Opens a decode stream whose start renders the chat; returns the rendered prompt (the
    stream's first answer). A render error is the client's 400 on ``messages``."""
    try:
        await call.write(tok_pb.DecodeStreamRequest(start=start))
        reply = await call.read()
    except grpc.aio.AioRpcError as exc:
        error = tokenizer_error(exc)
        if error.status == 400 and error.param in (None, "messages", "start"):
            error.param = "messages"  # the chat template rejected the messages
        raise error from exc
    if reply is grpc.aio.EOF or not reply.HasField("rendered"):
        raise OpenAIError(502, "the tokenizer did not render the chat")
    return reply.rendered  # type: ignore[no-any-return]


async def _one_by_one(call: Any) -> AsyncIterator[list[pb.GenerateResponse]]:
    async for response in call:
        yield [response]


async def _batches(call: Any) -> AsyncIterator[list[pb.GenerateResponse]]:
    """The worker's responses, batched: whatever arrived while the previous batch was being
    decoded comes as one batch, so a slow decode costs fewer tokenizer round trips."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    end = object()

    async def pump() -> None:
        try:
            async for response in call:
                queue.put_nowait(response)
            queue.put_nowait(end)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait(exc)

    task = asyncio.ensure_future(pump())
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            done = False
            responses = []
            for item in batch:
                if item is end:
                    done = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    responses.append(item)
            if responses:
                yield responses
            if done:
                return
    finally:
        task.cancel()


def _check_regex(pattern: Any, param: str) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise invalid(param, f"Invalid '{param}': expected a non-empty regular expression.")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise invalid(param, f"Invalid '{param}': not a valid regular expression: {exc}.") from exc
    return pattern


def constraint_of(request: ChatCompletionRequest) -> tuple[str, str, str] | None:
    """(proto constraint field, value, request param) from response_format/regex/ebnf/tools.

    Everything is checked here, before any service sees the request."""
    found: list[tuple[str, str, str]] = []
    fmt = request.response_format
    if fmt is not None:
        kind = fmt.get("type")
        if kind == "json_object":
            found.append(("json_schema", json.dumps({"type": "object"}), "response_format"))
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise invalid("response_format.json_schema",
                              "Missing required parameter: 'response_format.json_schema'.")
            if not isinstance(spec.get("name"), str) or not re.fullmatch(
                    r"[A-Za-z0-9_-]{1,64}", spec["name"]):
                raise invalid("response_format.json_schema.name",
                              "Invalid 'response_format.json_schema.name': 1-64 letters, "
                              "digits, '_' or '-'.")
            schema = spec.get("schema", spec.get("schema_"))
            if schema is None:
                schema = {}
            check_json_schema(schema, "response_format.json_schema.schema")
            found.append(("json_schema", json.dumps(schema), "response_format"))
        elif kind not in (None, "text"):
            raise invalid("response_format.type",
                          f"Invalid value for 'response_format.type': {kind!r}; expected "
                          "'text', 'json_object' or 'json_schema'.")
    extra = request.model_extra or {}
    if extra.get("regex") is not None:
        found.append(("regex", _check_regex(extra["regex"], "regex"), "regex"))
    if extra.get("ebnf") is not None:
        if not isinstance(extra["ebnf"], str) or "::=" not in extra["ebnf"]:
            raise invalid("ebnf", "Invalid 'ebnf': expected an EBNF grammar with rules "
                                  "('name ::= ...').")
        found.append(("ebnf_grammar", extra["ebnf"], "ebnf"))
    forced = forced_tool_schema(request)
    if forced is not None:
        found.append(("json_schema", json.dumps(forced), "tool_choice"))
    if len(found) > 1:
        raise invalid(found[1][2], f"Only one of response_format, regex, ebnf and a forced "
                                   f"tool_choice may constrain the output; got "
                                   f"{found[0][2]} and {found[1][2]}.")
    return found[0] if found else None


def check_tools(request: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The function tools the template and parser see (none for tool_choice "none")."""
    tools = request.tools or []
    names = []
    for i, tool in enumerate(tools):
        if tool.get("type", "function") != "function":
            raise invalid(f"tools[{i}].type", f"Invalid value for 'tools[{i}].type': only "
                                              "'function' tools are supported.")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid(f"tools[{i}].function.name",
                          f"Missing required parameter: 'tools[{i}].function.name'.")
        if "parameters" in fn:
            check_json_schema(fn["parameters"], f"tools[{i}].function.parameters")
        names.append(fn["name"])
    choice = request.tool_choice
    if choice is not None:
        if isinstance(choice, str):
            if choice not in ("none", "auto", "required"):
                raise invalid("tool_choice", f"Invalid value for 'tool_choice': {choice!r}; "
                                             "expected none, auto, required or a function.")
            if choice == "required" and not tools:
                raise invalid("tool_choice", "tool_choice 'required' needs 'tools'.")
        else:
            name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
            if not isinstance(name, str):
                raise invalid("tool_choice.function.name",
                              "Missing required parameter: 'tool_choice.function.name'.")
            if name not in names:
                raise invalid("tool_choice.function.name",
                              f"Invalid 'tool_choice': no tool named {name!r} in 'tools'.")
    if choice == "none":
        return []
    return [{"type": "function", "function": t["function"]} for t in tools]


def forced_tool_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """tool_choice required/named: the output is constrained to a JSON list of calls."""
    choice = request.tool_choice
    if not request.tools or choice in (None, "none", "auto"):
        return None
    fns = [t["function"] for t in request.tools if isinstance(t.get("function"), dict)]
    if isinstance(choice, dict):
        fns = [f for f in fns if f.get("name") == choice["function"]["name"]]
    variants = [{"type": "object", "required": ["name", "parameters"],
                 "properties": {"name": {"type": "string", "enum": [f["name"]]},
                                "parameters": f.get("parameters") or {"type": "object"}}}
                for f in fns]
    return {"type": "array", "minItems": 1,
            "maxItems": 1 if not request.parallel_tool_calls or isinstance(choice, dict)
            else len(variants) * 4,
            "items": {"anyOf": variants}}


def check_message(message: ChatMessage, param: str) -> None:
    """What OpenAI requires of a message beyond its shape: content where the role needs it,
    and a type on every content part (a template would otherwise render them as it guesses)."""
    if message.content is None:
        if message.role in ("system", "developer", "user", "tool"):
            raise invalid(f"{param}.content",
                          f"Missing required parameter: '{param}.content' ({message.role}).")
        if message.role == "assistant" and not message.tool_calls and not (
                message.model_extra or {}).get("function_call"):
            raise invalid(f"{param}.content", f"Missing required parameter: '{param}.content' "
                                              "(an assistant message needs content or "
                                              "tool_calls).")
    elif isinstance(message.content, list):
        for j, part in enumerate(message.content):
            kind = part.get("type")
            if not isinstance(kind, str) or not kind:
                raise invalid(f"{param}.content[{j}].type",
                              f"Missing required parameter: '{param}.content[{j}].type'.")
            check_part_payload(part, f"{param}.content[{j}]")


class ChatCompletionService:
    """The logic behind /v1/chat/completions."""

    def __init__(self, backends: Backends, tool_call_parser: str = "",
                 reasoning_parser: str = "") -> None:
        self.backends = backends
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self.pool = UpstreamPool(backends)  # HTTP workers (leases) and --backend openai

    @staticmethod
    def check_supported(request: ChatCompletionRequest) -> None:
        """Rejects what this gateway cannot honour, instead of silently ignoring it."""
        if request.top_logprobs and not request.logprobs:
            raise invalid("top_logprobs", "top_logprobs requires logprobs: true.")
        if request.stream_options is not None and not request.stream:
            raise invalid("stream_options", "stream_options is only allowed with stream: true.")
        if request.logit_bias:
            for key, bias in request.logit_bias.items():
                if not key.isdigit():
                    raise invalid("logit_bias", f"logit_bias keys must be token ids, got {key!r}")
                if not -100 <= bias <= 100:
                    raise invalid("logit_bias", f"logit_bias values must be between -100 and "
                                                f"100, got {bias} for token {key}")
        for i, message in enumerate(request.messages):
            check_message(message, f"messages[{i}]")

    async def prepare(self, request: ChatCompletionRequest, request_id: str,
                      target_worker: str = "") -> tuple[list[Generation], int]:
        self.check_supported(request)
        tools = check_tools(request)
        constraint = constraint_of(request)
        model = await self.backends.model(request.model)
        target_worker = target_worker or PINNED_WORKER.get()
        if (self.backends.provider or model.http_workers) and not target_worker:
            return self._http_generations(request, request_id, model), 0
        await self.backends.ensure_tokenizer(model)
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        # "": the tokenizer's own choice (by model name, JSON when the name is unknown).
        parser = self.tool_call_parser if tools else ""
        if constraint is not None and constraint[2] == "tool_choice":
            parser = "json"  # the constrained output is a JSON list of calls
        # "": the tokenizer's default (auto: harmony for gpt-oss); separate_reasoning=false
        # asks for the raw text, which "passthrough" gives.
        reasoning_parser = self.reasoning_parser if request.separate_reasoning else "passthrough"
        # The chat is rendered by the tokenizer as it opens the first choice's decode stream
        # (one call, not RenderChat and then DecodeStream); the stream's first answer is the
        # prompt. Other choices (n > 1) open theirs with the same start (rendered again).
        start = tok_pb.DecodeStart(
            model=model.id,
            skip_special_tokens=request.skip_special_tokens,
            stop=request.stop_list,
            no_stop_trim=request.no_stop_trim,
            reasoning_parser=reasoning_parser,
            tool_parser=parser,
            tools=[to_struct(t) for t in tools],
            render=tok_pb.RenderChatRequest(
                model=model.id,
                messages=[to_struct(m) for m in messages],
                tools=[to_struct(t) for t in tools],
                template_kwargs=to_struct(request.chat_template_kwargs or {}),
                add_generation_prompt=True,
            ),
        )
        first_decode = self.backends.tokenizer.DecodeStream(
            metadata=((MODEL_KEY, model.id), (REQUEST_ID_KEY, request_id)))
        try:
            rendered = await open_rendered(first_decode, start)
            generations = self._generations(request, request_id, model, rendered, start,
                                            constraint, target_worker)
        except BaseException:
            first_decode.cancel()
            raise
        generations[0].decode_call = first_decode
        return generations, len(rendered.token_ids)

    def _generations(self, request: ChatCompletionRequest, request_id: str, model: ServedModel,
                     rendered: tok_pb.RenderChatResponse, start: tok_pb.DecodeStart,
                     constraint: Any, target_worker: str) -> list[Generation]:
        prompt_ids = list(rendered.token_ids)
        context = model.max_context_length or 0
        if context and len(prompt_ids) >= context:
            raise OpenAIError(
                400, f"This model's maximum context length is {context} tokens; the messages "
                f"have {len(prompt_ids)} tokens.", param="messages", code="context_length_exceeded")
        max_new = request.max_new_tokens
        if context:
            room = context - len(prompt_ids)
            if max_new is not None and max_new > room:
                raise OpenAIError(
                    400, f"max_tokens is too large: {max_new}. The prompt has {len(prompt_ids)} "
                    f"tokens and the context is {context}; at most {room} tokens can be generated.",
                    param="max_tokens", code="context_length_exceeded")
            max_new = max_new or room
        generations = []
        for index in range(request.n):
            sampling = pb.SamplingParams(
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                min_p=request.min_p,
                frequency_penalty=request.frequency_penalty,
                presence_penalty=request.presence_penalty,
                repetition_penalty=request.repetition_penalty,
                stop=request.stop_list,
                stop_token_ids=request.stop_token_ids or [],
                skip_special_tokens=request.skip_special_tokens,
                n=1,
                min_new_tokens=request.min_tokens,
                ignore_eos=request.ignore_eos,
                no_stop_trim=request.no_stop_trim,
                logit_bias={k: v for k, v in (request.logit_bias or {}).items()},
            )
            if max_new is not None:
                sampling.max_new_tokens = max_new
            if request.stream_interval is not None:
                sampling.stream_interval = request.stream_interval
            if request.seed is not None:
                sampling.custom_params.update({"seed": request.seed + index})
            if constraint is not None:
                setattr(sampling, constraint[0], constraint[1])
            rid = request_id if request.n == 1 else f"{request_id}-{index}"
            generate = pb.GenerateRequest(
                request_id=rid,
                tokenized=pb.TokenizedInput(original_text=rendered.prompt, input_ids=prompt_ids),
                sampling_params=sampling,
                stream=True,
                return_logprob=request.logprobs,
                top_logprobs_num=request.top_logprobs or 0,
            )
            generations.append(Generation(
                self.backends, rid, model, generate, start, index=index,
                constraint_param=constraint[2] if constraint else "response_format",
                target_worker=target_worker))
        return generations

    def _http_generations(self, request: ChatCompletionRequest, request_id: str,
                          model: ServedModel) -> list[Generation]:
        """The request on an HTTP upstream (a lease picks the worker per generation; a gRPC
        pick falls back to this pipeline pinned to it). Only what the client set is sent."""
        body = request.model_dump(exclude_unset=True, exclude_none=True)
        body["n"] = 1
        single = request.model_copy(update={"n": 1})
        out = []
        for index in range(request.n):
            rid = request_id if request.n == 1 else f"{request_id}-{index}"

            async def on_grpc(url: str, rid: str = rid, index: int = index) -> Generation:
                generations, _ = await self.prepare(single, rid, target_worker=url)
                generations[0].index = index
                return generations[0]

            out.append(HttpGeneration(self.pool, model, body, rid, on_grpc, index=index))
        return out  # type: ignore[return-value]

    async def complete(self, request: ChatCompletionRequest, request_id: str
                       ) -> ChatCompletionResponse:
        generations, _ = await self.prepare(request, request_id)
        for g in generations:
            g.lockstep = False
        started = time.perf_counter()
        first = [True]

        async def run(generation: Generation) -> ChatCompletionChoice:
            text: list[str] = []
            reasoning: list[str] = []
            calls: dict[int, dict[str, Any]] = {}
            logprobs: list[dict[str, Any]] = []
            async for delta in generation.deltas():
                if first[0]:
                    TTFT.observe(time.perf_counter() - started)
                    first[0] = False
                text.append(delta.text)
                reasoning.append(delta.reasoning)
                logprobs += delta.logprobs
                for part in delta.tool_calls:
                    call = calls.setdefault(part.index, {
                        "id": part.id, "type": "function",
                        "function": {"name": part.name, "arguments": ""}})
                    call["function"]["arguments"] += part.arguments
            result = generation.result
            record_usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens)
            finish = "tool_calls" if calls and result.finish_reason == "stop" \
                else result.finish_reason
            return ChatCompletionChoice(
                index=generation.index,
                message=ChatCompletionMessage(
                    content="".join(text) if (text and "".join(text)) or not calls else None,
                    reasoning_content="".join(reasoning) or None,
                    tool_calls=[calls[i] for i in sorted(calls)] or None),
                logprobs={"content": logprobs} if request.logprobs else None,
                finish_reason=finish,
            )

        choices = await _gather(run(g) for g in generations)
        return ChatCompletionResponse(
            id=request_id,
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=_usage([g.result for g in generations]),
        )

    async def stream(self, request: ChatCompletionRequest, request_id: str
                     ) -> AsyncIterator[str]:
        """SSE frames. Errors before the first frame raise; later ones become an error frame."""
        generations, _ = await self.prepare(request, request_id)
        return self._frames(request, request_id, generations)

    async def _frames(self, request: ChatCompletionRequest, request_id: str,
                      generations: list[Generation]) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        started = time.perf_counter()
        prefix = (f'{{"id":{json.dumps(request_id)},"object":"chat.completion.chunk",'
                  f'"created":{created},"model":{json.dumps(request.model)},"choices":[')
        suffix = "]" + (',"usage":null' if include_usage else "") + "}\n\n"

        def frame(index: int, delta: dict[str, Any], finish_reason: str | None = None,
                  logprobs: Any = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            # pydantic-core's serializer: ~5x json.dumps for these small dicts (per chunk)
            return f"data: {prefix}{to_json(choice).decode()}{suffix}"

        for g in generations:
            yield frame(g.index, {"role": "assistant", "content": ""})
        first = True
        has_calls: set[int] = set()
        try:
            async for delta in _merge([g.deltas() for g in generations]):
                if first:
                    TTFT.observe(time.perf_counter() - started)
                    first = False
                content: dict[str, Any] = {}
                if delta.reasoning:
                    content["reasoning_content"] = delta.reasoning
                if delta.text:
                    content["content"] = delta.text
                if delta.tool_calls:
                    has_calls.add(delta.index)
                    content["tool_calls"] = [_tool_delta(p) for p in delta.tool_calls]
                yield frame(delta.index, content,
                            logprobs={"content": delta.logprobs} if request.logprobs else None)
        except OpenAIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never a silent truncation: the SDK raises on an error frame
            log.exception("stream %s failed", request_id)
            yield f"data: {json.dumps(OpenAIError(500, str(exc)).body())}\n\n"
            return
        # The closing events go out as one body chunk (one socket write, not one per event).
        tail: list[str] = []
        for g in generations:
            record_usage(g.result.prompt_tokens, g.result.completion_tokens, g.result.cached_tokens)
            reason = g.result.finish_reason
            if g.index in has_calls and reason == "stop":
                reason = "tool_calls"
            tail.append(frame(g.index, {}, reason))
        if include_usage:
            usage_chunk = {
                "id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": request.model, "choices": [],
                "usage": _usage([g.result for g in generations]).model_dump(),
            }
            tail.append(f"data: {json.dumps(usage_chunk)}\n\n")
        tail.append("data: [DONE]\n\n")
        yield "".join(tail)


def _tool_delta(part: ToolCallPart) -> dict[str, Any]:
    """OpenAI's delta rules: id, type and name only on a call's first fragment."""
    out: dict[str, Any] = {"index": part.index}
    if part.id or part.name:
        out["id"] = part.id
        out["type"] = "function"
        out["function"] = {"name": part.name, "arguments": part.arguments}
    else:
        out["function"] = {"arguments": part.arguments}
    return out


async def _gather(coros: Any) -> list[Any]:
    """asyncio.gather that cancels the siblings when one fails."""
    coros = list(coros)
    if len(coros) == 1:  # the common n = 1: no task of its own
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _merge(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    """Interleaves the choices' deltas as they come; the first failure ends all of them."""
    if len(streams) == 1:
        return streams[0]  # n = 1: no relay of its own
    return _interleave(streams)


async def _interleave(streams: list[AsyncIterator[Delta]]) -> AsyncIterator[Delta]:
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            _, got = await queue.get()
            if got is None:
                open_streams -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(results: list[GenerationResult]) -> Usage:
    prompt = results[0].prompt_tokens if results else 0
    completion = sum(r.completion_tokens for r in results)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details={"cached_tokens": max((r.cached_tokens for r in results),
                                                    default=0)},
    )


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
