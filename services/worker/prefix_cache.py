"""A block prefix cache: KV of token-id blocks, keyed by content-hashed chains, LRU-bounded.

Plain Python: the KV payload of a block is opaque here (the torch engine stores per-layer
key/value tensors). A prompt is cut into blocks of ``block_size`` tokens; block ``i``'s key is
``block_hash(hash of block i-1, tokens of block i)`` (see :mod:`services.worker.kv_events`),
so a hit on block ``i`` implies the whole prefix up to it matches. A request copies the KV of
its longest cached prefix and prefills only the rest; requests never pin blocks, so any block
can be evicted at any time. Eviction is LRU among leaves (blocks no cached block extends), so
every cached chain stays reachable from its first block.

Every change is mirrored into a :class:`~services.worker.kv_events.KvEventLog` when one is
given: ``stored`` (with the parent block's hash) on insert, ``removed`` on eviction,
``cleared`` on :meth:`BlockCache.clear`. Thread-safe.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.worker.kv_events import Block, BlocksRemoved, BlocksStored, KvEventLog, block_hash


@dataclass
class CachedBlock:
    block_hash: int
    parent: int | None
    token_ids: tuple[int, ...]
    kv: Any
    children: set[int] = field(default_factory=set)


class BlockCache:
    def __init__(self, block_size: int, capacity_tokens: int,
                 events: KvEventLog | None = None) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.block_size = block_size
        self.capacity_blocks = max(0, capacity_tokens // block_size)
        self.events = events
        self._lock = threading.Lock()
        self._blocks: collections.OrderedDict[int, CachedBlock] = collections.OrderedDict()
        self.evictions = 0

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_tokens(self) -> int:
        return len(self._blocks) * self.block_size

    def hashes(self, token_ids: Sequence[int], upto: int | None = None) -> list[int]:
        """Chained hashes of the full blocks of ``token_ids[:upto]``."""
        end = len(token_ids) if upto is None else min(upto, len(token_ids))
        out: list[int] = []
        parent: int | None = None
        for start in range(0, end - self.block_size + 1, self.block_size):
            parent = block_hash(parent, token_ids[start:start + self.block_size])
            out.append(parent)
        return out

    def match(self, hashes: Sequence[int], max_tokens: int, touch: bool = True
              ) -> list[CachedBlock]:
        """The longest cached chain over ``hashes`` covering at most ``max_tokens`` tokens."""
        limit = max(0, max_tokens) // self.block_size
        found: list[CachedBlock] = []
        with self._lock:
            for h in hashes[:limit]:
                block = self._blocks.get(h)
                if block is None:
                    break
                found.append(block)
            if touch:
                for block in found:
                    self._blocks.move_to_end(block.block_hash)
        return found

    def insert(self, token_ids: Sequence[int], hashes: Sequence[int],
               kv_for_block: Callable[[int], Any]) -> int:
        """Caches every block of ``hashes`` (the chain of ``token_ids``) not cached yet;
        ``kv_for_block(i)`` gives block ``i``'s KV. Returns the number of new blocks."""
        if self.capacity_blocks == 0:
            return 0
        hashes = list(hashes[:self.capacity_blocks])
        bs = self.block_size
        stored: list[BlocksStored] = []
        run: list[Block] = []
        run_parent: int | None = None
        with self._lock:
            parent: int | None = None
            for i, h in enumerate(hashes):
                block = self._blocks.get(h)
                if block is not None:
                    self._blocks.move_to_end(h)
                    if run:
                        stored.append(BlocksStored(tuple(run), run_parent))
                        run = []
                else:
                    tokens = tuple(token_ids[i * bs:(i + 1) * bs])
                    block = CachedBlock(h, parent, tokens, kv_for_block(i))
                    self._blocks[h] = block
                    if parent is not None and parent in self._blocks:
                        self._blocks[parent].children.add(h)
                    if not run:
                        run_parent = parent
                    run.append(Block(h, tokens))
                parent = h
            if run:
                stored.append(BlocksStored(tuple(run), run_parent))
            removed = self._evict(protect=set(hashes))
        if self.events is not None:
            events: list[Any] = list(stored)
            if removed:
                events.append(BlocksRemoved(tuple(removed)))
            self.events.publish(events)
        return sum(len(s.blocks) for s in stored)

    def _evict(self, protect: set[int]) -> list[int]:
        removed: list[int] = []
        while len(self._blocks) > self.capacity_blocks:
            victim = next((b for b in self._blocks.values()
                           if not b.children and b.block_hash not in protect), None)
            if victim is None:
                victim = next((b for b in self._blocks.values() if not b.children), None)
            if victim is None:  # cannot happen: a chain always has a leaf
                break
            del self._blocks[victim.block_hash]
            if victim.parent is not None and victim.parent in self._blocks:
                self._blocks[victim.parent].children.discard(victim.block_hash)
            removed.append(victim.block_hash)
            self.evictions += 1
        return removed

    def clear(self) -> int:
        """Drops every block (a ``cleared`` event); returns how many there were."""
        with self._lock:
            count = len(self._blocks)
            self._blocks.clear()
        if self.events is not None:
            self.events.cleared()
        return count
