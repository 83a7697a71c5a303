"""TokenizerService: gRPC <-> TokenizerCore.

Big CPU work (long prompts, large batches) runs on a thread pool. Small work (a short chat, a
decode step of a few tokens: tens to hundreds of microseconds) runs on the event loop: a pool
hop (future, thread wake-up, GIL hand-off, loop wake-up) costs more than that work, and the
work holds the GIL either way. ``inline_max_bytes`` draws the line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc
from sglmesh.tokenizer.v1 import tokenizer_pb2 as pb
from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc

from services.common.errors import ErrorCode, ServiceError, invalid_argument, not_found
from services.common.metrics import child
from services.common.structs import from_struct
from services.tokenizer import metrics
from services.tokenizer.chat_template import ChatTemplateError
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import DecodeStreamSpec, InvalidRequest, TokenizerCore
from services.tokenizer.metrics import register_cache_collector
from services.tokenizer.registry import LoadedTokenizer, TokenizerLoadError, UnknownModel
from services.tokenizer.remote import fetch_tokenizer_bundle
from services.tokenizer.stream import DecodeOptions, DecodeSession, StreamDelta

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = "sglmesh.tokenizer.v1.TokenizerService"


def to_service_error(exc: BaseException) -> ServiceError | None:
    """Domain exceptions -> ServiceError (the interceptor turns it into a status)."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, UnknownModel):
        return not_found("model", exc.model)
    if isinstance(exc, InvalidRequest):
        return invalid_argument(exc.field, str(exc))
    if isinstance(exc, ChatTemplateError):
        return invalid_argument("messages", str(exc), reason="CHAT_TEMPLATE_ERROR")
    if isinstance(exc, TokenizerLoadError):
        return invalid_argument("source", str(exc), reason="TOKENIZER_LOAD_FAILED")
    return None


def info_of(tok: LoadedTokenizer) -> pb.TokenizerInfo:
    info = pb.TokenizerInfo(
        model=tok.model, vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids,
        has_chat_template=tok.chat_template is not None, source=tok.source,
        fingerprint=tok.fingerprint, model_max_length=tok.model_max_length,
    )
    if tok.bos_token_id is not None:
        info.bos_token_id = tok.bos_token_id
    if tok.pad_token_id is not None:
        info.pad_token_id = tok.pad_token_id
    return info


# Prompt tokens kept as decode context, so the first output token decodes with the right
# leading space (a rendered start's context; other callers send their own tail).
PROMPT_CONTEXT_TOKENS = 8


def opens_reasoning(prompt: str) -> bool:
    """The template opened a reasoning block for the answer (``<think>`` at the very end)."""
    return prompt.rstrip().endswith("<think>")


def record_call(method: str, ok: bool, started: float) -> None:
    """Counts one operation by outcome and observes its duration (from ``started``)."""
    child(metrics.REQUESTS, method, "ok" if ok else "error").inc()
    child(metrics.LATENCY, method).observe(time.perf_counter() - started)


@contextlib.contextmanager
def measured(method: str) -> Iterator[None]:
    """:func:`record_call` around a block."""
    start = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        record_call(method, ok, start)


def _timed_step(spec: DecodeStreamSpec, session: DecodeSession, ids: list[int],
                finished: bool) -> StreamDelta:
    start = time.perf_counter()
    delta = spec.step(session, ids, finished)
    metrics.DECODE_STEP.observe(time.perf_counter() - start)
    return delta


