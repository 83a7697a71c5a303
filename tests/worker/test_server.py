"""The worker as a real process: the SglangScheduler contract over gRPC with the real model."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import pytest
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as pb_grpc

from services.common.errors import ErrorCode, error_details
from services.common.net import create_channel, free_port
from tests.procs import ServiceProcess

METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def worker(embedded_model_dir: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess("worker", ["--model-path", str(embedded_model_dir),
                                   "--max-running-requests", "4", "--num-threads", "1",
                                   "--metrics-port", str(METRICS_PORT)]) as proc:
        yield proc


@pytest.fixture
async def stub(worker: ServiceProcess) -> AsyncIterator[pb_grpc.SglangSchedulerStub]:
    channel = create_channel(worker.target)
    try:
        yield pb_grpc.SglangSchedulerStub(channel)
    finally:
        await channel.close()


def request(ids: list[int], rid: str, stream: bool, max_new: int = 12,
            **sampling: object) -> pb.GenerateRequest:
    params = pb.SamplingParams(**{"temperature": 0.0, "max_new_tokens": max_new, **sampling})
    return pb.GenerateRequest(request_id=rid, tokenized=pb.TokenizedInput(input_ids=ids),
                              sampling_params=params, stream=stream)


async def test_stream_and_unary_agree(stub: pb_grpc.SglangSchedulerStub,
                                      chat_ids: Callable[..., list[int]],
                                      decode: Callable[[list[int]], str]) -> None:
    ids = chat_ids()
    replies = [r async for r in stub.Generate(request(ids, "s1", stream=True))]
    chunks = [r.chunk for r in replies[:-1]]
    assert all(r.WhichOneof("response") == "chunk" for r in replies[:-1])
    complete = replies[-1].complete
    assert replies[-1].WhichOneof("response") == "complete"
    streamed = [t for c in chunks for t in c.token_ids]
    assert streamed == list(complete.output_ids)
    assert [c.completion_tokens for c in chunks] == list(range(1, len(chunks) + 1))
    assert all(c.prompt_tokens == len(ids) for c in chunks)
    assert "Paris" in decode(streamed)
    assert complete.finish_reason == "stop" and complete.matched_token_id == 2
    assert complete.prompt_tokens == len(ids)
    assert complete.completion_tokens == len(streamed)

    unary = [r async for r in stub.Generate(request(ids, "u1", stream=False))]
    assert len(unary) == 1 and unary[0].WhichOneof("response") == "complete"
    assert list(unary[0].complete.output_ids) == streamed
    assert unary[0].request_id == "u1"


async def test_length_finish(stub: pb_grpc.SglangSchedulerStub,
                             chat_ids: Callable[..., list[int]]) -> None:
    replies = [r async for r in stub.Generate(request(chat_ids(), "l1", stream=False, max_new=3,
                                                      ignore_eos=True))]
    assert replies[-1].complete.finish_reason == "length"
    assert len(replies[-1].complete.output_ids) == 3
    assert not replies[-1].complete.HasField("matched_token_id")


async def wait_idle(stub: pb_grpc.SglangSchedulerStub) -> None:
    for _ in range(100):
        loads = await stub.GetLoads(pb.GetLoadsRequest())
        info = await stub.GetServerInfo(pb.GetServerInfoRequest())
        if loads.loads[0].num_running_reqs == 0 and info.active_requests == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"still busy: {loads} active={info.active_requests}")


async def test_cancel_stream_aborts(stub: pb_grpc.SglangSchedulerStub,
                                    chat_ids: Callable[..., list[int]]) -> None:
    call = stub.Generate(request(chat_ids(), "cancel-me", stream=True, max_new=2000,
                                 ignore_eos=True))
    seen = 0
    async for reply in call:
        assert reply.WhichOneof("response") == "chunk"
        seen += 1
        if seen == 2:
            break
    loads = await stub.GetLoads(pb.GetLoadsRequest())
    assert loads.loads[0].num_running_reqs == 1
    call.cancel()
    await wait_idle(stub)


async def read_rest(call: object) -> list[pb.GenerateResponse]:
    """The rest of a stream already read with ``read()`` (grpc.aio forbids mixing that with
    ``async for`` on one call)."""
    out = []
    while (item := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        out.append(item)
    return out


async def test_abort_rpc(stub: pb_grpc.SglangSchedulerStub,
                         chat_ids: Callable[..., list[int]]) -> None:
    call = stub.Generate(request(chat_ids(), "abort-me", stream=True, max_new=2000,
                                 ignore_eos=True))
    first = await call.read()
    assert first.WhichOneof("response") == "chunk"
    reply = await stub.Abort(pb.AbortRequest(request_id="abort-me", reason="test"))
    assert reply.success
    rest = await read_rest(call)
    assert rest and rest[-1].complete.finish_reason == "abort"
    missing = await stub.Abort(pb.AbortRequest(request_id="abort-me"))
    assert not missing.success
    await wait_idle(stub)


@pytest.mark.parametrize(("field", "sampling", "top"), [
    ("sampling_params.top_p", {"top_p": 1.5}, {}),
    ("sampling_params.temperature", {"temperature": -0.5}, {}),
    ("sampling_params.n", {"n": 100}, {}),
    ("sampling_params.json_schema", {"json_schema": "{}"}, {}),
    ("sampling_params.regex", {"regex": "a+"}, {}),
    ("sampling_params.top_k", {"top_k": -5}, {}),
    ("sampling_params.logit_bias", {"logit_bias": {"x": 1.0}}, {}),
    ("tokenized.input_ids", {}, {"empty": True}),
    ("tokenized.input_ids", {}, {"long": True}),
])
async def test_invalid_arguments(stub: pb_grpc.SglangSchedulerStub,
                                 chat_ids: Callable[..., list[int]], field: str,
                                 sampling: dict[str, object], top: dict[str, bool]) -> None:
    ids = [] if top.get("empty") else [1] * 9000 if top.get("long") else chat_ids()
    req = request(ids, "bad", stream=True)
    for key, value in sampling.items():
        if isinstance(value, dict):
            getattr(req.sampling_params, key).update(value)
        else:
            setattr(req.sampling_params, key, value)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.Generate(req):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(info.value)
    assert details.code == ErrorCode.INVALID_ARGUMENT
    assert details.metadata["field"] == field
    assert details.message


async def test_model_info(stub: pb_grpc.SglangSchedulerStub, embedded_model_dir: Path) -> None:
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert list(info.eos_token_ids) == [2]
    assert (info.bos_token_id, info.pad_token_id) == (1, 2)
    assert info.vocab_size == 49152 and info.max_context_length == 8192
    assert list(info.architectures) == ["LlamaForCausalLM"] and info.model_type == "llama"
    assert info.is_generation and not info.supports_vision
    assert info.served_model_name == embedded_model_dir.name
    assert info.model_path == str(embedded_model_dir)
    assert info.tokenizer_path == str(embedded_model_dir)


async def test_server_info_and_loads(stub: pb_grpc.SglangSchedulerStub) -> None:
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.server_type == "grpc" and info.sglang_version.startswith("sglmesh-torch")
    assert info.server_args["dp_size"] == 1
    assert info.server_args["max_running_requests"] == 4
    assert info.uptime_seconds > 0 and info.start_time.seconds > 0
    assert info.max_total_num_tokens == 8192 * 4 + 16384  # running requests + prefix cache
    loads = await stub.GetLoads(pb.GetLoadsRequest(include=["all"]))
    assert loads.dp_rank_count == 1 and len(loads.loads) == 1
    load = loads.loads[0]
    assert load.max_running_requests == 4 and load.max_total_num_tokens == 8192 * 4 + 16384
    assert load.HasField("memory") and load.memory.weight_gb > 0.2


async def test_tokenizer_bundle(stub: pb_grpc.SglangSchedulerStub) -> None:
    from tokenizers import Tokenizer

    chunks = [c async for c in stub.GetTokenizer(common_pb2.GetTokenizerRequest())]
    assert all(len(c.data) <= 1 << 20 for c in chunks)
    assert all(not c.sha256 for c in chunks[:-1]) and chunks[-1].sha256
    data = b"".join(c.data for c in chunks)
    assert hashlib.sha256(data).hexdigest() == chunks[-1].sha256
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = set(archive.namelist())
        assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= names
        tokenizer = Tokenizer.from_str(archive.read("tokenizer.json").decode())
        config = json.loads(archive.read("tokenizer_config.json"))
    assert tokenizer.get_vocab_size() == 49152
    assert config["eos_token"] == "<|im_end|>"


async def test_health_flush_unimplemented(stub: pb_grpc.SglangSchedulerStub) -> None:
    health = await stub.HealthCheck(pb.HealthCheckRequest())
    assert health.healthy, health.message
    flush = await stub.FlushCache(common_pb2.FlushCacheRequest())
    assert flush.success
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Embed(pb.EmbedRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


# --------------------------------------------------------------------- prefix cache, KV events

LONG_SYSTEM = ("You answer questions about European geography in one short sentence, "
               "naming the city and nothing else. ") * 11


async def test_prefix_cache_over_grpc(stub: pb_grpc.SglangSchedulerStub,
                                      embedded_model_dir: Path) -> None:
    from .conftest import render_chat

    prompt = render_chat(embedded_model_dir, [{"role": "system", "content": LONG_SYSTEM},
                                              {"role": "user", "content": "Capital of Italy?"}])
    assert len(prompt) > 200
    flush = await stub.FlushCache(common_pb2.FlushCacheRequest())
    assert flush.success
    cold = [r async for r in stub.Generate(request(prompt, "pc1", stream=True, max_new=3))]
    assert cold[-1].complete.cached_tokens == 0
    warm = [r async for r in stub.Generate(request(prompt, "pc2", stream=True, max_new=3))]
    assert all(r.chunk.cached_tokens >= 192 for r in warm[:-1])
    assert warm[-1].complete.cached_tokens >= 192
    loads = await stub.GetLoads(pb.GetLoadsRequest(include=["all"]))
    load = loads.loads[0]
    assert load.cache_hit_rate > 0 and load.num_used_tokens >= 192
    assert 0 < load.token_usage <= 1 and load.memory.kv_cache_gb > 0
    assert (await stub.FlushCache(common_pb2.FlushCacheRequest())).success
    again = [r async for r in stub.Generate(request(prompt, "pc3", stream=False, max_new=1))]
    assert again[-1].complete.cached_tokens == 0


async def test_server_info_kv_events_descriptor(stub: pb_grpc.SglangSchedulerStub,
                                                worker: ServiceProcess) -> None:
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    descriptor = dict(info.server_args["kv_events"])
    assert descriptor == {"publisher": "grpc", "endpoint_host": "127.0.0.1",
                          "endpoint_port_base": worker.port, "topic": "", "block_size": 16,
                          "dp_size": 1}
    assert info.scheduler_info["block_size"] == 16


async def read_until(call: object, predicate: Callable[[common_pb2.KvEventBatch], bool],
                     seen: list[common_pb2.KvEventBatch], timeout: float = 60
                     ) -> common_pb2.KvEventBatch:
    async def loop() -> common_pb2.KvEventBatch:
        while True:
            batch = await call.read()  # type: ignore[attr-defined]
            assert batch is not grpc.aio.EOF
            seen.append(batch)
            if predicate(batch):
                return batch

    return await asyncio.wait_for(loop(), timeout)


async def test_kv_events_stream(stub: pb_grpc.SglangSchedulerStub,
                                chat_ids: Callable[..., list[int]]) -> None:
    call = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(
        start_sequence_number=0, load_records_before_first_batch=True))
    seen: list[common_pb2.KvEventBatch] = []
    try:
        first = await call.read()
        assert first.sequence_number == 0 and first.load.load_only
        assert first.load.max_running_requests == 4
        ids = chat_ids("Name a large river in Africa and one city on it, please.")
        [r async for r in stub.Generate(request(ids, "kv1", stream=False, max_new=2))]
        longer = ids + ids[-24:]  # extends the cached prompt: its new blocks have a parent
        [r async for r in stub.Generate(request(longer, "kv2", stream=False, max_new=2))]
        expected = longer[:len(longer) // 16 * 16]

        def has_prompt_blocks(batch: common_pb2.KvEventBatch) -> bool:
            tokens = [t for b in seen for ev in b.events if ev.HasField("stored")
                      for blk in ev.stored.blocks for t in blk.token_ids]
            return bool(expected) and all(
                list(expected[i:i + 16]) in [list(blk.token_ids) for b in seen
                                             for ev in b.events if ev.HasField("stored")
                                             for blk in ev.stored.blocks]
                for i in range(0, len(expected), 16)) or len(tokens) > 10_000

        await read_until(call, has_prompt_blocks, seen)
        real = [b for b in seen[1:] if not b.load.load_only]
        numbers = [b.sequence_number for b in real if not b.HasField("snapshot")]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
        stored = [ev.stored for b in real for ev in b.events if ev.HasField("stored")]
        assert all(blk.block_size == 16 and len(blk.token_ids) == 16
                   for s in stored for blk in s.blocks)
        assert any(s.HasField("parent_block_hash") for s in stored)
        last = numbers[-1]
    finally:
        call.cancel()
    # resume from a cursor still held: replay starts exactly there
    resumed = stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(
        start_sequence_number=last))
    try:
        batch = await asyncio.wait_for(resumed.read(), 30)
        assert batch.sequence_number == last and not batch.load.load_only
    finally:
        resumed.cancel()
    # a cursor the worker never had: OUT_OF_RANGE
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(
                start_sequence_number=last + 10_000)):
            pass
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE


# --------------------------------------------------------------------- sampling params


async def test_n_seed_logprobs_over_grpc(stub: pb_grpc.SglangSchedulerStub,
                                         chat_ids: Callable[..., list[int]]) -> None:
    ids = chat_ids()

    def make(rid: str) -> pb.GenerateRequest:
        req = request(ids, rid, stream=True, max_new=4, temperature=0.8, n=2, ignore_eos=True)
        req.sampling_params.custom_params.update({"seed": 11})
        req.return_logprob = True
        req.top_logprobs_num = 2
        req.logprob_start_len = 0
        return req

    replies = [r async for r in stub.Generate(make("n-a"))]
    chunks = [r.chunk for r in replies if r.WhichOneof("response") == "chunk"]
    completes = {r.complete.index: r.complete for r in replies
                 if r.WhichOneof("response") == "complete"}
    assert sorted(completes) == [0, 1]
    for index, complete in completes.items():
        mine = [c for c in chunks if c.index == index]
        assert [t for c in mine for t in c.token_ids] == list(complete.output_ids)
        assert list(complete.output_logprobs.token_ids) == list(complete.output_ids)
        assert all(len(top.token_ids) == 2 for top in complete.output_logprobs.top_logprobs)
        inputs = mine[0].input_logprobs
        assert list(inputs.token_ids) == ids
        assert not inputs.token_logprobs[0].HasField("value")
        assert all(v.HasField("value") for v in inputs.token_logprobs[1:])
        assert not mine[1].HasField("input_logprobs")
        assert len(complete.input_logprobs.token_ids) == len(ids)
    again = [r async for r in stub.Generate(make("n-b"))]
    outputs = {r.complete.index: list(r.complete.output_ids) for r in again
               if r.WhichOneof("response") == "complete"}
    assert outputs == {i: list(c.output_ids) for i, c in completes.items()}  # same seed


async def test_stop_string_over_grpc(stub: pb_grpc.SglangSchedulerStub,
                                     chat_ids: Callable[..., list[int]],
                                     decode: Callable[[list[int]], str]) -> None:
    ref = [r async for r in stub.Generate(request(chat_ids(), "ss0", stream=False, max_new=10))]
    text = decode(list(ref[-1].complete.output_ids))
    assert " of" in text
    replies = [r async for r in stub.Generate(request(chat_ids(), "ss1", stream=True, max_new=10,
                                                      stop=[" of"]))]
    complete = replies[-1].complete
    assert complete.finish_reason == "stop" and complete.matched_stop_str == " of"
    streamed = [t for r in replies[:-1] for t in r.chunk.token_ids]
    assert streamed == list(complete.output_ids)
    assert decode(streamed) == text[:text.index(" of")]


async def test_worker_metrics(stub: pb_grpc.SglangSchedulerStub,
                              chat_ids: Callable[..., list[int]]) -> None:
    import httpx

    [r async for r in stub.Generate(request(chat_ids(), "m1", stream=False, max_new=2))]
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", trust_env=False).text
    for name in ("sglmesh_worker_requests_total{", "sglmesh_worker_prompt_tokens_total",
                 "sglmesh_worker_generation_tokens_total",
                 "sglmesh_worker_time_to_first_token_seconds_bucket",
                 "sglmesh_worker_running_requests", "sglmesh_worker_waiting_requests",
                 "sglmesh_worker_cache_hit_rate", "sglmesh_worker_token_usage"):
        assert name in text, name


# --------------------------------------------------------------------- draining


async def test_sigterm_drains(embedded_model_dir: Path,
                              chat_ids: Callable[..., list[int]]) -> None:
    """SIGTERM: unhealthy + NOT_SERVING + new work refused, while in-flight work finishes."""
    import os
    import signal

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc = ServiceProcess("worker", ["--model-path", str(embedded_model_dir),
                                     "--num-threads", "1"]).start()
    channel = create_channel(proc.target)
    try:
        stub = pb_grpc.SglangSchedulerStub(channel)
        call = stub.Generate(request(chat_ids(), "drain-me", stream=True, max_new=40,
                                     ignore_eos=True))
        assert (await call.read()).WhichOneof("response") == "chunk"
        assert proc.proc is not None
        os.killpg(proc.proc.pid, signal.SIGTERM)
        await asyncio.sleep(0.3)
        health = await stub.HealthCheck(pb.HealthCheckRequest())
        assert not health.healthy and "draining" in health.message
        status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(
            service="sglang.grpc.scheduler.SglangScheduler"))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(request(chat_ids(), "late", stream=False)):
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = await read_rest(call)
        assert rest[-1].complete.finish_reason == "length"
        assert len(rest[-1].complete.output_ids) == 40
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
    finally:
        await channel.close()
        proc.stop()


async def test_stream_interval_with_a_trimmed_stop_string(embedded_model_dir: Path,
                                                          chat_ids: Callable[..., list[int]],
                                                          decode: Callable[[list[int]], str]
                                                          ) -> None:
    """--stream-interval 4 on the real engine: first token alone, then up to 4 per chunk. The
    stop string " is Paris" is trimmed with the token it held back, so the finish adds no token:
    the three tokens waiting for the interval must still be sent, and the chunks join to
    exactly the output ("The capital of France is Paris" without the stop string)."""
    with ServiceProcess("worker", ["--model-path", str(embedded_model_dir),
                                   "--num-threads", "1", "--stream-interval", "4"]) as proc:
        channel = create_channel(proc.target)
        try:
            stub = pb_grpc.SglangSchedulerStub(channel)
            replies = [r async for r in stub.Generate(request(
                chat_ids(), "si", stream=True, max_new=30, stop=[" is Paris"]))]
        finally:
            await channel.close()
    chunks = [r.chunk for r in replies if r.HasField("chunk")]
    complete = replies[-1].complete
    assert complete.matched_stop_str == " is Paris"
    assert [len(c.token_ids) for c in chunks] == [1, 3]
    streamed = [t for c in chunks for t in c.token_ids]
    assert streamed == list(complete.output_ids) and decode(streamed) == "The capital of France"
