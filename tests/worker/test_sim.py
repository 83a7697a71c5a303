"""The ``sim`` engine: its model (tokens, timing, radix cache, events) and its gRPC contract."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import grpc
import pytest
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.net import create_channel
from services.worker.config import WorkerConfig
from services.worker.engine_api import EngineError, SamplingOptions
from services.worker.kv_events import BlocksRemoved, BlocksStored, chain_hashes
from services.worker.sim import RadixBlockCache, SimEngine, SimParams
from services.worker.sim_server import SimWorker, build_sim_worker

FAST = dict(decode_ms=1.0, decode_ms_per_running=0.0, prefill_ms_per_token=0.0)


async def run(engine: SimEngine, rid: str, ids: list[int], **opts: object) -> list:
    return [o async for o in engine.generate(rid, ids, SamplingOptions(**opts))]  # type: ignore[arg-type]


@pytest.fixture
async def engine() -> AsyncIterator[SimEngine]:
    eng = SimEngine(SimParams(block_size=4, max_total_num_tokens=256, **FAST))  # type: ignore[arg-type]
    eng.start()
    await eng.wait_ready()
    yield eng
    eng.stop()


# ----------------------------------------------------------------------------- the engine


async def test_tokens_are_deterministic_and_cached_tokens_come_from_the_cache(
        engine: SimEngine) -> None:
    ids = list(range(10, 50))
    first = await run(engine, "a", ids, max_new_tokens=5)
    second = await run(engine, "b", ids, max_new_tokens=5)
    assert [o.new_token_ids for o in first] == [o.new_token_ids for o in second]
    assert first[-1].finish_reason == second[-1].finish_reason == "length"
    assert first[-1].cached_tokens == 0
    assert second[-1].cached_tokens == 39  # every block cached; the last token is recomputed
    assert all(t not in engine.eos_token_ids for o in first for t in o.new_token_ids)
    assert engine.loads().cache_hit_rate == pytest.approx(39 / 80)


async def test_natural_stop_on_eos_and_stop_ids_never_emitted(engine: SimEngine) -> None:
    outs = await run(engine, "a", [5, 6, 7], stop_token_ids=[1000])
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].matched_token_id == engine.params.eos_token_id
    assert len(outs[-1].output_ids) == engine.params.output_tokens
    assert 1000 not in outs[-1].output_ids


async def test_n_samples_have_their_own_index(engine: SimEngine) -> None:
    outs = await run(engine, "n", [1, 2, 3, 4, 5], max_new_tokens=3, n=2)
    done = {o.index: o.output_ids for o in outs if o.finished}
    assert set(done) == {0, 1} and done[0] != done[1]


async def test_stores_and_evictions_become_kv_events(engine: SimEngine) -> None:
    assert engine.kv_events is not None
    start = engine.kv_events.last_sequence + 1
    ids = list(range(100, 140))  # 10 blocks of 4
    await run(engine, "a", ids, max_new_tokens=2)
    batches = engine.kv_events.since(start)
    stored = [b for batch in batches for e in batch.events if isinstance(e, BlocksStored)
              for b in e.blocks]
    assert [b.block_hash for b in stored[:10]] == chain_hashes(ids, 4)
    assert list(stored[0].token_ids) == ids[:4]
    # Fill the 256-token cache with other prompts: LRU blocks are evicted and reported.
    for i in range(8):
        await run(engine, f"f{i}", list(range(1000 + 100 * i, 1060 + 100 * i)), max_new_tokens=1)
    removed = {h for batch in engine.kv_events.since(start) for e in batch.events
               if isinstance(e, BlocksRemoved) for h in e.block_hashes}
    assert set(chain_hashes(ids, 4)) & removed  # the oldest prompt went first
    assert engine.cache.num_tokens <= 256
    assert engine.kv_events.live_blocks() == engine.cache.num_blocks
    seqs = [b.sequence_number for b in engine.kv_events.since(start)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_lru_evicts_the_least_recently_used_leaf() -> None:
    cache = RadixBlockCache(block_size=2)
    cache.insert([1, 2, 3, 4], room_tokens=100)
    cache.insert([5, 6, 7, 8], room_tokens=100)
    cache.match([1, 2, 3, 4])  # touch the first prompt
    cache.insert([9, 10], room_tokens=8)  # needs one block: evicts from [5,6,7,8]
    assert len(cache.match([1, 2, 3, 4])) == 2
    assert len(cache.match([5, 6, 7, 8])) == 1
    locked = cache.match([1, 2, 3, 4])
    cache.lock(locked, +1)
    cache.evict(100)  # a referenced path is never evicted
    assert len(cache.match([1, 2, 3, 4])) == 2


async def test_step_time_grows_with_batch_and_uncached_prefill() -> None:
    params = SimParams(decode_ms=2.0, decode_ms_per_running=1.0, prefill_ms_per_token=0.01,
                       block_size=4)
    eng = SimEngine(params)
    eng.start()
    try:
        ids = list(range(1, 401))
        await run(eng, "cold", ids, max_new_tokens=1)
        # admitted alone: 2 ms decode + 400 uncached tokens * 0.01 ms
        assert eng.last_step == (1, 400, pytest.approx(6.0))
        await run(eng, "warm", ids, max_new_tokens=1)
        assert eng.last_step == (1, 1, pytest.approx(2.01))  # the cached prefix costs nothing
        gens = [asyncio.create_task(run(eng, f"b{i}", [7000 + i] * 4, max_new_tokens=20))
                for i in range(8)]
        await asyncio.sleep(0.05)
        batch, _, ms = eng.last_step
        assert batch == 8 and ms == pytest.approx(2.0 + 7 * 1.0)
        await asyncio.gather(*gens)
    finally:
        eng.stop()


async def test_failure_injection() -> None:
    eng = SimEngine(SimParams(error_rate=1.0, **FAST))  # type: ignore[arg-type]
    eng.start()
    with pytest.raises(EngineError, match="injected"):
        await run(eng, "x", [1, 2, 3])
    assert [o.completion_tokens for o in await run(eng, "health-1", [1], max_new_tokens=1)] == [1]
    eng.stop()

    eng = SimEngine(SimParams(hang_rate=1.0, **FAST))  # type: ignore[arg-type]
    eng.start()
    stream = eng.generate("h", [1, 2, 3], SamplingOptions(max_new_tokens=2))
    task = asyncio.create_task(stream.__anext__())
    await asyncio.sleep(0.05)
    assert not task.done() and eng.loads().num_running == 1
    assert eng.abort("h", "test")
    out = await task
    assert out.finish_reason == "abort"
    eng.stop()


# ----------------------------------------------------------------------------- over gRPC


def sim_config(**kw: object) -> WorkerConfig:
    base = dict(engine="sim", host="127.0.0.1", port=0, block_size=4,
                sim_decode_ms=1.0, sim_prefill_ms_per_token=0.0, sim_decode_ms_per_running=0.0,
                sim_max_total_tokens=4096, max_running_requests=16)
    base.update(kw)
    return WorkerConfig(**base)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def worker(**kw: object) -> AsyncIterator[tuple[SimWorker, pb_grpc.SglangSchedulerStub]]:
    w = build_sim_worker(sim_config(**kw))
    await w.start()
    channel = create_channel(f"127.0.0.1:{w.port}")
    try:
        yield w, pb_grpc.SglangSchedulerStub(channel)
    finally:
        await channel.close()
        await w.stop(0)


def gen(ids: list[int], rid: str, max_new: int = 4, stream: bool = True,
        **kw: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=rid, tokenized=pb.TokenizedInput(input_ids=ids), stream=stream,
        sampling_params=pb.SamplingParams(temperature=0.0, max_new_tokens=max_new), **kw)


async def test_generate_info_loads_and_tokenizer_over_grpc() -> None:
    async with worker() as (_, stub):
        ids = list(range(20, 60))
        first = [r async for r in stub.Generate(gen(ids, "g1"))]
        second = [r async for r in stub.Generate(gen(ids, "g2"))]
        assert [r.WhichOneof("response") for r in first] == ["chunk"] * 4 + ["complete"]
        assert first[-1].complete.cached_tokens == 0
        assert second[0].chunk.cached_tokens == 39 and second[-1].complete.cached_tokens == 39
        assert list(first[-1].complete.output_ids) == list(second[-1].complete.output_ids)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.vocab_size == 49152 and list(info.eos_token_ids) == [2]
        assert info.served_model_name == "sim-model"
        loads = await stub.GetLoads(pb.GetLoadsRequest())
        assert loads.loads[0].num_used_tokens > 0 and loads.loads[0].cache_hit_rate > 0
        server = await stub.GetServerInfo(pb.GetServerInfoRequest())
        kv = server.server_args["kv_events"]
        assert kv["block_size"] == 4 and kv["publisher"] == "grpc"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.GetTokenizer(common_pb2.GetTokenizerRequest()):
                pass
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "--model-path" in (err.value.details() or "")


async def test_subscribe_kv_events_resume_and_out_of_range() -> None:
    async with worker() as (w, stub):
        ids = list(range(300, 316))  # 4 blocks

        async def collect(start: int, count: int) -> list[common_pb2.KvEventBatch]:
            got: list[common_pb2.KvEventBatch] = []
            call = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(
                start_sequence_number=start))
            async for batch in call:
                if batch.load.load_only:
                    continue
                got.append(batch)
                if len(got) >= count:
                    call.cancel()
                    break
            return got

        live = asyncio.create_task(collect(0, 1))
        await asyncio.sleep(0.1)
        [r async for r in stub.Generate(gen(ids, "k1", max_new=1))]
        [batch] = await asyncio.wait_for(live, 5)
        stored = [b for e in batch.events if e.WhichOneof("data") == "stored"
                  for b in e.stored.blocks]
        assert [b.block_hash for b in stored][:4] == chain_hashes(ids, 4)
        assert list(stored[0].token_ids) == ids[:4] and stored[0].block_size == 4
        # Resume from an old cursor: the same batches again, in order.
        assert w.engine.kv_events is not None
        last = w.engine.kv_events.last_sequence
        replay = await asyncio.wait_for(collect(1, last), 5)
        assert [b.sequence_number for b in replay] == list(range(1, last + 1))
        # A cursor older than the replay window: OUT_OF_RANGE.
        w.engine.kv_events._batches.popleft()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(1, 1)
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        flushed = await stub.FlushCache(common_pb2.FlushCacheRequest())
        assert flushed.success


async def test_injected_errors_and_slow_start_over_grpc() -> None:
    async with worker(sim_error_rate=1.0) as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            [r async for r in stub.Generate(gen([1, 2, 3], "e1"))]
        assert "injected" in (err.value.details() or "")
        health = await stub.HealthCheck(pb.HealthCheckRequest())
        assert health.healthy  # probes are exempt
    w = build_sim_worker(sim_config(sim_slow_start=0.5))
    await w.start(wait_ready=False)
    ready = asyncio.create_task(w.ready())
    channel = create_channel(f"127.0.0.1:{w.port}")
    stub = pb_grpc.SglangSchedulerStub(channel)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await ready
        assert (await stub.GetModelInfo(pb.GetModelInfoRequest())).vocab_size == 49152
    finally:
        await channel.close()
        await w.stop(0)


async def test_pd_decode_waits_for_its_prefill_peer() -> None:
    async with worker(disaggregation_mode="prefill", bootstrap_port=0) as (prefill, p_stub), \
            worker(disaggregation_mode="decode", sim_bootstrap_timeout=2.0) as (_, d_stub):
        assert prefill.bootstrap is not None
        port = prefill.bootstrap.port
        params = pb.DisaggregatedParams(bootstrap_host="127.0.0.1", bootstrap_port=port,
                                        bootstrap_room=4242)
        ids = list(range(500, 540))
        decode = asyncio.create_task(_collect(d_stub.Generate(
            gen(ids, "pd1", max_new=6, disaggregated_params=params))))
        await asyncio.sleep(0.2)
        assert not decode.done()  # waiting for room 4242
        prefilled = await _collect(p_stub.Generate(
            gen(ids, "pd1", max_new=6, disaggregated_params=params)))
        assert prefilled[-1].complete.completion_tokens == 1  # the prefill leg makes one token
        decoded = await asyncio.wait_for(decode, 5)
        assert decoded[-1].complete.completion_tokens == 6
        assert decoded[-1].complete.cached_tokens == len(ids) - 1  # KV came from the peer
        info = await p_stub.GetServerInfo(pb.GetServerInfoRequest())
        assert info.server_args["disaggregation_mode"] == "prefill"
        # No prefill ever finishes room 7: the decode leg fails with UNAVAILABLE.
        params.bootstrap_room = 7
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _collect(d_stub.Generate(gen(ids, "pd2", disaggregated_params=params)))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "room 7" in (err.value.details() or "")


async def _collect(call: object) -> list[pb.GenerateResponse]:
    return [r async for r in call]  # type: ignore[attr-defined]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="--disaggregation-mode"):
        sim_config(disaggregation_mode="both")
    with pytest.raises(ValueError, match="--sim-error-rate"):
        sim_config(sim_error_rate=2.0)
    with pytest.raises(ValueError, match="sim option"):
        dataclasses.replace(sim_config(), engine="torch", disaggregation_mode="prefill")


async def test_stream_interval_sends_the_first_token_then_n_per_message() -> None:
    """--stream-interval 4: 10 tokens arrive as 1 + 4 + 4 + 1 (the rest at finish), the same
    tokens and cumulative counts as one message per token."""
    ids = list(range(20, 60))
    async with worker(stream_interval=4) as (_, stub):
        replies = [r async for r in stub.Generate(gen(ids, "si", max_new=10,
                                                      return_logprob=True))]
    async with worker() as (_, stub):
        each = [r async for r in stub.Generate(gen(ids, "one", max_new=10,
                                                   return_logprob=True))]
    chunks = [r.chunk for r in replies if r.HasField("chunk")]
    assert [len(c.token_ids) for c in chunks] == [1, 4, 4, 1]
    assert [c.completion_tokens for c in chunks] == [1, 5, 9, 10]
    assert [t for c in chunks for t in c.token_ids] == list(replies[-1].complete.output_ids)
    assert list(replies[-1].complete.output_ids) == list(each[-1].complete.output_ids)
    assert [len(c.output_logprobs.token_logprobs) for c in chunks] == [1, 4, 4, 1]
    assert ([v for c in chunks for v in c.output_logprobs.token_logprobs]
            == [v for r in each[:-1] for v in r.chunk.output_logprobs.token_logprobs])


async def test_a_requests_stream_interval_overrides_the_workers() -> None:
    """SGLang's per-request ``sampling_params.stream_interval``: 3 on a worker started with 1
    gives 1 + 3 + 3 + 3; 1 on a worker started with 4 gives one message per token; < 1 is a
    bad request naming the field."""
    ids = list(range(20, 60))

    def request(rid: str, interval: int) -> pb.GenerateRequest:
        req = gen(ids, rid, max_new=10)
        req.sampling_params.stream_interval = interval
        return req

    async with worker() as (_, stub):
        replies = [r async for r in stub.Generate(request("three", 3))]
        assert [len(r.chunk.token_ids) for r in replies if r.HasField("chunk")] == [1, 3, 3, 3]
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            [r async for r in stub.Generate(request("zero", 0))]
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stream_interval" in exc.value.details()
    async with worker(stream_interval=4) as (_, stub):
        replies = [r async for r in stub.Generate(request("one", 1))]
        assert [len(r.chunk.token_ids) for r in replies if r.HasField("chunk")] == [1] * 10
