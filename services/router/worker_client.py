"""The router's gRPC client of one worker (the SglangScheduler contract)."""

from __future__ import annotations

import grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import create_channel, strip_scheme
from services.router.workers import ModelCard


class WorkerClient:
    """Channel + stub for one worker url; also used to forward calls verbatim."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.target = strip_scheme(url)
        self.channel = create_channel(self.target)
        self.stub = pb_grpc.SglangSchedulerStub(self.channel)

    async def model_card(self, timeout: float) -> ModelCard:
        """Reads GetModelInfo, waiting for the worker to come up for at most ``timeout`` s."""
        info = await self.stub.GetModelInfo(
            pb.GetModelInfoRequest(), timeout=timeout, wait_for_ready=True
        )
        return ModelCard(
            model_id=info.served_model_name or info.model_path,
            max_context_length=info.max_context_length,
            is_generation=info.is_generation,
            eos_token_ids=tuple(info.eos_token_ids),
            vocab_size=info.vocab_size,
        )

    async def health_check(self, timeout: float) -> tuple[bool, str]:
        """The worker's deep HealthCheck; a failed call is an unhealthy result, not an error."""
        try:
            reply = await self.stub.HealthCheck(pb.HealthCheckRequest(), timeout=timeout)
            return reply.healthy, reply.message
        except grpc.aio.AioRpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"

    async def abort(self, request_id: str, reason: str, timeout: float) -> bool:
        try:
            reply = await self.stub.Abort(
                pb.AbortRequest(request_id=request_id, reason=reason), timeout=timeout
            )
            return reply.success
        except grpc.aio.AioRpcError:
            return False

    async def close(self) -> None:
        await self.channel.close()
