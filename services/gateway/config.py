"""Gateway configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from services.common.config import ServiceConfig, option

# Short aliases the issue promises next to the generated SGLMESH_GATEWAY_* names.
API_KEYS_ENV = "SGLMESH_API_KEYS"
BACKENDS = ("sglmesh", "openai")
EMBEDDED = "embedded"  # --router / --tokenizer: in this process instead of at an address


@dataclass
class GatewayConfig(ServiceConfig):
    """sglmesh gateway: OpenAI-compatible HTTP API in front of the sglmesh services."""

    service_name: ClassVar[str] = "gateway"

    port: int = option(8000, help="HTTP port.")
    router: str = option(
        "127.0.0.1:30100", help="Router address (host:port), or 'embedded': run the router "
                                "inside this process (its flags in --router-args).")
    router_args: str = option(
        "", help="With --router embedded: the router's own flags, e.g. '--worker-urls "
                 "grpc://10.0.0.5:30000 --policy cache_aware' (SGLMESH_ROUTER_* env vars apply "
                 "too).")
    tokenizer: str = option(
        "127.0.0.1:30200", help="Tokenizer service address (host:port), or 'embedded': tokenize "
                                "inside this process (its flags in --tokenizer-args).")
    tokenizer_args: str = option(
        "", help="With --tokenizer embedded: the tokenizer service's own flags "
                 "(SGLMESH_TOKENIZER_* env vars apply too).")
    history: str = option("", help="History service address (host:port); empty: no history.")
    api_keys: list[str] = option(
        [], help="Accepted API keys (Authorization: Bearer); each key is its own history tenant; "
                 "empty: no authentication, one tenant. Also --api-key KEY (repeatable) and env "
                 f"{API_KEYS_ENV} (comma-separated).")
    request_timeout_secs: float = option(
        1800.0, help="Upper bound on one generation's duration (a gRPC deadline; 504, or an SSE "
                     "error event once streaming; SMG's default).")
    max_payload_size: int = option(16 * 1024 * 1024,
                                   help="Largest accepted request body in bytes (413 above).")
    max_request_bytes: int = option(0, help="Deprecated alias of --max-payload-size.")
    graceful_shutdown_secs: float = option(
        30.0, help="On SIGTERM, how long in-flight requests (streams too) may run to completion.")
    models_cache_secs: float = option(2.0, help="How long the router's model list is reused.")
    history_timeout_secs: float = option(10.0, help="Deadline of one history call.")
    tool_call_parser: str = option(
        "", help="Tool-call parser the tokenizer applies when a request has tools "
                 "(e.g. json, hermes, llama3, qwen3_coder, glm45); empty: the tokenizer's "
                 "--tool-call-parser (by default picked from the model name, json when the "
                 "name is not known).")
    reasoning_parser: str = option(
        "", help="Reasoning parser (deepseek-r1, qwen3, gpt_oss, ...); empty: the "
                 "tokenizer's --reasoning-parser (by default gpt_oss for gpt-oss models, none "
                 "for others). Its output is reasoning_content unless the request sets "
                 "separate_reasoning=false.")
    retry_after_secs: int = option(1, help="Retry-After sent with 429 and 503 answers.")
    sse_keepalive_secs: float = option(
        15.0, help="A streamed answer that has sent nothing for this many seconds gets an SSE "
                   "comment line, so proxies with an idle timeout keep it open through a long "
                   "queue wait or prefill (0: never; SMG's flag and default).")
    backend: str = option(
        "sglmesh", help="sglmesh: serve models through the router (gRPC and HTTP workers). "
                        "openai: proxy chat, completions, embeddings and responses to one "
                        "external OpenAI-compatible provider (--worker-urls); conversations, "
                        "stored responses and previous_response_id chains stay in sglmesh's "
                        "history.", metadata={"choices": BACKENDS})
    worker_urls: list[str] = option(
        [], help="--backend openai: the provider's OpenAI base url, e.g. "
                 "https://api.example.com/v1 (exactly one).")
    provider_api_key: str = option(
        "", help="--backend openai: the provider's API key (sent as Authorization: Bearer); "
                 "prefer the env var SGLMESH_GATEWAY_PROVIDER_API_KEY.")
    provider_max_retries: int = option(
        2, help="--backend openai: retries of a provider request that failed before any byte "
                "was relayed (connection error, 408, 429, 5xx).")
    upstream_timeout_secs: float = option(
        600.0, help="Read timeout of relayed HTTP requests (HTTP workers, provider).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.router:
            raise ValueError("--router is required")
        if not self.tokenizer:
            raise ValueError("--tokenizer is required")
        if self.router_args and self.router != EMBEDDED:
            raise ValueError("--router-args is for --router embedded")
        if self.tokenizer_args and self.tokenizer != EMBEDDED:
            raise ValueError("--tokenizer-args is for --tokenizer embedded")
        if self.request_timeout_secs <= 0:
            raise ValueError("--request-timeout-secs must be positive")
        if not self.api_keys and os.environ.get(API_KEYS_ENV):
            self.api_keys = [k.strip() for k in os.environ[API_KEYS_ENV].split(",") if k.strip()]
        if any(not key for key in self.api_keys):
            raise ValueError("--api-keys must not contain empty keys")
        if self.max_request_bytes:
            self.max_payload_size = self.max_request_bytes
        if self.max_payload_size <= 0:
            raise ValueError("--max-payload-size must be positive")
        if self.history_timeout_secs <= 0:
            raise ValueError("--history-timeout-secs must be positive")
        if self.sse_keepalive_secs < 0:
            raise ValueError("--sse-keepalive-secs must be >= 0 (0: never)")
        if self.backend not in BACKENDS:
            raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}")
        if self.backend == "openai":
            if len(self.worker_urls) != 1 or not self.worker_urls[0].startswith(
                    ("http://", "https://")):
                raise ValueError("--backend openai needs exactly one --worker-urls "
                                 "http(s)://provider/v1")
            self.worker_urls = [self.worker_urls[0].rstrip("/")]
        elif self.worker_urls:
            raise ValueError("--worker-urls is for --backend openai; register workers with the "
                             "router (--worker-urls there, or POST /workers)")
        if self.provider_max_retries < 0:
            raise ValueError("--provider-max-retries must be >= 0")
        if self.upstream_timeout_secs <= 0:
            raise ValueError("--upstream-timeout-secs must be positive")


def expand_aliases(argv: list[str]) -> list[str]:
    """``--api-key K`` (repeatable) -> ``--api-keys K1 K2``; other flags unchanged."""
    keys: list[str] = []
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--api-key" and i + 1 < len(argv):
            keys.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--api-key="):
            keys.append(arg.split("=", 1)[1])
        else:
            out.append(arg)
        i += 1
    if keys:
        out += ["--api-keys", *keys]
    return out
