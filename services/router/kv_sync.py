"""Keeps a :class:`~services.router.kv_index.KvIndex` in step with one worker's KV events.

One task per worker (while the model's policy is cache_aware): subscribe, apply batches in
order, and recover the way SMG does:

* a sequence gap -> resubscribe from ``last + 1`` (the publisher replays);
* ``OUT_OF_RANGE`` (cursor expired) / ``DATA_LOSS`` (fell behind) -> drop this worker's blocks
  and subscribe from 0 (snapshot first);
* ``UNIMPLEMENTED`` -> the worker publishes no events: approximate mode for it, stop;
* anything else (worker down) -> back off 100 ms .. 30 s and resume from ``last + 1``.

Loads carried on the batches (``EngineLoad``) replace GetLoads polling for that worker.
No grpc here: the subscription is any async iterator factory raising ``UpstreamError``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

from services.router.kv_index import Action, KvIndex, KvStream
from services.router.resilience import UpstreamError
from services.router.workers import EngineLoad, Worker

log = logging.getLogger(__name__)

RESET_CODES = frozenset({"OUT_OF_RANGE", "DATA_LOSS"})
Subscribe = Callable[[int], AsyncGenerator[Any, None]]


def engine_load_from_event(load: Any) -> EngineLoad:
    return EngineLoad(
        running_requests=load.running_requests, waiting_requests=load.waiting_requests,
        token_usage=load.token_usage, gen_throughput=load.gen_throughput,
        waiting_uncached_tokens=load.waiting_uncached_tokens, source="events",
        update_time=time.monotonic())


class KvSubscription:
    def __init__(self, worker: Worker, index: KvIndex, subscribe: Subscribe,
                 min_backoff: float = 0.1, max_backoff: float = 30.0) -> None:
        self.worker = worker
        self.index = index
        self.subscribe = subscribe
        self.stream = KvStream()
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.resets = 0
        self.gaps = 0
        self.failures = 0
        self.batches = 0
        self.unimplemented = False
        self.on_failure: Callable[[str], None] | None = None

    @property
    def url(self) -> str:
        return self.worker.url

    async def run(self) -> None:
        backoff = self.min_backoff
        while True:
            start = self.stream.resume_from()
            try:
                gap = await self._consume(start)
                backoff = self.min_backoff
                if gap:
                    self.gaps += 1
                    log.info("kv events %s: gap after %d, resubscribing", self.url,
                             self.stream.last_sequence)
                    continue
            except UpstreamError as err:
                self.failures += 1
                if self.on_failure is not None:
                    self.on_failure(err.code)
                if err.code == "UNIMPLEMENTED":
                    log.info("kv events %s: not published; approximate mode for it", self.url)
                    self.unimplemented = True
                    self.index.drop_worker(self.url)
                    return
                if err.code in RESET_CODES:
                    log.warning("kv events %s: %s; dropping its blocks and starting over",
                                self.url, err)
                    self.resets += 1
                    self.index.drop_worker(self.url)
                    self.stream.reset()
                    continue
                log.debug("kv events %s: %s; retrying in %.1fs", self.url, err, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    async def _consume(self, start: int) -> bool:
        """Reads one subscription; True when it stopped at a gap."""
        async with aclosing(self.subscribe(start)) as batches:
            async for batch in batches:
                if batch.HasField("load"):
                    self.worker.engine_load = engine_load_from_event(batch.load)
                snapshot_pending = batch.HasField("snapshot") and \
                    batch.snapshot.index + 1 < batch.snapshot.count
                action = self.stream.accept(batch)
                if action is Action.GAP:
                    return True
                if action is Action.APPLY:
                    self.index.apply_batch(self.url, batch)
                    self.batches += 1
                if not snapshot_pending:  # the index now mirrors the worker's cache
                    self.index.set_live(self.url, True)
        return False
