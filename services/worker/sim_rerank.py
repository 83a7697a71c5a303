"""A SIMULATED cross-encoder (reranker) worker: no model, deterministic lexical scores.

    python -m services.worker.sim_rerank --port 30010 --served-model-name sim-reranker

It serves the worker contract (``sglang.grpc.scheduler.SglangScheduler``) the way a real
SGLang cross-encoder in ``--grpc-mode`` is reached: ``GetModelInfo`` says not generative, one
label, a ``*ForSequenceClassification`` architecture; ``Embed`` with ``is_cross_encoder`` and
``texts = [query, document]`` answers a one-element ``embedding``: the pair's relevance score.
The score is a simulation (word-overlap cosine, in [0, 1]), there only so ``/v1/rerank`` can be
tested end to end on a CPU box without a reranker model; it is no model of relevance.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import grpc
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.config import ServiceConfig, option
from services.common.errors import ErrorCode, ServiceError
from services.common.grpc_server import GrpcServer, wait_for_shutdown
from services.common.service import main_for

SERVICE_NAME = "sglang.grpc.scheduler.SglangScheduler"
ARCHITECTURE = "SimCrossEncoderForSequenceClassification"
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def sim_score(query: str, document: str) -> float:
    """Deterministic stand-in relevance: cosine of the two texts' word sets, in [0, 1]."""
    q, d = set(words(query)), set(words(document))
    if not q or not d:
        return 0.0
    return len(q & d) / math.sqrt(len(q) * len(d))


@dataclass
class SimRerankConfig(ServiceConfig):
    """sglmesh SIMULATED reranker worker (tests and demos; scores are word overlap)."""

    service_name: ClassVar[str] = "sim-rerank"

    served_model_name: str = option("sim-reranker", help="Model id the worker reports.")
    context_length: int = option(512, help="Context length reported.")


class SimRerankServicer(pb_grpc.SglangSchedulerServicer):
    def __init__(self, config: SimRerankConfig) -> None:
        self.config = config

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model_path="sim://rerank", served_model_name=self.config.served_model_name,
            is_generation=False, max_context_length=self.config.context_length,
            max_req_input_len=self.config.context_length, model_type="sim",
            architectures=[ARCHITECTURE], num_labels=1, id2label_json='{"0": "LABEL_0"}')

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(server_type="grpc", sglang_version="sim-rerank")

    async def HealthCheck(self, request: pb.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(healthy=True, message="sim reranker")

    async def GetLoads(self, request: pb.GetLoadsRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetLoadsResponse:
        return pb.GetLoadsResponse()

    async def Embed(self, request: pb.EmbedRequest,
                    context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        if not request.is_cross_encoder or len(request.texts) != 2:
            raise ServiceError(ErrorCode.INVALID_ARGUMENT, "CROSS_ENCODER_ONLY",
                               "this sim reranker scores pairs only: is_cross_encoder with "
                               "texts = [query, document]", {"field": "texts"})
        query, document = request.texts
        return pb.EmbedResponse(embedding=[sim_score(query, document)], embedding_dim=1,
                                prompt_tokens=len(words(query)) + len(words(document)))


async def serve(config: SimRerankConfig) -> None:
    server = GrpcServer(config)
    server.add_service(pb_grpc.add_SglangSchedulerServicer_to_server,
                       SimRerankServicer(config), SERVICE_NAME)
    await server.start()
    await server.set_serving(True)
    try:
        await wait_for_shutdown()
    finally:
        await server.stop(0)


def main() -> None:
    main_for(SimRerankConfig, serve)


if __name__ == "__main__":
    main()
