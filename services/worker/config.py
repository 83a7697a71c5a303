"""Worker configuration: ``python -m services.worker --help``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from services.common.config import ServiceConfig, option

ENGINES = ("torch", "sim", "sglang")
PD_MODES = ("", "prefill", "decode")
DTYPES = ("bfloat16", "float16", "float32")


def _default_cache() -> str:
    env = os.environ.get("SGLMESH_MODEL_CACHE")
    return env if env else str(Path.home() / ".cache" / "sglmesh" / "models")


@dataclass
class WorkerConfig(ServiceConfig):
    """sglmesh worker: one inference engine behind sglang.grpc.scheduler.SglangScheduler."""

    service_name: ClassVar[str] = "worker"

    engine: str = option(
        "torch", help="Inference engine: torch (transformers, CPU or GPU), sim (simulated, no "
                      "model: load and routing benchmarks) or sglang (real SGLang in --grpc-mode "
                      "as a supervised subprocess; SGLang flags go after `--`).")
    model_path: str = option(
        "", help="Model directory (config.json, safetensors, tokenizer.json); empty = the "
                 "embedded SmolLM2-135M-Instruct, converted on first start into --model-cache-dir.")
    model_cache_dir: str = option(
        _default_cache(), help="Where the embedded model is converted and cached "
                               "(SGLMESH_MODEL_CACHE is honoured).")
    served_model_name: str = option(
        "", help="Model name reported to clients (default: SmolLM2-135M-Instruct for the "
                 "embedded model, else the model directory's name).")
    device: str = option("cpu", help="Torch device: cpu or cuda[:N].")
    dtype: str = option("bfloat16", help="Weight dtype: bfloat16, float16 or float32.")
    max_running_requests: int = option(8, help="Requests decoded concurrently; more wait.")
    context_length: int = option(0, help="Context length (0 = the model's maximum).")
    num_threads: int = option(0, help="Torch CPU threads (0 = all cores).")
    batch_decode: bool = option(
        True, help="Decode all running requests in one batched forward pass (left padding); "
                   "--no-batch-decode runs one forward pass per request.")
    health_check_timeout: float = option(
        20.0, help="Seconds the deep HealthCheck waits for its 1-token generation.")
    stream_interval: int = option(
        1, help="torch and sim: tokens per streamed chunk (SGLang's --stream-interval; with "
                "--engine sglang pass it in --sglang-args). The first token goes out at once, "
                "then one message per N tokens: the router, tokenizer and gateway handle N "
                "times fewer messages per token.")
    # prefix cache and KV events (torch and sim)
    block_size: int = option(
        16, help="Tokens per prefix-cache block (the KV event granularity).")
    prefix_cache_tokens: int = option(
        16384, help="torch: prefix cache capacity in tokens (0 = off).")
    prefill_chunk: int = option(256, help="torch: prompt tokens prefilled per engine step.")
    kv_events_config: str = option(
        "", help="KV events as SGLang's --kv-events-config JSON; empty = {\"publisher\": "
                 "\"grpc\"} (served on SubscribeKvEvents).")
    kv_events_buffer: int = option(
        10000, help="KV event batches kept so a subscriber can resume (start_sequence_number).")
    drain_timeout: float = option(
        30.0, help="Seconds in-flight requests get to finish on SIGTERM.")
    # PD roles (sim; SGLang takes its own --disaggregation-* flags after `--`)
    disaggregation_mode: str = option(
        "", help="PD role of a sim worker: prefill or decode (empty = regular).")
    bootstrap_port: int = option(
        8998, help="Prefill role: loopback/host port of the PD bootstrap server (0 picks one).")
    # --engine sim
    sim_vocab_size: int = option(49152, help="sim: vocabulary size reported and sampled from.")
    sim_eos_token_id: int = option(2, help="sim: the EOS id ending requests without max_new_tokens.")
    sim_block_size: int = option(
        0, help="sim: tokens per cache block; 0 = --block-size (kept for older callers).")
    sim_max_total_tokens: int = option(
        65536, help="sim: KV capacity in tokens (running requests + radix prefix cache).")
    sim_decode_ms: float = option(20.0, help="sim: decode step time with one running request.")
    sim_decode_ms_per_running: float = option(
        0.5, help="sim: decode step time added per extra running request.")
    sim_prefill_ms_per_token: float = option(
        0.05, help="sim: prefill time per uncached prompt token.")
    sim_output_tokens: int = option(
        128, help="sim: output length (then EOS) when a request sets no max_new_tokens.")
    sim_error_rate: float = option(0.0, help="sim: fraction of requests that fail (injected).")
    sim_hang_rate: float = option(
        0.0, help="sim: fraction of requests that never produce a token until aborted.")
    sim_slow_start: float = option(
        0.0, help="sim: seconds before the worker becomes ready (health NOT_SERVING meanwhile).")
    sim_seed: int = option(0, help="sim: seed of the failure-injection draws.")
    sim_bootstrap_timeout: float = option(
        30.0, help="sim decode role: seconds to wait for the prefill peer's bootstrap room.")
    # --engine sglang
    sglang_args: str = option(
        "", help="sglang: SGLang flags as one shell-quoted string (same as everything after "
                 "`--` on the command line; both are joined).")
    sglang_ready_timeout: float = option(
        1800.0, help="sglang: seconds to wait for SGLang's gRPC health to be SERVING.")
    sglang_launcher: str = option(
        "", help="sglang: command that starts SGLang (default: `python -m "
                 "sglang.launch_server`); tests point it at a stand-in.")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.engine = self.engine.lower()
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        if self.stream_interval < 1:
            raise ValueError("--stream-interval must be >= 1")
        if self.max_running_requests < 1:
            raise ValueError(
                f"--max-running-requests must be >= 1, got {self.max_running_requests}")
        if self.context_length < 0:
            raise ValueError(f"--context-length must be >= 0, got {self.context_length}")
        if self.num_threads < 0:
            raise ValueError(f"--num-threads must be >= 0, got {self.num_threads}")
        if self.health_check_timeout <= 0:
            raise ValueError(
                f"--health-check-timeout must be > 0, got {self.health_check_timeout}")
        if not self.model_cache_dir:
            raise ValueError("--model-cache-dir must not be empty")
        if self.disaggregation_mode == "null":
            self.disaggregation_mode = ""
        if self.disaggregation_mode not in PD_MODES:
            raise ValueError("--disaggregation-mode must be prefill or decode (or empty), got "
                             f"{self.disaggregation_mode!r}")
        if self.disaggregation_mode and self.engine != "sim":
            raise ValueError(
                f"--disaggregation-mode is a sim option; --engine {self.engine} "
                + ("takes SGLang's own --disaggregation-mode after `--`" if self.engine == "sglang"
                   else "has no PD roles"))
        if not 0 <= self.bootstrap_port <= 65535:
            raise ValueError(f"--bootstrap-port must be 0-65535, got {self.bootstrap_port}")
        for name in ("sim_vocab_size", "sim_max_total_tokens", "sim_output_tokens", "block_size",
                     "kv_events_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if not 0 <= self.sim_eos_token_id < self.sim_vocab_size:
            raise ValueError("--sim-eos-token-id must be a token id below --sim-vocab-size")
        for name in ("sim_error_rate", "sim_hang_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got "
                                 f"{getattr(self, name)}")
        for name in ("sim_decode_ms", "sim_decode_ms_per_running", "sim_prefill_ms_per_token",
                     "sim_slow_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got "
                                 f"{getattr(self, name)}")
        if self.sim_block_size < 0:
            raise ValueError(f"--sim-block-size must be >= 0, got {self.sim_block_size}")
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"--prefix-cache-tokens must be >= 0, got {self.prefix_cache_tokens}")
        if self.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be >= 1, got {self.prefill_chunk}")
        if self.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if self.sim_bootstrap_timeout <= 0:
            raise ValueError("--sim-bootstrap-timeout must be > 0")
        if self.sglang_ready_timeout <= 0:
            raise ValueError("--sglang-ready-timeout must be > 0")
