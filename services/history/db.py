"""Engines for the history database: SQLite (WAL, foreign keys) or PostgreSQL (bounded pool)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
VERSION_TABLE = "history_alembic_version"
# Serializes concurrent migrations of several replicas on one PostgreSQL database.
PG_MIGRATION_LOCK = 0x5617_0001
WRITE_OPTION = "history_write"


def make_engine(url: str, pool_size: int = 5, op_timeout: float = 5.0) -> AsyncEngine:
    """An async engine with bounded pool and timeouts; SQLite gets WAL and foreign keys."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    kwargs: dict[str, Any] = {"pool_size": pool_size, "max_overflow": pool_size,
                              "pool_timeout": op_timeout}
    if backend == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": op_timeout}
    else:
        kwargs["pool_pre_ping"] = True
        kwargs["pool_recycle"] = 1800
        if backend == "postgresql":
            kwargs["connect_args"] = {"timeout": op_timeout, "command_timeout": op_timeout}
    engine = create_async_engine(parsed, **kwargs)
    if backend == "sqlite":
        _sqlite_events(engine)
    return engine


def _sqlite_events(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We emit BEGIN ourselves (below): pysqlite's implicit transactions are off.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(conn: Connection) -> None:
        # Writers take the write lock up front (no deadlock upgrading a read lock); readers
        # run concurrently under WAL.
        write = conn.get_execution_options().get(WRITE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("version_table", VERSION_TABLE)
    return cfg


async def run_migrations(engine: AsyncEngine, action: str = "upgrade",
                         revision: str = "head") -> None:
    """Applies (``upgrade``) or reverts (``downgrade``) migrations in one transaction."""
    if action not in ("upgrade", "downgrade"):
        raise ValueError(f"unknown migration action {action!r}")
    cfg = alembic_config()

    def run(connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
        cfg.attributes["connection"] = connection
        getattr(command, action)(cfg, revision)

    async with engine.execution_options(**{WRITE_OPTION: True}).begin() as conn:
        await conn.run_sync(run)


async def current_revision(engine: AsyncEngine) -> str | None:
    from alembic.migration import MigrationContext

    def read(connection: Connection) -> str | None:
        ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return ctx.get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


def run_sync(coro: Any) -> Any:
    return asyncio.run(coro)
