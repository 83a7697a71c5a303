"""The precise cache view: a per-model block index fed by workers' KV events.

Workers stream ``smg.grpc.common.KvEventBatch`` (``SubscribeKvEvents``). For each worker the
index keeps the blocks it holds; a block is identified by a *content chain hash* the router
computes itself from the block's token ids and its parent's chain hash (position-independent
of the engine's own hash function, as SMG does), while the engine's ``block_hash`` is kept
only to resolve parents and removals. ``match(prompt)`` hashes the prompt's full blocks the
same way and returns, per worker, how many leading tokens it holds.

:class:`KvStream` is the per-subscription sequencing: skip duplicates and load-only
heartbeats, apply snapshot chunks, detect gaps (-> resubscribe from ``last + 1``).

Holders are bitmasks (one bit per worker), so a prompt's match is one dict lookup and one AND
per block. Plain Python over the real protobuf message classes; no I/O. Two routers fed the
same events hold the same blocks for the same workers, so they make the same choices.
"""

from __future__ import annotations

import enum
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

_REMOTE = 2  # KV_CACHE_LOCALITY_REMOTE


def chain_hash(parent: int, token_ids: Sequence[int] | array | bytes) -> int:
    """A block's content hash chained onto its parent's.

    Python's own (SipHash) hash of ``(parent, token bytes)``: fast, and only ever compared
    inside this process, so per-process hash seeds do not matter. Two router replicas compute
    different numbers but the same *matches*, hence the same decisions."""
    if not isinstance(token_ids, bytes):
        token_ids = (token_ids if isinstance(token_ids, array) else array("I", token_ids)).tobytes()
    return hash((parent, token_ids))


def namespace_seed(lora_name: str = "", cache_salt: str = "") -> int:
    """The root 'parent' of a chain: blocks under another LoRA or salt never match."""
    if not lora_name and not cache_salt:
        return 0
    return hash(("ns", lora_name, cache_salt))


def chain_hashes(tokens: Sequence[int] | array, block_size: int,
                 seed: int = 0) -> Iterator[int]:
    """Chain hashes of the full blocks of ``tokens``, computed as they are consumed."""
    data = (tokens if isinstance(tokens, array) else array("I", tokens)).tobytes()
    step = 4 * block_size
    parent = seed
    for start in range(0, len(data) - step + 1, step):
        parent = hash((parent, data[start:start + step]))
        yield parent


def prompt_chain(tokens: Sequence[int] | array, block_size: int, seed: int = 0) -> list[int]:
    """Chain hashes of every full block of ``tokens``."""
    return list(chain_hashes(tokens, block_size, seed))


@dataclass
class _WorkerBlocks:
    bit: int
    by_engine_hash: dict[int, int] = field(default_factory=dict)  # engine hash -> chain hash
    extra: dict[int, int] = field(default_factory=dict)  # chain hash -> duplicates beyond one
    held: int = 0  # distinct chain hashes held
    unplaced: int = 0  # stored blocks whose parent was unknown
    evicted_at: float | None = None  # clock() of the last removal event (an eviction)


