"""``/v1/completions``, ``/generate`` (SGLang native), ``/v1/tokenize``, ``/v1/detokenize``,
``/v1/embeddings``: the prompt-in, text-out (or vector-out) endpoints."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from sglmesh.tokenizer.v1 import tokenizer_pb2 as tok_pb
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from services.gateway.backends import Backends, ServedModel
from services.gateway.errors import OpenAIError, from_grpc, invalid
from services.gateway.metrics import record_usage
from services.gateway.protocol import CompletionRequest
from services.gateway.schema import check_json_schema
from services.gateway.serving_chat import (
    MODEL_KEY,
    PROMPT_CONTEXT_TOKENS,
    REQUEST_ID_KEY,
    Generation,
    GenerationResult,
    _check_regex,
    _gather,
    _merge,
)


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _in_range(ids: list[int], param: str) -> list[int]:
    """Token ids as the worker contract carries them (uint32; the vocabulary is the worker's
    check)."""
    for token in ids:
        if not 0 <= token < 2 ** 32:
            raise invalid(param, f"Invalid '{param}': token id {token} is out of range.")
    return ids


def prompts_of(value: Any, param: str) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token id lists."""
    if isinstance(value, str):
        return [value]
    if _is_ids(value):
        return [_in_range(list(value), param)]
    if isinstance(value, list) and value and all(
            isinstance(v, str) or _is_ids(v) for v in value):
        return [v if isinstance(v, str) else _in_range(v, param) for v in value]
    raise invalid(param, f"Invalid value for '{param}': expected a string, a list of strings, "
                         "a list of token ids or a list of token id lists (not empty).")


