"""``python -m services.history.migrate upgrade|downgrade [REVISION] [--history-db URL]``."""

from __future__ import annotations

import argparse
import asyncio
import os

from services.history.config import DEFAULT_DB
from services.history.db import current_revision, make_engine, run_migrations


async def _main(url: str, action: str, revision: str) -> str | None:
    engine = make_engine(url)
    try:
        if action != "current":
            await run_migrations(engine, action, revision)
        return await current_revision(engine)
    finally:
        await engine.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.history.migrate",
                                     description="Migrate the history database schema.")
    parser.add_argument("action", choices=["upgrade", "downgrade", "current"])
    parser.add_argument("revision", nargs="?", default=None,
                        help="Target revision (default: head for upgrade, -1 for downgrade).")
    parser.add_argument("--history-db",
                        default=os.environ.get("SGLMESH_HISTORY_HISTORY_DB", DEFAULT_DB),
                        help="SQLAlchemy async database URL.")
    args = parser.parse_args(argv)
    revision = args.revision or ("head" if args.action == "upgrade" else "-1")
    current = asyncio.run(_main(args.history_db, args.action, revision))
    print(f"history schema at revision: {current or 'base (empty)'}")


if __name__ == "__main__":
    main()
