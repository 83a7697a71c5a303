"""Fetching a tokenizer bundle from a worker (SglangScheduler.GetTokenizer): transport only."""

from __future__ import annotations

from smg_grpc_proto.generated import common_pb2, sglang_scheduler_pb2_grpc

from services.common.net import create_channel, strip_scheme


async def fetch_tokenizer_bundle(target: str, timeout: float = 60.0,
                                 wait_for_ready: bool = False) -> tuple[bytes, str]:
    """Joins the streamed zip chunks; returns (zip bytes, sha256 from the final chunk)."""
    parts: list[bytes] = []
    sha256 = ""
    async with create_channel(strip_scheme(target)) as channel:
        stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        call = stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=timeout,
                                 wait_for_ready=wait_for_ready)
        async for chunk in call:
            parts.append(chunk.data)
            if chunk.sha256:
                sha256 = chunk.sha256
    return b"".join(parts), sha256