def _mapping_errors(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with domain exceptions raised as ServiceErrors."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        mapped = to_service_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


class TokenizerService(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, core: TokenizerCore, executor: ThreadPoolExecutor,
                 worker_timeout: float = 60.0, inline_max_bytes: int = 8192) -> None:
        self.core = core
        self.executor = executor
        self.worker_timeout = worker_timeout
        self.inline_max_bytes = inline_max_bytes
        # A decode step's size is its token count: ids are varints of ~3 bytes, and the text
        # they turn into is a few bytes each.
        self.inline_max_tokens = inline_max_bytes // 8

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.executor, lambda: _mapping_errors(fn, *args, **kwargs))

    async def _run_sized(self, size: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` on the loop when ``size`` is at most ``inline_max_bytes``, else on the pool."""
        if size > self.inline_max_bytes:
            return await self._run(fn, *args, **kwargs)
        return _mapping_errors(fn, *args, **kwargs)

    async def load(self, model: str, local_path: str = "", worker_target: str = "",
                   chat_template: str = "", wait_for_ready: bool = False) -> LoadedTokenizer:
        if not model:
            raise invalid_argument("model", "model is required")
        if local_path:
            return await self._run(self.core.load_dir, model, local_path, chat_template or None)
        if worker_target:
            try:
                data, sha256 = await fetch_tokenizer_bundle(
                    worker_target, self.worker_timeout, wait_for_ready=wait_for_ready)
            except grpc.aio.AioRpcError as exc:
                raise ServiceError(
                    ErrorCode.UNAVAILABLE, "WORKER_UNAVAILABLE",
                    f"GetTokenizer from {worker_target} failed: "
                    f"{exc.code().name} {exc.details()}", {"worker_target": worker_target},
                ) from exc
            return await self._run(self.core.load_bundle, model, worker_target, data, sha256,
                                   chat_template or None)
        raise invalid_argument("source", "one of local_path or worker_target is required")

    # -- RPCs ------------------------------------------------------------------------------------

    async def LoadTokenizer(self, request: pb.LoadTokenizerRequest,
                            context: grpc.aio.ServicerContext) -> pb.LoadTokenizerResponse:
        kind = request.WhichOneof("source")
        tok = await self.load(
            request.model, local_path=request.local_path if kind == "local_path" else "",
            worker_target=request.worker_target if kind == "worker_target" else "",
            chat_template=request.chat_template)
        return pb.LoadTokenizerResponse(tokenizer=info_of(tok))

    async def GetTokenizerInfo(self, request: pb.GetTokenizerInfoRequest,
                               context: grpc.aio.ServicerContext) -> pb.GetTokenizerInfoResponse:
        tok = await self._run_sized(0, self.core.get, request.model)
        return pb.GetTokenizerInfoResponse(tokenizer=info_of(tok))

    async def ListTokenizers(self, request: pb.ListTokenizersRequest,
                             context: grpc.aio.ServicerContext) -> pb.ListTokenizersResponse:
        return pb.ListTokenizersResponse(
            tokenizers=[info_of(t) for t in self.core.registry.list()])

    async def Tokenize(self, request: pb.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        with measured("Tokenize"):
            results = await self._run_sized(request.ByteSize(), self.core.tokenize,
                                            request.model, list(request.texts),
                                            request.add_special_tokens)
        child(metrics.TOKENS, "Tokenize").inc(sum(len(r) for r in results))
        return pb.TokenizeResponse(results=[pb.TokenIds(token_ids=r) for r in results],
                                   total_tokens=sum(len(r) for r in results))

    async def Detokenize(self, request: pb.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        with measured("Detokenize"):
            texts = await self._run_sized(request.ByteSize(), self.core.detokenize,
                                          request.model,
                                          [list(s.token_ids) for s in request.sequences],
                                          request.skip_special_tokens)
        return pb.DetokenizeResponse(texts=texts)

    async def RenderChat(self, request: pb.RenderChatRequest,
                         context: grpc.aio.ServicerContext) -> pb.RenderChatResponse:
        prompt, ids = await self._render(request)
        return pb.RenderChatResponse(prompt=prompt, token_ids=ids)

    async def _render(self, request: pb.RenderChatRequest) -> tuple[str, list[int]]:
        def render() -> tuple[str, list[int]]:
            return self.core.render_chat(
                request.model, [from_struct(m) for m in request.messages],
                tools=[from_struct(t) for t in request.tools] or None,
                documents=[from_struct(d) for d in request.documents] or None,
                add_generation_prompt=(request.add_generation_prompt
                                       if request.HasField("add_generation_prompt") else None),
                template_kwargs=(from_struct(request.template_kwargs)
                                 if request.HasField("template_kwargs") else None),
                continue_final_message=request.continue_final_message,
            )

        with measured("RenderChat"):
            prompt, ids = await self._run_sized(request.ByteSize(), render)
        child(metrics.TOKENS, "RenderChat").inc(len(ids))
        return prompt, ids

    async def DecodeStream(
        self, request_iterator: AsyncIterator[pb.DecodeStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.DecodeStreamResponse]:
        stream = self.open_decode_stream()
        ok = False
        try:
            async for request in request_iterator:
                response = await stream.handle(request)
                if response is not None:
                    yield response
            ok = True
        finally:
            stream.finish(ok)

    def open_decode_stream(self) -> DecodeStreamHandler:
        """A DecodeStream's state, answered one request at a time (the in-process fast path,
        ``services.common.inprocess.LockstepCall``, drives it without the stream plumbing)."""
        return DecodeStreamHandler(self)

    # Bidi methods whose every request gets at most one answer, computed when it is read.
    lockstep_methods = {"DecodeStream": "open_decode_stream"}


class DecodeStreamHandler:
    """One DecodeStream: a start (validated, optionally rendering the chat), then token chunks
    decoded per choice index. ``handle`` answers one request: the rendered prompt for a start
    that renders, a decoded delta for tokens, None for a plain start."""

    def __init__(self, service: TokenizerService) -> None:
        self._service = service
        self._spec: DecodeStreamSpec | None = None
        self._sessions: dict[int, DecodeSession] = {}
        self._started = time.perf_counter()
        self._tokens = child(metrics.TOKENS, "DecodeStream")

    async def handle(self, request: pb.DecodeStreamRequest) -> pb.DecodeStreamResponse | None:
        if self._spec is None:
            return await self._start(request)
        if not request.HasField("tokens"):
            kind = request.WhichOneof("request")
            raise invalid_argument("start" if kind == "start" else "request",
                                   "start may only be sent once, as the first message")
        msg = request.tokens
        session = self._sessions.get(msg.index)
        if session is None:
            session = self._sessions[msg.index] = self._spec.new_session()
        ids = list(msg.token_ids)
        service = self._service
        if len(ids) <= service.inline_max_tokens and service.inline_max_bytes:
            delta = _mapping_errors(_timed_step, self._spec, session, ids, msg.finished)
        else:
            delta = await service._run(_timed_step, self._spec, session, ids, msg.finished)
        self._tokens.inc(len(ids))
        response = pb.DecodeStreamResponse(
            index=msg.index, text=delta.text, reasoning_text=delta.reasoning_text,
            stopped=delta.stopped, matched_stop=delta.matched_stop)
        if delta.tool_calls:
            response.tool_calls.extend(
                pb.ToolCallDelta(tool_index=c.index, id=c.id, name=c.name, arguments=c.arguments)
                for c in delta.tool_calls)
            new_calls = sum(1 for c in delta.tool_calls if c.name)
            if new_calls:
                metrics.TOOL_CALLS.labels(self._spec.tool_parser).inc(new_calls)
        return response

    async def _start(self, request: pb.DecodeStreamRequest) -> pb.DecodeStreamResponse | None:
        if not request.HasField("start"):
            raise invalid_argument("start", "the first DecodeStream message must be start")
        start = request.start
        service = self._service
        context_ids, reasoning_open = list(start.prompt_token_ids), start.reasoning_open
        response = None
        if start.HasField("render"):
            prompt, ids = await service._render(start.render)
            context_ids = ids[-PROMPT_CONTEXT_TOKENS:]
            # Whichever parser applies (named here or the service's default) starts inside
            # the reasoning block the template opened; without one it is unused.
            reasoning_open = opens_reasoning(prompt)
            response = pb.DecodeStreamResponse(
                rendered=pb.RenderChatResponse(prompt=prompt, token_ids=ids))
        options = DecodeOptions(
            skip_special_tokens=(start.skip_special_tokens
                                 if start.HasField("skip_special_tokens") else True),
            stop=list(start.stop), no_stop_trim=start.no_stop_trim,
            prompt_token_ids=context_ids,
        )
        self._spec = await service._run_sized(
            start.ByteSize(), service.core.open_stream, start.model, options,
            start.reasoning_parser, start.tool_parser, reasoning_open,
            [from_struct(t) for t in start.tools])
        return response

    def finish(self, ok: bool) -> None:
        """Counts the stream by outcome and observes its duration."""
        record_call("DecodeStream", ok, self._started)


def build_service(config: TokenizerConfig, executor: ThreadPoolExecutor) -> TokenizerService:
    """The service ``config`` describes (its models are loaded by :func:`load_configured`)."""
    core = TokenizerCore(config.cache_dir, tool_call_parser=config.tool_call_parser,
                         reasoning_parser=config.reasoning_parser,
                         cache_max_bytes=config.cache_max_bytes,
                         cache_max_entries=config.cache_max_entries,
                         prefix_cache_max_bytes=config.prefix_cache_max_bytes)
    register_cache_collector(core.registry)
    return TokenizerService(core, executor, worker_timeout=config.worker_timeout,
                            inline_max_bytes=config.inline_max_bytes)


async def load_configured(service: TokenizerService, config: TokenizerConfig) -> None:
    """Loads the ``--tokenizer`` models of ``config``; a ServiceError names the failing one."""
    template = config.chat_template_source()
    for model, source in config.tokenizer_specs():
        remote = source.startswith(("grpc://", "grpcs://"))
        try:
            tok = await service.load(
                model, local_path="" if remote else source,
                worker_target=source if remote else "",
                chat_template=template or "", wait_for_ready=True)
        except ServiceError as exc:
            log.error("cannot load the tokenizer of %s from %s: %s", model, source, exc)
            raise
        log.info("loaded tokenizer %s from %s (vocab %d, fingerprint %s)", model, tok.source,
                 tok.vocab_size, tok.fingerprint[:12])
