"""The torch engine with the real embedded model: greedy output, concurrency, abort, limits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from services.worker.engine import EngineOutput, SamplingOptions, TorchEngine

GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def engine(embedded_model_dir: Path) -> Iterator[TorchEngine]:
    eng = TorchEngine(embedded_model_dir, max_running_requests=4)
    eng.start()
    yield eng
    eng.stop()


async def collect(engine: TorchEngine, rid: str, ids: list[int],
                  options: SamplingOptions) -> tuple[list[int], EngineOutput]:
    tokens: list[int] = []
    async for out in engine.generate(rid, ids, options):
        tokens += out.new_token_ids
        if out.finished:
            return tokens, out
    raise AssertionError("no finish")


async def test_greedy_paris(engine: TorchEngine, chat_ids: Callable[..., list[int]],
                            decode: Callable[[list[int]], str]) -> None:
    ids = chat_ids()
    tokens, final = await collect(engine, "paris", ids, SamplingOptions(**GREEDY,
                                                                        max_new_tokens=24))
    assert "Paris" in decode(tokens)
    assert final.finish_reason == "stop" and final.matched_token_id == 2
    assert final.output_ids == tokens
    assert final.prompt_tokens == len(ids) and final.completion_tokens == len(tokens)
    assert engine.active_requests() == 0


async def test_max_new_tokens_length(engine: TorchEngine,
                                     chat_ids: Callable[..., list[int]]) -> None:
    tokens, final = await collect(engine, "len", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=5, ignore_eos=True))
    assert len(tokens) == 5
    assert final.finish_reason == "length" and final.matched_token_id is None


async def test_stop_token_ids(engine: TorchEngine, chat_ids: Callable[..., list[int]]) -> None:
    reference, _ = await collect(engine, "ref", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=6))
    stop = reference[2]
    tokens, final = await collect(engine, "stop", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=6, stop_token_ids=[stop]))
    assert tokens == reference[: reference.index(stop) + 1]
    assert final.finish_reason == "stop" and final.matched_token_id == stop


async def test_min_new_tokens_blocks_eos(engine: TorchEngine,
                                         chat_ids: Callable[..., list[int]]) -> None:
    tokens, final = await collect(engine, "min", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=14, min_new_tokens=12))
    assert len(tokens) >= 12
    assert 2 not in tokens[:11]


async def test_logit_bias_forces_token(engine: TorchEngine,
                                       chat_ids: Callable[..., list[int]]) -> None:
    tokens, _ = await collect(engine, "bias", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=3, ignore_eos=True, logit_bias={42: 100.0}))
    assert tokens == [42, 42, 42]


async def test_seeded_sampling_reproducible(engine: TorchEngine,
                                            chat_ids: Callable[..., list[int]]) -> None:
    options = SamplingOptions(temperature=0.9, top_p=0.9, top_k=40, min_p=0.02,
                              repetition_penalty=1.1, frequency_penalty=0.3,
                              presence_penalty=0.3, max_new_tokens=8, seed=1234)
    first, _ = await collect(engine, "s1", chat_ids(), options)
    second, _ = await collect(engine, "s2", chat_ids(), options)
    assert first == second and len(first) >= 1


async def test_concurrent_requests_interleave(engine: TorchEngine,
                                              chat_ids: Callable[..., list[int]]) -> None:
    events: list[tuple[str, str, float]] = []

    async def run(rid: str, started: asyncio.Event | None) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(rid, chat_ids(), SamplingOptions(
                **GREEDY, max_new_tokens=16, ignore_eos=True)):
            if not tokens:
                events.append((rid, "first", time.monotonic()))
                if started is not None:
                    started.set()
            tokens += out.new_token_ids
            if out.finished:
                events.append((rid, "done", time.monotonic()))
                assert out.finish_reason == "length"
        return tokens

    started = asyncio.Event()
    first = asyncio.create_task(run("A", started))
    await started.wait()
    second = asyncio.create_task(run("B", None))
    a, b = await asyncio.gather(first, second)
    assert len(a) == len(b) == 16
    when = {(rid, kind): t for rid, kind, t in events}
    assert when[("B", "first")] < when[("A", "done")]


async def test_abort_frees_slot(engine: TorchEngine, chat_ids: Callable[..., list[int]]) -> None:
    gen = engine.generate("victim", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=400, ignore_eos=True))
    first = await gen.__anext__()
    assert first.new_token_ids
    assert engine.active_requests() == 1
    assert engine.abort("victim")
    assert engine.active_requests() == 0 and engine.loads().num_running == 0
    final = None
    async for out in gen:
        final = out
    assert final is not None and final.finish_reason == "abort"
    assert not engine.abort("victim")


async def test_closing_consumer_aborts(engine: TorchEngine,
                                       chat_ids: Callable[..., list[int]]) -> None:
    gen = engine.generate("closed", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=400, ignore_eos=True))
    async with contextlib.aclosing(gen):
        await gen.__anext__()
        assert engine.active_requests() == 1
    assert engine.active_requests() == 0

    async def consume() -> None:
        async for _ in engine.generate("cancelled", chat_ids(), SamplingOptions(
                **GREEDY, max_new_tokens=400, ignore_eos=True)):
            pass

    task = asyncio.create_task(consume())
    for _ in range(100):
        await asyncio.sleep(0.02)
        if engine.loads().num_running:
            break
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert engine.active_requests() == 0
    # the slot is really free: a new request runs to completion
    tokens, final = await collect(engine, "after", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=3, ignore_eos=True))
    assert len(tokens) == 3 and final.finish_reason == "length"


async def test_batched_decode_matches_sequential(embedded_model_dir: Path,
                                                 chat_ids: Callable[..., list[int]]) -> None:
    """In float32 a batched decode (left padding + masks) gives the unbatched greedy tokens."""
    eng = TorchEngine(embedded_model_dir, dtype="float32", max_running_requests=4)
    eng.start()
    try:
        prompts = [chat_ids(), chat_ids("Write a poem about the sea."),
                   chat_ids("List three fruits.")]
        options = SamplingOptions(**GREEDY, max_new_tokens=12, ignore_eos=True)
        sequential = [(await collect(eng, f"seq{i}", ids, options))[0]
                      for i, ids in enumerate(prompts)]
        steps_before = eng.steps
        batched = await asyncio.gather(*(collect(eng, f"bat{i}", ids, options)
                                         for i, ids in enumerate(prompts)))
        assert [tokens for tokens, _ in batched] == sequential
        assert eng.steps - steps_before < 3 * 12  # decode steps were shared
    finally:
        eng.stop()