class PromptService:
    def __init__(self, backends: Backends) -> None:
        self.backends = backends

    async def _model(self, name: str) -> ServedModel:
        model = await self.backends.model(name)
        await self.backends.ensure_tokenizer(model)
        return model

    async def tokenize(self, model: ServedModel, texts: list[str], request_id: str,
                       add_special_tokens: bool = True) -> list[list[int]]:
        if not texts:
            return []
        try:
            reply = await self.backends.tokenizer.Tokenize(tok_pb.TokenizeRequest(
                model=model.id, texts=texts, add_special_tokens=add_special_tokens),
                timeout=30, metadata=((REQUEST_ID_KEY, request_id),))
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, "tokenizer") from exc
        return [list(r.token_ids) for r in reply.results]

    async def prompt_ids(self, model: ServedModel, prompts: list[str | list[int]],
                         request_id: str, param: str) -> list[list[int]]:
        texts = [p for p in prompts if isinstance(p, str)]
        encoded = iter(await self.tokenize(model, texts, request_id))
        out = [next(encoded) if isinstance(p, str) else p for p in prompts]
        context = model.max_context_length
        for i, ids in enumerate(out):
            if not ids:
                raise invalid(param, f"Invalid '{param}': prompt {i} has no tokens.")
            if context and len(ids) >= context:
                raise OpenAIError(400, f"This model's maximum context length is {context} "
                                       f"tokens; prompt {i} has {len(ids)} tokens.", param=param,
                                  code="context_length_exceeded")
        return out

    def generation(self, model: ServedModel, request_id: str, index: int, ids: list[int],
                   sampling: pb.SamplingParams, constraint_param: str = "response_format",
                   prompt_param: str = "prompt") -> Generation:
        context = model.max_context_length
        if context:
            room = context - len(ids)
            if not sampling.HasField("max_new_tokens"):
                sampling.max_new_tokens = room
            elif sampling.max_new_tokens > room:
                raise OpenAIError(
                    400, f"max_tokens is too large: {sampling.max_new_tokens}. The prompt has "
                    f"{len(ids)} tokens and the context is {context}; at most {room} tokens can "
                    "be generated.", param="max_tokens", code="context_length_exceeded")
        generate = pb.GenerateRequest(
            request_id=request_id, tokenized=pb.TokenizedInput(input_ids=ids),
            sampling_params=sampling, stream=True)
        start = tok_pb.DecodeStart(
            model=model.id, skip_special_tokens=sampling.skip_special_tokens,
            stop=list(sampling.stop), no_stop_trim=sampling.no_stop_trim,
            prompt_token_ids=ids[-PROMPT_CONTEXT_TOKENS:])
        return Generation(self.backends, request_id, model, generate, start, index=index,
                          constraint_param=constraint_param, prompt_param=prompt_param)

    # ---- /v1/completions ------------------------------------------------------------------------

    @staticmethod
    def check_completion(request: CompletionRequest) -> None:
        if request.echo:
            raise invalid("echo", "echo is not supported (it needs prompt logprobs).")
        if request.suffix:
            raise invalid("suffix", "suffix (fill-in-the-middle) is not supported.")
        if request.logprobs is not None:
            raise invalid("logprobs", "logprobs are not supported on /v1/completions; use "
                                      "/v1/chat/completions with logprobs: true.")
        if request.best_of is not None and request.best_of != request.n:
            raise invalid("best_of", "best_of other than n is not supported.")
        if request.regex is not None:
            _check_regex(request.regex, "regex")

    async def completion_generations(self, request: CompletionRequest, request_id: str
                                     ) -> list[Generation]:
        self.check_completion(request)
        prompts = prompts_of(request.prompt, "prompt")
        model = await self._model(request.model)
        all_ids = await self.prompt_ids(model, prompts, request_id, "prompt")
        generations = []
        for p, ids in enumerate(all_ids):
            for j in range(request.n):
                index = p * request.n + j
                sampling = completion_sampling(request)
                if request.seed is not None:
                    sampling.custom_params.update({"seed": request.seed + index})
                rid = request_id if len(all_ids) * request.n == 1 else f"{request_id}-{index}"
                generations.append(self.generation(model, rid, index, ids, sampling,
                                                   "regex" if request.regex else "json_schema"))
        return generations

    async def complete(self, request: CompletionRequest, request_id: str) -> dict[str, Any]:
        generations = await self.completion_generations(request, request_id)
        for g in generations:
            g.lockstep = False

        async def run(g: Generation) -> dict[str, Any]:
            text = [d.text async for d in g.deltas()]
            record_usage(g.result.prompt_tokens, g.result.completion_tokens, g.result.cached_tokens)
            return {"text": "".join(text), "index": g.index, "logprobs": None,
                    "finish_reason": g.result.finish_reason}

        choices = await _gather(run(g) for g in generations)
        return {"id": request_id, "object": "text_completion", "created": int(time.time()),
                "model": request.model, "choices": choices,
                "usage": completion_usage([g.result for g in generations], request.n)}

    async def stream(self, request: CompletionRequest, request_id: str) -> AsyncIterator[str]:
        generations = await self.completion_generations(request, request_id)
        return self._frames(request, request_id, generations)

    async def _frames(self, request: CompletionRequest, request_id: str,
                      generations: list[Generation]) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(request.stream_options and request.stream_options.include_usage)

        def frame(index: int, text: str, finish: str | None = None) -> str:
            chunk: dict[str, Any] = {
                "id": request_id, "object": "text_completion", "created": created,
                "model": request.model,
                "choices": [{"text": text, "index": index, "logprobs": None,
                             "finish_reason": finish}]}
            if include_usage:
                chunk["usage"] = None
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        try:
            async for delta in _merge([g.deltas() for g in generations]):
                if delta.text:
                    yield frame(delta.index, delta.text)
        except OpenAIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        for g in generations:
            record_usage(g.result.prompt_tokens, g.result.completion_tokens, g.result.cached_tokens)
            yield frame(g.index, "", g.result.finish_reason)
        if include_usage:
            usage = {"id": request_id, "object": "text_completion", "created": created,
                     "model": request.model, "choices": [],
                     "usage": completion_usage([g.result for g in generations], request.n)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    # ---- /generate (SGLang native) ----------------------------------------------------------------

    async def generate(self, body: dict[str, Any], request_id: str
                       ) -> tuple[list[Generation], bool, bool]:
        """(generations, stream, batch) for SGLang's native body."""
        text, input_ids = body.get("text"), body.get("input_ids")
        if (text is None) == (input_ids is None):
            raise invalid("text", "Exactly one of 'text' and 'input_ids' is required.")
        batch = isinstance(text, list) or (isinstance(input_ids, list) and bool(input_ids)
                                           and isinstance(input_ids[0], list))
        prompts = prompts_of(text if text is not None else input_ids,
                             "text" if text is not None else "input_ids")
        if body.get("return_logprob"):
            raise invalid("return_logprob", "return_logprob is not supported by /generate yet.")
        model_name = body.get("model")
        if model_name is None:
            models = await self.backends.models()
            if len(models) != 1:
                raise invalid("model", "Missing 'model': the router serves "
                                       f"{len(models)} models.")
            model_name = next(iter(models))
        model = await self._model(str(model_name))
        all_ids = await self.prompt_ids(model, prompts, request_id,
                                        "text" if text is not None else "input_ids")
        params = body.get("sampling_params") or {}
        if not isinstance(params, dict):
            raise invalid("sampling_params", "Invalid 'sampling_params': expected an object.")
        rid = str(body.get("rid") or request_id)
        generations = []
        for i, ids in enumerate(all_ids):
            sampling = native_sampling(params)
            generations.append(self.generation(model, rid if len(all_ids) == 1 else f"{rid}-{i}",
                                               i, ids, sampling, "sampling_params",
                                               "text" if text is not None else "input_ids"))
        return generations, bool(body.get("stream")), batch

    @staticmethod
    async def native_result(g: Generation) -> dict[str, Any]:
        g.lockstep = False
        text = "".join([d.text async for d in g.deltas()])
        return {"text": text, "meta_info": native_meta(g)}

    async def native_stream(self, generations: list[Generation]) -> AsyncIterator[str]:
        texts = {g.index: "" for g in generations}
        by_index = {g.index: g for g in generations}
        try:
            async for delta in _merge([g.deltas() for g in generations]):
                texts[delta.index] += delta.text
                out = {"text": texts[delta.index], "index": delta.index,
                       "meta_info": native_meta(by_index[delta.index], final=False)}
                yield f"data: {json.dumps(out, ensure_ascii=False)}\n\n"
        except OpenAIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
            return
        for g in generations:
            out = {"text": texts[g.index], "index": g.index, "meta_info": native_meta(g)}
            yield f"data: {json.dumps(out, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    # ---- tokenize / detokenize / embeddings -------------------------------------------------------

    async def tokenize_endpoint(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        model = await self._model(_required_str(body, "model"))
        prompt = body.get("prompt")
        add_special = body.get("add_special_tokens", True)
        if isinstance(prompt, str):
            tokens = (await self.tokenize(model, [prompt], request_id, bool(add_special)))[0]
            return {"tokens": tokens, "count": len(tokens),
                    "max_model_len": model.max_context_length or None}
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            batches = await self.tokenize(model, prompt, request_id, bool(add_special))
            return {"tokens": batches, "count": [len(t) for t in batches],
                    "max_model_len": model.max_context_length or None}
        raise invalid("prompt", "Invalid 'prompt': expected a string or a list of strings.")

    async def detokenize_endpoint(self, body: dict[str, Any], request_id: str
                                  ) -> dict[str, Any]:
        model = await self._model(_required_str(body, "model"))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens):
            raise invalid("tokens", "Invalid 'tokens': expected a list of token ids.")
        try:
            reply = await self.backends.tokenizer.Detokenize(tok_pb.DetokenizeRequest(
                model=model.id, sequences=[tok_pb.TokenIds(token_ids=tokens)],
                skip_special_tokens=bool(body.get("skip_special_tokens", False))),
                timeout=30, metadata=((REQUEST_ID_KEY, request_id),))
        except grpc.aio.AioRpcError as exc:
            error = from_grpc(exc, "tokenizer")
            if error.param == "sequences[0].token_ids":
                error.param = "tokens"  # as the client named them
            raise error from exc
        return {"text": reply.texts[0]}

    async def embeddings(self, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        name = _required_str(body, "model")
        if "input" not in body:
            raise invalid("input", "Missing required parameter: 'input'.")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise invalid("encoding_format", "Invalid 'encoding_format': 'float' or 'base64'.")
        dimensions = body.get("dimensions")
        if dimensions is not None and (not isinstance(dimensions, int) or dimensions < 1):
            raise invalid("dimensions", "Invalid 'dimensions': expected a positive integer.")
        prompts = prompts_of(body["input"], "input")
        model = await self._model(name)
        all_ids = await self.prompt_ids(model, prompts, request_id, "input")
        metadata = ((MODEL_KEY, model.id), (REQUEST_ID_KEY, request_id))

        async def embed(i: int, ids: list[int]) -> pb.EmbedResponse:
            try:
                return await self.backends.scheduler.Embed(pb.EmbedRequest(
                    request_id=f"{request_id}-{i}", tokenized=pb.TokenizedInput(input_ids=ids)),
                    metadata=metadata, timeout=120)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNIMPLEMENTED,
                                  grpc.StatusCode.INVALID_ARGUMENT):
                    raise OpenAIError(400, f"The model `{model.id}` does not support "
                                           f"embeddings ({exc.details()}).", param="model",
                                      code="model_not_embedding") from exc
                raise from_grpc(exc, "router") from exc

        replies = await asyncio.gather(*(embed(i, ids) for i, ids in enumerate(all_ids)))
        data = []
        for i, reply in enumerate(replies):
            vector = list(reply.embedding)
            if dimensions is not None:
                if dimensions > len(vector):
                    raise invalid("dimensions", f"Invalid 'dimensions': the model's embeddings "
                                                f"have {len(vector)} dimensions.")
                vector = vector[:dimensions]
            value: Any = vector
            if encoding == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(ids) for ids in all_ids)
        return {"object": "list", "data": data, "model": model.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _required_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise invalid(key, f"Missing required parameter: '{key}'.")
    return value


_NATIVE_FLOATS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                  "repetition_penalty")
_NATIVE_INTS = ("top_k", "max_new_tokens", "min_new_tokens", "stream_interval")
_NATIVE_BOOLS = ("skip_special_tokens", "ignore_eos", "no_stop_trim",
                 "spaces_between_special_tokens")


