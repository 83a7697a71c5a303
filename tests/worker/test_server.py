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
from services.common.net import create_channel
from tests.procs import ServiceProcess


@pytest.fixture(scope="module")
def worker(embedded_model_dir: Path) -> Iterator[ServiceProcess]:
    with ServiceProcess("worker", ["--model-path", str(embedded_model_dir),
                                   "--max-running-requests", "4", "--num-threads", "1"]) as proc:
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
    params = pb.SamplingParams(temperature=0.0, max_new_tokens=max_new, **sampling)
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


async def test_abort_rpc(stub: pb_grpc.SglangSchedulerStub,
                         chat_ids: Callable[..., list[int]]) -> None:
    call = stub.Generate(request(chat_ids(), "abort-me", stream=True, max_new=2000,
                                 ignore_eos=True))
    first = await call.read()
    assert first.WhichOneof("response") == "chunk"
    reply = await stub.Abort(pb.AbortRequest(request_id="abort-me", reason="test"))
    assert reply.success
    last = None
    async for item in call:
        last = item
    assert last is not None and last.complete.finish_reason == "abort"
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
