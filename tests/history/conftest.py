"""Fixtures of the history tests: a SQLite file and a fresh PostgreSQL database per session."""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.history.repository import HistoryRepository

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def _in_thread(coro_fn: Any, *args: Any) -> Any:
    """Runs a coroutine on its own loop in a worker thread (usable from sync fixtures)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro_fn(*args)).result()


async def _admin(sql: str) -> None:
    conn = await asyncio.wait_for(asyncpg.connect(PG_ADMIN_DSN), 5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextmanager
def fresh_pg_database() -> Iterator[str]:
    """``CREATE DATABASE sglmesh_test_<random>``, yielding its URL; dropped afterwards."""
    name = f"sglmesh_test_{secrets.token_hex(6)}"
    try:
        _in_thread(_admin, f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 cannot be reached: {exc!r}")
    try:
        yield PG_URL.format(name=name)
    finally:
        _in_thread(_admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'history.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
async def repo(db_url: str) -> AsyncIterator[HistoryRepository]:
    repository = HistoryRepository(db_url, pool_size=4, op_timeout=10.0)
    await repository.migrate()
    try:
        yield repository
    finally:
        await repository.close()


@pytest.fixture
def tenant() -> str:
    """A tenant of its own per test, so tests sharing one database never see each other."""
    return f"tenant-{secrets.token_hex(4)}"
