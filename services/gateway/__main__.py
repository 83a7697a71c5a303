"""``python -m services.gateway --port 8000 --router H:P --tokenizer H:P [--history H:P]``."""

from __future__ import annotations

import sys

import uvicorn

from services.common.config import parse_config
from services.common.logs import setup_logging
from services.common.telemetry import setup_tracing, shutdown_tracing
from services.gateway.config import GatewayConfig, expand_aliases
from services.gateway.embedded import check_flags
from services.gateway.server import create_app


def main(argv: list[str] | None = None) -> None:
    config = parse_config(GatewayConfig, expand_aliases(sys.argv[1:] if argv is None else argv))
    check_flags(config.router, config.router_args, config.tokenizer, config.tokenizer_args)
    setup_logging(config.service_name, config.log_level, config.log_json, config.error_log)
    setup_tracing(config.service_name, config.trace_file, config.otlp_endpoint,
                  config.trace_console)
    try:
        uvicorn.run(
            create_app(config), host=config.host, port=config.port, loop="uvloop",
            log_level="warning" if config.log_level == "info" else config.log_level,
            access_log=config.log_level == "debug",
            timeout_graceful_shutdown=round(config.graceful_shutdown_secs),
        )
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
