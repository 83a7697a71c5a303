"""Configuration of the history service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from services.common.config import ServiceConfig, option
from services.history.domain import DEFAULT_MAX_ITEM_BYTES

DEFAULT_DB = "sqlite+aiosqlite:///sglmesh-history.db"


@dataclass
class HistoryConfig(ServiceConfig):
    """History service: conversations, items and stored responses (SQLite or PostgreSQL)."""

    service_name: ClassVar[str] = "history"

    history_db: str = option(
        DEFAULT_DB,
        help="SQLAlchemy async database URL: sqlite+aiosqlite:///FILE (relative to the working "
        "directory) or postgresql+asyncpg://USER:PASS@HOST:PORT/DB.",
    )
    pool_size: int = option(5, help="Database connection pool size (PostgreSQL).")
    op_timeout: float = option(
        5.0, help="Seconds one database operation may take before failing as UNAVAILABLE."
    )
    max_item_bytes: int = option(
        DEFAULT_MAX_ITEM_BYTES,
        help="Largest item accepted, in bytes of its JSON; bigger ones are INVALID_ARGUMENT.",
    )
    probe_interval: float = option(
        2.0, help="Seconds between database health probes (grpc.health follows them)."
    )
    response_max_age: float = option(
        0.0, help="Delete stored responses older than this many seconds (0 keeps them forever)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.history_db:
            raise ValueError("--history-db must not be empty")
        if self.pool_size < 1:
            raise ValueError(f"--pool-size must be >= 1, got {self.pool_size}")
        if self.op_timeout <= 0:
            raise ValueError(f"--op-timeout must be > 0, got {self.op_timeout}")
        if self.max_item_bytes < 1:
            raise ValueError(f"--max-item-bytes must be >= 1, got {self.max_item_bytes}")
        if self.probe_interval <= 0:
            raise ValueError(f"--probe-interval must be > 0, got {self.probe_interval}")
        if self.response_max_age < 0:
            raise ValueError(f"--response-max-age must be >= 0, got {self.response_max_age}")
