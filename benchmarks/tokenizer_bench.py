"""Tokenizer service: tokenize throughput, chat rendering latency, and the cache effect.

    .venv/bin/python benchmarks/tokenizer_bench.py [--tokenizer-dir DIR] [--quick]

Measured side by side in one run, on the same machine:
  1. Tokenize throughput (tokens/s) for 1 KB, 10 KB and 100 KB prompts, in-process
     (TokenizerCore) vs over gRPC (a real `python -m services.tokenizer` process). Every
     prompt is new text, so the exact-match cache never hits.
  2. RenderChat latency (chat template + tokenize) for a short chat, in-process vs gRPC.
  3. A 20-turn conversation rendered turn by turn with the caches on vs off (in-process and
     over gRPC, two service processes): per-turn latency and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sglmesh.tokenizer.v1 import tokenizer_pb2 as pb
from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.net import CHANNEL_OPTIONS, free_port  # noqa: E402
from services.tokenizer.core import TokenizerCore  # noqa: E402

DEFAULT_DIR = Path.home() / ".cache" / "sglmesh" / "models" / "SmolLM2-135M-Instruct"
WORDS = ("the of and to in is that for it with as was on be by this are or from at an which "
         "tokenizer service latency throughput prefix cache model request stream gateway router "
         "worker prompt template conversation answer question token boundary memory bytes "
         "function, parser. JSON: {\"key\": [1, 2, 3]} café naïve 你好 世界 2024-05-01 3.14159 "
         "def main(): return x + y\n").split(" ")
MODEL = "smollm2"


def text_of(size: int, rnd: random.Random) -> str:
    parts: list[str] = []
    n = 0
    while n < size:
        w = rnd.choice(WORDS)
        parts.append(w)
        n += len(w) + 1
    return " ".join(parts)[:size]


def struct(d: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


@contextmanager
def service(tokenizer_dir: Path, *extra: str) -> Iterator[tokenizer_pb2_grpc.TokenizerServiceStub]:
    """A real tokenizer service process on loopback; yields a stub once it serves."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.tokenizer", "--host", "127.0.0.1", "--port", str(port),
         "--tokenizer", f"{MODEL}={tokenizer_dir}", "--log-level", "warning", *extra],
        cwd=ROOT, env=env)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the tokenizer service did not start")
            time.sleep(0.2)
        yield tokenizer_pb2_grpc.TokenizerServiceStub(channel)
    finally:
        channel.close()
        proc.terminate()
        proc.wait(timeout=15)


def timed_pair(a: Callable[[], Any], b: Callable[[], Any],
               runs: int) -> tuple[list[float], list[float]]:
    """Runs a and b alternately (after one warm-up each), so load on a shared machine hits
    both alike; returns their durations."""
    a()
    b()
    ta: list[float] = []
    tb: list[float] = []
    for n in range(runs):
        for fn, out in ((a, ta), (b, tb)) if n % 2 == 0 else ((b, tb), (a, ta)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return ta, tb


def measure_size(core: TokenizerCore, stub: Any, size: int,
                 n: int) -> tuple[float, list[float], list[float]]:
    rnd = random.Random(size)
    texts = [text_of(size, rnd) for _ in range(2 * n + 2)]
    local_texts, remote_texts = iter(texts[::2]), iter(texts[1::2])
    counts: list[int] = []

    def local() -> None:
        counts.append(len(core.tokenize(MODEL, [next(local_texts)], False)[0]))

    def remote() -> None:
        reply = stub.Tokenize(pb.TokenizeRequest(model=MODEL, texts=[next(remote_texts)]))
        counts.append(reply.total_tokens)

    t_local, t_remote = timed_pair(local, remote, n)
    return statistics.mean(counts), t_local, t_remote


def throughput(core: TokenizerCore, stub: Any, sizes: list[int], runs: dict[int, int]) -> None:
    print("\n== Tokenize throughput (new text every call; caches cannot hit) ==")
    print(f"{'prompt':>8} {'tokens':>7} {'in-process tok/s':>17} {'gRPC tok/s':>11} "
          f"{'in-proc ms':>10} {'gRPC ms':>8} {'gRPC/in-proc':>12}")
    for size in sizes:
        tokens, t_local, t_remote = measure_size(core, stub, size, runs[size])
        ml, mr = statistics.median(t_local), statistics.median(t_remote)
        print(f"{size // 1000:>6}KB {tokens:>7.0f} {tokens / ml:>17,.0f} {tokens / mr:>11,.0f} "
              f"{ml * 1e3:>10.2f} {mr * 1e3:>8.2f} {mr / ml:>11.2f}x")


def chat_messages(rnd: random.Random, n: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"[{n}] " + text_of(300, rnd)},
            {"role": "assistant", "content": text_of(400, rnd)},
            {"role": "user", "content": text_of(200, rnd)}]


def chat_latency(core: TokenizerCore, stub: Any, runs: int) -> None:
    print("\n== RenderChat latency (4 messages, ~1 KB, template + tokenize) ==")
    rnd = random.Random(1)
    local_msgs = iter([chat_messages(rnd, i) for i in range(runs + 1)])
    remote_msgs = iter([[struct(m) for m in chat_messages(rnd, i)] for i in range(runs + 1)])
    t_local, t_remote = timed_pair(
        lambda: core.render_chat(MODEL, next(local_msgs)),
        lambda: stub.RenderChat(pb.RenderChatRequest(model=MODEL, messages=next(remote_msgs))),
        runs)
    for name, t in (("in-process", t_local), ("gRPC", t_remote)):
        q = statistics.quantiles(t, n=10)
        print(f"{name:>11}: median {statistics.median(t) * 1e3:.2f} ms, "
              f"p90 {q[-1] * 1e3:.2f} ms over {runs} calls")
    print(f"gRPC/in-process median: "
          f"{statistics.median(t_remote) / statistics.median(t_local):.2f}x")