def native_sampling(params: dict[str, Any]) -> pb.SamplingParams:
    """SGLang's ``sampling_params`` object as the worker contract's message (defaults SGLang's)."""
    sampling = pb.SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, repetition_penalty=1.0,
                                 skip_special_tokens=True, n=1, max_new_tokens=128)
    known = {*_NATIVE_FLOATS, *_NATIVE_INTS, *_NATIVE_BOOLS, "stop", "stop_token_ids", "n",
             "regex", "json_schema", "ebnf", "logit_bias", "seed", "sampling_seed"}
    for key, value in params.items():
        param = f"sampling_params.{key}"
        if key not in known:
            raise invalid(param, f"Unknown sampling parameter {key!r}.")
        if value is None:
            continue
        try:
            _set_native(sampling, key, value, param)
        except (ValueError, TypeError, AttributeError) as exc:  # the proto's own checks
            raise invalid(param, f"Invalid '{param}': {value!r} ({exc}).") from exc
    return sampling


def _set_native(sampling: pb.SamplingParams, key: str, value: Any, param: str) -> None:
    """One SGLang sampling parameter onto the message (``native_sampling``)."""
    if key in _NATIVE_FLOATS:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise invalid(param, f"Invalid '{param}': expected a number.")
        setattr(sampling, key, float(value))
    elif key in _NATIVE_INTS:
        if not isinstance(value, int) or isinstance(value, bool):
            raise invalid(param, f"Invalid '{param}': expected an integer.")
        if key == "stream_interval" and value < 1:
            raise invalid(param, f"Invalid '{param}': must be at least 1, got {value}.")
        setattr(sampling, key, value)
    elif key in _NATIVE_BOOLS:
        setattr(sampling, key, bool(value))
    elif key == "stop":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise invalid(param, f"Invalid '{param}': a string or a list of strings.")
        sampling.stop.extend(stops)
    elif key == "stop_token_ids":
        sampling.stop_token_ids.extend(value)
    elif key == "n":
        if value != 1:
            raise invalid(param, "n > 1 is not supported on /generate; send a batch.")
    elif key == "regex":
        sampling.regex = _check_regex(value, param)
    elif key == "json_schema":
        schema = json.loads(value) if isinstance(value, str) else value
        check_json_schema(schema, param)
        sampling.json_schema = json.dumps(schema)
    elif key == "ebnf":
        sampling.ebnf_grammar = str(value)
    elif key == "logit_bias":
        sampling.logit_bias.update({str(k): float(v) for k, v in value.items()})
    elif key in ("seed", "sampling_seed"):
        sampling.custom_params.update({"seed": int(value)})


