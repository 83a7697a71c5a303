"""Tokens/s and TTFT of streamed chat answers through a running sglmesh gateway.

    python benchmarks/chat_stream.py --url http://127.0.0.1:8000 --runs 3 --max-tokens 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
import openai


def one_stream(client: openai.OpenAI, model: str, max_tokens: int) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = 0.0
    usage = None
    for chunk in client.chat.completions.create(
            model=model, stream=True, temperature=0, max_tokens=max_tokens,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
            extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].delta.content and not first:
            first = time.perf_counter() - start
        if chunk.usage:
            usage = chunk.usage
    total = time.perf_counter() - start
    assert usage is not None
    return first, total, usage.completion_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="none",
                           http_client=httpx.Client(trust_env=False, timeout=600))
    one_stream(client, args.model, 8)  # warm-up
    rates, ttfts = [], []
    for _ in range(args.runs):
        ttft, total, tokens = one_stream(client, args.model, args.max_tokens)
        rates.append(tokens / (total - ttft) if total > ttft else 0.0)
        ttfts.append(ttft)
        print(f"{tokens} tokens in {total:.2f}s: TTFT {ttft * 1000:.0f} ms, "
              f"decode {rates[-1]:.1f} tok/s")
    print(f"median decode {statistics.median(rates):.1f} tok/s, "
          f"median TTFT {statistics.median(ttfts) * 1000:.0f} ms over {args.runs} runs")


if __name__ == "__main__":
    main()
