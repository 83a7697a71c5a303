"""``LoadsFallback``: GetLoads through the sglang wrapper when SGLang's servicer fails on a section.

smg-grpc-servicer 0.8.0 on sglang 0.5.17 (seen on the GPU host) raises AttributeError -> UNKNOWN
for GetLoads without ``include``. The child is replaced by a plain async function here (no GPU).
"""

from __future__ import annotations

import pytest
from smg_grpc_proto.generated import sglang_scheduler_pb2 as pb

from services.worker.sglang_engine import LoadsFallback


class Unknown(Exception):
    pass


def make_child(fails_when: set[str]):
    seen: list[list[str]] = []

    async def call(raw: bytes) -> bytes:
        request = pb.GetLoadsRequest.FromString(raw)
        sections = list(request.include) or ["all"]
        seen.append(sections)
        if any(s in fails_when for s in sections):
            raise Unknown("AttributeError: 'DisaggregationMetrics' object has no attribute")
        return pb.GetLoadsResponse(version="0.5.17", dp_rank_count=1).SerializeToString()

    return call, seen


async def test_all_sections_fall_back_once_and_stay_narrow() -> None:
    call, seen = make_child({"all"})
    fallback = LoadsFallback(lambda exc: isinstance(exc, Unknown))
    reply = pb.GetLoadsResponse.FromString(
        await fallback(pb.GetLoadsRequest().SerializeToString(), call))
    assert reply.dp_rank_count == 1
    assert seen == [["all"], list(LoadsFallback.LADDER[0])]
    await fallback(pb.GetLoadsRequest().SerializeToString(), call)
    assert seen[-1] == list(LoadsFallback.LADDER[0])  # no second failing attempt
    assert len(seen) == 3


async def test_ladder_goes_down_to_core() -> None:
    call, seen = make_child({"all", "memory"})
    fallback = LoadsFallback(lambda exc: isinstance(exc, Unknown))
    await fallback(pb.GetLoadsRequest(dp_rank=0).SerializeToString(), call)
    assert seen[-1] == ["core"]
    assert pb.GetLoadsRequest.FromString(pb.GetLoadsRequest(dp_rank=0).SerializeToString()).dp_rank == 0


async def test_explicit_sections_and_other_errors_pass_through() -> None:
    call, seen = make_child({"disagg"})
    fallback = LoadsFallback(lambda exc: isinstance(exc, Unknown))
    await fallback(pb.GetLoadsRequest(include=["core"]).SerializeToString(), call)
    assert seen == [["core"]]

    async def broken(raw: bytes) -> bytes:
        raise RuntimeError("UNAVAILABLE")

    with pytest.raises(RuntimeError):
        await fallback(pb.GetLoadsRequest().SerializeToString(), broken)


async def test_every_step_failing_raises() -> None:
    call, _ = make_child({"all", "core", "memory"})
    fallback = LoadsFallback(lambda exc: isinstance(exc, Unknown))
    with pytest.raises(Unknown):
        await fallback(pb.GetLoadsRequest().SerializeToString(), call)


def test_dummy_load_format_is_read() -> None:
    """``--load-format dummy`` (random weights) is read so pre-flight needs no weight files."""
    from services.worker.sglang_engine import parse_sglang_args

    s = parse_sglang_args(["--model-path", "/m", "--load-format", "dummy"], use_sglang=False)
    assert s.load_format == "dummy"
    assert parse_sglang_args(["--model-path", "/m"], use_sglang=False).load_format == "auto"


def test_child_port_leaves_room_for_sglangs_derived_grpc_port(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path) -> None:
    """SGLang 0.5.17 derives a port as --port + 10000 and exits when that exceeds 65535 (seen
    on the GPU host with a private port of 58425): the wrapper's child port stays <= 55535."""
    from types import SimpleNamespace

    from services.worker import sglang_engine as se

    ports = iter([58425, 61000, 41000, 42000, 43000])
    monkeypatch.setattr(se, "free_port_block", lambda count, *a, **k: next(ports))
    config = SimpleNamespace(log_level="info", sglang_launcher="")
    settings = se.SglangSettings(model_path=str(tmp_path))
    wrapper = se.prepare(config, ["--model-path", str(tmp_path)], settings, supports_bind=False)
    assert wrapper.child_port == 41000
    assert wrapper.child_argv[wrapper.child_argv.index("--port") + 1] == "41000"
