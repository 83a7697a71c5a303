"""The precise cache view: a per-model block index fed by workers' KV events.

Workers stream ``smg.grpc.common.KvEventBatch`` (``SubscribeKvEvents``). For each worker the
index keeps the blocks it holds; a block is identified by a *content chain hash* the router
computes itself from the block's token ids and its parent's chain hash (position-independent
of the engine's own hash function, as SMG does), while the engine's ``block_hash`` is kept
only to resolve parents and removals. ``match(prompt)`` hashes the prompt's full blocks the
same way and returns, per worker, how many leading tokens it holds.

:class:`KvStream` is the per-subscription sequencing: skip duplicates and load-only
heartbeats, apply snapshot chunks, detect gaps (-> resubscribe from ``last + 1``).

Plain Python over the real protobuf message classes; no I/O. Two routers fed the same events
build the same index (the hashes are deterministic), so they make the same choices.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

_REMOTE = 2  # KV_CACHE_LOCALITY_REMOTE


def chain_hash(parent: int, token_ids: Sequence[int] | array) -> int:
    data = token_ids if isinstance(token_ids, array) else array("I", token_ids)
    digest = hashlib.blake2b(struct.pack("<Q", parent), digest_size=8)
    digest.update(data.tobytes())
    return int.from_bytes(digest.digest(), "little")


def namespace_seed(lora_name: str = "", cache_salt: str = "") -> int:
    """The root 'parent' of a chain: blocks under another LoRA or salt never match."""
    if not lora_name and not cache_salt:
        return 0
    return int.from_bytes(hashlib.blake2b(f"{lora_name}\0{cache_salt}".encode(),
                                          digest_size=8).digest(), "little")


def prompt_chain(tokens: Sequence[int] | array, block_size: int, seed: int = 0) -> list[int]:
    """Chain hashes of every full block of ``tokens``."""
    tokens = tokens if isinstance(tokens, array) else array("I", tokens)
    hashes = []
    parent = seed
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = chain_hash(parent, tokens[start:start + block_size])
        hashes.append(parent)
    return hashes


@dataclass
class _WorkerBlocks:
    by_engine_hash: dict[int, int] = field(default_factory=dict)  # engine hash -> chain hash
    refs: dict[int, int] = field(default_factory=dict)  # chain hash -> engine blocks with it
    live: bool = False
    unplaced: int = 0  # stored blocks whose parent was unknown


class KvIndex:
    def __init__(self, block_size: int = 0) -> None:
        self.block_size = block_size  # learned from the first stored block when 0
        self._holders: dict[int, set[str]] = {}
        self._workers: dict[str, _WorkerBlocks] = {}

    # ------------------------------------------------------------------ state

    def is_live(self, url: str) -> bool:
        state = self._workers.get(url)
        return state is not None and state.live

    def set_live(self, url: str, live: bool) -> None:
        self._workers.setdefault(url, _WorkerBlocks()).live = live

    def drop_worker(self, url: str) -> None:
        """Forgets everything about ``url`` (removed, or its stream must start over)."""
        state = self._workers.pop(url, None)
        if state is None:
            return
        for chash in state.refs:
            self._unhold(chash, url)

    def blocks(self, url: str | None = None) -> int:
        if url is None:
            return len(self._holders)
        state = self._workers.get(url)
        return len(state.refs) if state else 0

    def workers(self) -> list[str]:
        return sorted(self._workers)

    def _unhold(self, chash: int, url: str) -> None:
        holders = self._holders.get(chash)
        if holders is not None:
            holders.discard(url)
            if not holders:
                del self._holders[chash]

    # ------------------------------------------------------------------ events

    def apply_batch(self, url: str, batch: Any) -> None:
        for event in batch.events:
            self.apply_event(url, event)

    def apply_event(self, url: str, event: Any) -> None:
        """Applies one ``smg.grpc.common.KvCacheEvent``."""
        kind = event.WhichOneof("data")
        state = self._workers.setdefault(url, _WorkerBlocks())
        if kind == "stored":
            self._stored(url, state, event.stored)
        elif kind == "removed":
            if event.removed.HasField("locality") and event.removed.locality == _REMOTE:
                return
            for engine_hash in event.removed.block_hashes:
                chash = state.by_engine_hash.pop(engine_hash, None)
                if chash is None:
                    continue
                left = state.refs[chash] - 1
                if left:
                    state.refs[chash] = left
                else:
                    del state.refs[chash]
                    self._unhold(chash, url)
        elif kind == "cleared":
            live = state.live
            self.drop_worker(url)
            self._workers[url] = _WorkerBlocks(live=live)

    def _stored(self, url: str, state: _WorkerBlocks, stored: Any) -> None:
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
            chash = chain_hash(parent, block.token_ids)
            previous = state.by_engine_hash.get(block.block_hash)
            if previous != chash:
                if previous is not None:  # the engine reused a hash: drop the old meaning
                    state.by_engine_hash.pop(block.block_hash)
                    left = state.refs[previous] - 1
                    if left:
                        state.refs[previous] = left
                    else:
                        del state.refs[previous]
                        self._unhold(previous, url)
                state.by_engine_hash[block.block_hash] = chash
                state.refs[chash] = state.refs.get(chash, 0) + 1
                self._holders.setdefault(chash, set()).add(url)
            parent = chash

    # ------------------------------------------------------------------ queries

    def match(self, tokens: Sequence[int] | array, urls: Iterable[str] | None = None,
              seed: int = 0) -> dict[str, int]:
        """Cached leading tokens of ``tokens`` per worker (only workers with a match)."""
        if not self.block_size or not self._holders:
            return {}
        wanted = set(urls) if urls is not None else None
        result: dict[str, int] = {}
        alive: set[str] | None = None
        depth = 0
        tokens = tokens if isinstance(tokens, array) else array("I", tokens)
        bs = self.block_size
        parent = seed
        for start in range(0, len(tokens) - bs + 1, bs):
            parent = chain_hash(parent, tokens[start:start + bs])
            holders = self._holders.get(parent)
            if not holders:
                break
            alive = (set(holders) if wanted is None else holders & wanted) if alive is None \
                else alive & holders
            if not alive:
                break
            depth += bs
            for url in alive:
                result[url] = depth
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
