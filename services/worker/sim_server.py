"""``--engine sim``: the SglangScheduler contract over :class:`services.worker.sim.SimEngine`.

:class:`SimServicer` is the worker's own :class:`~services.worker.server.WorkerServicer` with
what only the sim adds:

* PD roles: with ``--disaggregation-mode prefill`` the worker runs a bootstrap server on
  ``--bootstrap-port`` and marks each request's ``bootstrap_room`` done when its prefill
  finishes; with ``--disaggregation-mode decode`` a request that carries
  ``disaggregated_params`` first waits for its prefill peer to finish that room (see
  :mod:`services.worker.sim_pd`), then decodes with the whole prompt counted as transferred
  (``cached_tokens`` = prompt - 1). The fake bootstrap host ``2.2.2.2`` (SGLang warm-up)
  never waits.
* GetModelInfo / GetTokenizer without a model: model info from the ``--sim-*`` flags and
  GetTokenizer UNIMPLEMENTED; with ``--model-path DIR`` (a real tokenizer directory) both are
  served from that directory.
* ``kv_events`` descriptor (``publisher: grpc``) and the PD fields in GetServerInfo.

:func:`build_sim_worker` makes one independent worker (engine + gRPC server); the fleet
(:mod:`services.worker.sim_fleet`) builds many of them in one process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.errors import ErrorCode, ServiceError
from services.common.grpc_server import GrpcServer
from services.common.net import dial_host
from services.worker import server as base
from services.worker.config import WorkerConfig
from services.worker.kv_events import (
    kv_events_descriptor,
)
from services.worker.sim import SimEngine, SimParams
from services.worker.sim_pd import FAKE_BOOTSTRAP_HOST, BootstrapError, BootstrapServer, wait_for_room

log = logging.getLogger(__name__)

SERVICE_NAME = "sglang.grpc.scheduler.SglangScheduler"


def sim_params(config: WorkerConfig, model_dir: Path | None = None) -> SimParams:
    """The engine's knobs from the flags; with a model directory its config.json supplies the
    vocabulary size, EOS / BOS ids and context length (so a real tokenizer matches)."""
    params = SimParams(
        vocab_size=config.sim_vocab_size, context_length=config.context_length or 8192,
        max_running_requests=config.max_running_requests,
        max_total_num_tokens=config.sim_max_total_tokens,
        block_size=config.sim_block_size or config.block_size,
        event_log_batches=config.kv_events_buffer,
        decode_ms=config.sim_decode_ms, decode_ms_per_running=config.sim_decode_ms_per_running,
        prefill_ms_per_token=config.sim_prefill_ms_per_token,
        output_tokens=config.sim_output_tokens, error_rate=config.sim_error_rate,
        hang_rate=config.sim_hang_rate, slow_start=config.sim_slow_start, seed=config.sim_seed,
        eos_token_id=config.sim_eos_token_id)
    if model_dir is not None:
        from services.worker.sglang_engine import model_facts

        facts = model_facts(str(model_dir), context_length=config.context_length)
        if facts.vocab_size:
            params.vocab_size = facts.vocab_size
        if facts.eos_token_ids:
            params.eos_token_id = facts.eos_token_ids[0]
        if facts.bos_token_id is not None:
            params.bos_token_id = facts.bos_token_id
        if facts.context_length:
            params.context_length = facts.context_length
    return params


class SimServicer(base.WorkerServicer):
    """The worker servicer over a :class:`SimEngine`, plus PD roles and tokenizer-less info."""

    def __init__(self, config: WorkerConfig, model_dir: Path | None, served_model_name: str,
                 bootstrap: BootstrapServer | None = None) -> None:
        super().__init__(config, model_dir or Path("/nonexistent-sim-model"), served_model_name)
        self.has_model_dir = model_dir is not None
        self.bootstrap = bootstrap
        self.rooms: dict[str, int] = {}  # request id -> bootstrap room (prefill role)
        self.port = 0

    def on_prefill_done(self, request_id: str) -> None:
        room = self.rooms.pop(request_id, None)
        if room is not None and self.bootstrap is not None:
            self.bootstrap.mark_done(room)

    def _sim(self) -> SimEngine:
        engine = self._engine()
        assert isinstance(engine, SimEngine)
        return engine

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        engine = self._sim()
        params = request.disaggregated_params if request.HasField("disaggregated_params") \
            else None
        if params is not None or not request.request_id:
            copy = pb.GenerateRequest()
            copy.CopyFrom(request)
            copy.ClearField("disaggregated_params")
            if not copy.request_id:
                copy.request_id = f"sim-{id(copy):x}-{engine.total_requests}"
            request = copy
        rid = request.request_id
        mode = self.config.disaggregation_mode
        peer = params is not None and params.bootstrap_host not in ("", FAKE_BOOTSTRAP_HOST)
        if params is not None and peer:
            if mode == "decode":
                port = params.bootstrap_port or 8998
                try:
                    await wait_for_room(params.bootstrap_host, port, params.bootstrap_room,
                                        self.config.sim_bootstrap_timeout)
                except BootstrapError as exc:
                    raise ServiceError(ErrorCode.UNAVAILABLE, "PD_BOOTSTRAP_FAILED", str(exc),
                                       {"bootstrap_room": str(params.bootstrap_room)}) from exc
                engine.transferred.add(rid)  # the prompt's KV "arrived" from the prefill peer
            elif mode == "prefill":
                self.rooms[rid] = params.bootstrap_room
                request.sampling_params.max_new_tokens = 1  # the prefill leg makes one token
        try:
            async for reply in super().Generate(request, context):
                yield reply
        finally:
            self.rooms.pop(rid, None)
            engine.transferred.discard(rid)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        info = await super().GetModelInfo(request, context)
        if not self.has_model_dir:
            info.model_path = info.tokenizer_path = ""
            info.model_type = "sim"
            info.pad_token_id = 0
            info.bos_token_id = self._engine().bos_token_id or 0
        return info

    async def GetTokenizer(self, request: common_pb2.GetTokenizerRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        if not self.has_model_dir:
            raise ServiceError(ErrorCode.UNIMPLEMENTED, "NO_TOKENIZER",
                               "this sim worker has no tokenizer; start it with --model-path "
                               "DIR (a directory with tokenizer.json) to serve one")
        async for chunk in super().GetTokenizer(request, context):
            yield chunk

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        info = await super().GetServerInfo(request, context)
        engine = self._sim()
        args = info.server_args
        if "kv_events" not in args.fields or args.fields["kv_events"].WhichOneof("kind") \
                == "null_value":
            descriptor = kv_events_descriptor(
                {"publisher": "grpc"}, block_size=engine.params.block_size,
                default_host=self.config.host, default_port=self.port or self.config.port)
            args.update({"kv_events": descriptor})
        args.update({"disaggregation_mode": self.config.disaggregation_mode or "null",
                     "disaggregation_bootstrap_port": self.config.bootstrap_port,
                     "page_size": engine.params.block_size})
        info.scheduler_info.update(json.loads(json.dumps(engine.info())))
        return info

    async def GetLoads(self, request: pb.GetLoadsRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetLoadsResponse:
        reply = await super().GetLoads(request, context)
        loads = self._engine().loads()
        for load in reply.loads:  # older shared servicers report no cache hit rate
            load.cache_hit_rate = loads.cache_hit_rate
            load.num_waiting_uncached_tokens = loads.num_waiting_tokens
        return reply

    async def FlushCache(self, request: common_pb2.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> common_pb2.FlushCacheResponse:
        ok, message = self._engine().flush_cache()
        return common_pb2.FlushCacheResponse(success=ok, message=message)


# -------------------------------------------------------------------- building and serving


@dataclasses.dataclass
class SimWorker:
    """One sim worker: engine, servicer, gRPC server and (prefill role) bootstrap server."""

    config: WorkerConfig
    engine: SimEngine
    servicer: SimServicer
    server: GrpcServer
    bootstrap: BootstrapServer | None = None

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self, wait_ready: bool = True) -> None:
        if self.bootstrap is not None:
            await self.bootstrap.start()
        await self.server.start()
        self.servicer.port = self.server.port
        self.engine.start()
        if wait_ready:
            await self.ready()

    async def ready(self) -> None:
        await self.engine.wait_ready()
        self.servicer.engine = self.engine  # type: ignore[assignment]
        await self.server.set_serving(True)

    async def stop(self, grace: float = 1.0) -> None:
        self.servicer.draining = True
        await self.server.stop(grace)
        self.engine.stop()
        if self.bootstrap is not None:
            await self.bootstrap.stop()


def build_sim_worker(config: WorkerConfig, model_dir: Path | None = None,
                     served_model_name: str = "") -> SimWorker:
    engine = SimEngine(sim_params(config, model_dir))
    bootstrap = None
    if config.disaggregation_mode == "prefill":
        bootstrap = BootstrapServer(config.host, config.bootstrap_port)
    name = served_model_name or config.served_model_name or (
        model_dir.name if model_dir is not None else "sim-model")
    servicer = SimServicer(config, model_dir, name, bootstrap)
    servicer.port = config.port
    engine.on_prefill_done = servicer.on_prefill_done
    server = GrpcServer(config)
    server.add_service(pb_grpc.add_SglangSchedulerServicer_to_server, servicer, SERVICE_NAME)
    return SimWorker(config, engine, servicer, server, bootstrap)


async def serve(config: WorkerConfig, model_dir: Path | None = None) -> None:
    """``python -m services.worker --engine sim``."""
    from services.common.grpc_server import wait_for_shutdown

    worker = build_sim_worker(config, model_dir)
    await worker.start(wait_ready=False)
    ready = asyncio.create_task(worker.ready())
    log.info("sim worker on %s:%d (bootstrap port %s, role %s)", dial_host(config.host),
             worker.port, worker.bootstrap.port if worker.bootstrap else "-",
             config.disaggregation_mode or "regular")
    await wait_for_shutdown()
    ready.cancel()
    await worker.stop()
