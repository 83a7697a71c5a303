"""The worker's gRPC transport: ``sglang.grpc.scheduler.SglangScheduler`` over an engine.

Transport only: proto <-> engine mapping and request validation, for any engine that
implements :class:`services.worker.engine_api.Engine`. Proto3 zero defaults are not semantic
defaults, so 0 means "unset" for top_p (1.0), top_k (-1), repetition_penalty (1.0) and n (1);
temperature 0 is greedy; an unset max_new_tokens runs to the context length;
``logprob_start_len`` is taken as sent (-1: no input logprobs, 0: from the first token), as
SGLang's servicer does. The sampling seed is ``custom_params["seed"]`` (or
``custom_params["sampling_seed"]``).

KV events: ``SubscribeKvEvents`` streams the engine's :class:`~services.worker.kv_events.
KvEventLog` (snapshot or replay, then live batches, load-only heartbeats with an
``EngineLoad``). For the torch engine the publisher IS this gRPC stream, so GetServerInfo's
``server_args.kv_events`` describes it as ``{"publisher": "grpc", "endpoint_host": <gRPC host>,
"endpoint_port_base": <gRPC port>, ...}``; ``--kv-events-config`` (SGLang's JSON shape) may
override host/port/topic or turn it off with ``{"publisher": null}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.errors import ErrorCode, ServiceError, invalid_argument
from services.common.grpc_server import GrpcServer, wait_for_shutdown
from services.worker import metrics
from services.worker.config import WorkerConfig
from services.worker.engine_api import (
    Engine,
    EngineError,
    EngineLoads,
    EngineOutput,
    SamplingOptions,
    TokenLogprobs,
)
from services.worker.kv_events import (
    BlocksRemoved,
    BlocksStored,
    CursorGone,
    EventBatch,
    SubscriberBehind,
    kv_events_descriptor,
)
from services.worker.model_store import (
    EMBEDDED_NAME,
    ModelPathError,
    ensure_embedded_model,
    preflight_model_path,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "sglang.grpc.scheduler.SglangScheduler"
VERSION = "sglmesh-torch 0.2.0"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "config.json", "generation_config.json")
CHUNK_SIZE = 1 << 20
UNSUPPORTED = "not supported by the torch engine"
MAX_N = 64
KV_HEARTBEAT_S = 2.0

# Flags this module reads with getattr defaults (declared in WorkerConfig by its owner).
DEFAULTS: dict[str, Any] = {
    "block_size": 16,  # tokens per prefix-cache block (and KV event block)
    "prefix_cache_tokens": 16384,  # prefix cache capacity in tokens (0 = off)
    "prefill_chunk": 256,  # prompt tokens prefilled per engine step
    "kv_events_config": "",  # SGLang-shaped JSON; empty = {"publisher": "grpc"}
    "kv_events_buffer": 10000,  # KV event batches kept for resume
    "drain_timeout": 30.0,  # seconds in-flight requests get to finish on SIGTERM
}


def setting(config: Any, name: str) -> Any:
    return getattr(config, name, DEFAULTS[name])


def unavailable(message: str) -> ServiceError:
    return ServiceError(ErrorCode.UNAVAILABLE, "WORKER_UNAVAILABLE", message)


def _to_struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(json.loads(json.dumps(values, default=str)))
    return struct


def _seed(sp: pb.SamplingParams) -> int | None:
    if not sp.HasField("custom_params"):
        return None
    for key in ("seed", "sampling_seed"):
        value = sp.custom_params.fields.get(key)
        if value is None or value.WhichOneof("kind") == "null_value":
            continue
        if value.WhichOneof("kind") != "number_value" or value.number_value != int(
                value.number_value):
            raise invalid_argument(f"sampling_params.custom_params.{key}",
                                   f"{key} must be an integer")
        return int(value.number_value)
    return None


def sampling_options(request: pb.GenerateRequest, context_length: int,
                     vocab_size: int) -> SamplingOptions:
    """Validates a GenerateRequest and maps its sampling params to engine options."""
    ids = request.tokenized.input_ids
    if not ids:
        raise invalid_argument("tokenized.input_ids", "input_ids must not be empty "
                               "(the worker takes tokenized input only)")
    if len(ids) >= context_length:
        raise invalid_argument(
            "tokenized.input_ids",
            f"the prompt has {len(ids)} tokens; the context length is {context_length}")
    if max(ids) >= vocab_size:
        raise invalid_argument("tokenized.input_ids",
                               f"token id {max(ids)} is out of the vocabulary ({vocab_size})")
    sp = request.sampling_params
    constraint = sp.WhichOneof("constraint")
    if constraint:
        raise invalid_argument(
            f"sampling_params.{constraint}",
            f"constrained decoding ({constraint}) is {UNSUPPORTED}: it has no grammar backend; "
            "send the request without a constraint or to an SGLang worker")
    n = sp.n or 1
    if not 1 <= n <= MAX_N:
        raise invalid_argument("sampling_params.n", f"n must be in [1, {MAX_N}], got {sp.n}")
    if request.return_hidden_states:
        raise invalid_argument("return_hidden_states", f"hidden states are {UNSUPPORTED}")
    if request.custom_logit_processor:
        raise invalid_argument("custom_logit_processor",
                               f"custom logit processors are {UNSUPPORTED}")
    if request.input_embeds:
        raise invalid_argument("input_embeds", f"input embeddings are {UNSUPPORTED}")
    mm = request.mm_inputs
    if mm.image_urls or mm.image_data or mm.video_urls or mm.video_data or mm.audio_urls \
            or mm.audio_data or mm.HasField("pixel_values"):
        raise invalid_argument("mm_inputs", f"multimodal input is {UNSUPPORTED}")
    if request.disaggregated_params.bootstrap_host:
        raise invalid_argument("disaggregated_params", f"PD disaggregation is {UNSUPPORTED}")
    if request.lora_id:
        raise invalid_argument("lora_id", f"LoRA adapters are {UNSUPPORTED}")
    if request.HasField("data_parallel_rank") and request.data_parallel_rank != 0:
        raise invalid_argument("data_parallel_rank",
                               f"this worker has one DP rank (0), got {request.data_parallel_rank}")
    if sp.temperature < 0:
        raise invalid_argument("sampling_params.temperature",
                               f"temperature must be >= 0, got {sp.temperature}")
    top_p = sp.top_p or 1.0
    if not 0 < top_p <= 1:
        raise invalid_argument("sampling_params.top_p", f"top_p must be in (0, 1], got {sp.top_p}")
    top_k = sp.top_k or -1
    if top_k < -1:
        raise invalid_argument("sampling_params.top_k",
                               f"top_k must be -1 (off) or >= 1, got {sp.top_k}")
    if not 0 <= sp.min_p <= 1:
        raise invalid_argument("sampling_params.min_p", f"min_p must be in [0, 1], got {sp.min_p}")
    repetition = sp.repetition_penalty or 1.0
    if not 0 < repetition <= 2:
        raise invalid_argument("sampling_params.repetition_penalty",
                               f"repetition_penalty must be in (0, 2], got {sp.repetition_penalty}")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(sp, name)
        if not -2 <= value <= 2:
            raise invalid_argument(f"sampling_params.{name}",
                                   f"{name} must be in [-2, 2], got {value}")
    max_new: int | None = None
    if sp.HasField("max_new_tokens"):
        max_new = sp.max_new_tokens
        if max_new < 1:
            raise invalid_argument("sampling_params.max_new_tokens",
                                   f"max_new_tokens must be >= 1, got {max_new}")
    if max_new is not None and sp.min_new_tokens > max_new:
        raise invalid_argument("sampling_params.min_new_tokens",
                               f"min_new_tokens ({sp.min_new_tokens}) exceeds max_new_tokens "
                               f"({max_new})")
    if sp.HasField("stream_interval") and sp.stream_interval < 1:
        raise invalid_argument("sampling_params.stream_interval",
                               f"stream_interval must be >= 1, got {sp.stream_interval}")
    bad_stop = [t for t in sp.stop_token_ids if t >= vocab_size]
    if bad_stop:
        raise invalid_argument("sampling_params.stop_token_ids",
                               f"stop token id {bad_stop[0]} is out of the vocabulary")
    stops = [s for s in sp.stop if s]
    if len(stops) != len(sp.stop):
        raise invalid_argument("sampling_params.stop", "stop strings must not be empty")
    logit_bias: dict[int, float] = {}
    for key, bias in sp.logit_bias.items():
        try:
            tok = int(key)
        except ValueError:
            tok = -1
        if not 0 <= tok < vocab_size:
            raise invalid_argument("sampling_params.logit_bias",
                                   f"logit_bias key {key!r} is not a token id in the vocabulary")
        logit_bias[tok] = float(bias)
    return_logprob = bool(request.return_logprob)
    if request.top_logprobs_num < 0:
        raise invalid_argument("top_logprobs_num",
                               f"top_logprobs_num must be >= 0, got {request.top_logprobs_num}")
    if request.top_logprobs_num > 20 and request.top_logprobs_num > vocab_size:
        raise invalid_argument("top_logprobs_num", "top_logprobs_num exceeds the vocabulary")
    if request.logprob_start_len < -1:
        raise invalid_argument("logprob_start_len",
                               f"logprob_start_len must be >= -1, got {request.logprob_start_len}")
    bad_ids = [t for t in request.token_ids_logprob if t >= vocab_size]
    if bad_ids:
        raise invalid_argument("token_ids_logprob",
                               f"token id {bad_ids[0]} is out of the vocabulary")
    return SamplingOptions(
        temperature=float(sp.temperature), top_p=float(top_p), top_k=int(top_k),
        min_p=float(sp.min_p), repetition_penalty=float(repetition),
        frequency_penalty=float(sp.frequency_penalty),
        presence_penalty=float(sp.presence_penalty), max_new_tokens=max_new,
        min_new_tokens=int(sp.min_new_tokens), stop_token_ids=[int(t) for t in sp.stop_token_ids],
        ignore_eos=sp.ignore_eos, seed=_seed(sp), logit_bias=logit_bias, n=n, stop=stops,
        no_stop_trim=sp.no_stop_trim, skip_special_tokens=sp.skip_special_tokens,
        return_logprob=return_logprob,
        top_logprobs_num=int(request.top_logprobs_num) if return_logprob else 0,
        logprob_start_len=int(request.logprob_start_len) if return_logprob else -1,
        token_ids_logprob=[int(t) for t in request.token_ids_logprob] if return_logprob else [])


# -------------------------------------------------------------------- engine -> proto


def _top(rows: list[list[tuple[int, float]]]) -> list[pb.TopLogProbs]:
    return [pb.TopLogProbs(values=[v for _, v in row], token_ids=[t for t, _ in row])
            for row in rows]


def output_logprobs(lp: TokenLogprobs | None) -> pb.OutputLogProbs | None:
    if lp is None:
        return None
    return pb.OutputLogProbs(
        token_logprobs=[float(v) if v is not None else 0.0 for v in lp.logprobs],
        token_ids=lp.token_ids, top_logprobs=_top(lp.top) if any(lp.top) else [],
        token_ids_logprobs=_top(lp.requested) if any(lp.requested) else [])


def input_logprobs(lp: TokenLogprobs | None) -> pb.InputLogProbs | None:
    if lp is None:
        return None
    return pb.InputLogProbs(
        token_logprobs=[pb.InputTokenLogProb() if v is None else pb.InputTokenLogProb(value=v)
                        for v in lp.logprobs],
        token_ids=lp.token_ids, top_logprobs=_top(lp.top) if any(lp.top) else [])


def joined(earlier: EngineOutput, later: EngineOutput) -> EngineOutput:
    """One chunk for two consecutive outputs of a sample (counts are cumulative: the later's)."""
    logprobs = earlier.output_logprobs
    if logprobs is not None and later.output_logprobs is not None:
        logprobs = TokenLogprobs(list(logprobs.token_ids), list(logprobs.logprobs),
                                 list(logprobs.top), list(logprobs.requested))
        logprobs.extend(later.output_logprobs)
    return dataclasses.replace(
        later, new_token_ids=earlier.new_token_ids + later.new_token_ids,
        output_logprobs=logprobs if logprobs is not None else later.output_logprobs,
        input_logprobs=(earlier.input_logprobs if earlier.input_logprobs is not None
                        else later.input_logprobs))


def chunk_message(out: EngineOutput) -> pb.GenerateStreamChunk:
    return pb.GenerateStreamChunk(
        token_ids=out.new_token_ids, prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens, cached_tokens=out.cached_tokens,
        output_logprobs=output_logprobs(out.output_logprobs),
        input_logprobs=input_logprobs(out.input_logprobs), index=out.index)


def complete_message(out: EngineOutput, inputs: TokenLogprobs | None) -> pb.GenerateComplete:
    complete = pb.GenerateComplete(
        output_ids=out.output_ids, finish_reason=out.finish_reason or "stop",
        prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
        cached_tokens=out.cached_tokens,
        output_logprobs=output_logprobs(out.all_output_logprobs),
        input_logprobs=input_logprobs(inputs), index=out.index)
    if out.matched_token_id is not None:
        complete.matched_token_id = out.matched_token_id
    elif out.matched_stop_str is not None:
        complete.matched_stop_str = out.matched_stop_str
    return complete


def engine_load(loads: EngineLoads, sample: int, load_only: bool,
                full: bool) -> common_pb2.EngineLoad:
    load = common_pb2.EngineLoad(
        running_requests=loads.num_running, waiting_requests=loads.num_waiting,
        waiting_uncached_tokens=loads.num_waiting_tokens, token_usage=loads.token_usage,
        gen_throughput=loads.gen_throughput, max_running_requests=loads.max_running_requests,
        age_ms=0, sample=sample, load_only=load_only)
    if loads.active_token_usage is not None:
        load.active_token_usage = loads.active_token_usage
    if full:
        load.cache_hit_rate = loads.cache_hit_rate
        load.num_used_tokens = loads.num_used_tokens
        load.max_total_num_tokens = loads.max_total_num_tokens
        load.memory.CopyFrom(common_pb2.EngineMemory(
            weight_gb=loads.weight_bytes / 1e9, kv_cache_gb=loads.kv_cache_bytes / 1e9,
            token_capacity=loads.max_total_num_tokens))
        load.queues.CopyFrom(common_pb2.EngineQueues(waiting=loads.num_waiting))
    return load


def event_batch(batch: EventBatch, block_size: int) -> common_pb2.KvEventBatch:
    out = common_pb2.KvEventBatch(sequence_number=batch.sequence_number,
                                  timestamp=batch.timestamp, dp_rank=0)
    for i, event in enumerate(batch.events):
        event_id = 0 if batch.snapshot else (batch.sequence_number << 16) + i + 1
        item = out.events.add(event_id=event_id)
        if isinstance(event, BlocksStored):
            item.stored.blocks.extend(
                common_pb2.KvBlock(block_hash=b.block_hash, token_ids=b.token_ids,
                                   block_size=block_size) for b in event.blocks)
            if event.parent_block_hash is not None:
                item.stored.parent_block_hash = event.parent_block_hash
        elif isinstance(event, BlocksRemoved):
            item.removed.block_hashes.extend(event.block_hashes)
        else:
            item.cleared.SetInParent()
    if batch.snapshot is not None:
        out.snapshot.CopyFrom(common_pb2.KvSnapshotChunk(
            index=batch.snapshot.index, count=batch.snapshot.count,
            blocks=batch.snapshot.blocks, unknown_before=0))
    return out


class WorkerServicer(pb_grpc.SglangSchedulerServicer):
    """SglangScheduler over any :class:`~services.worker.engine_api.Engine`."""

    def __init__(self, config: WorkerConfig, model_dir: Path, served_model_name: str) -> None:
        self.config = config
        self.model_dir = model_dir
        self.served_model_name = served_model_name
        self.engine: Engine | None = None
        self.draining = False
        self.start_time = time.time()
        self.last_receive = 0.0
        self.port = 0  # the bound gRPC port, once the server started
        self._tokenizer_zip: tuple[bytes, str] | None = None
        self._descriptor: tuple[bool, dict[str, Any] | None] = (False, None)

    def _engine(self, new_work: bool = False) -> Engine:
        if self.engine is None:
            raise unavailable("the worker is still loading its model")
        if new_work and self.draining:
            raise unavailable("the worker is draining (shutting down); retry on another worker")
        return self.engine

    # ---------------------------------------------------------------- generation

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        engine = self._engine(new_work=True)
        arrived = time.monotonic()
        self.last_receive = time.time()
        options = sampling_options(request, engine.context_length, engine.vocab_size)
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        first_token: set[int] = set()
        inputs: dict[int, TokenLogprobs | None] = {}
        held: dict[int, EngineOutput] = {}  # per sample: tokens waiting for the stream interval
        # The request's own interval (SGLang's per-request sampling param), else the worker's.
        sp = request.sampling_params
        interval = (sp.stream_interval if sp.HasField("stream_interval")
                    else self.config.stream_interval)
        try:
            stream = engine.generate(request_id, list(request.tokenized.input_ids), options)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    first = bool(out.new_token_ids) and out.index not in first_token
                    if first:
                        first_token.add(out.index)
                        metrics.TTFT.observe(time.monotonic() - arrived)
                    if out.input_logprobs is not None:
                        inputs[out.index] = out.input_logprobs
                    if request.stream and (out.new_token_ids or out.input_logprobs is not None):
                        chunk = out
                        if out.index in held:
                            chunk = joined(held.pop(out.index), out)
                        if (first or out.finished or interval == 1
                                or len(chunk.new_token_ids) >= interval):
                            yield pb.GenerateResponse(request_id=request_id,
                                                      chunk=chunk_message(chunk))
                        else:
                            held[out.index] = chunk
                    elif out.finished and out.index in held:  # a finish that adds no token
                        yield pb.GenerateResponse(request_id=request_id,
                                                  chunk=chunk_message(held.pop(out.index)))
                    if out.finished:
                        self._count(out, arrived)
                        yield pb.GenerateResponse(
                            request_id=request_id,
                            complete=complete_message(out, inputs.get(out.index)))
        except EngineError as exc:
            metrics.REQUESTS.labels("error").inc()
            field = getattr(exc, "field", None)
            if field:
                raise invalid_argument(field, str(exc)) from exc
            if "already running" in str(exc):
                raise ServiceError(ErrorCode.ALREADY_EXISTS, "REQUEST_ID_IN_USE", str(exc),
                                   {"field": "request_id"}) from exc
            raise unavailable(str(exc)) from exc

    @staticmethod
    def _count(out: EngineOutput, arrived: float) -> None:
        metrics.REQUESTS.labels(out.finish_reason or "stop").inc()
        metrics.PROMPT_TOKENS.inc(out.prompt_tokens)
        metrics.CACHED_TOKENS.inc(out.cached_tokens)
        metrics.GENERATION_TOKENS.inc(out.completion_tokens)
        metrics.E2E.observe(time.monotonic() - arrived)

    async def Abort(self, request: pb.AbortRequest,
                    context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if self.engine is None:
            return pb.AbortResponse(success=False, message="the worker is still loading")
        found = self.engine.abort(request.request_id, request.reason or "aborted by client")
        return pb.AbortResponse(
            success=found, message="aborted" if found else
            f"request {request.request_id!r} is not running")

    # ---------------------------------------------------------------- health, info, loads

    async def health_probe(self, timeout: float) -> tuple[bool, str]:
        """A real 1-token generation."""
        if self.draining:
            return False, "draining: the worker is shutting down"
        if self.engine is None:
            return False, "loading the model"
        engine = self.engine
        rid = f"health-{uuid.uuid4().hex}"
        bos = engine.bos_token_id
        prompt = [int(bos) if isinstance(bos, int) else 1]

        async def probe() -> int:
            count = 0
            stream = engine.generate(rid, prompt, SamplingOptions(
                temperature=0.0, max_new_tokens=1, ignore_eos=True))
            async with contextlib.aclosing(stream):
                async for out in stream:
                    if out.finished and out.finish_reason == "abort":
                        raise RuntimeError(out.abort_message or "aborted")
                    count = out.completion_tokens
            return count

        start = time.monotonic()
        try:
            count = await asyncio.wait_for(probe(), timeout)
        except TimeoutError:
            return False, f"health generation timed out after {timeout:.1f}s"
        except Exception as exc:  # the probe reports, never raises
            return False, f"health generation failed: {exc}"
        if count != 1:
            return False, f"health generation produced {count} tokens"
        return True, f"ok: 1 token in {(time.monotonic() - start) * 1000:.0f} ms"

    async def HealthCheck(self, request: pb.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> pb.HealthCheckResponse:
        healthy, message = await self.health_probe(self.config.health_check_timeout)
        return pb.HealthCheckResponse(healthy=healthy, message=message)

    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.model_dir / name
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        engine = self._engine()
        config = self._read_json("config.json")
        gen = self._read_json("generation_config.json")
        pad = gen.get("pad_token_id", config.get("pad_token_id"))
        bos = gen.get("bos_token_id", config.get("bos_token_id"))
        defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "min_p",
                                        "repetition_penalty") if k in gen}
        return pb.GetModelInfoResponse(
            model_path=str(self.model_dir), tokenizer_path=str(self.model_dir),
            is_generation=True, preferred_sampling_params="", weight_version="default",
            served_model_name=self.served_model_name,
            max_context_length=engine.context_length, vocab_size=engine.vocab_size,
            supports_vision=False, model_type=config.get("model_type", ""),
            eos_token_ids=engine.eos_token_ids,
            pad_token_id=int(pad) if isinstance(pad, int) else 0,
            bos_token_id=int(bos) if isinstance(bos, int) else 0,
            max_req_input_len=engine.context_length - 1,
            architectures=config.get("architectures", []),
            default_sampling_params_json=json.dumps(defaults) if defaults else "")

    def kv_events(self) -> dict[str, Any] | None:
        """The ``kv_events`` descriptor (computed once the server is bound)."""
        engine = self._engine()
        if engine.kv_events is None:
            return None
        known, descriptor = self._descriptor
        if known:
            return descriptor
        raw = setting(self.config, "kv_events_config") or '{"publisher": "grpc"}'
        block_size = engine.kv_events.block_size
        descriptor = kv_events_descriptor(
            raw, block_size=block_size, dp_size=1, default_host=self.config.host,
            default_port=self.port or self.config.port, publishers=("grpc",))
        if descriptor is not None and descriptor["block_size"] != block_size:
            log.warning("--kv-events-config block_size %s differs from the engine's block "
                        "size %d; advertising %d", descriptor["block_size"], block_size,
                        block_size)
            descriptor["block_size"] = block_size
        if self.port:
            self._descriptor = (True, descriptor)
        return descriptor

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        engine = self._engine()
        args = dataclasses.asdict(self.config)
        for name, default in DEFAULTS.items():
            args.setdefault(name, default)
        args.update(model_path=str(self.model_dir), served_model_name=self.served_model_name,
                    context_length=engine.context_length, dp_size=1, tp_size=1,
                    data_parallel_size=1, kv_events=self.kv_events())
        scheduler = engine.info()
        start = timestamp_pb2.Timestamp()
        start.FromSeconds(int(self.start_time))
        return pb.GetServerInfoResponse(
            server_args=_to_struct(args), scheduler_info=_to_struct(scheduler),
            active_requests=engine.active_requests(), is_paused=self.draining,
            last_receive_timestamp=self.last_receive,
            uptime_seconds=time.time() - self.start_time, sglang_version=VERSION,
            server_type="grpc", start_time=start,
            max_total_num_tokens=engine.max_total_num_tokens)

    async def GetLoads(self, request: pb.GetLoadsRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetLoadsResponse:
        engine = self._engine()
        loads = engine.loads()
        include = set(request.include) or {"core"}
        everything = "all" in include
        load = pb.SchedulerLoad(
            dp_rank=0, num_running_reqs=loads.num_running, num_waiting_reqs=loads.num_waiting,
            num_total_reqs=loads.num_running + loads.num_waiting,
            num_used_tokens=loads.num_used_tokens,
            max_total_num_tokens=loads.max_total_num_tokens, token_usage=loads.token_usage,
            gen_throughput=loads.gen_throughput, cache_hit_rate=loads.cache_hit_rate,
            utilization=min(1.0, loads.num_running / max(loads.max_running_requests, 1)),
            max_running_requests=loads.max_running_requests,
            num_waiting_uncached_tokens=loads.num_waiting_tokens)
        if everything or "memory" in include:
            load.memory.CopyFrom(pb.MemoryMetrics(
                weight_gb=loads.weight_bytes / 1e9, kv_cache_gb=loads.kv_cache_bytes / 1e9,
                token_capacity=loads.max_total_num_tokens))
        if everything or "queues" in include:
            load.queues.CopyFrom(pb.QueueMetrics(waiting=loads.num_waiting))
        selected = [load] if not request.HasField("dp_rank") or request.dp_rank == 0 else []
        return pb.GetLoadsResponse(
            timestamp=datetime.datetime.now(datetime.UTC).isoformat(), version=VERSION,
            dp_rank_count=1, loads=selected,
            aggregate=pb.AggregateMetrics(
                total_running_reqs=loads.num_running, total_waiting_reqs=loads.num_waiting,
                total_reqs=loads.num_running + loads.num_waiting,
                avg_token_usage=loads.token_usage, avg_throughput=loads.gen_throughput,
                avg_utilization=load.utilization))

    # ---------------------------------------------------------------- KV events

    async def SubscribeKvEvents(self, request: common_pb2.SubscribeKvEventsRequest,
                                context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[common_pb2.KvEventBatch]:
        engine = self._engine()
        events = engine.kv_events
        if events is None or self.kv_events() is None:
            raise ServiceError(ErrorCode.UNIMPLEMENTED, "NO_KV_EVENTS",
                               "this worker publishes no KV events (--kv-events-config has "
                               "publisher null or is malformed)")
        sample = 0

        def load(load_only: bool, full: bool) -> common_pb2.EngineLoad:
            nonlocal sample
            sample += 1
            return engine_load(engine.loads(), sample, load_only, full)

        if request.load_records_before_first_batch:
            yield common_pb2.KvEventBatch(sequence_number=0, timestamp=time.time(), dp_rank=0,
                                          load=load(True, True))
        stream = events.subscribe(request.start_sequence_number, heartbeat_s=KV_HEARTBEAT_S)
        first = True
        try:
            async with contextlib.aclosing(stream):
                async for batch in stream:
                    out = event_batch(batch, events.block_size)
                    out.load.CopyFrom(load(batch.load_only, batch.load_only or first))
                    first = False
                    yield out
        except CursorGone as exc:
            raise ServiceError(ErrorCode.OUT_OF_RANGE, "KV_EVENTS_CURSOR_GONE", str(exc),
                               {"field": "start_sequence_number"}) from exc
        except SubscriberBehind as exc:
            await context.abort(grpc.StatusCode.DATA_LOSS, str(exc))

    # ---------------------------------------------------------------- admin

    async def FlushCache(self, request: common_pb2.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> common_pb2.FlushCacheResponse:
        engine = self._engine()
        success, message = await asyncio.to_thread(engine.flush_cache)
        return common_pb2.FlushCacheResponse(success=success, message=message)

    def tokenizer_bundle(self) -> tuple[bytes, str]:
        """The tokenizer files as one deterministic zip, and its sha256 hex."""
        if self._tokenizer_zip is None:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for name in TOKENIZER_FILES:
                    path = self.model_dir / name
                    if path.is_file():
                        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                        info.compress_type = zipfile.ZIP_DEFLATED
                        archive.writestr(info, path.read_bytes())
            data = buffer.getvalue()
            self._tokenizer_zip = (data, hashlib.sha256(data).hexdigest())
        return self._tokenizer_zip

    async def GetTokenizer(self, request: common_pb2.GetTokenizerRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        data, digest = await asyncio.to_thread(self.tokenizer_bundle)
        offsets = list(range(0, len(data), CHUNK_SIZE)) or [0]
        for i, offset in enumerate(offsets):
            last = i == len(offsets) - 1
            yield common_pb2.GetTokenizerChunk(data=data[offset:offset + CHUNK_SIZE],
                                               sha256=digest if last else "")


# -------------------------------------------------------------------- process main


def resolve_model(config: WorkerConfig) -> tuple[Path, str]:
    """(model directory, served model name); converts the embedded model when needed."""
    if config.model_path:
        model_dir = preflight_model_path(config.model_path)
        return model_dir, config.served_model_name or model_dir.name
    model_dir = ensure_embedded_model(Path(config.model_cache_dir).expanduser())
    return preflight_model_path(model_dir), config.served_model_name or EMBEDDED_NAME


def create_torch_engine(config: WorkerConfig, model_dir: Path) -> Engine:
    from services.worker.engine import TorchEngine

    return TorchEngine(
        model_dir, device=config.device, dtype=config.dtype,
        max_running_requests=config.max_running_requests,
        context_length=config.context_length, num_threads=config.num_threads,
        batch_decode=config.batch_decode, block_size=setting(config, "block_size"),
        prefix_cache_tokens=setting(config, "prefix_cache_tokens"),
        prefill_chunk=setting(config, "prefill_chunk"),
        kv_event_buffer=setting(config, "kv_events_buffer"))


async def drain(servicer: WorkerServicer, server: GrpcServer, timeout: float) -> None:
    """Stops taking work (HealthCheck unhealthy, grpc.health NOT_SERVING, new Generate calls
    UNAVAILABLE) and waits up to ``timeout`` seconds for in-flight requests to finish."""
    servicer.draining = True
    await server.set_serving(False)
    engine = servicer.engine
    deadline = time.monotonic() + timeout
    if engine is not None and engine.active_requests():
        log.info("draining: waiting up to %.0f s for %d in-flight requests", timeout,
                 engine.active_requests())
    while engine is not None and engine.active_requests() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if engine is not None and engine.active_requests():
        log.warning("drain timeout: aborting %d requests", engine.active_requests())


async def serve(config: WorkerConfig,
                create_engine: Callable[[WorkerConfig, Path], Engine] = create_torch_engine
                ) -> None:
    try:
        model_dir, name = await asyncio.to_thread(resolve_model, config)
    except ModelPathError as exc:
        raise SystemExit(f"worker: {exc}") from None
    servicer = WorkerServicer(config, model_dir, name)
    server = GrpcServer(config)
    server.add_service(pb_grpc.add_SglangSchedulerServicer_to_server, servicer, SERVICE_NAME)
    servicer.port = await server.start()
    engine = await asyncio.to_thread(create_engine, config, model_dir)
    engine.start()
    servicer.engine = engine
    metrics.bind_engine(engine)
    healthy, message = await servicer.health_probe(max(config.health_check_timeout, 60.0))
    if not healthy:
        await server.stop(0)
        engine.stop()
        raise SystemExit(f"worker: warm-up generation failed: {message}")
    log.info("worker serving %s from %s (%s; model loaded in %.2f s; kv_events %s)", name,
             model_dir, message, engine.load_seconds, servicer.kv_events())
    await server.set_serving(True)
    await wait_for_shutdown()
    await drain(servicer, server, float(setting(config, "drain_timeout")))
    await server.stop(1.0)
    await asyncio.to_thread(engine.stop)
