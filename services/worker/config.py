"""Worker configuration: ``python -m services.worker --help``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from services.common.config import ServiceConfig, option

ENGINES = ("torch",)
LATER_ENGINES = ("sim", "sglang")
DTYPES = ("bfloat16", "float16", "float32")


def _default_cache() -> str:
    env = os.environ.get("SGLMESH_MODEL_CACHE")
    return env if env else str(Path.home() / ".cache" / "sglmesh" / "models")


@dataclass
class WorkerConfig(ServiceConfig):
    """sglmesh worker: one inference engine behind sglang.grpc.scheduler.SglangScheduler."""

    service_name: ClassVar[str] = "worker"

    engine: str = option("torch", help="Inference engine: torch (transformers, CPU or GPU).")
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

    def __post_init__(self) -> None:
        super().__post_init__()
        self.engine = self.engine.lower()
        if self.engine in LATER_ENGINES:
            raise ValueError(f"--engine {self.engine} is not available yet; use --engine torch")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"--device must be cpu or cuda[:N], got {self.device!r}")
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
