"""The history service as a real process (python -m services.history) over gRPC.

The round-trip and error tests run against ``--history-backend sql`` and ``memory`` alike;
``none`` has its own test (everything answers, nothing is stored).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2, json_format, struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sglmesh.history.v1 import history_pb2 as pb
from sglmesh.history.v1 import history_pb2_grpc

from services.common.errors import ErrorCode, error_details
from services.common.net import CHANNEL_OPTIONS, free_port
from tests.procs import ServiceProcess


def struct(value: dict) -> struct_pb2.Struct:  # type: ignore[type-arg]
    return json_format.ParseDict(value, struct_pb2.Struct())


def message(text: str, role: str = "user") -> pb.Item:
    return pb.Item(type="message", role=role,
                   data=struct({"content": [{"type": "input_text", "text": text}]}))


def stub_for(proc: ServiceProcess) -> tuple[grpc.Channel, history_pb2_grpc.HistoryServiceStub]:
    channel = grpc.insecure_channel(proc.target, options=CHANNEL_OPTIONS)
    return channel, history_pb2_grpc.HistoryServiceStub(channel)


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "history.db"


@pytest.fixture(params=["sql", "memory"])
def history(request: pytest.FixtureRequest, db_file: Path) -> Iterator[ServiceProcess]:
    args = ["--history-backend", request.param]
    if request.param == "sql":
        args += ["--history-db", f"sqlite+aiosqlite:///{db_file}"]
    with ServiceProcess("history", args, ready_timeout=60) as proc:
        yield proc


@pytest.fixture
def stub(history: ServiceProcess) -> Iterator[history_pb2_grpc.HistoryServiceStub]:
    channel, stub = stub_for(history)
    yield stub
    channel.close()


def test_conversation_round_trip(stub: history_pb2_grpc.HistoryServiceStub) -> None:
    created = stub.CreateConversation(pb.CreateConversationRequest(
        tenant="t1", metadata={"topic": "demo"}, items=[message("hi")], request_id="req-1"),
        timeout=10)
    conv = created.conversation
    assert conv.id.startswith("conv_") and conv.metadata["topic"] == "demo"
    assert conv.create_time.seconds > 0
    assert created.items[0].id.startswith("msg_") and created.items[0].role == "user"

    retry = stub.CreateConversation(pb.CreateConversationRequest(
        tenant="t1", metadata={"topic": "demo"}, items=[message("hi")], request_id="req-1"),
        timeout=10)
    assert retry.conversation.id == conv.id

    got = stub.GetConversation(pb.GetConversationRequest(tenant="t1", conversation_id=conv.id),
                               timeout=10)
    assert got.conversation == conv

    added = stub.CreateConversationItems(pb.CreateConversationItemsRequest(
        tenant="t1", conversation_id=conv.id,
        items=[message("hello", "assistant"), message("more")]), timeout=10)
    assert len(added.items) == 2
    page = stub.ListConversationItems(pb.ListConversationItemsRequest(
        tenant="t1", conversation_id=conv.id, page_size=2), timeout=10)
    assert [i.id for i in page.items] == [created.items[0].id, added.items[0].id]
    assert page.next_page_token == added.items[0].id
    rest = stub.ListConversationItems(pb.ListConversationItemsRequest(
        tenant="t1", conversation_id=conv.id, page_size=2, page_token=page.next_page_token),
        timeout=10)
    assert [i.id for i in rest.items] == [added.items[1].id] and rest.next_page_token == ""
    desc = stub.ListConversationItems(pb.ListConversationItemsRequest(
        tenant="t1", conversation_id=conv.id, order=pb.SORT_ORDER_DESC), timeout=10)
    assert desc.items[0].id == added.items[1].id
    item = stub.GetConversationItem(pb.GetConversationItemRequest(
        tenant="t1", conversation_id=conv.id, item_id=added.items[0].id), timeout=10).item
    assert json_format.MessageToDict(item.data)["content"][0]["text"] == "hello"

    updated = stub.UpdateConversation(pb.UpdateConversationRequest(
        tenant="t1", conversation=pb.Conversation(id=conv.id, metadata={"topic": "new"}),
        update_mask=field_mask_pb2.FieldMask(paths=["metadata"])), timeout=10)
    assert dict(updated.conversation.metadata) == {"topic": "new"}

    listed = stub.ListConversations(pb.ListConversationsRequest(tenant="t1"), timeout=10)
    assert [c.id for c in listed.conversations] == [conv.id]

    stub.DeleteConversationItem(pb.DeleteConversationItemRequest(
        tenant="t1", conversation_id=conv.id, item_id=created.items[0].id), timeout=10)
    stub.DeleteConversation(pb.DeleteConversationRequest(tenant="t1", conversation_id=conv.id),
                            timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetConversation(pb.GetConversationRequest(tenant="t1", conversation_id=conv.id),
                             timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_responses_over_grpc(stub: history_pb2_grpc.HistoryServiceStub) -> None:
    first = stub.CreateResponse(pb.CreateResponseRequest(tenant="t1", response=pb.StoredResponse(
        model="m", status="completed", input_items=[message("q1")],
        output_items=[message("a1", "assistant")], usage=struct({"total_tokens": 5}))),
        timeout=10).response
    assert first.id.startswith("resp_") and first.usage["total_tokens"] == 5
    second = stub.CreateResponse(pb.CreateResponseRequest(tenant="t1", response=pb.StoredResponse(
        model="m", status="in_progress", previous_response_id=first.id,
        input_items=[message("q2")])), timeout=10).response
    updated = stub.UpdateResponse(pb.UpdateResponseRequest(
        tenant="t1", response=pb.StoredResponse(id=second.id, status="completed",
                                                output_items=[message("a2", "assistant")]),
        update_mask=field_mask_pb2.FieldMask(paths=["status", "output_items"])),
        timeout=10).response
    assert updated.status == "completed" and len(updated.output_items) == 1
    chain = stub.GetResponseChain(pb.GetResponseChainRequest(
        tenant="t1", response_id=second.id), timeout=10).responses
    assert [r.id for r in chain] == [first.id, second.id]
    inputs = stub.ListResponseInputItems(pb.ListResponseInputItemsRequest(
        tenant="t1", response_id=second.id), timeout=10)
    assert len(inputs.items) == 1
    stub.DeleteResponse(pb.DeleteResponseRequest(tenant="t1", response_id=second.id), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetResponse(pb.GetResponseRequest(tenant="t1", response_id=second.id), timeout=10)
    assert error_details(err.value).reason == "RESPONSE_NOT_FOUND"


def test_errors_carry_error_info(stub: history_pb2_grpc.HistoryServiceStub) -> None:
    conv = stub.CreateConversation(pb.CreateConversationRequest(tenant="a"),
                                   timeout=10).conversation
    with pytest.raises(grpc.RpcError) as err:
        stub.GetConversation(pb.GetConversationRequest(tenant="b", conversation_id=conv.id),
                             timeout=10)
    info = error_details(err.value)
    assert info.code is ErrorCode.NOT_FOUND and info.reason == "CONVERSATION_NOT_FOUND"
    assert info.metadata == {"conversation": conv.id}

    with pytest.raises(grpc.RpcError) as err:
        stub.CreateConversation(pb.CreateConversationRequest(
            tenant="a", metadata={f"k{i}": "v" for i in range(17)}), timeout=10)
    info = error_details(err.value)
    assert info.code is ErrorCode.INVALID_ARGUMENT and info.metadata["field"] == "metadata"

    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateConversation(pb.UpdateConversationRequest(
            tenant="a", conversation=pb.Conversation(id=conv.id),
            update_mask=field_mask_pb2.FieldMask(paths=["create_time"])), timeout=10)
    info = error_details(err.value)
    assert info.code is ErrorCode.INVALID_ARGUMENT and info.metadata["field"] == "update_mask"

    with pytest.raises(grpc.RpcError) as err:
        stub.ListConversations(pb.ListConversationsRequest(tenant="a", page_size=500),
                               timeout=10)
    assert error_details(err.value).metadata["field"] == "page_size"


def test_survives_kill_9(db_file: Path) -> None:
    args = ["--history-db", f"sqlite+aiosqlite:///{db_file}"]
    proc = ServiceProcess("history", args, ready_timeout=60).start()
    try:
        channel, stub = stub_for(proc)
        created = stub.CreateConversation(pb.CreateConversationRequest(
            tenant="t", items=[message("keep me")]), timeout=10)
        channel.close()
        assert proc.proc is not None
        os.killpg(proc.proc.pid, signal.SIGKILL)
        proc.proc.wait(10)
    finally:
        proc.stop()
    with ServiceProcess("history", args, ready_timeout=60) as again:
        channel, stub = stub_for(again)
        got = stub.ListConversationItems(pb.ListConversationItemsRequest(
            tenant="t", conversation_id=created.conversation.id), timeout=10)
        assert [i.id for i in got.items] == [created.items[0].id]
        channel.close()


def test_unreachable_database_is_unavailable_not_a_hang() -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere"
    with ServiceProcess("history", ["--history-db", url, "--op-timeout", "2"],
                        wait_ready=False) as proc:
        channel = grpc.insecure_channel(proc.target, options=CHANNEL_OPTIONS)
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = history_pb2_grpc.HistoryServiceStub(channel)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.CreateConversation(pb.CreateConversationRequest(tenant="t"), timeout=20)
            assert time.monotonic() - start < 5
            info = error_details(err.value)
            assert info.code is ErrorCode.UNAVAILABLE and info.reason == "STORAGE_UNAVAILABLE"
        finally:
            channel.close()


@pytest.mark.parametrize("backend", ["sql", "memory"])
def test_retention_purges_old_responses(db_file: Path, backend: str) -> None:
    args = ["--history-backend", backend, "--history-db", f"sqlite+aiosqlite:///{db_file}",
            "--response-max-age", "1"]
    with ServiceProcess("history", args, ready_timeout=60) as proc:
        channel, stub = stub_for(proc)
        try:
            stored = stub.CreateResponse(pb.CreateResponseRequest(
                tenant="t", response=pb.StoredResponse(model="m", input_items=[message("q")])),
                timeout=10).response
            deadline = time.monotonic() + 15
            while True:
                try:
                    stub.GetResponse(pb.GetResponseRequest(tenant="t", response_id=stored.id),
                                     timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.NOT_FOUND
                    break
                assert time.monotonic() < deadline, "response not purged"
                time.sleep(0.3)
        finally:
            channel.close()


def test_migrate_command(db_file: Path) -> None:
    import subprocess
    import sys

    from tests.procs import ROOT

    url = f"sqlite+aiosqlite:///{db_file}"
    for action, expected in (("upgrade", "0001_initial"), ("downgrade", "base"),
                             ("upgrade", "0001_initial")):
        done = subprocess.run([sys.executable, "-m", "services.history.migrate", action,
                               "--history-db", url], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout


def _metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in a Prometheus text exposition (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return None


def test_item_limits_page_tokens_and_metrics(db_file: Path) -> None:
    import urllib.request

    metrics_port = free_port()
    args = ["--history-db", f"sqlite+aiosqlite:///{db_file}", "--max-item-bytes", "4096",
            "--metrics-port", str(metrics_port)]
    with ServiceProcess("history", args, ready_timeout=60) as proc:
        channel, stub = stub_for(proc)
        try:
            conv = stub.CreateConversation(pb.CreateConversationRequest(
                tenant="t", items=[message("x" * 3000)]), timeout=10).conversation

            def invalid(call, request) -> dict[str, str]:  # type: ignore[no-untyped-def]
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=10)
                info = error_details(err.value)
                assert info.code is ErrorCode.INVALID_ARGUMENT, info
                return {"field": info.metadata["field"], "message": info.message}

            big = invalid(stub.CreateConversationItems, pb.CreateConversationItemsRequest(
                tenant="t", conversation_id=conv.id, items=[message("ok"), message("x" * 5000)]))
            assert big["field"] == "items[1].data" and "4096" in big["message"]
            assert invalid(stub.CreateConversationItems, pb.CreateConversationItemsRequest(
                tenant="t", conversation_id=conv.id, items=[pb.Item()]))["field"] == "items[0]"
            assert invalid(stub.CreateConversation, pb.CreateConversationRequest(
                tenant="t", items=[pb.Item(type="message", role="user")])
            )["field"] == "items[0].data.content"
            assert invalid(stub.CreateConversationItems, pb.CreateConversationItemsRequest(
                tenant="t", conversation_id=conv.id, items=[]))["field"] == "items"
            assert invalid(stub.CreateResponse, pb.CreateResponseRequest(
                tenant="t", response=pb.StoredResponse(model="m", input_items=[
                    pb.Item(type="function_call_output", data=struct({"output": "1"}))]))
            )["field"] == "response.input_items[0].data.call_id"
            for token in ("msg_unknown", "x" * 300, "msg_\x01"):
                assert invalid(stub.ListConversationItems, pb.ListConversationItemsRequest(
                    tenant="t", conversation_id=conv.id, page_token=token))["field"] == "page_token"
            assert invalid(stub.ListConversations, pb.ListConversationsRequest(
                tenant="t", page_token="conv_nope"))["field"] == "page_token"
            # Nothing of the rejected writes was stored.
            items = stub.ListConversationItems(pb.ListConversationItemsRequest(
                tenant="t", conversation_id=conv.id), timeout=10).items
            assert len(items) == 1
            assert len(stub.ListConversations(pb.ListConversationsRequest(tenant="t"),
                                              timeout=10).conversations) == 1
            with pytest.raises(grpc.RpcError):
                stub.GetConversation(pb.GetConversationRequest(tenant="t", conversation_id="c"),
                                     timeout=10)

            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
        finally:
            channel.close()
    ops = "sglmesh_history_operations_total"
    assert _metric(text, ops, operation="create_conversation", outcome="ok") == 1
    assert _metric(text, ops, operation="create_conversation", outcome="invalid_argument") == 1
    assert _metric(text, ops, operation="create_conversation_items",
                   outcome="invalid_argument") == 3
    assert _metric(text, ops, operation="list_conversation_items",
                   outcome="invalid_argument") == 3
    assert _metric(text, ops, operation="get_conversation", outcome="not_found") == 1
    assert _metric(text, "sglmesh_history_operation_duration_seconds_count",
                   operation="list_conversation_items") == 4
    assert _metric(text, "sglmesh_history_pool_connections_in_use") == 0
    assert _metric(text, "sglmesh_history_pool_size") == 5
    assert _metric(text, "sglmesh_history_database_up") == 1


def test_memory_backend_process(tmp_path: Path) -> None:
    """``--history-backend memory``: SERVING at once, no database file, bounds from flags,
    and everything gone after a restart."""
    metrics_port = free_port()
    args = ["--history-backend", "memory", "--memory-max-conversations", "2",
            "--history-db", f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}",
            "--metrics-port", str(metrics_port)]
    with ServiceProcess("history", args, ready_timeout=60) as proc:
        channel, stub = stub_for(proc)
        try:
            ids = [stub.CreateConversation(pb.CreateConversationRequest(
                tenant="t", items=[message(f"m{i}")]), timeout=10).conversation.id
                for i in range(3)]
            listed = stub.ListConversations(pb.ListConversationsRequest(tenant="t"), timeout=10)
            assert [c.id for c in listed.conversations] == ids[:0:-1]  # the oldest was dropped
            with pytest.raises(grpc.RpcError) as err:
                stub.GetConversation(pb.GetConversationRequest(tenant="t",
                                                               conversation_id=ids[0]),
                                     timeout=10)
            assert error_details(err.value).reason == "CONVERSATION_NOT_FOUND"
            import urllib.request

            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
                text = reply.read().decode()
        finally:
            channel.close()
    assert not (tmp_path / "unused.db").exists()
    assert _metric(text, "sglmesh_history_memory_evictions_total", kind="conversation",
                   reason="conversations") == 1
    assert _metric(text, "sglmesh_history_operations_total", operation="create_conversation",
                   outcome="ok") == 3
    assert _metric(text, "sglmesh_history_database_up") == 1
    with ServiceProcess("history", args[:4], ready_timeout=60) as again:
        channel, stub = stub_for(again)
        try:
            assert not stub.ListConversations(pb.ListConversationsRequest(tenant="t"),
                                              timeout=10).conversations
        finally:
            channel.close()


def test_none_backend_process(tmp_path: Path) -> None:
    """``--history-backend none``: creates answer with ids, reads are NOT_FOUND with reason
    HISTORY_DISABLED, health is SERVING, nothing touches a database."""
    args = ["--history-backend", "none",
            "--history-db", f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"]
    with ServiceProcess("history", args, ready_timeout=60) as proc:
        channel, stub = stub_for(proc)
        try:
            created = stub.CreateConversation(pb.CreateConversationRequest(
                tenant="t", metadata={"k": "v"}, items=[message("hi")], request_id="r1"),
                timeout=10)
            conv = created.conversation
            assert conv.id.startswith("conv_") and dict(conv.metadata) == {"k": "v"}
            assert created.items[0].id.startswith("msg_") and conv.create_time.seconds > 0
            retry = stub.CreateConversation(pb.CreateConversationRequest(
                tenant="t", metadata={"k": "v"}, items=[message("hi")], request_id="r1"),
                timeout=10)
            assert retry.conversation.id == conv.id
            stored = stub.CreateResponse(pb.CreateResponseRequest(
                tenant="t", response=pb.StoredResponse(
                    model="m", status="completed", input_items=[message("q")],
                    output_items=[message("a", "assistant")])), timeout=10).response
            assert stored.id.startswith("resp_") and len(stored.output_items) == 1

            def not_found(call, request) -> None:  # type: ignore[no-untyped-def]
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=10)
                info = error_details(err.value)
                assert info.code is ErrorCode.NOT_FOUND and info.reason == "HISTORY_DISABLED"
                assert "stores nothing" in info.message and info.metadata["backend"] == "none"

            not_found(stub.GetResponse, pb.GetResponseRequest(tenant="t", response_id=stored.id))
            not_found(stub.GetResponseChain, pb.GetResponseChainRequest(
                tenant="t", response_id=stored.id))
            not_found(stub.ListResponseInputItems, pb.ListResponseInputItemsRequest(
                tenant="t", response_id=stored.id))
            not_found(stub.DeleteResponse, pb.DeleteResponseRequest(tenant="t",
                                                                    response_id=stored.id))
            not_found(stub.GetConversation, pb.GetConversationRequest(tenant="t",
                                                                      conversation_id=conv.id))
            not_found(stub.ListConversationItems, pb.ListConversationItemsRequest(
                tenant="t", conversation_id=conv.id))
            not_found(stub.DeleteConversation, pb.DeleteConversationRequest(
                tenant="t", conversation_id=conv.id))
            assert not stub.ListConversations(pb.ListConversationsRequest(tenant="t"),
                                              timeout=10).conversations
            with pytest.raises(grpc.RpcError) as err:  # bad requests: INVALID_ARGUMENT still
                stub.CreateConversation(pb.CreateConversationRequest(
                    tenant="t", items=[pb.Item(type="message", role="user")]), timeout=10)
            assert error_details(err.value).metadata["field"] == "items[0].data.content"
        finally:
            channel.close()
    assert not (tmp_path / "unused.db").exists()
