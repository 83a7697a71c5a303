"""``/v1/chat/completions``: validate -> render + tokenize -> route + generate -> decode.

One code path for streaming and non-streaming: the worker always streams; the tokenizer's
DecodeStream turns each chunk into text in lock-step; the non-streaming answer is the sum of
the deltas.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from services.gateway.backends import Backends, ServedModel
from services.gateway.errors import OpenAIError, from_grpc, invalid
from services.gateway.metrics import OUTPUT_TOKENS, TTFT
from services.gateway.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Usage,
)

log = logging.getLogger(__name__)

MODEL_KEY = "x-sglmesh-model"
REQUEST_ID_KEY = "x-request-id"
# The decoder needs a few prompt tokens of context for the first output token's spacing.
PROMPT_CONTEXT_TOKENS = 8


@dataclass
class Delta:
    """What one worker chunk added to the answer."""

    text: str = ""
    reasoning: str = ""


@dataclass
class GenerationResult:
    """The end state of one generation."""

    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    matched_stop: str | int | None = None


@dataclass
class Generation:
    """One running generation: a router Generate call paired with a tokenizer DecodeStream."""

    backends: Backends
    request_id: str
    model: ServedModel
    generate_request: pb.GenerateRequest
    decode_start: tok_pb.DecodeStart
    result: GenerationResult = field(default_factory=GenerationResult)

    async def deltas(self) -> AsyncIterator[Delta]:
        metadata = ((MODEL_KEY, self.model.id), (REQUEST_ID_KEY, self.request_id))
        decode_call = self.backends.tokenizer.DecodeStream(metadata=metadata)
        generate_call = self.backends.scheduler.Generate(self.generate_request, metadata=metadata)
        completed = False
        try:
            try:
                await decode_call.write(tok_pb.DecodeStreamRequest(start=self.decode_start))
            except grpc.aio.AioRpcError as exc:
                raise from_grpc(exc, "tokenizer") from exc
            async for response in generate_call:
                if response.HasField("chunk"):
                    chunk = response.chunk
                    self.result.prompt_tokens = chunk.prompt_tokens
                    self.result.completion_tokens = chunk.completion_tokens
                    self.result.cached_tokens = chunk.cached_tokens
                    decoded = await self._decode(decode_call, chunk.token_ids, finished=False)
                    if decoded.text or decoded.reasoning_text:
                        yield Delta(decoded.text, decoded.reasoning_text)
                    if decoded.stopped:
                        self.result.finish_reason = "stop"
                        self.result.matched_stop = decoded.matched_stop
                        completed = True
                        return  # finally cancels the generation: the stop string ended it
                elif response.HasField("complete"):
                    done = response.complete
                    self.result.finish_reason = done.finish_reason or "stop"
                    self.result.prompt_tokens = done.prompt_tokens or self.result.prompt_tokens
                    self.result.completion_tokens = (done.completion_tokens
                                                     or self.result.completion_tokens)
                    self.result.cached_tokens = done.cached_tokens or self.result.cached_tokens
                    if done.HasField("matched_token_id"):
                        self.result.matched_stop = done.matched_token_id
                    elif done.HasField("matched_stop_str"):
                        self.result.matched_stop = done.matched_stop_str
            decoded = await self._decode(decode_call, [], finished=True)
            if decoded.text or decoded.reasoning_text:
                yield Delta(decoded.text, decoded.reasoning_text)
            if decoded.stopped:
                self.result.finish_reason = "stop"
                self.result.matched_stop = decoded.matched_stop
            completed = True
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, "router") from exc
        finally:
            if not completed or not generate_call.done():
                generate_call.cancel()  # the router relays this as an Abort to the worker
            decode_call.cancel()

    @staticmethod
    async def _decode(call: Any, token_ids: Any, finished: bool) -> tok_pb.DecodeStreamResponse:
        try:
            await call.write(tok_pb.DecodeStreamRequest(
                tokens=tok_pb.DecodeTokens(index=0, token_ids=token_ids, finished=finished)))
            response = await call.read()
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, "tokenizer") from exc
        if response is grpc.aio.EOF:
            raise OpenAIError(502, "tokenizer closed the decode stream early")
        return response  # type: ignore[no-any-return]


def _to_struct(value: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    json_format.ParseDict(value, struct)
    return struct


class ChatCompletionService:
    """The logic behind /v1/chat/completions."""

    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    @staticmethod
    def check_supported(request: ChatCompletionRequest) -> None:
        """Rejects what this gateway cannot honour yet, instead of silently ignoring it."""
        if request.n != 1:
            raise invalid("n", "n > 1 is not supported yet")
        if request.logprobs or request.top_logprobs:
            raise invalid("logprobs", "logprobs are not supported yet")
        if request.tools:
            raise invalid("tools", "tool calling is not supported yet")
        if request.response_format and request.response_format.get("type") not in (None, "text"):
            raise invalid("response_format", "only response_format type 'text' is supported yet")
        if request.logit_bias:
            for key in request.logit_bias:
                if not key.lstrip("-").isdigit():
                    raise invalid("logit_bias", f"logit_bias keys must be token ids, got {key!r}")

    async def prepare(self, request: ChatCompletionRequest, request_id: str
                      ) -> tuple[Generation, int]:
        self.check_supported(request)
        model = await self.backends.model(request.model)
        await self.backends.ensure_tokenizer(model)
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        try:
            rendered = await self.backends.tokenizer.RenderChat(tok_pb.RenderChatRequest(
                model=model.id,
                messages=[_to_struct(m) for m in messages],
                template_kwargs=_to_struct(request.chat_template_kwargs or {}),
                add_generation_prompt=True,
            ), timeout=30)
        except grpc.aio.AioRpcError as exc:
            error = from_grpc(exc, "tokenizer")
            if error.status == 400 and error.param in (None, "messages"):
                error.param = "messages"
            raise error from exc
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
        if request.seed is not None:
            sampling.custom_params.update({"seed": request.seed})
        generate = pb.GenerateRequest(
            request_id=request_id,
            tokenized=pb.TokenizedInput(original_text=rendered.prompt, input_ids=prompt_ids),
            sampling_params=sampling,
            stream=True,
        )
        start = tok_pb.DecodeStart(
            model=model.id,
            skip_special_tokens=request.skip_special_tokens,
            stop=request.stop_list,
            no_stop_trim=request.no_stop_trim,
            prompt_token_ids=prompt_ids[-PROMPT_CONTEXT_TOKENS:],
        )
        return Generation(self.backends, request_id, model, generate, start), len(prompt_ids)

    async def complete(self, request: ChatCompletionRequest, request_id: str
                       ) -> ChatCompletionResponse:
        generation, _ = await self.prepare(request, request_id)
        started = time.perf_counter()
        text: list[str] = []
        reasoning: list[str] = []
        first = True
        async for delta in generation.deltas():
            if first:
                TTFT.observe(time.perf_counter() - started)
                first = False
            text.append(delta.text)
            reasoning.append(delta.reasoning)
        result = generation.result
        OUTPUT_TOKENS.inc(result.completion_tokens)
        return ChatCompletionResponse(
            id=request_id,
            created=int(time.time()),
            model=request.model,
            choices=[ChatCompletionChoice(
                index=0,
                message=ChatCompletionMessage(
                    content="".join(text), reasoning_content="".join(reasoning) or None),
                finish_reason=result.finish_reason,
            )],
            usage=_usage(result),
        )

    async def stream(self, request: ChatCompletionRequest, request_id: str
                     ) -> AsyncIterator[str]:
        """SSE frames. Errors before the first frame raise; later ones become an error frame."""
        generation, _ = await self.prepare(request, request_id)
        return self._frames(request, request_id, generation)

    async def _frames(self, request: ChatCompletionRequest, request_id: str,
                      generation: Generation) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        started = time.perf_counter()

        def frame(delta: dict[str, Any], finish_reason: str | None = None) -> str:
            chunk: dict[str, Any] = {
                "id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": request.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason}],
            }
            if include_usage:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        yield frame({"role": "assistant", "content": ""})
        first = True
        try:
            async for delta in generation.deltas():
                if first:
                    TTFT.observe(time.perf_counter() - started)
                    first = False
                content: dict[str, Any] = {}
                if delta.reasoning:
                    content["reasoning_content"] = delta.reasoning
                if delta.text:
                    content["content"] = delta.text
                yield frame(content)
        except OpenAIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never a silent truncation: the SDK raises on an error frame
            log.exception("stream %s failed", request_id)
            yield f"data: {json.dumps(OpenAIError(500, str(exc)).body())}\n\n"
            return
        result = generation.result
        OUTPUT_TOKENS.inc(result.completion_tokens)
        yield frame({}, result.finish_reason)
        if include_usage:
            usage_chunk = {
                "id": request_id, "object": "chat.completion.chunk", "created": created,
                "model": request.model, "choices": [], "usage": _usage(result).model_dump(),
            }
            yield f"data: {json.dumps(usage_chunk)}\n\n"
        yield "data: [DONE]\n\n"


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details={"cached_tokens": result.cached_tokens},
    )


def new_request_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"
