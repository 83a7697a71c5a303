"""Gateway configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from services.common.config import ServiceConfig, option


@dataclass
class GatewayConfig(ServiceConfig):
    """sglmesh gateway: OpenAI-compatible HTTP API in front of the sglmesh services."""

    service_name: ClassVar[str] = "gateway"

    port: int = option(8000, help="HTTP port.")
    router: str = option("127.0.0.1:30100", help="Router address (host:port).")
    tokenizer: str = option("127.0.0.1:30200", help="Tokenizer service address (host:port).")
    history: str = option("", help="History service address (host:port); empty: no history.")
    api_keys: list[str] = option(
        [], help="Accepted API keys (Authorization: Bearer); empty: no authentication.")
    request_timeout_secs: float = option(600.0, help="Upper bound on one request's duration.")
    max_request_bytes: int = option(16 * 1024 * 1024, help="Largest accepted request body.")
    models_cache_secs: float = option(2.0, help="How long the router's model list is reused.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.router:
            raise ValueError("--router is required")
        if not self.tokenizer:
            raise ValueError("--tokenizer is required")
        if self.request_timeout_secs <= 0:
            raise ValueError("--request-timeout-secs must be positive")
