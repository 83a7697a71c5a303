"""``python -m services.history``: the history gRPC service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

from services.common.grpc_server import GrpcServer, wait_for_shutdown
from services.common.service import main_for
from services.history import metrics
from services.history.backends import Repository, open_repository
from services.history.config import HistoryConfig
from services.history.domain import HistoryError, utcnow
from services.history.health import DatabaseProbe
from services.history.repository import HistoryRepository
from services.history.server import SERVICE_NAME, HistoryServicer, add_to_server

log = logging.getLogger("services.history")


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


async def migrate_until_ready(repo: HistoryRepository, servicer: HistoryServicer,
                              server: GrpcServer, max_delay: float = 10.0) -> None:
    """Applies migrations, retrying while the database is unreachable, then goes SERVING."""
    delay = 0.5
    while True:
        try:
            await repo.migrate()
            break
        except HistoryError as exc:
            servicer.not_ready_reason = f"history database not ready: {exc}"
            log.warning("%s; retrying in %.1fs", servicer.not_ready_reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
    servicer.ready = True
    await server.set_serving(True)
    metrics.DATABASE_UP.set(1)
    log.info("history database %s ready", _redact(repo.url))


async def purge_forever(repo: Repository, servicer: HistoryServicer,
                        max_age: float) -> None:
    """Deletes responses older than ``max_age`` seconds, periodically."""
    interval = min(max(max_age / 4, 1.0), 300.0)
    while True:
        await asyncio.sleep(interval)
        if not servicer.ready:
            continue
        try:
            purged = await repo.purge_responses(utcnow() - timedelta(seconds=max_age))
            if purged:
                log.info("purged %d responses older than %gs", purged, max_age)
        except HistoryError as exc:
            log.warning("response purge failed: %s", exc)


async def serve(config: HistoryConfig) -> None:
    repo = open_repository(config)
    server = GrpcServer(config)
    tasks: list[asyncio.Task[None]] = []
    if isinstance(repo, HistoryRepository):
        # SQL only: migrations before SERVING, a database probe, pool gauges.
        sql = repo

        async def database_changed(up: bool) -> None:
            metrics.DATABASE_UP.set(1 if up else 0)
            await server.set_serving(up)

        probe = DatabaseProbe(sql.ping, database_changed, config.probe_interval)
        servicer = HistoryServicer(repo, on_unavailable=probe.poke)
        server.add_service(add_to_server, servicer, SERVICE_NAME)
        metrics.DATABASE_UP.set(0)
        metrics.watch_pool(sql.pool_in_use, config.pool_size)
        await server.start()

        async def start_up() -> None:
            await migrate_until_ready(sql, servicer, server)
            await probe.run()

        tasks.append(asyncio.create_task(start_up()))
    else:
        # memory / none: nothing to migrate or probe; serving at once.
        servicer = HistoryServicer(repo)
        servicer.ready = True
        server.add_service(add_to_server, servicer, SERVICE_NAME)
        metrics.DATABASE_UP.set(1)
        await server.start()
        await server.set_serving(True)
        log.info("history backend %s: %s", repo.backend,
                 "kept in memory, lost on restart" if repo.backend == "memory"
                 else "nothing is stored")
    if config.response_max_age > 0:
        tasks.append(asyncio.create_task(purge_forever(repo, servicer, config.response_max_age)))
    try:
        await wait_for_shutdown()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await server.stop()
        await repo.close()


def main() -> None:
    main_for(HistoryConfig, serve)


if __name__ == "__main__":
    main()
