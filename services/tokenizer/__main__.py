"""``python -m services.tokenizer``: the tokenizer/parser service."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc

from services.common.errors import ServiceError
from services.common.grpc_server import GrpcServer, wait_for_shutdown
from services.common.service import main_for
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.server import SERVICE_NAME, build_service, load_configured


async def serve(config: TokenizerConfig) -> None:
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="tokenizer")
    service = build_service(config, executor)
    server = GrpcServer(config)
    server.add_service(tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, service,
                       SERVICE_NAME)
    await server.start()
    try:
        try:
            await load_configured(service, config)
        except ServiceError as exc:
            raise SystemExit(1) from exc
        await server.set_serving(True)
        await wait_for_shutdown()
    finally:
        await server.stop()
        executor.shutdown(wait=False, cancel_futures=True)


def main() -> None:
    main_for(TokenizerConfig, serve)


if __name__ == "__main__":
    main()
