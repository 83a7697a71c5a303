"""The worker's gRPC transport: ``sglang.grpc.scheduler.SglangScheduler`` over the engine.

Transport only: proto <-> engine mapping and request validation. Proto3 zero defaults are not
semantic defaults, so 0 means "unset" for top_p (1.0), top_k (-1), repetition_penalty (1.0)
and n (1); temperature 0 is greedy; an unset max_new_tokens runs to the context length.
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
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.errors import ErrorCode, ServiceError, invalid_argument
from services.common.grpc_server import GrpcServer, wait_for_shutdown
from services.worker.config import WorkerConfig
from services.worker.engine import EngineError, SamplingOptions, TorchEngine
from services.worker.model_store import (
    EMBEDDED_NAME,
    ModelPathError,
    ensure_embedded_model,
    preflight_model_path,
)

log = logging.getLogger(__name__)

SERVICE_NAME = "sglang.grpc.scheduler.SglangScheduler"
VERSION = "sglmesh-torch 0.1.0"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "config.json", "generation_config.json")
CHUNK_SIZE = 1 << 20
UNSUPPORTED = "not supported by the torch engine"


def unavailable(message: str) -> ServiceError:
    return ServiceError(ErrorCode.UNAVAILABLE, "WORKER_UNAVAILABLE", message)


def _to_struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(json.loads(json.dumps(values, default=str)))
    return struct


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
        raise invalid_argument(f"sampling_params.{constraint}", f"{constraint} is {UNSUPPORTED}")
    if sp.n not in (0, 1):
        raise invalid_argument("sampling_params.n", f"n must be 1 for now ({UNSUPPORTED}), "
                               f"got {sp.n}")
    if request.return_logprob or request.top_logprobs_num or request.token_ids_logprob:
        raise invalid_argument("return_logprob", f"logprobs are {UNSUPPORTED} yet")
    if request.return_hidden_states:
        raise invalid_argument("return_hidden_states", f"hidden states are {UNSUPPORTED}")
    mm = request.mm_inputs
    if mm.image_urls or mm.image_data or mm.video_urls or mm.video_data or mm.audio_urls \
            or mm.audio_data or mm.HasField("pixel_values"):
        raise invalid_argument("mm_inputs", f"multimodal input is {UNSUPPORTED}")
    if request.disaggregated_params.bootstrap_host:
        raise invalid_argument("disaggregated_params", f"PD disaggregation is {UNSUPPORTED}")
    if request.lora_id:
        raise invalid_argument("lora_id", f"LoRA adapters are {UNSUPPORTED}")
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
    bad_stop = [t for t in sp.stop_token_ids if t >= vocab_size]
    if bad_stop:
        raise invalid_argument("sampling_params.stop_token_ids",
                               f"stop token id {bad_stop[0]} is out of the vocabulary")
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
    seed = None
    if sp.HasField("custom_params") and "seed" in sp.custom_params.fields:
        seed = int(sp.custom_params.fields["seed"].number_value)
    return SamplingOptions(
        temperature=float(sp.temperature), top_p=float(top_p), top_k=int(top_k),
        min_p=float(sp.min_p), repetition_penalty=float(repetition),
        frequency_penalty=float(sp.frequency_penalty),
        presence_penalty=float(sp.presence_penalty), max_new_tokens=max_new,
        min_new_tokens=int(sp.min_new_tokens), stop_token_ids=[int(t) for t in sp.stop_token_ids],
        ignore_eos=sp.ignore_eos, seed=seed, logit_bias=logit_bias)


class WorkerServicer(pb_grpc.SglangSchedulerServicer):
    """SglangScheduler over a :class:`TorchEngine`; UNIMPLEMENTED for the rest."""

    def __init__(self, config: WorkerConfig, model_dir: Path, served_model_name: str) -> None:
        self.config = config
        self.model_dir = model_dir
        self.served_model_name = served_model_name
        self.engine: TorchEngine | None = None
        self.draining = False
        self.start_time = time.time()
        self.last_receive = 0.0
        self._tokenizer_zip: tuple[bytes, str] | None = None

    def _engine(self) -> TorchEngine:
        if self.engine is None:
            raise unavailable("the worker is still loading its model")
        if self.draining:
            raise unavailable("the worker is shutting down")
        return self.engine

    # ---------------------------------------------------------------- generation

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        engine = self._engine()
        self.last_receive = time.time()
        options = sampling_options(request, engine.context_length, engine.vocab_size)
        request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
        try:
            stream = engine.generate(request_id, list(request.tokenized.input_ids), options)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    if request.stream and out.new_token_ids:
                        chunk = pb.GenerateStreamChunk(
                            token_ids=out.new_token_ids, prompt_tokens=out.prompt_tokens,
                            completion_tokens=out.completion_tokens,
                            cached_tokens=out.cached_tokens)
                        yield pb.GenerateResponse(request_id=request_id, chunk=chunk)
                    if out.finished:
                        complete = pb.GenerateComplete(
                            output_ids=out.output_ids, finish_reason=out.finish_reason or "stop",
                            prompt_tokens=out.prompt_tokens,
                            completion_tokens=out.completion_tokens,
                            cached_tokens=out.cached_tokens)
                        if out.matched_token_id is not None:
                            complete.matched_token_id = out.matched_token_id
                        yield pb.GenerateResponse(request_id=request_id, complete=complete)
        except EngineError as exc:
            if "already running" in str(exc):
                raise ServiceError(ErrorCode.ALREADY_EXISTS, "REQUEST_ID_IN_USE", str(exc),
                                   {"field": "request_id"}) from exc
            raise unavailable(str(exc)) from exc

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
        bos = getattr(engine.hf_config, "bos_token_id", None)
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

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        engine = self._engine()
        args = dataclasses.asdict(self.config)
        args.update(model_path=str(self.model_dir), served_model_name=self.served_model_name,
                    context_length=engine.context_length, dp_size=1, tp_size=1,
                    data_parallel_size=1)
        loads = engine.loads()
        scheduler = {"engine": "torch", "batch_decode": engine.batch_decode,
                     "scheduling": "iteration-level (continuous batching)",
                     "max_running_requests": engine.max_running_requests,
                     "max_total_num_tokens": engine.max_total_num_tokens,
                     "model_load_seconds": round(engine.load_seconds, 3),
                     "steps": engine.steps, "total_requests": loads.total_requests}
        start = timestamp_pb2.Timestamp()
        start.FromSeconds(int(self.start_time))
        return pb.GetServerInfoResponse(
            server_args=_to_struct(args), scheduler_info=_to_struct(scheduler),
            active_requests=engine.active_requests(), is_paused=False,
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
            gen_throughput=loads.gen_throughput, cache_hit_rate=0.0,
            utilization=loads.num_running / loads.max_running_requests,
            max_running_requests=loads.max_running_requests,
            num_waiting_uncached_tokens=loads.num_waiting_tokens)
        if everything or "memory" in include:
            load.memory.CopyFrom(pb.MemoryMetrics(
                weight_gb=engine.weight_bytes / 1e9,
                kv_cache_gb=loads.num_used_tokens * engine.kv_bytes_per_token / 1e9,
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

    # ---------------------------------------------------------------- admin

    async def FlushCache(self, request: common_pb2.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> common_pb2.FlushCacheResponse:
        return common_pb2.FlushCacheResponse(
            success=True, message="the torch engine keeps no prefix cache; nothing to flush")

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


async def serve(config: WorkerConfig) -> None:
    try:
        model_dir, name = await asyncio.to_thread(resolve_model, config)
    except ModelPathError as exc:
        raise SystemExit(f"worker: {exc}") from None
    servicer = WorkerServicer(config, model_dir, name)
    server = GrpcServer(config)
    server.add_service(pb_grpc.add_SglangSchedulerServicer_to_server, servicer, SERVICE_NAME)
    await server.start()
    engine = await asyncio.to_thread(
        TorchEngine, model_dir, device=config.device, dtype=config.dtype,
        max_running_requests=config.max_running_requests,
        context_length=config.context_length, num_threads=config.num_threads,
        batch_decode=config.batch_decode)
    engine.start()
    servicer.engine = engine
    healthy, message = await servicer.health_probe(max(config.health_check_timeout, 60.0))
    if not healthy:
        await server.stop(0)
        engine.stop()
        raise SystemExit(f"worker: warm-up generation failed: {message}")
    log.info("worker serving %s from %s (%s; model loaded in %.2f s)", name, model_dir,
             message, engine.load_seconds)
    await server.set_serving(True)
    await wait_for_shutdown()
    servicer.draining = True
    await server.stop()
    await asyncio.to_thread(engine.stop)
