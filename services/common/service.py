"""Process entry helper: parse config, set up logging and tracing, run the async main."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from services.common.config import ServiceConfig, parse_config
from services.common.grpc_server import run
from services.common.logs import setup_logging
from services.common.telemetry import setup_tracing, shutdown_tracing

C = TypeVar("C", bound=ServiceConfig)


def main_for(config_cls: type[C], serve: Callable[[C], Coroutine[Any, Any, None]],
             argv: list[str] | None = None) -> None:
    """``python -m services.<name>``: flags -> config -> logging/tracing -> ``serve(config)``."""
    config = parse_config(config_cls, argv)
    setup_logging(config.service_name, config.log_level, config.log_json, config.error_log)
    setup_tracing(config.service_name, config.trace_file, config.otlp_endpoint,
                  config.trace_console)
    try:
        run(lambda: serve(config))
    except KeyboardInterrupt:
        pass
    finally:
        shutdown_tracing()
