"""The KV event log, the block prefix cache and the kv_events descriptor (plain Python)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from services.worker.kv_events import (
    BlocksRemoved,
    BlocksStored,
    CacheCleared,
    CursorGone,
    KvEventLog,
    SubscriberBehind,
    block_hash,
    chain_hashes,
    kv_events_descriptor,
)
from services.worker.prefix_cache import BlockCache


def test_block_hash_chains() -> None:
    a = block_hash(None, [1, 2, 3, 4])
    assert a == block_hash(None, [1, 2, 3, 4]) and -(2**63) <= a < 2**63
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(None, [5, 6, 7, 8])  # position-bound
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4) == [a, block_hash(a, [5, 6, 7, 8])]


def test_sequence_replay_and_cursor_gone() -> None:
    log = KvEventLog(block_size=4, max_batches=3)
    assert log.last_sequence == 0 and log.publish([]) == 0
    for i in range(5):
        assert log.stored([(i + 1, [i] * 4)], None) == i + 1
    assert [b.sequence_number for b in log.since(3)] == [3, 4, 5]
    assert log.since(6) == []  # the next one: nothing yet, not an error
    with pytest.raises(CursorGone, match="no longer held"):
        log.since(2)
    with pytest.raises(CursorGone, match="ahead"):
        log.since(7)
    assert log.oldest_sequence == 3


def test_snapshot_parents_first() -> None:
    log = KvEventLog(block_size=2)
    assert log.snapshot() == []
    log.stored([(10, [1, 2]), (11, [3, 4])], None)
    log.stored([(12, [5, 6])], 11)
    log.stored([(20, [9, 9])], None)
    log.removed([20])
    chunks = log.snapshot()
    assert len(chunks) == 1 and chunks[0].sequence_number == log.last_sequence == 4
    assert chunks[0].snapshot is not None and chunks[0].snapshot.blocks == 3
    events = chunks[0].events
    assert isinstance(events[0], CacheCleared)
    order = [(e.blocks[0].block_hash, e.parent_block_hash) for e in events[1:]
             if isinstance(e, BlocksStored)]
    assert order == [(10, None), (11, 10), (12, 11)]
    log.cleared()
    assert log.live_blocks() == 0


async def test_subscribe_snapshot_then_live_and_heartbeat() -> None:
    log = KvEventLog(block_size=2)
    log.stored([(1, [1, 2])], None)
    stream = log.subscribe(0, heartbeat_s=0.05)
    async with contextlib.aclosing(stream):
        snap = await anext(stream)
        assert snap.snapshot is not None and snap.sequence_number == 1
        log.stored([(2, [3, 4])], 1)
        live = await anext(stream)
        assert live.sequence_number == 2 and live.snapshot is None
        assert isinstance(live.events[0], BlocksStored)
        beat = await asyncio.wait_for(anext(stream), 2)
        assert beat.load_only and beat.sequence_number == 2 and not beat.events


async def test_subscribe_resume_from_cursor() -> None:
    log = KvEventLog(block_size=2)
    for i in range(4):
        log.stored([(i + 1, [i, i])], i or None)
    stream = log.subscribe(3)
    async with contextlib.aclosing(stream):
        assert (await anext(stream)).sequence_number == 3
        assert (await anext(stream)).sequence_number == 4
        log.removed([4])
        batch = await asyncio.wait_for(anext(stream), 2)
        assert batch.sequence_number == 5 and isinstance(batch.events[0], BlocksRemoved)
    with pytest.raises(CursorGone):
        async for _ in log.subscribe(99):
            pass


async def test_slow_subscriber_falls_behind() -> None:
    log = KvEventLog(block_size=2, max_batches=2)
    log.stored([(1, [1, 1])], None)
    stream = log.subscribe(1)
    with pytest.raises(SubscriberBehind):
        async with contextlib.aclosing(stream):
            await anext(stream)
            for i in range(5):
                log.stored([(i + 2, [i, i])], None)
            await anext(stream)


async def test_publish_from_another_thread_wakes_subscriber() -> None:
    log = KvEventLog(block_size=2)
    stream = log.subscribe(0)
    async with contextlib.aclosing(stream):
        task = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(log.stored, [(7, [7, 7])], None)
        batch = await asyncio.wait_for(task, 2)
        assert batch.sequence_number == 1


# --------------------------------------------------------------------- block cache


def test_block_cache_match_insert_evict_events() -> None:
    log = KvEventLog(block_size=2)
    cache = BlockCache(block_size=2, capacity_tokens=6, events=log)  # 3 blocks
    tokens = [1, 2, 3, 4, 5]
    hashes = cache.hashes(tokens)
    assert len(hashes) == 2
    assert cache.insert(tokens, hashes, lambda i: f"kv{i}") == 2
    stored = log.since(1)[0].events[0]
    assert isinstance(stored, BlocksStored) and stored.parent_block_hash is None
    assert [b.token_ids for b in stored.blocks] == [(1, 2), (3, 4)]
    assert [b.kv for b in cache.match(hashes, max_tokens=4)] == ["kv0", "kv1"]
    assert len(cache.match(hashes, max_tokens=3)) == 1  # block-aligned limit
    assert cache.insert(tokens, hashes, lambda i: "again") == 0  # already cached
    # a branch off the first block, then a new chain: LRU leaves go first
    branch = [1, 2, 9, 9]
    cache.insert(branch, cache.hashes(branch), lambda i: "b")
    assert cache.num_blocks == 3
    last = log.last_sequence
    other = [7, 7]
    cache.insert(other, cache.hashes(other), lambda i: "o")
    assert cache.num_blocks == 3 and cache.evictions == 1
    batch = log.since(last + 1)[0]
    removed = [e for e in batch.events if isinstance(e, BlocksRemoved)]
    assert removed and removed[0].block_hashes == (hashes[1],)  # the older leaf
    assert len(cache.match(hashes, 4)) == 1  # the root block survived
    assert cache.clear() == 3 and cache.num_blocks == 0
    assert isinstance(log.since(log.last_sequence)[0].events[0], CacheCleared)
    assert log.live_blocks() == 0


def test_block_cache_disabled() -> None:
    cache = BlockCache(block_size=4, capacity_tokens=0)
    assert cache.insert([1] * 8, cache.hashes([1] * 8), lambda i: None) == 0
    assert cache.match(cache.hashes([1] * 8), 8) == []


# --------------------------------------------------------------------- descriptor


def describe(raw: object, **kw: object) -> dict[str, object] | None:
    args: dict[str, object] = {"block_size": 16, "default_host": "0.0.0.0",
                               "default_port": 30000}
    args.update(kw)
    return kv_events_descriptor(raw, **args)  # type: ignore[arg-type]


def test_descriptor_valid_shapes() -> None:
    assert describe('{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:5557", '
                    '"topic": "kv"}') == {
        "publisher": "zmq", "endpoint_host": "127.0.0.1", "endpoint_port_base": 5557,
        "topic": "kv", "block_size": 16, "dp_size": 1}
    grpc = describe({"publisher": "grpc"})
    assert grpc is not None and (grpc["endpoint_host"], grpc["endpoint_port_base"]) == \
        ("0.0.0.0", 30000)
    zmq_default = describe('{"publisher": "zmq"}', dp_size=2)
    assert zmq_default is not None and zmq_default["endpoint_host"] == "*"
    assert zmq_default["endpoint_port_base"] == 5557 and zmq_default["dp_size"] == 2


@pytest.mark.parametrize(("endpoint", "host"), [
    ("tcp://*:5557", "*"), ("tcp://0.0.0.0:5557", "0.0.0.0"), ("tcp://[::]:5557", "::")])
def test_descriptor_wildcard_hosts_advertised_as_such(endpoint: str, host: str) -> None:
    out = describe({"publisher": "zmq", "endpoint": endpoint})
    assert out is not None and out["endpoint_host"] == host


@pytest.mark.parametrize("raw", [None, "", "  ", '{"publisher": null}', {"publisher": None}])
def test_descriptor_no_publisher_is_null(raw: object, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert describe(raw) is None
    assert not caplog.records


@pytest.mark.parametrize(("raw", "why"), [
    ("{not json", "Expecting"),
    ("[1, 2]", "JSON object"),
    ('{"publisher": "kafka"}', "publisher must be"),
    ('{"publisher": "zmq", "endpoint": "ipc:///tmp/kv"}', "tcp://"),
    ('{"publisher": "zmq", "endpoint": "http://h:5557"}', "tcp://"),
    ('{"publisher": "zmq", "endpoint": "tcp://h:0"}', "1-65535"),
    ('{"publisher": "zmq", "endpoint": "tcp://h:65536"}', "1-65535"),
    ('{"publisher": "zmq", "endpoint": "tcp://h:abc"}', "non-numeric"),
    ('{"publisher": "zmq", "endpoint": "tcp://h"}', "no port"),
    ('{"publisher": "zmq", "endpoint": "tcp://:5557"}', "no host"),
    ('{"publisher": "zmq", "block_size": 0}', "block_size"),
    ('{"publisher": "zmq", "block_size": -16}', "block_size"),
    ('{"publisher": "zmq", "block_size": "16"}', "block_size"),
    ('{"publisher": "zmq", "dp_size": 0}', "dp_size"),
    ('{"publisher": "zmq", "topic": 5}', "topic"),
])
def test_descriptor_malformed_is_null_with_warning(raw: str, why: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="services.worker.kv_events"):
        assert describe(raw) is None
    assert any(why in r.getMessage() for r in caplog.records), caplog.text


def test_descriptor_engine_block_size_must_be_positive(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert describe('{"publisher": "grpc"}', block_size=0) is None
    assert "block_size" in caplog.text


def test_descriptor_publisher_not_offered(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert describe('{"publisher": "zmq"}', publishers=("grpc",)) is None
    assert "publisher must be one of grpc" in caplog.text
