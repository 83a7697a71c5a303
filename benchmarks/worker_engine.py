"""Embedded torch engine: decode throughput by concurrency, and TTFT with a cached prefix.

    .venv/bin/python benchmarks/worker_engine.py [--dtype bfloat16] [--num-threads 1]
        [--concurrency 1,4,8,16] [--tokens 64] [--rounds 3] [--prefix-tokens 500] [--trials 5]
        [--json F]

In-process (no gRPC): :class:`services.worker.engine.TorchEngine` on the embedded model.

* Throughput: ``C`` concurrent streams, each a distinct chat prompt generating ``--tokens``
  tokens (ignore_eos); tokens/s = all output tokens / wall time from the first submit to the
  last finish (prefills included). The prefix cache is flushed before each level; the levels
  are run ``--rounds`` times, interleaved, and the median is reported.
* Prefix reuse: a ``--prefix-tokens`` shared prefix followed by a distinct question. Each trial
  flushes the cache, runs one request cold (TTFT uncached), then a second request with the same
  prefix and another question (TTFT cached); the two are measured side by side in the same
  trial, and the ratio is taken of the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.worker.engine import SamplingOptions, TorchEngine  # noqa: E402
from services.worker.model_store import default_cache_dir, ensure_embedded_model  # noqa: E402

QUESTIONS = ["What is the capital of France?", "Name three fruits.", "Write a haiku about rain.",
             "Explain gravity briefly.", "What is 12 times 7?", "Describe a cat.",
             "Give me a color.", "Why is the sky blue?", "Name a planet.", "Say hello in Spanish.",
             "What do bees make?", "Name a large ocean.", "Who wrote Hamlet?",
             "Define a noun.", "What is ice?", "List two metals."]


def encode(model_dir: Path, system: str | None, question: str) -> list[int]:
    import jinja2
    from tokenizers import Tokenizer

    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": question}]
    text = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(
        template).render(messages=messages, add_generation_prompt=True)
    return list(Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(
        text, add_special_tokens=False).ids)


async def run_one(engine: TorchEngine, rid: str, ids: list[int], options: SamplingOptions
                  ) -> tuple[float, int, int]:
    """(TTFT seconds, output tokens, cached tokens)."""
    start = time.perf_counter()
    ttft = 0.0
    count = cached = 0
    async for out in engine.generate(rid, ids, options):
        if out.new_token_ids and not ttft:
            ttft = time.perf_counter() - start
        count = out.completion_tokens
        cached = out.cached_tokens
    return ttft, count, cached


async def throughput(engine: TorchEngine, model_dir: Path, levels: list[int],
                     tokens: int, rounds: int) -> list[dict[str, float]]:
    prompts = [encode(model_dir, None, q) for q in QUESTIONS]
    options = SamplingOptions(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
    await run_one(engine, "warmup", prompts[0], SamplingOptions(temperature=0.0,
                                                                 max_new_tokens=4))
    runs: dict[int, list[tuple[float, int, float]]] = {level: [] for level in levels}
    for _ in range(rounds):  # levels interleaved across rounds: drifting machine load is shared
        for level in levels:
            engine.flush_cache()
            start = time.perf_counter()
            results = await asyncio.gather(*(
                run_one(engine, f"tp{level}-{i}",
                        prompts[i % len(prompts)] + [198] * (i // len(prompts)), options)
                for i in range(level)))
            wall = time.perf_counter() - start
            runs[level].append((wall, sum(n for _, n, _ in results),
                                statistics.median(t for t, _, _ in results)))
    rows = []
    for level in levels:
        rates = [n / wall for wall, n, _ in runs[level]]
        rate = statistics.median(rates)
        row = {"concurrency": level, "output_tokens": runs[level][0][1], "rounds": rounds,
               "tokens_per_s": round(rate, 1), "per_stream_tokens_per_s": round(rate / level, 2),
               "tokens_per_s_each_round": [round(r, 1) for r in rates],
               "median_ttft_s": round(statistics.median(t for _, _, t in runs[level]), 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


async def prefix_reuse(engine: TorchEngine, model_dir: Path, prefix_tokens: int,
                       trials: int) -> dict[str, float]:
    unit = ("You are the assistant of a small museum. Visitors ask about opening hours, "
            "tickets, the collection of maps and the cafe; answer in one sentence. ")
    system = unit
    while len(encode(model_dir, system, "?")) < prefix_tokens:
        system += unit
    options = SamplingOptions(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    cold: list[float] = []
    warm: list[float] = []
    cached: list[int] = []
    prompt_len = 0
    for trial in range(trials + 1):
        engine.flush_cache()
        a = encode(model_dir, system, QUESTIONS[(2 * trial) % len(QUESTIONS)])
        b = encode(model_dir, system, QUESTIONS[(2 * trial + 1) % len(QUESTIONS)])
        t_cold, _, c_cold = await run_one(engine, f"cold{trial}", a, options)
        t_warm, _, c_warm = await run_one(engine, f"warm{trial}", b, options)
        assert c_cold == 0, c_cold
        if trial == 0:
            continue  # warm-up trial
        cold.append(t_cold)
        warm.append(t_warm)
        cached.append(c_warm)
        prompt_len = len(b)
    row = {"prefix_tokens": len(encode(model_dir, system, "?")), "prompt_tokens": prompt_len,
           "trials": trials, "cached_tokens": min(cached),
           "ttft_uncached_s": round(statistics.median(cold), 4),
           "ttft_cached_s": round(statistics.median(warm), 4),
           "speedup": round(statistics.median(cold) / statistics.median(warm), 2)}
    print(json.dumps(row), flush=True)
    return row


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3,
                        help="passes over the concurrency levels (median reported)")
    parser.add_argument("--prefix-tokens", type=int, default=500)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    model_dir = Path(args.model_path) if args.model_path else \
        ensure_embedded_model(default_cache_dir())
    levels = [int(x) for x in args.concurrency.split(",") if x]
    engine = TorchEngine(model_dir, dtype=args.dtype, num_threads=args.num_threads,
                         max_running_requests=max(levels))
    engine.start()
    try:
        rows = await throughput(engine, model_dir, levels, args.tokens, args.rounds)
        reuse = await prefix_reuse(engine, model_dir, args.prefix_tokens, args.trials)
    finally:
        engine.stop()
    result = {"dtype": args.dtype, "num_threads": args.num_threads, "tokens": args.tokens,
              "throughput": rows, "prefix_reuse": reuse}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
