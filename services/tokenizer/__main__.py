"""``python -m services.tokenizer``: the tokenizer/parser service."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc

from services.common.errors import ServiceError
from services.common.grpc_server import GrpcServer, wait_for_shutdown
from services.common.service import main_for
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import TokenizerCore
from services.tokenizer.metrics import register_cache_collector
from services.tokenizer.server import SERVICE_NAME, TokenizerService

log = logging.getLogger("services.tokenizer")


async def serve(config: TokenizerConfig) -> None:
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="tokenizer")
    core = TokenizerCore(config.cache_dir, tool_call_parser=config.tool_call_parser,
                         reasoning_parser=config.reasoning_parser,
                         cache_max_bytes=config.cache_max_bytes,
                         cache_max_entries=config.cache_max_entries,
                         prefix_cache_max_bytes=config.prefix_cache_max_bytes)
    register_cache_collector(core.registry)
    service = TokenizerService(core, executor, worker_timeout=config.worker_timeout,
                               inline_max_bytes=config.inline_max_bytes)
    server = GrpcServer(config)
    server.add_service(tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, service,
                       SERVICE_NAME)
    await server.start()
    try:
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
                raise SystemExit(1) from exc
            log.info("loaded tokenizer %s from %s (vocab %d, fingerprint %s)", model, tok.source,
                     tok.vocab_size, tok.fingerprint[:12])
        await server.set_serving(True)
        await wait_for_shutdown()
    finally:
        await server.stop()
        executor.shutdown(wait=False, cancel_futures=True)


def main() -> None:
    main_for(TokenizerConfig, serve)


if __name__ == "__main__":
    main()
