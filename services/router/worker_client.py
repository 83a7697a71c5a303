"""The router's gRPC client of one worker (the SglangScheduler contract).

The only router module that sees grpc errors: failed calls surface as
:class:`~services.router.resilience.UpstreamError` carrying the status code's name.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence

import grpc
from google.protobuf import json_format
from opentelemetry import context as otel_context
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import create_channel, strip_scheme
from services.common.telemetry import with_trace_metadata
from services.router import relay
from services.router.generate_h2 import GenerateChannel
from services.router.resilience import UpstreamError
from services.router.workers import EngineLoad, ModelCard


def _upstream(exc: grpc.aio.AioRpcError) -> UpstreamError:
    return UpstreamError(exc.code().name, exc.details() or "", exc)


class WorkerClient:
    """Channel + stub for one worker url; also used to forward calls verbatim.

    ``transport`` is how ``Generate`` goes: ``grpclib`` (HTTP/2 on the event loop:
    :mod:`services.router.generate_h2`) or ``grpcio`` (the grpc.aio channel every other call
    uses)."""

    def __init__(self, url: str, transport: str = "grpclib") -> None:
        self.url = url
        self.target = strip_scheme(url)
        self.channel = create_channel(self.target)
        self.stub = pb_grpc.SglangSchedulerStub(self.channel)
        self._generate_raw = relay.raw_generate(self.channel)
        self._generate_h2 = GenerateChannel(self.target) if transport == "grpclib" else None

    async def model_card(self, timeout: float) -> ModelCard:
        """Reads GetModelInfo, waiting for the worker to come up for at most ``timeout`` s."""
        # A worker that is up but still loading answers UNAVAILABLE: keep asking until the
        # deadline (model conversion on a first start can take a while).
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await self.stub.GetModelInfo(
                    pb.GetModelInfoRequest(), timeout=max(0.1, deadline - time.monotonic()),
                    wait_for_ready=True)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.5)
        return ModelCard(
            model_id=info.served_model_name or info.model_path,
            max_context_length=info.max_context_length,
            is_generation=info.is_generation,
            eos_token_ids=tuple(info.eos_token_ids),
            vocab_size=info.vocab_size,
            architectures=tuple(info.architectures),
            num_labels=info.num_labels,
        )

    async def server_info(self, timeout: float) -> dict[str, object]:
        """GetServerInfo's ``server_args`` (dp size, bootstrap port, kv events ...); {} if absent."""
        try:
            info = await self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return {}
        return json_format.MessageToDict(info.server_args) if info.HasField("server_args") else {}

    async def health_check(self, timeout: float) -> tuple[bool, str]:
        """The worker's deep HealthCheck; a failed call is an unhealthy result, not an error."""
        try:
            reply = await self.stub.HealthCheck(pb.HealthCheckRequest(), timeout=timeout)
            return reply.healthy, reply.message
        except grpc.aio.AioRpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"

    async def get_loads(self, timeout: float) -> EngineLoad:
        try:
            reply = await self.stub.GetLoads(pb.GetLoadsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _upstream(exc) from exc
        load = EngineLoad(source="poll", update_time=time.monotonic())
        for rank in reply.loads:
            load.running_requests += rank.num_running_reqs
            load.waiting_requests += rank.num_waiting_reqs
            load.gen_throughput += rank.gen_throughput
            load.waiting_uncached_tokens += rank.num_waiting_uncached_tokens
            load.token_usage = max(load.token_usage, rank.token_usage)
        return load

    async def generate(self, request: pb.GenerateRequest, metadata: Sequence[tuple[str, str]],
                       trace_context: otel_context.Context | None = None
                       ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """Streams Generate; a failed call raises UpstreamError; closing the iterator cancels.

        ``trace_context`` (the router's attempt span) is current while the call starts, so
        the worker's spans are its children."""
        token = otel_context.attach(trace_context) if trace_context is not None else None
        try:
            # Relaying for the router's own Generate handler: the worker's bytes, unparsed.
            raw = relay.raw_responses()
            if self._generate_h2 is not None:
                call = self._generate_h2.generate(request, with_trace_metadata(metadata), raw)
            else:
                generate = self._generate_raw if raw else self.stub.Generate
                call = generate(request, metadata=tuple(metadata))
        finally:
            if token is not None:
                otel_context.detach(token)
        done = False
        try:
            async for response in call:
                yield response
            done = True
        except grpc.aio.AioRpcError as exc:
            done = True
            raise _upstream(exc) from exc
        finally:
            if not done:
                if isinstance(call, grpc.aio.Call):
                    call.cancel()
                else:
                    await call.aclose()

    async def kv_events(self, start_sequence_number: int
                        ) -> AsyncGenerator[common_pb2.KvEventBatch, None]:
        """SubscribeKvEvents; a failed stream raises UpstreamError; closing cancels it."""
        call = self.stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(
            start_sequence_number=start_sequence_number, load_records_before_first_batch=True))
        done = False
        try:
            async for batch in call:
                yield batch
            done = True
        except grpc.aio.AioRpcError as exc:
            done = True
            raise _upstream(exc) from exc
        finally:
            if not done:
                call.cancel()

    async def abort(self, request_id: str, reason: str, timeout: float) -> bool:
        try:
            reply = await self.stub.Abort(
                pb.AbortRequest(request_id=request_id, reason=reason), timeout=timeout
            )
            return reply.success
        except grpc.aio.AioRpcError:
            return False

    async def close(self) -> None:
        if self._generate_h2 is not None:
            self._generate_h2.close()
        await self.channel.close()
