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
    eng = TorchEngine(embedded_model_dir, max_running_requests=4, num_threads=1)
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


def test_implements_the_engine_protocol(engine: TorchEngine) -> None:
    from services.worker.engine_api import Engine

    assert isinstance(engine, Engine)
    assert engine.info()["engine"] == "torch" and engine.kv_events is not None


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


@pytest.fixture(scope="module")
def engine32(embedded_model_dir: Path) -> Iterator[TorchEngine]:
    """float32, so cached / batched / chunked greedy output equals the plain one exactly."""
    eng = TorchEngine(embedded_model_dir, dtype="float32", max_running_requests=4,
                      num_threads=1)
    eng.start()
    yield eng
    eng.stop()


async def test_batched_decode_matches_sequential(engine32: TorchEngine,
                                                 chat_ids: Callable[..., list[int]]) -> None:
    """In float32 a batched decode (left padding + masks) gives the unbatched greedy tokens."""
    eng = engine32
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


# --------------------------------------------------------------------- prefix cache


LONG_SYSTEM = ("You are a careful assistant for a travel agency. Answer briefly, name the "
               "city, and never invent facts. ") * 9


async def test_prefix_reuse_same_output(engine32: TorchEngine,
                                        embedded_model_dir: Path) -> None:
    """A repeated 200+-token prefix is served from the block cache: cached_tokens >= 192 and
    greedy output identical to the cold run (float32)."""
    from services.worker.kv_events import BlocksStored

    from .conftest import render_chat

    eng = engine32
    eng.flush_cache()
    prompt = render_chat(embedded_model_dir, [{"role": "system", "content": LONG_SYSTEM},
                                              {"role": "user", "content": QUESTION_FR}])
    assert len(prompt) >= 200
    seq = eng.kv_events.last_sequence if eng.kv_events else 0
    options = SamplingOptions(**GREEDY, max_new_tokens=8)
    cold, cold_final = await collect(eng, "cold", prompt, options)
    assert cold_final.cached_tokens == 0
    warm, warm_final = await collect(eng, "warm", prompt, options)
    assert warm_final.cached_tokens >= 192
    assert warm == cold
    # the events mirror the cache: the stored blocks spell the prompt's prefix
    assert eng.kv_events is not None
    stored = [b for batch in eng.kv_events.since(seq + 1) for ev in batch.events
              if isinstance(ev, BlocksStored) for b in ev.blocks]
    spelled = [t for b in stored for t in b.token_ids]
    assert spelled[:192] == prompt[:192]
    # same prefix, other question: the shared blocks are reused
    other = render_chat(embedded_model_dir, [{"role": "system", "content": LONG_SYSTEM},
                                             {"role": "user", "content": "And of Spain?"}])
    _, other_final = await collect(eng, "other", other, SamplingOptions(**GREEDY,
                                                                        max_new_tokens=2))
    assert other_final.cached_tokens >= 192
    assert eng.loads().cache_hit_rate > 0
    # flush really flushes: cold again, same output
    ok, _ = eng.flush_cache()
    assert ok and eng.prefix_cache.num_blocks == 0
    again, again_final = await collect(eng, "again", prompt, options)
    assert again_final.cached_tokens == 0 and again == cold


QUESTION_FR = "What is the capital of France?"


async def test_chunked_prefill_interleaves_decoding(engine32: TorchEngine,
                                                    embedded_model_dir: Path) -> None:
    """A long prompt is prefilled over several steps while another request keeps decoding."""
    from .conftest import render_chat

    eng = engine32
    eng.flush_cache()
    long_prompt = render_chat(embedded_model_dir, [{"role": "system", "content": LONG_SYSTEM},
                                                   {"role": "user", "content": "Hi"}])
    order: list[str] = []
    started = asyncio.Event()

    async def decoder() -> None:
        async for _ in eng.generate("dec", [1, 504], SamplingOptions(
                **GREEDY, max_new_tokens=20, ignore_eos=True)):
            order.append("dec")
            started.set()

    chunk = eng.prefill_chunk
    eng.prefill_chunk = 48
    try:
        async def first_long() -> None:
            async for out in eng.generate("long2", long_prompt, SamplingOptions(
                    **GREEDY, max_new_tokens=1)):
                if out.new_token_ids:
                    order.append("long-first")

        dec = asyncio.create_task(decoder())
        await started.wait()
        order.append("long-submitted")
        await first_long()
        await dec
    finally:
        eng.prefill_chunk = chunk
    between = order[order.index("long-submitted"):order.index("long-first")]
    # >= 4 prefill steps (48 tokens each), each followed by a decode step of "dec"
    assert len(long_prompt) > 4 * 48
    assert between.count("dec") >= 3, order


