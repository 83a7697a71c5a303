"""Background database probe: grpc.health follows whether the database answers.

Plain asyncio, no transport types: ``ping`` raises when the database cannot be reached and
``on_change(up)`` is awaited on every transition (the service flips its health status there).
A request that meets an unreachable database calls :meth:`DatabaseProbe.poke`, so health
turns NOT_SERVING at once rather than at the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from services.history.domain import HistoryError

log = logging.getLogger(__name__)


class DatabaseProbe:
    """Pings the database every ``interval`` seconds (sooner when poked)."""

    def __init__(self, ping: Callable[[], Awaitable[None]],
                 on_change: Callable[[bool], Awaitable[None]], interval: float = 2.0,
                 min_gap: float = 0.25) -> None:
        self.ping = ping
        self.on_change = on_change
        self.interval = interval
        self.min_gap = min(min_gap, interval)
        self.up = True
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """Probe now (a request just failed as unavailable); a no-op while already down."""
        if self.up:
            self._wake.set()

    async def check(self) -> bool:
        """One probe; awaits ``on_change`` when the answer differs from the last one."""
        try:
            await self.ping()
            up, why = True, ""
        except HistoryError as exc:
            up, why = False, str(exc)
        if up != self.up:
            self.up = up
            if up:
                log.info("history database reachable again: SERVING")
            else:
                log.warning("history database unreachable: NOT_SERVING (%s)", why)
            await self.on_change(up)
        return up

    async def run(self) -> None:
        """Probes forever (until cancelled); faster while the database is down."""
        while True:
            self._wake.clear()
            await self.check()
            delay = self.interval if self.up else min(self.interval, 0.5)
            await asyncio.sleep(self.min_gap)  # pokes never make it spin
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(delay - self.min_gap, 0))
