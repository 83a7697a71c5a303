"""Load-balancing policies: one ``select_worker(workers, info)`` interface (as in SMG).

A policy instance serves one model (and one PD leg). It gets the *routable* workers of that
model (healthy, circuit breaker not open) and picks one, or None when none fits. Hooks:
``on_worker_removed`` (forget a worker), ``maintenance`` (periodic: tree eviction).

Policies: round_robin, random, power_of_two, cache_aware (approximate radix tree; precise when
a KV-event index is attached, see :mod:`services.router.kv_index`), consistent_hashing,
manual (sticky table), prefix_hash.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import random
import time
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from services.router.kv_index import prompt_chain
from services.router.radix_tree import RadixTree
from services.router.workers import Worker

if TYPE_CHECKING:
    from services.router.kv_index import KvIndex


@dataclass(frozen=True)
class SelectionInfo:
    """What a policy may look at besides the workers.

    ``token_ids`` when the request was tokenized (the gRPC data plane); ``text`` when it was
    not (requests the gateway relays to HTTP workers, SMG's ``request_text``): cache_aware then
    matches characters in a per-model text tree, prefix_hash hashes the text's head."""

    token_ids: Sequence[int] = field(default=())
    routing_key: str = ""
    request_id: str = ""
    text: str = ""


@dataclass(frozen=True)
class PolicyConfig:
    """Policy knobs (SMG flag names and defaults)."""

    cache_threshold: float = 0.3
    balance_abs_threshold: float = 64
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 2 ** 26
    virtual_nodes: int = 150
    prefix_token_count: int = 256
    prefix_hash_load_factor: float = 1.25
    prefix_hash_balance_abs_threshold: float = 10
    max_idle_secs: float = 4 * 3600.0
    selection_accounting_ttl_ms: float = 2000.0
    kv_pressure_window_secs: float = 0.0


class LoadBalancingPolicy(Protocol):
    name: str

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        """Picks one of ``workers`` (all routable, one model) or None."""
        ...

    def on_worker_removed(self, worker: Worker) -> None:
        """Forgets whatever the policy keeps about ``worker``."""
        ...

    def maintenance(self) -> None:
        """Periodic upkeep (eviction); cheap when there is nothing to do."""
        ...


class PolicyBase:
    """No-op hooks for policies that keep no per-worker state."""

    name = ""

    def __init__(self, config: PolicyConfig | None = None,
                 rng: random.Random | None = None) -> None:
        self.config = config or PolicyConfig()
        self._rng = rng or random.Random()

    def on_worker_removed(self, worker: Worker) -> None:
        return None

    def maintenance(self) -> None:
        return None


def least_loaded(workers: Sequence[Worker]) -> Worker | None:
    """Min by ``(load, processed, position)`` (SMG #1714): spreads ties instead of piling on
    the first worker, and is deterministic for replicas that saw the same traffic."""
    if not workers:
        return None
    best, best_load = workers[0], workers[0].load
    for worker in workers:
        load = worker.load
        if load < best_load or (load == best_load and worker.processed < best.processed):
            best, best_load = worker, load
    return best


# Tokens of a prompt's opening that pick a new prefix's worker among equally loaded ones: long
# enough to get past a chat template's fixed opening into the system prompt.
PLACEMENT_KEY_TOKENS = 256


def stable_hash(data: bytes) -> int:
    """A 64-bit hash that is the same in every process (router replicas agree)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class RoundRobinPolicy(PolicyBase):
    """Cycles through the workers in url order."""

    name = "round_robin"

    def __init__(self, config: PolicyConfig | None = None,
                 rng: random.Random | None = None) -> None:
        super().__init__(config, rng)
        self._counter = itertools.count()

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        if not workers:
            return None
        return workers[next(self._counter) % len(workers)]


class RandomPolicy(PolicyBase):
    """Picks uniformly at random."""

    name = "random"

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        return self._rng.choice(list(workers)) if workers else None


class PowerOfTwoPolicy(PolicyBase):
    """Samples two workers and keeps the one with fewer in-flight requests."""

    name = "power_of_two"

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        if not workers:
            return None
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(list(workers), 2)
        return a if a.load <= b.load else b


class HashRing:
    """``virtual_nodes`` points per worker url on a 64-bit ring; lookup walks clockwise."""

    def __init__(self, urls: Sequence[str], virtual_nodes: int) -> None:
        points = sorted(
            (stable_hash(f"{url}#{i}".encode()), url) for url in urls for i in range(virtual_nodes)
        )
        self._hashes = [h for h, _ in points]
        self._urls = [u for _, u in points]

    def lookup(self, key_hash: int, allowed: Callable[[str], bool] | None = None) -> str | None:
        if not self._hashes:
            return None
        start = bisect.bisect_left(self._hashes, key_hash)
        n = len(self._hashes)
        for step in range(n):
            url = self._urls[(start + step) % n]
            if allowed is None or allowed(url):
                return url
        return None


class ConsistentHashingPolicy(PolicyBase):
    """Sticky by routing key through a hash ring of the routable workers (150 virtual nodes
    each): a key moves only when its worker leaves the routable set (unhealthy, breaker open,
    removed) or, for ~1/n of keys, when a worker joins. No key -> random."""

    name = "consistent_hashing"

    def __init__(self, config: PolicyConfig | None = None,
                 rng: random.Random | None = None) -> None:
        super().__init__(config, rng)
        self._ring: HashRing | None = None
        self._ring_urls: tuple[str, ...] = ()
        self._positions: dict[str, int] = {}

    def _ring_for(self, workers: Sequence[Worker]) -> tuple[HashRing, dict[str, int]]:
        urls = tuple(w.url for w in workers)
        if self._ring is None or urls != self._ring_urls:
            self._ring = HashRing(sorted(urls), self.config.virtual_nodes)
            self._ring_urls = urls
            self._positions = {url: i for i, url in enumerate(urls)}
        return self._ring, self._positions

    def key_of(self, info: SelectionInfo) -> bytes | None:
        return info.routing_key.encode() if info.routing_key else None

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        if not workers:
            return None
        key = self.key_of(info)
        if key is None:
            return self._rng.choice(list(workers))
        ring, positions = self._ring_for(workers)
        url = ring.lookup(stable_hash(key))
        return workers[positions[url]] if url is not None else None


class ManualPolicy(PolicyBase):
    """SMG's ``manual``: a routing key is pinned to the worker it was first given (the least
    loaded then) and stays there while that worker is routable, even when workers are added;
    it is re-assigned only when its worker is not routable. Idle keys expire after
    ``max_idle_secs``. No key -> random."""

    name = "manual"

    def __init__(self, config: PolicyConfig | None = None,
                 rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, rng)
        self._clock = clock
        self._pins: dict[str, tuple[str, float]] = {}

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        if not workers:
            return None
        if not info.routing_key:
            return self._rng.choice(list(workers))
        now = self._clock()
        pinned = self._pins.get(info.routing_key)
        if pinned is not None:
            worker = next((w for w in workers if w.url == pinned[0]), None)
            if worker is not None:
                self._pins[info.routing_key] = (worker.url, now)
                return worker
        worker = least_loaded(workers)
        assert worker is not None
        self._pins[info.routing_key] = (worker.url, now)
        return worker

    def on_worker_removed(self, worker: Worker) -> None:
        self._pins = {k: v for k, v in self._pins.items() if v[0] != worker.url}

    def maintenance(self) -> None:
        cutoff = self._clock() - self.config.max_idle_secs
        self._pins = {k: v for k, v in self._pins.items() if v[1] >= cutoff}

    @property
    def pinned_keys(self) -> int:
        return len(self._pins)


class PrefixHashPolicy(ConsistentHashingPolicy):
    """Hashes the first ``prefix_token_count`` prompt tokens onto the ring (a light alternative
    to the radix tree); when the ring's pick is overloaded (load > ``load_factor`` x mean and
    more than ``balance_abs`` above the least loaded), the least-loaded worker instead."""

    name = "prefix_hash"

    def key_of(self, info: SelectionInfo) -> bytes | None:
        if not info.token_ids:
            # Untokenized (HTTP workers): ~4 characters a token, as SMG.
            return info.text[: 4 * self.config.prefix_token_count].encode() or None
        head = array("I", info.token_ids[: self.config.prefix_token_count])
        return head.tobytes()

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        worker = super().select_worker(workers, info)
        if worker is None or len(workers) < 2 or not worker.in_flight:
            return worker
        mean = sum(w.in_flight for w in workers) / len(workers)
        if worker.in_flight > self.config.prefix_hash_load_factor * mean:
            lightest = least_loaded(workers)
            assert lightest is not None
            if worker.in_flight - lightest.in_flight > \
                    self.config.prefix_hash_balance_abs_threshold:
                return lightest
        return worker


@dataclass
class CacheAwareStats:
    hits: int = 0
    misses: int = 0
    spills: int = 0
    pressure_moves: int = 0


class DispatchBookings:
    """Prompt blocks dispatched to a worker whose KV events have not reported them yet.

    A request's prefix is cached on its worker as soon as it prefills, but the event arrives
    only afterwards; without bookings, a burst of requests sharing a new prefix is spread over
    the fleet as misses. A booking lasts ``ttl`` seconds (SMG's --selection-accounting-ttl-ms),
    long enough for the engine's own event to take over.
    """

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._holders: dict[int, dict[str, float]] = {}  # chain hash -> url -> expiry
        self._expiries: deque[tuple[float, int, str]] = deque()
        self._per_worker: Counter[str] = Counter()  # live booked blocks per url

    def __len__(self) -> int:
        return len(self._holders)

    def blocks(self, url: str) -> int:
        """Blocks booked on ``url`` that have not expired (nor been forgotten)."""
        self._expire(self._clock())
        return self._per_worker[url]

    def _expire(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] <= now:
            _, chash, url = self._expiries.popleft()
            holders = self._holders.get(chash)
            if holders is not None and holders.get(url, now + 1) <= now:
                del holders[url]
                self._per_worker[url] -= 1
                if not holders:
                    del self._holders[chash]

    def book(self, url: str, chain: Sequence[int]) -> None:
        if self.ttl <= 0:
            return
        expiry = self._clock() + self.ttl
        for chash in chain:
            holders = self._holders.setdefault(chash, {})
            if url not in holders:
                self._per_worker[url] += 1
            holders[url] = expiry
            self._expiries.append((expiry, chash, url))

    def match(self, chain: Sequence[int], block_size: int) -> dict[str, int]:
        """Booked leading tokens of a prompt's block chain, per worker."""
        if self.ttl <= 0 or not self._holders:
            return {}
        self._expire(self._clock())
        result: dict[str, int] = {}
        alive: set[str] | None = None
        by_block = self._holders
        for depth, chash in enumerate(chain, 1):
            holders = by_block.get(chash)
            if not holders:
                break
            if alive is None:
                alive = set(holders)
            else:
                alive.intersection_update(holders)  # in place: no new set per block
                if not alive:
                    break
            for url in alive:
                result[url] = depth * block_size
        return result

    def forget(self, url: str) -> None:
        for chash in [h for h, holders in self._holders.items() if url in holders]:
            del self._holders[chash][url]
            if not self._holders[chash]:
                del self._holders[chash]
        self._per_worker.pop(url, None)


class SharedPrefixes:
    """How many requests' cached prefix ended at a given block (bounded, least recent out).

    A prefix that many requests stop at is a shared one (a system prompt, a few-shot block);
    a conversation's own history is where only that conversation's next turn stops."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._counts: OrderedDict[int, int] = OrderedDict()

    def note(self, chain_hash: int) -> int:
        """Counts one more request ending at ``chain_hash``; returns the count so far."""
        counts = self._counts
        count = counts.pop(chain_hash, 0) + 1
        counts[chain_hash] = count
        if len(counts) > self.capacity:
            counts.popitem(last=False)
        return count


class CacheAwarePolicy(PolicyBase):
    """SMG's cache_aware.

    Approximate mode (no KV events): one token radix tree per model records which worker was
    sent which prompt (a second, character tree holds requests that carry text instead of
    token ids: HTTP workers, whose prompts the gateway never tokenizes).
    ``match_rate = matched / len(prompt)``; above ``cache_threshold`` the least-loaded worker
    among those holding the match is chosen, else (a miss) the least-loaded worker of all.
    Then the per-request spill gate (SMG 1.13): if the choice's load exceeds
    ``balance_rel_threshold`` x mean *and* mean + ``balance_abs_threshold``, the least-loaded
    worker takes it instead (and becomes a new holder of the prefix). The prompt is then
    inserted for the chosen worker. ``maintenance`` evicts LRU entries down to
    ``max_tree_size`` tokens; a removed worker is purged from the tree.

    Precise mode (``kv_index`` attached): for workers whose KV events are live, the cached
    prefix length comes from the block index fed by those events instead of the tree; the
    worker with the longest cached prefix wins, ties -> least loaded; a cached prefix of at most
    ``cache_threshold`` of the prompt counts as a miss -> least loaded (SMG applies no threshold
    here, and then routes every prompt by its shared chat-template opening); the same spill
    gate applies. Workers without events (UNIMPLEMENTED) keep using the
    approximate tree. Cache pressure (:meth:`_relieve_pressure`, opt-in): a hit on a *shared*
    prefix whose worker is evicting goes to a worker with room instead, so a hot prefix is copied
    out before its worker's evictions start costing the conversations that live there.

    Load is :attr:`Worker.load` (this router's in-flight requests, or the worker's own pushed
    count when higher). A miss among equally loaded workers goes to the emptiest cache, then by
    a hash of the prompt's opening (:meth:`_place_new_prefix`), so router replicas agree.
    """

    name = "cache_aware"

    def __init__(self, config: PolicyConfig | None = None, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(config, rng)
        self.tree = RadixTree()
        # Character tree for requests that carry text, not token ids (HTTP workers; SMG's
        # StringTree): same structure, keyed by Unicode code points.
        self.text_tree = RadixTree()
        self.kv_index: KvIndex | None = None
        self.stats = CacheAwareStats()
        self._clock = clock
        self.bookings = DispatchBookings(config.selection_accounting_ttl_ms / 1000.0
                                         if config else 2.0, clock)
        self.shared_prefixes = SharedPrefixes()

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        if not workers:
            return None
        tokens = array("I", info.token_ids)
        tree = self.tree
        index = self.kv_index
        if not tokens and info.text:
            tokens.frombytes(info.text.encode("utf-32-le"))  # code points
            tree, index = self.text_tree, None  # KV events index tokens, not text
        if not tokens:
            return least_loaded(workers)
        live = index.live_urls if index is not None else frozenset()
        tree_scores: dict[str, int] | None = None
        chain: list[int] = []
        if live:
            # Precise: cached prefix per worker from the event index; workers without live
            # events are scored from the tree (computed only if such a worker is offered).
            assert index is not None
            scores: dict[str, int] = {}
            if index.block_size:
                chain = prompt_chain(tokens, index.block_size)
                scores = index.match_chain(chain)
                # Prompts dispatched moments ago are cached by the time they prefill, but no
                # event says so yet: count them for the worker they went to.
                for url, booked in self.bookings.match(chain, index.block_size).items():
                    if booked > scores.get(url, 0):
                        scores[url] = booked
        else:
            match = tree.prefix_match(tokens)
            scores = dict.fromkeys(match.tenants, match.matched)
        # One pass: the best (score desc, load, processed), the least loaded, the total load.
        best = lightest = workers[0]
        best_score = -1
        total = 0
        loads: dict[str, int] = {}
        for worker in workers:
            url = worker.url
            load = loads[url] = worker.load
            total += load
            if not live or url in live:
                score = scores.get(url, 0)
            else:
                if tree_scores is None:
                    tree_scores = tree.match_per_tenant(tokens)
                score = tree_scores.get(url, 0)
            if score > best_score or (score == best_score and (
                    load < loads[best.url] or (load == loads[best.url]
                                               and worker.processed < best.processed))):
                best, best_score = worker, score
            if load < loads[lightest.url] or (load == loads[lightest.url]
                                              and worker.processed < lightest.processed):
                lightest = worker
        # A match only counts above cache_threshold of the prompt, in both modes: every prompt
        # shares its chat template's opening tokens, and following those alone would pile all
        # traffic onto whichever worker cached them first (seen with real SGLang workers).
        hit = best_score > 0 and best_score / len(tokens) > self.config.cache_threshold
        chosen = best if hit else self._place_new_prefix(workers, loads, loads[lightest.url],
                                                         tokens, index)
        if hit and chain and best.url in live:
            assert index is not None
            chosen = self._relieve_pressure(best, chain[best_score // index.block_size - 1],
                                            workers, loads, live, tokens, index)
        if hit:
            self.stats.hits += 1
        else:
            self.stats.misses += 1
        # Spill gate (SMG 1.13): an overloaded choice goes to the least-loaded worker. The
        # absolute margin is capped at the in-flight count's natural swing at this mean (two
        # standard deviations of a Poisson count, at least 4), as SMG does, so a small pool
        # spills at all instead of leaving workers idle.
        mean = total / len(workers)
        abs_margin = self.config.balance_abs_threshold
        abs_margin = min(abs_margin, max(min(4.0, abs_margin), 2.0 * math.sqrt(mean)))
        chosen_load = loads[chosen.url]
        if (chosen is not lightest and chosen_load > mean * self.config.balance_rel_threshold
                and chosen_load > mean + abs_margin):
            self.stats.spills += 1
            chosen = lightest
        if not live or chosen.url not in live:
            # The tree stands in for events the chosen worker does not publish.
            tree.insert(tokens, chosen.url, self._clock())
        elif chain:
            self.bookings.book(chosen.url, chain)
        return chosen

    def _place_new_prefix(self, workers: Sequence[Worker], loads: dict[str, int],
                          lightest: int, tokens: array, index: KvIndex | None) -> Worker:
        """A miss: the least-loaded worker; among equally loaded ones the emptiest cache, then
        the one the prompt's opening tokens hash to (rendezvous).

        With KV events a cache's size is its blocks in the shared event index plus those this
        router booked and no event reported yet, and the hash is the same everywhere: router
        replicas that have not yet heard where a new prefix went still tend to send it to the
        same worker, where it is about to be cached, instead of each prefilling it somewhere
        else. Without events, "emptiest" is the fewest requests this router has sent there."""
        tied = [w for w in workers if loads[w.url] == lightest]
        if len(tied) == 1:
            return tied[0]
        key = tokens[:PLACEMENT_KEY_TOKENS].tobytes()
        if index is not None and index.live_urls:
            bookings = self.bookings
            return min(tied, key=lambda w: (index.blocks(w.url) + bookings.blocks(w.url),
                                            -stable_hash(key + w.url.encode())))
        return min(tied, key=lambda w: (w.processed, -stable_hash(key + w.url.encode())))

    def _relieve_pressure(self, best: Worker, match_end: int, workers: Sequence[Worker],
                          loads: dict[str, int], live: AbstractSet[str],
                          tokens: array, index: KvIndex) -> Worker:
        """``best`` holds the request's longest cached prefix; another worker when that prefix
        is a shared one (several requests have stopped at its last block), ``best`` reported
        an eviction within ``kv_pressure_window_secs`` (its cache is full), and a worker with
        room exists: live events, no recent eviction, at most half ``best``'s cached blocks,
        no more load.

        The request pays for prefilling the shared prefix once on the new worker; in return
        the conversations that start there stop competing for ``best``'s full cache, where
        they would lose their history to evictions between turns. Among several workers with
        room, the emptiest by the event index (in steps of 64 blocks, so event timing between
        replicas does not flip it), then a hash of the prompt's opening: replicas agree."""
        window = self.config.kv_pressure_window_secs
        if (window <= 0 or self.shared_prefixes.note(match_end) < 2
                or not index.evicted_within(best.url, window)):
            return best
        limit = index.blocks(best.url) // 2
        best_load = loads[best.url]
        roomy = [w for w in workers
                 if w.url in live and loads[w.url] <= best_load
                 and index.blocks(w.url) <= limit
                 and not index.evicted_within(w.url, window)]
        if not roomy:
            return best
        # Only what every replica sees (the event index, the prompt) ranks them, so replicas
        # copy a hot prefix to the same worker instead of each to another (docs/routing.md).
        key = tokens[:PLACEMENT_KEY_TOKENS].tobytes()
        self.stats.pressure_moves += 1
        return min(roomy, key=lambda w: (index.blocks(w.url) // 64,
                                         -stable_hash(key + w.url.encode())))

    def on_worker_removed(self, worker: Worker) -> None:
        self.tree.remove_tenant(worker.url)
        self.text_tree.remove_tenant(worker.url)
        self.bookings.forget(worker.url)

    def maintenance(self) -> None:
        self.tree.evict(self.config.max_tree_size)
        self.text_tree.evict(self.config.max_tree_size)  # characters, as SMG


_POLICIES: dict[str, type[PolicyBase]] = {
    p.name: p for p in (RoundRobinPolicy, RandomPolicy, PowerOfTwoPolicy, CacheAwarePolicy,
                        ConsistentHashingPolicy, ManualPolicy, PrefixHashPolicy)
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def create_policy(name: str, config: PolicyConfig | None = None,
                  rng: random.Random | None = None) -> LoadBalancingPolicy:
    try:
        cls = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None
    return cls(config, rng)  # type: ignore[return-value]


__all__ = ["SelectionInfo", "PolicyConfig", "LoadBalancingPolicy", "create_policy",
           "POLICY_NAMES", "least_loaded", "stable_hash", "HashRing"]