# --------------------------------------------------------------------- sampling params


async def collect_n(engine: TorchEngine, rid: str, ids: list[int], options: SamplingOptions
                    ) -> dict[int, tuple[list[int], EngineOutput]]:
    tokens: dict[int, list[int]] = {}
    finals: dict[int, EngineOutput] = {}
    async for out in engine.generate(rid, ids, options):
        tokens.setdefault(out.index, []).extend(out.new_token_ids)
        if out.finished:
            assert out.index not in finals
            finals[out.index] = out
    return {i: (tokens[i], finals[i]) for i in finals}


async def test_n_samples_seeded(engine: TorchEngine, chat_ids: Callable[..., list[int]]) -> None:
    options = SamplingOptions(temperature=1.0, max_new_tokens=6, ignore_eos=True, seed=7, n=3)
    first = await collect_n(engine, "n1", chat_ids(), options)
    assert sorted(first) == [0, 1, 2]
    for tokens, final in first.values():
        assert final.output_ids == tokens and len(tokens) == 6
    assert len({tuple(t) for t, _ in first.values()}) > 1  # seed + index per sample
    second = await collect_n(engine, "n2", chat_ids(), options)
    assert {i: t for i, (t, _) in second.items()} == {i: t for i, (t, _) in first.items()}
    assert engine.active_requests() == 0


async def test_n_abort_finishes_every_index(engine: TorchEngine,
                                            chat_ids: Callable[..., list[int]]) -> None:
    gen = engine.generate("nab", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=400, ignore_eos=True, n=2))
    await gen.__anext__()
    assert engine.abort("nab")
    finals = [out async for out in gen if out.finished]
    assert sorted(o.index for o in finals) == [0, 1]
    assert all(o.finish_reason == "abort" for o in finals)
    assert engine.active_requests() == 0 and engine.loads().num_running == 0


async def test_logprobs(engine32: TorchEngine, chat_ids: Callable[..., list[int]]) -> None:
    import math

    ids = chat_ids()
    options = SamplingOptions(**GREEDY, max_new_tokens=4, ignore_eos=True, return_logprob=True,
                              top_logprobs_num=3, logprob_start_len=0,
                              token_ids_logprob=[2, 42])
    outs = [o async for o in engine32.generate("lp", ids, options)]
    final = outs[-1]
    assert final.finished and final.all_output_logprobs is not None
    lp = final.all_output_logprobs
    assert lp.token_ids == final.output_ids and len(lp.logprobs) == 4
    for token, value, top, requested in zip(lp.token_ids, lp.logprobs, lp.top, lp.requested,
                                            strict=True):
        assert len(top) == 3 and top[0][0] == token  # greedy picks the top token
        assert math.isclose(top[0][1], value, abs_tol=1e-5) and value <= 0
        assert [t for t, _ in requested] == [2, 42]
    incremental = [t for o in outs if o.output_logprobs for t in o.output_logprobs.token_ids]
    assert incremental == final.output_ids
    inputs = outs[0].input_logprobs
    assert inputs is not None and inputs.token_ids == ids
    assert inputs.logprobs[0] is None and all(v is not None and v <= 0
                                              for v in inputs.logprobs[1:])
    assert outs[1].input_logprobs is None
    # logprob_start_len: positions from there on
    start = len(ids) - 5
    late = [o async for o in engine32.generate("lp2", ids, SamplingOptions(
        **GREEDY, max_new_tokens=1, return_logprob=True, logprob_start_len=start))]
    assert late[0].input_logprobs is not None
    assert late[0].input_logprobs.token_ids == ids[start:]
    assert late[0].input_logprobs.logprobs == pytest.approx(inputs.logprobs[start:], abs=1e-4)


async def test_stop_strings(engine: TorchEngine, chat_ids: Callable[..., list[int]],
                            decode: Callable[[list[int]], str]) -> None:
    reference, _ = await collect(engine, "ref-s", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=12))
    text = decode(reference)
    assert "capital of" in text, text
    tokens, final = await collect(engine, "stop-s", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=12, stop=[" of", "zzz"]))
    assert final.finish_reason == "stop" and final.matched_stop_str == " of"
    assert final.matched_token_id is None
    assert final.output_ids == tokens
    assert decode(tokens) == text[:text.index(" of")]  # trimmed
    kept, final = await collect(engine, "stop-k", chat_ids(), SamplingOptions(
        **GREEDY, max_new_tokens=12, stop=[" of"], no_stop_trim=True))
    assert final.matched_stop_str == " of"
    assert decode(kept) == text[:text.index(" of") + 3]
