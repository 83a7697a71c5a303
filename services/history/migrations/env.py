"""Alembic environment of the history database.

The service and ``python -m services.history.migrate`` hand a live connection in
``config.attributes["connection"]`` (see ``services.history.db.run_migrations``). Plain
``alembic`` use reads the URL from ``-x url=...`` or ``SGLMESH_HISTORY_HISTORY_DB``.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from services.history.db import VERSION_TABLE, make_engine
from services.history.models import Base

config = context.config
target_metadata = Base.metadata


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(url: str) -> None:
    engine = make_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def url_from_environment() -> str:
    from services.history.config import DEFAULT_DB

    return (context.get_x_argument(as_dictionary=True).get("url")
            or os.environ.get("SGLMESH_HISTORY_HISTORY_DB") or DEFAULT_DB)


if context.is_offline_mode():
    context.configure(url=url_from_environment(), target_metadata=target_metadata,
                      version_table=VERSION_TABLE, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    shared = config.attributes.get("connection")
    if shared is not None:
        do_run_migrations(shared)
    else:
        asyncio.run(run_async_migrations(url_from_environment()))
