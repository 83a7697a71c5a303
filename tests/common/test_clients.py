"""The thin typed clients of clients/python (``sglmesh.client``) against real service
processes: a tokenizer, a router and a sim worker, and history on a SQLite file."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from sglmesh.client import (
    HistoryClient,
    RouterAdminClient,
    SglmeshError,
    TokenizerClient,
    message_item,
)
from sglmesh.history.v1 import history_pb2 as hist_pb
from sglmesh.router.v1 import router_admin_pb2 as admin_pb

from tests.procs import ServiceProcess

SIM = ["--engine", "sim", "--sim-decode-ms", "1", "--sim-prefill-ms-per-token", "0"]


async def test_tokenizer_client(embedded_model_dir: Path) -> None:
    with ServiceProcess("tokenizer", ["--tokenizer", f"smollm2={embedded_model_dir}"]) as svc:
        async with TokenizerClient(f"grpc://{svc.target}") as tokenizer:
            assert [t.model for t in await tokenizer.list_tokenizers()] == ["smollm2"]
            ids = await tokenizer.tokenize("smollm2", "Hello there")
            assert ids and all(isinstance(i, int) for i in ids)
            assert await tokenizer.tokenize("smollm2", ["a", "b c"]) == [
                await tokenizer.tokenize("smollm2", "a"), await tokenizer.tokenize("smollm2",
                                                                                   "b c")]
            assert await tokenizer.detokenize("smollm2", [ids]) == ["Hello there"]
            chat = await tokenizer.render_chat(
                "smollm2", [{"role": "user", "content": "What is 2+2?"}])
            assert "<|im_start|>user\nWhat is 2+2?" in chat.prompt
            assert chat.prompt.endswith("<|im_start|>assistant\n")
            assert chat.token_ids == await tokenizer.tokenize("smollm2", chat.prompt,
                                                              add_special_tokens=False)
            with pytest.raises(SglmeshError) as caught:
                await tokenizer.tokenize("nope", "x")
            error = caught.value
            assert error.code == grpc.StatusCode.NOT_FOUND
            assert error.reason and error.domain and error.metadata.get("model") == "nope"


async def test_router_admin_client_registers_and_removes_a_worker() -> None:
    with ServiceProcess("worker", SIM) as worker, ServiceProcess(
            "router", ["--health-success-threshold", "1"]) as router:
        url = f"grpc://{worker.target}"
        async with RouterAdminClient(router.target) as admin:
            assert await admin.list_workers() == []
            job = await admin.add_worker(url, labels={"zone": "a"}, wait=True)
            assert job.state == admin_pb.JOB_STATE_SUCCEEDED and job.worker_url == url
            [listed] = await admin.list_workers()
            assert listed.url == url and dict(listed.labels) == {"zone": "a"}
            assert (await admin.get_worker(url)).model_id == listed.model_id
            assert [m.id for m in await admin.list_models()] == [listed.model_id]
            assert [load.url for load in await admin.loads()] == [url]
            assert [(r.url, r.success) for r in await admin.flush_cache()] == [(url, True)]
            # a job that fails: the same worker twice
            with pytest.raises(SglmeshError) as caught:
                await admin.add_worker(url, wait=True)
            assert caught.value.reason == "JOB_FAILED" and "already" in caught.value.message
            with pytest.raises(SglmeshError) as missing:
                await admin.get_worker("grpc://127.0.0.1:1")
            assert missing.value.code == grpc.StatusCode.NOT_FOUND
            await admin.remove_worker(url, wait=True)
            assert await admin.list_workers() == []
            with pytest.raises(ValueError):
                await admin.add_worker(url, worker_type="bogus")


async def test_history_client_conversations_items_and_responses(tmp_path: Path) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'history.db'}"
    with ServiceProcess("history", ["--history-db", db]) as svc:
        async with HistoryClient(svc.target, tenant="team-a") as history:
            conv = await history.create_conversation(
                [message_item("user", "hi")], metadata={"topic": "demo"}, request_id="r1")
            assert conv.id.startswith("conv_") and dict(conv.metadata) == {"topic": "demo"}
            again = await history.create_conversation([message_item("user", "hi")],
                                                      request_id="r1")
            assert again.id == conv.id  # a retried create is the same conversation
            added = await history.add_items(conv.id, [
                message_item("assistant", f"answer {n}") for n in range(3)])
            assert len(added) == 3
            listed = [i async for i in history.items(conv.id, page_size=2)]  # two pages
            assert [i.id for i in listed[1:]] == [i.id for i in added]
            assert listed[1].data["content"][0]["text"] == "answer 0"
            newest = [i async for i in history.items(conv.id, newest_first=True)]
            assert [i.id for i in newest] == [i.id for i in reversed(listed)]
            await history.delete_item(conv.id, added[0].id)
            assert len([i async for i in history.items(conv.id)]) == 3
            updated = await history.update_metadata(conv.id, {"topic": "other"})
            assert dict(updated.metadata) == {"topic": "other"}
            # another tenant sees nothing of it
            async with HistoryClient(svc.target, tenant="team-b") as other:
                with pytest.raises(SglmeshError) as hidden:
                    await other.get_conversation(conv.id)
                assert hidden.value.code == grpc.StatusCode.NOT_FOUND
            # stored responses are written by the gateway; read and delete them here
            first = (await history.stub.CreateResponse(hist_pb.CreateResponseRequest(
                tenant="team-a", response=hist_pb.StoredResponse(
                    model="m", status="completed", input_items=[message_item("user", "q")])),
                timeout=10)).response
            second = (await history.stub.CreateResponse(hist_pb.CreateResponseRequest(
                tenant="team-a", response=hist_pb.StoredResponse(
                    model="m", status="completed", previous_response_id=first.id)),
                timeout=10)).response
            assert (await history.get_response(first.id)).model == "m"
            assert [r.id for r in await history.response_chain(second.id)] == \
                [first.id, second.id]
            await history.delete_response(second.id)
            with pytest.raises(SglmeshError) as gone:
                await history.get_response(second.id)
            assert gone.value.code == grpc.StatusCode.NOT_FOUND and gone.value.reason
            await history.delete_conversation(conv.id)
            with pytest.raises(SglmeshError):
                await history.get_conversation(conv.id)
