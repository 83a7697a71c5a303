"""Small requests run on the event loop, big ones on the pool: same answers, same errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from sglmesh.tokenizer.v1 import tokenizer_pb2 as pb

from services.common.errors import ErrorCode, ServiceError
from services.tokenizer.core import TokenizerCore
from services.tokenizer.server import TokenizerService


def _struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


@pytest.fixture(scope="module")
def core(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TokenizerCore:
    core = TokenizerCore(tmp_path_factory.mktemp("inline-cache"))
    core.load_dir("smollm2", str(tokenizer_dir))
    return core


async def _decode(service: TokenizerService, chunks: list[list[int]]) -> list[str]:
    async def requests() -> AsyncIterator[pb.DecodeStreamRequest]:
        yield pb.DecodeStreamRequest(start=pb.DecodeStart(model="smollm2", stop=["\n\n"]))
        for n, ids in enumerate(chunks):
            yield pb.DecodeStreamRequest(tokens=pb.DecodeTokens(
                token_ids=ids, finished=n == len(chunks) - 1))

    return [r.text async for r in service.DecodeStream(requests(), None)]  # type: ignore[arg-type]


@pytest.mark.parametrize("inline_max_bytes", [0, 8192, 1 << 30])
async def test_inline_and_pool_agree(core: TokenizerCore, inline_max_bytes: int) -> None:
    with ThreadPoolExecutor(2) as executor:
        service = TokenizerService(core, executor, inline_max_bytes=inline_max_bytes)
        pooled = TokenizerService(core, executor, inline_max_bytes=0)
        request = pb.RenderChatRequest(model="smollm2", messages=[
            _struct({"role": "user", "content": "Hello there, how are you? " * 20})])
        got = await service.RenderChat(request, None)  # type: ignore[arg-type]
        want = await pooled.RenderChat(request, None)  # type: ignore[arg-type]
        assert (got.prompt, list(got.token_ids)) == (want.prompt, list(want.token_ids))
        ids = list(got.token_ids)
        chunks = [ids[:1], ids[1:3], ids[3:200], ids[200:]]
        assert await _decode(service, chunks) == await _decode(pooled, chunks)
        with pytest.raises(ServiceError) as info:  # errors map the same way on the loop
            await service.RenderChat(pb.RenderChatRequest(model="nope", messages=[
                _struct({"role": "user", "content": "x"})]), None)  # type: ignore[arg-type]
        assert info.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(ServiceError) as info:
            await _decode(service, [[10**9]])
        assert info.value.code is ErrorCode.INVALID_ARGUMENT


THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


async def test_a_template_that_opens_reasoning_is_followed_by_the_default_parser(
        tokenizer_dir: Path, tmp_path: Path) -> None:
    """The gateway sends no parser name (the service's --reasoning-parser applies) and the chat
    template itself opened <think>: the model's text up to </think> is reasoning."""
    core = TokenizerCore(tmp_path, reasoning_parser="qwen3")
    core.load_dir("thinker", str(tokenizer_dir), chat_template=THINKING_TEMPLATE)
    tok = core.get("thinker")
    answer = tok.encode("2+2 is 4</think>\n\nIt is 4.", add_special_tokens=False)

    async def requests() -> AsyncIterator[pb.DecodeStreamRequest]:
        yield pb.DecodeStreamRequest(start=pb.DecodeStart(
            model="thinker", render=pb.RenderChatRequest(model="thinker", messages=[
                _struct({"role": "user", "content": "2+2?"})])))
        yield pb.DecodeStreamRequest(tokens=pb.DecodeTokens(token_ids=answer, finished=True))

    with ThreadPoolExecutor(1) as executor:
        service = TokenizerService(core, executor)
        out = [r async for r in service.DecodeStream(requests(), None)]  # type: ignore[arg-type]
    assert out[0].rendered.prompt.endswith("<think>\n")
    assert "".join(r.reasoning_text for r in out[1:]) == "2+2 is 4"
    assert "".join(r.text for r in out[1:]).strip() == "It is 4."
