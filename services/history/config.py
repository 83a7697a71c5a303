"""Configuration of the history service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from services.common.config import ServiceConfig, option

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
        if self.response_max_age < 0:
            raise ValueError(f"--response-max-age must be >= 0, got {self.response_max_age}")