class KvIndex:
    """Block index of one model: chain hash -> bitmask of the workers holding the block."""

    def __init__(self, block_size: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.block_size = block_size  # learned from the first stored block when 0
        self._clock = clock
        self._holders: dict[int, int] = {}
        self._workers: dict[str, _WorkerBlocks] = {}
        self._free_bits: list[int] = []
        self._urls_by_bit: dict[int, str] = {}
        self.live_urls: set[str] = set()  # workers whose events are followed live
        self._next_bit = 0

    # ------------------------------------------------------------------ state

    def _state(self, url: str) -> _WorkerBlocks:
        state = self._workers.get(url)
        if state is None:
            if self._free_bits:
                bit = self._free_bits.pop()
            else:
                bit, self._next_bit = self._next_bit, self._next_bit + 1
            state = self._workers[url] = _WorkerBlocks(bit=1 << bit)
            self._urls_by_bit[state.bit] = url
        return state

    def is_live(self, url: str) -> bool:
        return url in self.live_urls

    def set_live(self, url: str, live: bool) -> None:
        self._state(url)
        if live:
            self.live_urls.add(url)
        else:
            self.live_urls.discard(url)

    def drop_worker(self, url: str) -> None:
        """Forgets everything about ``url`` (removed, or its stream must start over)."""
        self.live_urls.discard(url)
        state = self._workers.pop(url, None)
        if state is None:
            return
        self._clear_blocks(state)
        self._urls_by_bit.pop(state.bit, None)
        self._free_bits.append(state.bit.bit_length() - 1)

    def _clear_blocks(self, state: _WorkerBlocks) -> None:
        keep = ~state.bit
        holders = self._holders
        for chash in set(state.by_engine_hash.values()):
            mask = holders.get(chash)
            if mask is not None:
                mask &= keep
                if mask:
                    holders[chash] = mask
                else:
                    del holders[chash]
        state.by_engine_hash.clear()
        state.extra.clear()
        state.held = 0

    def blocks(self, url: str | None = None) -> int:
        if url is None:
            return len(self._holders)
        state = self._workers.get(url)
        return state.held if state else 0

    def workers(self) -> list[str]:
        return sorted(self._workers)

    def evicted_within(self, url: str, seconds: float) -> bool:
        """Whether ``url`` reported removed blocks in the last ``seconds``: an engine's radix
        cache removes blocks only to make room, so its cache is full."""
        state = self._workers.get(url)
        return (state is not None and state.evicted_at is not None
                and self._clock() - state.evicted_at <= seconds)

    def _hold(self, state: _WorkerBlocks, chash: int) -> None:
        mask = self._holders.get(chash, 0)
        if mask & state.bit:
            state.extra[chash] = state.extra.get(chash, 0) + 1
        else:
            self._holders[chash] = mask | state.bit
            state.held += 1

    def _unhold(self, state: _WorkerBlocks, chash: int) -> None:
        extra = state.extra.get(chash)
        if extra:
            if extra > 1:
                state.extra[chash] = extra - 1
            else:
                del state.extra[chash]
            return
        mask = self._holders.get(chash, 0) & ~state.bit
        if mask:
            self._holders[chash] = mask
        else:
            self._holders.pop(chash, None)
        state.held -= 1

    # ------------------------------------------------------------------ events

    def apply_batch(self, url: str, batch: Any) -> None:
        for event in batch.events:
            self.apply_event(url, event)

    def apply_event(self, url: str, event: Any) -> None:
        """Applies one ``smg.grpc.common.KvCacheEvent``."""
        kind = event.WhichOneof("data")
        state = self._state(url)
        if kind == "stored":
            self._stored(state, event.stored)
        elif kind == "removed":
            if event.removed.HasField("locality") and event.removed.locality == _REMOTE:
                return
            for engine_hash in event.removed.block_hashes:
                chash = state.by_engine_hash.pop(engine_hash, None)
                if chash is not None:
                    self._unhold(state, chash)
            if event.removed.block_hashes:
                state.evicted_at = self._clock()
        elif kind == "cleared":
            self._clear_blocks(state)

    def _stored(self, state: _WorkerBlocks, stored: Any) -> None:
        if stored.HasField("locality") and stored.locality == _REMOTE:
            return
        if stored.HasField("parent_block_hash"):
            parent = state.by_engine_hash.get(stored.parent_block_hash)
            if parent is None:
                state.unplaced += len(stored.blocks)
                return  # cannot place blocks under an unknown parent
        else:
            parent = namespace_seed(stored.lora_name, stored.cache_salt)
        for block in stored.blocks:
            if not self.block_size:
                self.block_size = block.block_size or len(block.token_ids)
            chash = hash((parent, array("I", block.token_ids).tobytes()))
            previous = state.by_engine_hash.get(block.block_hash)
            if previous != chash:
                if previous is not None:  # the engine reused a hash: drop the old meaning
                    self._unhold(state, previous)
                state.by_engine_hash[block.block_hash] = chash
                self._hold(state, chash)
            parent = chash

    # ------------------------------------------------------------------ queries

    def match(self, tokens: Sequence[int] | array, urls: Iterable[str] | None = None,
              seed: int = 0) -> dict[str, int]:
        """Cached leading tokens of ``tokens`` per worker (only workers with a match)."""
        if not self.block_size:
            return {}
        return self.match_chain(chain_hashes(tokens, self.block_size, seed), urls)

    def match_chain(self, chain: Iterable[int], urls: Iterable[str] | None = None
                    ) -> dict[str, int]:
        """:meth:`match` for a prompt whose chain hashes the caller already has
        (:func:`prompt_chain`), so they are not computed twice."""
        if not self.block_size or not self._holders:
            return {}
        if urls is None:
            wanted = -1  # every bit
        else:
            wanted = 0
            for url in urls:
                state = self._workers.get(url)
                if state is not None:
                    wanted |= state.bit
            if not wanted:
                return {}
        holders = self._holders
        alive = wanted
        depth = 0
        dropped: list[tuple[int, int]] = []  # (mask of workers that stopped, their depth)
        for chash in chain:
            now = alive & holders.get(chash, 0)
            if now != alive:
                if depth:
                    dropped.append((alive & ~now, depth))
                alive = now
                if not alive:
                    break
            depth += self.block_size
        if alive and depth:
            dropped.append((alive, depth))
        if not dropped:
            return {}
        result: dict[str, int] = {}
        urls_by_bit = self._urls_by_bit
        for mask, at in dropped:
            while mask:
                low = mask & -mask
                holder = urls_by_bit.get(low)
                if holder is not None:
                    result[holder] = at
                mask ^= low
        return result


class Action(enum.Enum):
    APPLY = "apply"
    SKIP = "skip"   # duplicate or load-only heartbeat
    GAP = "gap"     # a batch is missing: resubscribe from resume_from()


class KvStream:
    """Sequencing of one worker's event stream across resubscriptions."""

    def __init__(self) -> None:
        self.last_sequence = 0
        self._subscribed_from = 0

    def resume_from(self) -> int:
        """The ``start_sequence_number`` of the next subscription (0 = snapshot first)."""
        self._subscribed_from = self.last_sequence + 1 if self.last_sequence else 0
        return self._subscribed_from

    def reset(self) -> None:
        self.last_sequence = 0

    def accept(self, batch: Any) -> Action:
        load = batch.load if batch.HasField("load") else None
        if load is not None and load.load_only:
            return Action.SKIP
        seq = batch.sequence_number
        if batch.HasField("snapshot"):
            # Chunks of a snapshot (cursor 0): chunk 0 starts with `cleared`; the last chunk
            # carries the publisher's current sequence number.
            if batch.snapshot.index + 1 >= batch.snapshot.count:
                self.last_sequence = seq
            return Action.APPLY
        if seq <= self.last_sequence:
            return Action.SKIP
        if self.last_sequence and seq != self.last_sequence + 1:
            return Action.GAP
        if not self.last_sequence and self._subscribed_from and seq != self._subscribed_from:
            return Action.GAP
        self.last_sequence = seq
        return Action.APPLY
