"""Precise cache_aware: the block index, stream sequencing and recovery, and real sim workers.

Index and sequencing tests feed batches built from the real ``smg.grpc.common`` protobuf
classes. The recovery tests drive :class:`KvSubscription` with a scripted stream of such
batches (a stand-in for a worker whose stream breaks on cue, which a real worker does not do on
demand). The last tests follow real ``sim`` workers' event streams over gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from smg_grpc_proto.generated import common_pb2

from services.router.kv_index import Action, KvIndex, KvStream, prompt_chain
from services.router.kv_sync import KvSubscription
from services.router.policies import CacheAwarePolicy, PolicyConfig, SelectionInfo
from services.router.resilience import UpstreamError
from services.router.workers import Health, ModelCard, Worker
from tests.router.fleet import gen, generate, running_router, sim_config, sim_fleet, url

BS = 4


def stored(blocks: Sequence[tuple[int, Sequence[int]]], parent: int | None = None,
           **kw: object) -> common_pb2.KvCacheEvent:
    ev = common_pb2.KvCacheEvent(stored=common_pb2.KvBlocksStored(
        blocks=[common_pb2.KvBlock(block_hash=h, token_ids=list(t), block_size=BS)
                for h, t in blocks], **kw))
    if parent is not None:
        ev.stored.parent_block_hash = parent
    return ev


def removed(*hashes: int) -> common_pb2.KvCacheEvent:
    return common_pb2.KvCacheEvent(removed=common_pb2.KvBlocksRemoved(block_hashes=list(hashes)))


def cleared() -> common_pb2.KvCacheEvent:
    return common_pb2.KvCacheEvent(cleared=common_pb2.KvCacheCleared())


def batch(seq: int, *events: common_pb2.KvCacheEvent, load_only: bool = False,
          snapshot: tuple[int, int] | None = None) -> common_pb2.KvEventBatch:
    b = common_pb2.KvEventBatch(sequence_number=seq, events=list(events))
    b.load.running_requests = seq
    b.load.load_only = load_only
    if snapshot is not None:
        b.snapshot.index, b.snapshot.count = snapshot
    return b


PROMPT = list(range(100, 116))  # 4 blocks
BLOCKS = [(1000 + i, PROMPT[i * BS:(i + 1) * BS]) for i in range(4)]


def test_stored_chain_matches_prompt_prefixes() -> None:
    index = KvIndex()
    index.apply_event("a", stored(BLOCKS[:3]))
    index.apply_event("b", stored(BLOCKS[:1]))
    index.apply_event("b", stored(BLOCKS[1:2], parent=1000))  # chained through the parent
    assert index.block_size == BS
    assert index.match(PROMPT) == {"a": 12, "b": 8}
    assert index.match(PROMPT, ["b"]) == {"b": 8}
    assert index.match(PROMPT[:3]) == {}  # less than a block
    assert index.match([7] + PROMPT[1:]) == {}
    # The router's hash is content-based: engine hashes do not matter across workers.
    index.apply_event("c", stored([(5, BLOCKS[0][1]), (6, BLOCKS[1][1])]))
    assert index.match(PROMPT)["c"] == 8
    assert index.blocks() == 3 and index.blocks("a") == 3


def test_removed_cleared_and_unknown_parents() -> None:
    index = KvIndex()
    index.apply_event("a", stored(BLOCKS))
    index.apply_event("a", removed(1002, 1003, 424242))
    assert index.match(PROMPT) == {"a": 8}
    index.apply_event("a", stored([(2000, [1, 2, 3, 4])], parent=999))  # parent unknown
    assert index.blocks("a") == 2
    index.apply_event("a", cleared())
    assert index.match(PROMPT) == {} and index.blocks() == 0


def test_lora_and_remote_blocks_do_not_match() -> None:
    index = KvIndex()
    index.apply_event("a", stored(BLOCKS, lora_name="adapter-1"))
    index.apply_event("b", stored(BLOCKS, locality=common_pb2.KV_CACHE_LOCALITY_REMOTE))
    assert index.match(PROMPT) == {}


def test_drop_worker_keeps_the_others() -> None:
    index = KvIndex()
    index.apply_event("a", stored(BLOCKS))
    index.apply_event("b", stored(BLOCKS[:2]))
    index.drop_worker("a")
    assert index.match(PROMPT) == {"b": 8}


def test_prompt_chain_matches_index_hashing() -> None:
    index = KvIndex(block_size=BS)
    index.apply_event("a", stored(BLOCKS))
    assert len(prompt_chain(PROMPT, BS)) == 4 and index.blocks() == 4


def test_stream_sequencing() -> None:
    s = KvStream()
    assert s.resume_from() == 0
    assert s.accept(batch(0, load_only=True)) is Action.SKIP
    assert s.accept(batch(5, cleared(), snapshot=(0, 2))) is Action.APPLY
    assert s.last_sequence == 0  # mid-snapshot
    assert s.accept(batch(6, snapshot=(1, 2))) is Action.APPLY
    assert s.last_sequence == 6
    assert s.accept(batch(7)) is Action.APPLY
    assert s.accept(batch(7)) is Action.SKIP  # duplicate
    assert s.accept(batch(7, load_only=True)) is Action.SKIP  # heartbeat
    assert s.accept(batch(9)) is Action.GAP
    assert s.resume_from() == 8
    assert s.accept(batch(9)) is Action.GAP  # the replay must start at 8
    assert s.accept(batch(8)) is Action.APPLY
    s.reset()
    assert s.resume_from() == 0


def _worker(url: str) -> Worker:
    return Worker(url=url, card=ModelCard("m"), health=Health.READY)


class ScriptedStream:
    """Subscriptions answered from a script: each entry is (batches, error code or None)."""

    def __init__(self, script: list[tuple[list[common_pb2.KvEventBatch], str | None]]) -> None:
        self.script = script
        self.starts: list[int] = []
        self.done = asyncio.Event()

    async def __call__(self, start: int) -> AsyncIterator[common_pb2.KvEventBatch]:
        self.starts.append(start)
        if not self.script:
            self.done.set()
            await asyncio.Event().wait()  # stays open, like an idle worker
        batches, error = self.script.pop(0)
        for b in batches:
            yield b
        if error is not None:
            raise UpstreamError(error, "scripted")


async def _run(sub: KvSubscription, stream: ScriptedStream) -> None:
    task = asyncio.create_task(sub.run())
    await asyncio.wait_for(stream.done.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_gap_resubscribes_from_the_last_sequence() -> None:
    index = KvIndex()
    stream = ScriptedStream([
        ([batch(1, stored(BLOCKS[:1])), batch(3, stored(BLOCKS[2:3], parent=1001))], None),
        ([batch(2, stored(BLOCKS[1:2], parent=1000)),
          batch(3, stored(BLOCKS[2:3], parent=1001))], None),
    ])
    worker = _worker("a")
    sub = KvSubscription(worker, index, stream, min_backoff=0.001)
    await _run(sub, stream)
    assert stream.starts == [0, 2, 4] and sub.gaps == 1
    assert index.match(PROMPT) == {"a": 12} and index.is_live("a")
    assert worker.engine_load is not None and worker.engine_load.source == "events"


async def test_out_of_range_and_data_loss_start_over() -> None:
    for code in ("OUT_OF_RANGE", "DATA_LOSS"):
        index = KvIndex()
        stream = ScriptedStream([
            ([batch(1, stored(BLOCKS))], "UNAVAILABLE"),  # worker blip: resume, keep state
            ([], code),                                   # cursor gone: drop and start over
            ([batch(9, cleared(), stored(BLOCKS[:1]), snapshot=(0, 1))], None),
        ])
        sub = KvSubscription(_worker("a"), index, stream, min_backoff=0.001)
        await _run(sub, stream)
        assert stream.starts == [0, 2, 0, 10], code
        assert sub.resets == 1 and index.match(PROMPT) == {"a": 4}


async def test_unimplemented_means_approximate_for_that_worker() -> None:
    index = KvIndex()
    stream = ScriptedStream([([], "UNIMPLEMENTED")])
    sub = KvSubscription(_worker("a"), index, stream)
    await asyncio.wait_for(sub.run(), 5)  # returns: no more subscriptions
    assert sub.unimplemented and not index.is_live("a")


def test_precise_policy_prefers_the_longest_cached_prefix() -> None:
    ws = [_worker(f"grpc://w{i}:1") for i in range(3)]
    index = KvIndex()
    index.apply_event(ws[1].url, stored(BLOCKS[:2]))
    index.apply_event(ws[2].url, stored(BLOCKS))
    for w in ws:
        index.set_live(w.url, True)
    policy = CacheAwarePolicy()
    policy.kv_index = index
    assert policy.select_worker(ws, SelectionInfo(token_ids=PROMPT)) is ws[2]
    ws[2].in_flight = 1000  # load-aware: the spill gate moves it
    assert policy.select_worker(ws, SelectionInfo(token_ids=PROMPT)) is not ws[2]
    ws[2].in_flight = 0
    # no overlap -> least loaded
    ws[0].processed = ws[2].processed = 5
    assert policy.select_worker(ws, SelectionInfo(token_ids=[1] * 16)) is ws[1]


def test_precise_policy_ignores_a_short_shared_opening() -> None:
    """A cached prefix of at most cache_threshold of the prompt is a miss: every prompt shares
    its chat template's first tokens, and following those alone sends all traffic to one worker
    (seen with two real SGLang workers: 128 requests to one, none to the other)."""
    ws = [_worker(f"grpc://w{i}:1") for i in range(2)]
    index = KvIndex()
    index.apply_event(ws[0].url, stored(BLOCKS[:1]))  # 4 of 16 tokens: 25% < 30%
    for w in ws:
        index.set_live(w.url, True)
    policy = CacheAwarePolicy(PolicyConfig(selection_accounting_ttl_ms=0))  # events only
    policy.kv_index = index
    ws[0].processed = 3  # otherwise idle and equal: the less used worker wins a miss
    assert policy.select_worker(ws, SelectionInfo(token_ids=PROMPT)) is ws[1]
    assert policy.stats.misses == 1
    index.apply_event(ws[0].url, stored(BLOCKS[1:2], parent=BLOCKS[0][0]))  # 50% cached
    assert policy.select_worker(ws, SelectionInfo(token_ids=PROMPT)) is ws[0]
    assert policy.stats.hits == 1


def test_precise_policy_books_dispatched_prompts_until_events_arrive() -> None:
    """A burst sharing a new prefix follows the first request instead of spreading as misses
    (no KV event yet says the prefix is cached); the booking expires after the TTL."""
    ws = [_worker(f"grpc://w{i}:1") for i in range(3)]
    index = KvIndex(block_size=BS)
    for w in ws:
        index.set_live(w.url, True)
    now = [100.0]
    policy = CacheAwarePolicy(PolicyConfig(selection_accounting_ttl_ms=500),
                              clock=lambda: now[0])
    policy.kv_index = index
    first = policy.select_worker(ws, SelectionInfo(token_ids=PROMPT))
    assert first is not None
    first.in_flight = 1  # the first request is still running
    for _ in range(3):
        assert policy.select_worker(ws, SelectionInfo(token_ids=PROMPT)) is first
    now[0] += 1.0  # past the TTL, and still no event: a miss again -> least loaded
    assert policy.select_worker(ws, SelectionInfo(token_ids=PROMPT)) is not first


def test_spill_margin_is_capped_at_the_natural_swing() -> None:
    """With 64 as the absolute margin, 8 idle workers and one with 12 in flight would never
    spill; the margin is capped at max(4, 2*sqrt(mean)) as in SMG."""
    ws = [_worker(f"grpc://w{i}:1") for i in range(8)]
    index = KvIndex()
    index.apply_event(ws[0].url, stored(BLOCKS))
    for w in ws:
        index.set_live(w.url, True)
    policy = CacheAwarePolicy(PolicyConfig(selection_accounting_ttl_ms=0))
    policy.kv_index = index
    ws[0].in_flight = 3
    assert policy.select_worker(ws, SelectionInfo(token_ids=PROMPT)) is ws[0]  # within swing
    ws[0].in_flight = 12
    assert policy.select_worker(ws, SelectionInfo(token_ids=PROMPT)) is not ws[0]
    assert policy.stats.spills == 1


def test_removed_blocks_mark_a_worker_as_evicting_for_a_while() -> None:
    now = [10.0]
    index = KvIndex(clock=lambda: now[0])
    index.apply_event("a", stored(BLOCKS))
    index.apply_event("b", stored(BLOCKS))
    index.apply_event("b", cleared())  # a flush is not an eviction
    assert not index.evicted_within("a", 5) and not index.evicted_within("b", 5)
    index.apply_event("a", removed(BLOCKS[3][0]))
    assert index.evicted_within("a", 5) and not index.evicted_within("b", 5)
    now[0] += 6
    assert not index.evicted_within("a", 5)


def _pressure_fleet(window: float = 5.0) -> tuple[list[Worker], KvIndex, CacheAwarePolicy]:
    """Three live workers; w0 holds a shared 8-token prefix (two blocks) and 8 more blocks of
    other prompts, w1 holds the other prompts too, w2 is empty."""
    now = [100.0]
    ws = [_worker(f"grpc://w{i}:1") for i in range(3)]
    index = KvIndex(block_size=BS, clock=lambda: now[0])
    index.apply_event(ws[0].url, stored(BLOCKS[:2]))
    filler = [(5000 + i, [9000 + i] * BS) for i in range(8)]
    index.apply_event(ws[0].url, stored(filler))
    index.apply_event(ws[1].url, stored(filler))
    for w in ws:
        index.set_live(w.url, True)
    policy = CacheAwarePolicy(PolicyConfig(kv_pressure_window_secs=window,
                                           selection_accounting_ttl_ms=0),
                              clock=lambda: now[0])
    policy.kv_index = index
    return ws, index, policy


def _turn(n: int) -> SelectionInfo:
    """A first turn: the shared 8-token prefix, then 4 tokens of its own."""
    return SelectionInfo(token_ids=PROMPT[:8] + [7000 + n] * BS)


def test_a_shared_prefix_on_an_evicting_worker_is_copied_to_one_with_room() -> None:
    """Conversations that all start with one system prompt pile onto the worker holding it;
    once that worker evicts (its cache is full, so their histories will be lost between
    turns) new ones go to a worker with room, which then holds the prefix too."""
    ws, index, policy = _pressure_fleet()
    assert policy.select_worker(ws, _turn(1)) is ws[0]  # first request at this prefix
    assert policy.select_worker(ws, _turn(2)) is ws[0]  # shared, but w0 is not evicting
    index.apply_event(ws[0].url, removed(5000))
    index.apply_event(ws[1].url, removed(5001))  # w1 evicts too: it has no room either
    moved = policy.select_worker(ws, _turn(3))
    assert moved is ws[2] and policy.stats.pressure_moves == 1
    # A conversation's own history is not a shared prefix: its next turn stays on w0.
    index.apply_event(ws[0].url, stored(BLOCKS[2:3], parent=BLOCKS[1][0]))
    history = PROMPT[:12]
    assert policy.select_worker(ws, SelectionInfo(token_ids=history + [1] * BS)) is ws[0]
    # Once w2 holds the prefix as well, the two share it by load, as any two holders do.
    index.apply_event(ws[2].url, stored(BLOCKS[:2]))
    ws[2].in_flight = 1
    assert policy.select_worker(ws, _turn(4)) is ws[0]


def test_pressure_moves_are_off_by_default_and_need_a_worker_with_room() -> None:
    assert PolicyConfig().kv_pressure_window_secs == 0  # off unless asked for
    ws, index, policy = _pressure_fleet(window=0)
    index.apply_event(ws[0].url, removed(5000))
    for n in range(3):
        assert policy.select_worker(ws, _turn(n)) is ws[0]
    ws, index, policy = _pressure_fleet()
    index.apply_event(ws[0].url, removed(5000))
    index.apply_event(ws[2].url, stored([(6000 + i, [8000 + i] * BS) for i in range(8)]))
    ws[1].in_flight = 1  # w1 has room by blocks (none), but more load than w0
    index.apply_event(ws[1].url, cleared())
    for n in range(3):  # w2 is as full as w0, w1 busier: nowhere better to go
        assert policy.select_worker(ws, _turn(n)) is ws[0]
    assert policy.stats.pressure_moves == 0


# ----------------------------------------------------------------- real sim workers


async def _wait(predicate: object, timeout: float = 5.0) -> None:
    async def loop() -> None:
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)
    await asyncio.wait_for(loop(), timeout)


async def test_router_follows_sim_workers_events_and_replicas_agree() -> None:
    async with sim_fleet(*(sim_config() for _ in range(3))) as workers, \
            running_router(workers, policy="cache_aware") as r1, \
            running_router(workers, policy="cache_aware") as r2:
        model = r1.registry.all()[0].model_id
        await _wait(lambda: all(r.kv_indexes[model].is_live(url(w))
                                for r in (r1, r2) for w in workers))
        prompts = [list(range(1000 * p, 1000 * p + 64)) for p in range(4)]
        # Warm the caches through router 1 only; router 2 learns from the events alone.
        for p, prompt in enumerate(prompts):
            out, state = await generate(r1, gen(prompt, f"warm{p}", max_new=2))
            assert out[-1].complete.cached_tokens == 0
        holders = {p: state_url for p, state_url in
                   ((p, next(iter(r1.kv_indexes[model].match(prompt)))) for p, prompt in
                    enumerate(prompts) if r1.kv_indexes[model].match(prompt))}

        def settled() -> bool:
            return all(r2.kv_indexes[model].match(pr) == r1.kv_indexes[model].match(pr)
                       and len(r1.kv_indexes[model].match(pr)) == 1 for pr in prompts)
        await _wait(settled)
        assert len(holders) == 4
        for p, prompt in enumerate(prompts):
            follow = prompt + [7, 7, 7, 7]
            picks = []
            for r in (r1, r2):
                out, state = await generate(r, gen(follow, f"follow{p}-{id(r)}", max_new=2))
                picks.append(state.worker.url)  # type: ignore[union-attr]
                assert out[-1].complete.cached_tokens >= 60  # a real cache hit on the worker
            assert picks[0] == picks[1] == holders[p]


async def test_removed_worker_leaves_the_index() -> None:
    async with sim_fleet(sim_config(), sim_config()) as workers, \
            running_router(workers, policy="cache_aware") as router:
        model = router.registry.all()[0].model_id
        index = router.kv_indexes[model]
        await _wait(lambda: all(index.is_live(url(w)) for w in workers))
        await generate(router, gen(range(64), "x", max_new=2))
        await _wait(lambda: bool(index.match(list(range(64)))))
        (holder,) = index.match(list(range(64)))
        job = router.submit_remove_worker(holder)
        await asyncio.wait_for(job.done.wait(), 5)
        assert index.match(list(range(64))) == {} and holder not in router.kv_subscriptions


async def test_disable_kv_events_keeps_cache_aware_approximate() -> None:
    async with sim_fleet(sim_config(), sim_config()) as workers, \
            running_router(workers, policy="cache_aware", disable_kv_events=True) as router:
        assert not router.kv_subscriptions and not router.kv_indexes
        prompt = list(range(500, 600))
        _, first = await generate(router, gen(prompt, "a", max_new=2))
        out, again = await generate(router, gen(prompt + [1, 2], "b", max_new=2))
        assert again.worker is first.worker  # the tree remembered where the prefix went
        assert out[-1].complete.cached_tokens >= 96
