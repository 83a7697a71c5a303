"""Fixtures of the history tests: a SQLite file and a fresh PostgreSQL database per session,
and every backend behind one repository fixture.

``repo`` / ``open_repo`` run a test against each storing backend (sql-sqlite, sql-postgres,
memory): the repository contract tests are written once. ``any_repo`` adds ``none`` for the
tests that hold for a backend that stores nothing (request checks, unknown ids).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select

from services.history.backends import Repository
from services.history.memory import MemoryLimits, MemoryRepository
from services.history.models import ItemRow
from services.history.null import NullRepository
from services.history.repository import HistoryRepository

STORING_BACKENDS = ["sql-sqlite", "sql-postgres", "memory"]
ALL_BACKENDS = [*STORING_BACKENDS, "none"]
OpenRepo = Callable[..., Awaitable[Repository]]

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
async def sql_repo(db_url: str) -> AsyncIterator[HistoryRepository]:
    repository = HistoryRepository(db_url, pool_size=4, op_timeout=10.0)
    await repository.migrate()
    try:
        yield repository
    finally:
        await repository.close()


def _backend_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if backend == "sql-sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'history.db'}"
    if backend == "sql-postgres":
        return str(request.getfixturevalue("pg_url"))
    return ""


async def _open(backend: str, url: str, max_item_bytes: int | None = None,
                limits: MemoryLimits | None = None) -> Repository:
    size: dict[str, Any] = {} if max_item_bytes is None else {"max_item_bytes": max_item_bytes}
    if backend == "memory":
        return MemoryRepository(limits=limits, **size)
    if backend == "none":
        return NullRepository(**size)
    sql = HistoryRepository(url, pool_size=4, op_timeout=10.0, **size)
    await sql.migrate()
    return sql


@contextmanager
def _opener(backend: str, url: str) -> Iterator[tuple[OpenRepo, list[Repository]]]:
    opened: list[Repository] = []

    async def open_repo(**options: Any) -> Repository:
        repository = await _open(backend, url, **options)
        opened.append(repository)
        return repository

    yield open_repo, opened


@pytest.fixture(params=STORING_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(backend name, database URL or "") of each backend that stores."""
    return request.param, _backend_url(request.param, request, tmp_path)


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    return request.param, _backend_url(request.param, request, tmp_path)


@pytest.fixture
async def open_repo(backend: tuple[str, str]) -> AsyncIterator[OpenRepo]:
    """Opens a repository of this test's backend with options (``max_item_bytes``, ...)."""
    with _opener(*backend) as (opener, opened):
        try:
            yield opener
        finally:
            for repository in opened:
                await repository.close()


@pytest.fixture
async def repo(open_repo: OpenRepo) -> Repository:
    return await open_repo()


@pytest.fixture
async def any_repo(any_backend: tuple[str, str]) -> AsyncIterator[Repository]:
    with _opener(*any_backend) as (opener, opened):
        try:
            yield await opener()
        finally:
            for repository in opened:
                await repository.close()


async def count_items(repo: Repository, tenant: str) -> int:
    """Items the backend holds for ``tenant`` (linked or orphaned), read from its storage."""
    if isinstance(repo, HistoryRepository):
        async with repo.engine.connect() as conn:
            return int((await conn.execute(
                select(func.count()).select_from(ItemRow).where(ItemRow.tenant == tenant))
            ).scalar() or 0)
    if isinstance(repo, MemoryRepository):
        return repo.item_count(tenant)
    return 0


@pytest.fixture
def tenant() -> str:
    """A tenant of its own per test, so tests sharing one database never see each other."""
    return f"tenant-{secrets.token_hex(4)}"
