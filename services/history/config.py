"""Configuration of the history service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from services.common.config import ServiceConfig, option
from services.history.backends import BACKENDS, SQL
from services.history.domain import DEFAULT_MAX_ITEM_BYTES

DEFAULT_DB = "sqlite+aiosqlite:///sglmesh-history.db"


@dataclass
class HistoryConfig(ServiceConfig):
    """History service: conversations, items and stored responses (SQL, memory or none)."""

    service_name: ClassVar[str] = "history"

    history_backend: str = option(
        SQL,
        help="Where history lives: sql (SQLite or PostgreSQL, durable), memory (this process, "
        "bounded by the --memory-max-* flags, lost on restart) or none (every RPC answers, "
        "nothing is stored; reads are NOT_FOUND). See docs/history.md.",
        metadata={"choices": BACKENDS},
    )

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
    memory_max_conversations: int = option(
        10_000, help="memory backend: most conversations kept (all tenants); the least "
        "recently written go first."
    )
    memory_max_responses: int = option(
        10_000, help="memory backend: most stored responses kept (all tenants); the least "
        "recently written go first."
    )
    memory_max_items: int = option(
        100_000, help="memory backend: most items kept (all tenants); the least recently "
        "written conversations and responses go first."
    )
    memory_max_age: float = option(
        86_400.0, help="memory backend: drop conversations and responses not written for this "
        "many seconds (0: only the count bounds apply)."
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.history_backend not in BACKENDS:
            raise ValueError(f"--history-backend must be one of {', '.join(BACKENDS)}, "
                             f"got {self.history_backend!r}")
        for flag, value in (("--memory-max-conversations", self.memory_max_conversations),
                            ("--memory-max-responses", self.memory_max_responses),
                            ("--memory-max-items", self.memory_max_items)):
            if value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        if self.memory_max_age < 0:
            raise ValueError(f"--memory-max-age must be >= 0, got {self.memory_max_age}")
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
