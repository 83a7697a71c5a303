"""The OpenAI Conversations API through a real gateway in front of each history backend
(processes on loopback, the ``openai`` SDK as the client).

Conversations need no model: the gateway is started with router and tokenizer addresses that
nothing listens on, which only the generation endpoints would dial.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from services.common.net import free_port
from tests.procs import ServiceProcess


@contextmanager
def suite(backend: str, tmp_path: Path) -> Iterator[openai.OpenAI]:
    with ServiceProcess("history", ["--history-backend", backend, "--history-db",
                                    f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"],
                        ready_timeout=60) as history:
        gateway = ServiceProcess("gateway", [
            "--router", f"127.0.0.1:{free_port()}", "--tokenizer", f"127.0.0.1:{free_port()}",
            "--history", history.target], wait_ready=False)
        gateway.start()
        url = f"http://127.0.0.1:{gateway.port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{url}/liveness", trust_env=False,
                                 timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert gateway.proc is not None and gateway.proc.poll() is None, gateway.logs()
                assert time.monotonic() < deadline, gateway.logs()
                time.sleep(0.1)
            yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                http_client=httpx.Client(trust_env=False, timeout=30))
        finally:
            gateway.stop()


@pytest.mark.parametrize("backend", ["sql", "memory"])
def test_conversations_through_the_sdk(backend: str, tmp_path: Path) -> None:
    with suite(backend, tmp_path) as client:
        conv = client.conversations.create(
            metadata={"topic": "demo"},
            items=[{"type": "message", "role": "user", "content": "Hello!"}])
        assert conv.id.startswith("conv_") and conv.metadata == {"topic": "demo"}
        assert client.conversations.retrieve(conv.id).id == conv.id
        client.conversations.items.create(conv.id, items=[
            {"type": "message", "role": "assistant", "content": "Hi there."}])
        page = client.conversations.items.list(conv.id, order="asc")
        assert [i.model_dump()["content"][0]["text"] for i in page.data] == [
            "Hello!", "Hi there."]
        client.conversations.delete(conv.id)
        with pytest.raises(openai.NotFoundError):
            client.conversations.retrieve(conv.id)


def test_none_backend_through_the_sdk(tmp_path: Path) -> None:
    with suite("none", tmp_path) as client:
        conv = client.conversations.create(
            items=[{"type": "message", "role": "user", "content": "Hello!"}])
        assert conv.id.startswith("conv_")
        with pytest.raises(openai.NotFoundError) as err:
            client.conversations.retrieve(conv.id)
        assert err.value.code == "history_disabled"
        assert "stores nothing" in err.value.message
        with pytest.raises(openai.NotFoundError) as err:
            client.conversations.items.list(conv.id)
        assert err.value.code == "history_disabled"
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve("resp_unknown")
    assert not (tmp_path / "h.db").exists()