def native_meta(g: Generation, final: bool = True) -> dict[str, Any]:
    r = g.result
    meta: dict[str, Any] = {"id": g.request_id, "prompt_tokens": r.prompt_tokens,
                            "completion_tokens": r.completion_tokens,
                            "cached_tokens": r.cached_tokens}
    if final:
        meta["finish_reason"] = {"type": r.finish_reason, "matched": r.matched_stop} \
            if r.finish_reason == "stop" else {"type": r.finish_reason}
    else:
        meta["finish_reason"] = None
    return meta


def completion_sampling(request: CompletionRequest) -> pb.SamplingParams:
    sampling = pb.SamplingParams(
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
        min_p=request.min_p, frequency_penalty=request.frequency_penalty,
        presence_penalty=request.presence_penalty,
        repetition_penalty=request.repetition_penalty, stop=list(request.stop or []),
        stop_token_ids=request.stop_token_ids or [],
        skip_special_tokens=request.skip_special_tokens, n=1, min_new_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos, no_stop_trim=request.no_stop_trim,
        logit_bias=dict(request.logit_bias or {}))
    if request.max_tokens is not None:
        sampling.max_new_tokens = request.max_tokens
    if request.stream_interval is not None:
        sampling.stream_interval = request.stream_interval
    if request.regex is not None:
        sampling.regex = request.regex
    return sampling


def completion_usage(results: list[GenerationResult], n: int) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in results[::n])  # each prompt counted once
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)}}


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"
