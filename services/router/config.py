"""Router configuration. Flag names follow SMG where the meaning is the same."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from services.common.config import ServiceConfig, option
from services.router.policies import POLICY_NAMES


@dataclass
class RouterConfig(ServiceConfig):
    """sglmesh router: routes SglangScheduler calls to workers; admin API on the same port."""

    service_name: ClassVar[str] = "router"

    worker_urls: list[str] = option([], help="Workers to register at start-up (grpc://host:port).")
    policy: str = option("round_robin", help="Load-balancing policy.",
                         metadata={"choices": POLICY_NAMES})
    health_check_interval_secs: float = option(10.0, help="Seconds between health checks.")
    health_check_timeout_secs: float = option(
        10.0, help="Seconds a deep HealthCheck may take before it counts as a failure.")
    health_success_threshold: int = option(
        1, help="Consecutive successes that make a pending/not-ready worker ready.")
    health_failure_threshold: int = option(
        3, help="Consecutive failures that make a ready worker not ready.")
    worker_startup_timeout_secs: float = option(
        300.0, help="How long registration waits for a worker to answer GetModelInfo.")
    abort_timeout_secs: float = option(5.0, help="Timeout of the Abort sent on cancellation.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.health_check_interval_secs <= 0:
            raise ValueError("--health-check-interval-secs must be positive")
        if self.health_success_threshold < 1 or self.health_failure_threshold < 1:
            raise ValueError("--health-success-threshold/--health-failure-threshold must be >= 1")
