"""KV-cache events: the log an engine writes and ``SubscribeKvEvents`` streams, plus the
``kv_events`` descriptor that GetServerInfo advertises. Plain Python (no grpc, no torch).

An engine calls :meth:`KvEventLog.publish` (from any thread) with the blocks its prefix cache
stored, removed or cleared; each call becomes one :class:`EventBatch` with the next sequence
number (1, 2, 3, ...). The log keeps

* a bounded replay buffer of the last ``max_batches`` batches, so a subscriber resumes from a
  ``start_sequence_number`` without a gap (:class:`CursorGone` when that batch is no longer
  held: gRPC ``OUT_OF_RANGE``), and
* the set of live blocks, so a subscriber without a cursor (``start_sequence_number == 0``)
  first gets a snapshot (chunk 0 begins with ``cleared``, then every live block, parents
  before children) whose last chunk carries the current sequence number, then live batches.

A subscriber that falls more than ``max_batches`` behind gets :class:`SubscriberBehind`
(gRPC ``DATA_LOSS``). While nothing happens, :meth:`KvEventLog.subscribe` yields load-only
heartbeats that repeat the last sequence number.

Blocks are content-hashed chains: ``block_hash(parent_hash, token_ids)`` covers the whole
prefix up to and including the block, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import struct
import threading
import time
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("*", "0.0.0.0", "::")
PUBLISHERS = ("zmq", "grpc")
SNAPSHOT_CHUNK_BLOCKS = 512


def block_hash(parent: int | None, token_ids: Sequence[int]) -> int:
    """A signed 64-bit content hash of a block chained onto its parent's hash."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(struct.pack("<q", parent if parent is not None else 0))
    digest.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(digest.digest(), "little", signed=True)


def chain_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of every full block of ``token_ids``."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_hash(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


# ----------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Block:
    block_hash: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class BlocksStored:
    blocks: tuple[Block, ...]
    parent_block_hash: int | None  # the block before blocks[0]; None at the prompt start


@dataclass(frozen=True)
class BlocksRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True)
class CacheCleared:
    pass


KvEvent = BlocksStored | BlocksRemoved | CacheCleared


@dataclass(frozen=True)
class SnapshotInfo:
    index: int
    count: int
    blocks: int  # live blocks in the whole snapshot


@dataclass(frozen=True)
class EventBatch:
    sequence_number: int
    timestamp: float
    events: tuple[KvEvent, ...] = ()
    snapshot: SnapshotInfo | None = None
    load_only: bool = False  # a heartbeat: no events, repeats the last sequence number


class CursorGone(Exception):
    """The requested start sequence is no longer (or not yet) in the replay buffer."""


class SubscriberBehind(Exception):
    """A live subscriber fell further behind than the replay buffer reaches."""


@dataclass
class _Live:
    token_ids: tuple[int, ...]
    parent: int | None
    children: set[int] = field(default_factory=set)