def conversation(rnd: random.Random, turns: int) -> list[list[dict[str, str]]]:
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 10}]
    out = []
    for _ in range(turns):
        messages.append({"role": "user", "content": text_of(rnd.randint(300, 800), rnd)})
        out.append(list(messages))
        messages.append({"role": "assistant", "content": text_of(rnd.randint(500, 2000), rnd)})
    return out


def cache_effect(tokenizer_dir: Path, on: Any, off: Any, turns: int, convs: int) -> None:
    print(f"\n== {turns}-turn conversation, caches on vs off ({convs} conversations, "
          "new text each; interleaved) ==")
    core_on = TokenizerCore("/tmp", cache_max_bytes=64 << 20, prefix_cache_max_bytes=64 << 20)
    core_off = TokenizerCore("/tmp", cache_max_bytes=0, prefix_cache_max_bytes=0)
    core_on.load_dir(MODEL, str(tokenizer_dir))
    core_off.load_dir(MODEL, str(tokenizer_dir))
    tok_on, tok_off = core_on.get(MODEL), core_off.get(MODEL)
    assert tok_on.chat_template is not None
    rows: dict[str, list[float]] = {k: [] for k in (
        "encode on", "encode off", "render on", "render off", "grpc on", "grpc off")}
    prompt_tokens = 0
    for c in range(convs):
        chats = conversation(random.Random(100 + c), turns)
        prompts = [tok_on.chat_template.render(m) for m in chats]
        prompt_tokens = len(tok_off.encode(prompts[-1]))
        for messages, prompt in zip(chats, prompts, strict=True):
            wire = [struct(m) for m in messages]
            for key, fn in (
                    ("encode on", lambda p=prompt: tok_on.encode(p + " ")),
                    ("encode off", lambda p=prompt: tok_off.encode(p + " ")),
                    ("render on", lambda m=messages: core_on.render_chat(MODEL, m)),
                    ("render off", lambda m=messages: core_off.render_chat(MODEL, m)),
                    ("grpc on", lambda w=wire: on.RenderChat(
                        pb.RenderChatRequest(model=MODEL, messages=w))),
                    ("grpc off", lambda w=wire: off.RenderChat(
                        pb.RenderChatRequest(model=MODEL, messages=w)))):
                start = time.perf_counter()
                fn()
                rows[key].append(time.perf_counter() - start)
    stats = tok_on.cache.stats() if tok_on.cache else {}
    print(f"last turn prompt: {prompt_tokens} tokens; in-process prefix cache: "
          f"{stats['prefix'].hits} hits / {stats['prefix'].misses} misses, "
          f"{stats['prefix'].tokens_reused} tokens reused")
    print(f"{'what':>28} {'cache on ms/turn':>17} {'cache off ms/turn':>18} {'speed-up':>9}")
    for label, key in (("tokenize rendered prompt", "encode"),
                       ("RenderChat in-process", "render"), ("RenderChat over gRPC", "grpc")):
        m_on = statistics.mean(rows[f"{key} on"]) * 1e3
        m_off = statistics.mean(rows[f"{key} off"]) * 1e3
        print(f"{label:>28} {m_on:>17.3f} {m_off:>18.3f} {m_off / m_on:>8.2f}x")
    last_on = statistics.mean(rows["grpc on"][turns - 1::turns]) * 1e3
    last_off = statistics.mean(rows["grpc off"][turns - 1::turns]) * 1e3
    print(f"{'RenderChat gRPC, turn ' + str(turns):>28} {last_on:>17.3f} {last_off:>18.3f} "
          f"{last_off / last_on:>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, default=DEFAULT_DIR,
                        help="Directory with tokenizer.json (default: the embedded SmolLM2).")
    parser.add_argument("--quick", action="store_true", help="Fewer runs (smoke test).")
    args = parser.parse_args()
    if not (args.tokenizer_dir / "tokenizer.json").is_file():
        sys.exit(f"{args.tokenizer_dir} has no tokenizer.json (pass --tokenizer-dir)")
    scale = 0.2 if args.quick else 1.0
    runs = {s: max(3, int(n * scale)) for s, n in ((1000, 300), (10_000, 100), (100_000, 20))}
    core = TokenizerCore("/tmp", cache_max_bytes=64 << 20, prefix_cache_max_bytes=64 << 20)
    core.load_dir(MODEL, str(args.tokenizer_dir))
    print(f"tokenizer: {args.tokenizer_dir} | python {sys.version.split()[0]} | "
          f"{os.cpu_count()} CPUs")
    with service(args.tokenizer_dir, "--workers", "2") as stub, \
            service(args.tokenizer_dir, "--workers", "2", "--cache-max-bytes", "0",
                    "--prefix-cache-max-bytes", "0") as stub_off:
        throughput(core, stub, [1000, 10_000, 100_000], runs)
        chat_latency(core, stub, max(10, int(200 * scale)))
        cache_effect(args.tokenizer_dir, stub, stub_off, 20, max(1, int(5 * scale)))


if __name__ == "__main__":
    main()