class KvEventLog:
    """Sequence-numbered KV events with a bounded replay buffer and the live block set."""

    def __init__(self, block_size: int, max_batches: int = 10000) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if max_batches <= 0:
            raise ValueError(f"max_batches must be > 0, got {max_batches}")
        self.block_size = block_size
        self.max_batches = max_batches
        self._lock = threading.Lock()
        self._batches: collections.deque[EventBatch] = collections.deque(maxlen=max_batches)
        self._sequence = 0
        self._live: dict[int, _Live] = {}
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.events_published = 0

    # ------------------------------------------------------------------ writing

    @property
    def last_sequence(self) -> int:
        with self._lock:
            return self._sequence

    @property
    def oldest_sequence(self) -> int:
        """The oldest sequence still replayable (last + 1 when the buffer is empty)."""
        with self._lock:
            return self._batches[0].sequence_number if self._batches else self._sequence + 1

    def live_blocks(self) -> int:
        with self._lock:
            return len(self._live)

    def publish(self, events: Iterable[KvEvent]) -> int:
        """Appends one batch; returns its sequence number (the last one when ``events`` is
        empty, which publishes nothing). Thread-safe."""
        events = tuple(events)
        if not events:
            return self.last_sequence
        with self._lock:
            for event in events:
                self._apply(event)
            self._sequence += 1
            batch = EventBatch(self._sequence, time.time(), events)
            self._batches.append(batch)
            self.events_published += len(events)
            waiters = list(self._waiters)
        for loop, wake in waiters:
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # that loop is closed
                pass
        return batch.sequence_number

    def stored(self, blocks: Sequence[tuple[int, Sequence[int]]],
               parent_block_hash: int | None) -> int:
        return self.publish([BlocksStored(
            tuple(Block(h, tuple(t)) for h, t in blocks), parent_block_hash)])

    def removed(self, block_hashes: Sequence[int]) -> int:
        return self.publish([BlocksRemoved(tuple(block_hashes))] if block_hashes else [])

    def cleared(self) -> int:
        return self.publish([CacheCleared()])

    def _apply(self, event: KvEvent) -> None:
        if isinstance(event, BlocksStored):
            parent = event.parent_block_hash
            for block in event.blocks:
                self._live[block.block_hash] = _Live(block.token_ids, parent)
                if parent is not None and parent in self._live:
                    self._live[parent].children.add(block.block_hash)
                parent = block.block_hash
        elif isinstance(event, BlocksRemoved):
            for h in event.block_hashes:
                entry = self._live.pop(h, None)
                if entry is not None and entry.parent in self._live:
                    self._live[entry.parent].children.discard(h)
        else:
            self._live.clear()

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> list[EventBatch]:
        """The live state as snapshot chunks ending at the current sequence (may be empty)."""
        with self._lock:
            sequence = self._sequence
            roots = [h for h, e in self._live.items()
                     if e.parent is None or e.parent not in self._live]
            ordered: list[BlocksStored] = []
            stack = list(reversed(roots))
            while stack:  # parents before children
                h = stack.pop()
                entry = self._live[h]
                ordered.append(BlocksStored((Block(h, entry.token_ids),), entry.parent))
                stack.extend(sorted(entry.children, reverse=True))
        if sequence == 0:
            return []
        events: list[KvEvent] = [CacheCleared(), *ordered]
        count = max(1, min(sequence, -(-len(events) // SNAPSHOT_CHUNK_BLOCKS)))
        size = -(-len(events) // count)
        now = time.time()
        return [EventBatch(sequence - count + 1 + i, now, tuple(events[i * size:(i + 1) * size]),
                           snapshot=SnapshotInfo(i, count, len(ordered)))
                for i in range(count)]

    def since(self, start_sequence_number: int) -> list[EventBatch]:
        """The held batches numbered >= ``start_sequence_number``; :class:`CursorGone` when
        the buffer no longer (or never) reached that far."""
        with self._lock:
            if start_sequence_number > self._sequence + 1:
                raise CursorGone(
                    f"start_sequence_number {start_sequence_number} is ahead of the publisher "
                    f"(last sequence {self._sequence}); resubscribe from 0")
            oldest = self._batches[0].sequence_number if self._batches else self._sequence + 1
            if start_sequence_number < oldest:
                raise CursorGone(
                    f"start_sequence_number {start_sequence_number} is no longer held (oldest "
                    f"replayable: {oldest}); resubscribe from 0")
            return [b for b in self._batches if b.sequence_number >= start_sequence_number]

    async def subscribe(self, start_sequence_number: int = 0,
                        heartbeat_s: float = 0.0) -> AsyncGenerator[EventBatch, None]:
        """Snapshot (cursor 0) or replay (cursor N), then live batches; load-only heartbeats
        every ``heartbeat_s`` seconds of silence when it is > 0. Runs until closed."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        waiter = (loop, wake)
        with self._lock:
            self._waiters.add(waiter)
        try:
            if start_sequence_number == 0:
                pending = self.snapshot()
                cursor = pending[-1].sequence_number + 1 if pending else self.last_sequence + 1
            else:
                pending = self.since(start_sequence_number)
                cursor = start_sequence_number
            for batch in pending:
                yield batch
                if not batch.snapshot:
                    cursor = batch.sequence_number + 1
            while True:
                wake.clear()
                try:
                    batches = self.since(cursor)
                except CursorGone as exc:
                    raise SubscriberBehind(
                        f"subscriber fell behind the replay buffer ({self.max_batches} batches)"
                    ) from exc
                for batch in batches:
                    yield batch
                    cursor = batch.sequence_number + 1
                if batches:
                    continue
                try:
                    if heartbeat_s > 0:
                        await asyncio.wait_for(wake.wait(), heartbeat_s)
                    else:
                        await wake.wait()
                except TimeoutError:
                    yield EventBatch(cursor - 1, time.time(), load_only=True)
        finally:
            with self._lock:
                self._waiters.discard(waiter)


# ----------------------------------------------------------------------------- descriptor


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> (host, port); ValueError naming the problem."""
    if not isinstance(endpoint, str) or not endpoint.startswith("tcp://"):
        raise ValueError(f"endpoint must be tcp://HOST:PORT, got {endpoint!r}")
    rest = endpoint[len("tcp://"):]
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]:")
        if not sep:
            raise ValueError(f"endpoint {endpoint!r} has no port")
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ValueError(f"endpoint {endpoint!r} has no port")
    if not host:
        raise ValueError(f"endpoint {endpoint!r} has no host")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"endpoint {endpoint!r} has a non-numeric port") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"endpoint {endpoint!r}: port must be 1-65535, got {port}")
    return host, port


def kv_events_descriptor(raw: str | dict[str, Any] | None, *, block_size: int, dp_size: int = 1,
                         default_host: str = "", default_port: int = 0,
                         publishers: Sequence[str] = PUBLISHERS) -> dict[str, Any] | None:
    """The structured ``kv_events`` descriptor for GetServerInfo's ``server_args``.

    ``raw`` is SGLang's ``--kv-events-config`` JSON (``{"publisher": "zmq", "endpoint":
    "tcp://*:5557", "topic": ...}``) or its parsed dict. ``publisher: "grpc"`` means the events
    travel on the worker's own ``SubscribeKvEvents`` stream; its endpoint defaults to the gRPC
    server's ``default_host:default_port``. Returns ``{publisher, endpoint_host,
    endpoint_port_base, topic, block_size, dp_size}``, or ``None`` when no publisher is
    configured (empty config or ``"publisher": null``) or the config is malformed (logged as
    a warning naming the problem; never raises). A wildcard host (``*``, ``0.0.0.0``, ``::``)
    is advertised as given: the publisher binds it, and a subscriber dials loopback or the
    worker's address.
    """
    try:
        if raw is None or (isinstance(raw, str) and not raw.strip()):
            return None
        config = json.loads(raw) if isinstance(raw, str) else raw
        if not isinstance(config, dict):
            raise ValueError(f"expected a JSON object, got {type(config).__name__}")
        publisher = config.get("publisher")
        if publisher is None or publisher == "null":
            return None
        if publisher not in publishers:
            raise ValueError(f"publisher must be one of {', '.join(publishers)} (or null), "
                             f"got {publisher!r}")
        endpoint = config.get("endpoint")
        if endpoint is None:
            if publisher == "grpc" and default_port:
                host, port = default_host or "127.0.0.1", default_port
                if not 1 <= port <= 65535:
                    raise ValueError(f"port must be 1-65535, got {port}")
            elif publisher == "zmq":
                host, port = _parse_endpoint("tcp://*:5557")  # SGLang's default
            else:
                raise ValueError("endpoint is required")
        else:
            host, port = _parse_endpoint(endpoint)
        size = config.get("block_size", block_size)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {size!r}")
        dp = config.get("dp_size", dp_size)
        if not isinstance(dp, int) or isinstance(dp, bool) or dp <= 0:
            raise ValueError(f"dp_size must be a positive integer, got {dp!r}")
        topic = config.get("topic", "") or ""
        if not isinstance(topic, str):
            raise ValueError(f"topic must be a string, got {topic!r}")
        return {"publisher": publisher, "endpoint_host": host, "endpoint_port_base": port,
                "topic": topic, "block_size": size, "dp_size": dp}
    except (ValueError, TypeError) as exc:
        log.warning("ignoring malformed --kv-events-config (%s): %s; kv_events is null", raw, exc)
        return None
