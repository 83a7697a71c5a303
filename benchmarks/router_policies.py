"""Router policy decision cost and memory; radix tree / KV index memory per cached token.

    .venv/bin/python benchmarks/router_policies.py            # the full table
    .venv/bin/python benchmarks/router_policies.py --quick    # fewer decisions

Decision cost: mean wall time of one ``select_worker`` call (plus the router's own
bookkeeping that a real dispatch does: the load guard around it) over a multi-turn,
shared-prefix workload: ``--conversations`` conversations, each a 1,024-token system prompt
shared by groups of 8 conversations plus a growing history, ``--prompt-tokens`` long on average.
The policy sees all N workers (routable). cache_aware precise runs with a KV index fed by
synthetic stored events so every worker holds a share of the prefixes.

Memory: ``tracemalloc`` bytes held by the policy's state after the run (tree, ring, pins, index).
Tree memory: tokens inserted as distinct 1,000-token prompts spread over 8 workers, reported per
million cached tokens (``size`` = tokens on edges), for the radix tree and the KV block index.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
import tracemalloc
from array import array
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smg_grpc_proto.generated import common_pb2  # noqa: E402

from services.router.kv_index import KvIndex  # noqa: E402
from services.router.policies import (  # noqa: E402
    CacheAwarePolicy,
    PolicyConfig,
    SelectionInfo,
    create_policy,
)
from services.router.radix_tree import RadixTree  # noqa: E402
from services.router.workers import Health, ModelCard, Worker  # noqa: E402

POLICIES = ("round_robin", "random", "power_of_two", "consistent_hashing", "manual",
            "prefix_hash", "cache_aware", "cache_aware_precise")
BLOCK = 16


def make_workers(n: int) -> list[Worker]:
    return [Worker(url=f"grpc://10.0.{i // 250}.{i % 250}:30000", card=ModelCard("m"),
                   health=Health.READY) for i in range(n)]


def workload(conversations: int, turns: int, prompt_tokens: int, seed: int = 0
             ) -> list[SelectionInfo]:
    """Multi-turn requests, interleaved: each turn extends its conversation's history."""
    rng = random.Random(seed)
    systems = [[rng.randrange(50_000) for _ in range(1024)] for _ in range(max(1, conversations // 8))]
    histories = [list(systems[c % len(systems)]) for c in range(conversations)]
    step = max(16, (prompt_tokens - 1024) // max(1, turns))
    requests = []
    for _turn in range(turns):
        for c in range(conversations):
            histories[c] += [rng.randrange(50_000) for _ in range(step)]
            requests.append(SelectionInfo(token_ids=array("I", histories[c]),
                                          routing_key=f"conv-{c}"))
    rng.shuffle(requests)
    return requests


def precise_index(workers: list[Worker], requests: list[SelectionInfo]) -> KvIndex:
    """Every worker holds the blocks of the prompts a hash of the conversation gives it."""
    index = KvIndex(block_size=BLOCK)
    ev_hash = 1
    for info in requests[: len(requests) // 2]:
        worker = workers[hash(info.routing_key) % len(workers)]
        tokens = info.token_ids
        blocks = []
        for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
            blocks.append(common_pb2.KvBlock(block_hash=ev_hash,
                                             token_ids=list(tokens[start:start + BLOCK]),
                                             block_size=BLOCK))
            ev_hash += 1
        index.apply_event(worker.url, common_pb2.KvCacheEvent(
            stored=common_pb2.KvBlocksStored(blocks=blocks)))
    for w in workers:
        index.set_live(w.url, True)
    return index


def build(name: str, workers: list[Worker], requests: list[SelectionInfo]) -> object:
    if name == "cache_aware_precise":
        policy = CacheAwarePolicy(PolicyConfig())
        policy.kv_index = precise_index(workers, requests)
        return policy
    return create_policy(name, PolicyConfig(), random.Random(0))


def decision_cost(name: str, n: int, requests: list[SelectionInfo]) -> dict[str, float]:
    workers = make_workers(n)
    policy = build(name, workers, requests)
    select = policy.select_worker  # type: ignore[attr-defined]
    samples = []
    for info in requests:
        t0 = time.perf_counter_ns()
        worker = select(workers, info)
        with worker.track():
            pass
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return {"mean_us": statistics.fmean(samples), "p50_us": statistics.median(samples),
            "p99_us": sorted(samples)[int(0.99 * (len(samples) - 1))]}


def router_select_cost(policy: str, n: int, requests: list[SelectionInfo]) -> float:
    """Mean us of ``Router.select`` (model lookup, health/breaker filter, policy, span)."""
    from services.router.config import RouterConfig
    from services.router.router import Router

    router = Router(RouterConfig(policy=policy))
    for w in make_workers(n):
        router.registry.add(w)
    samples = []
    for info in requests:
        t0 = time.perf_counter_ns()
        worker = router.select("m", info)
        with worker.track():
            pass
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(samples)


def policy_memory(name: str, n: int, requests: list[SelectionInfo]) -> int:
    workers = make_workers(n)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    policy = build(name, workers, requests)
    for info in requests:
        policy.select_worker(workers, info)  # type: ignore[attr-defined]
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del policy
    return held


def tree_memory(total_tokens: int, prompt_len: int = 1000, tenants: int = 8) -> dict[str, float]:
    rng = random.Random(1)
    prompts = [array("I", (rng.randrange(50_000) for _ in range(prompt_len)))
               for _ in range(total_tokens // prompt_len)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tree = RadixTree()
    for i, p in enumerate(prompts):
        tree.insert(p, f"grpc://w{i % tenants}:1", now=float(i))
    tree_bytes = tracemalloc.get_traced_memory()[0] - base
    t0 = time.perf_counter()
    tree.evict(tree.size // 2)
    evict_s = time.perf_counter() - t0
    tracemalloc.stop()
    size_after = tree.size
    del tree
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = KvIndex(block_size=BLOCK)
    h = 1
    for i, p in enumerate(prompts):
        blocks = []
        for start in range(0, len(p) - BLOCK + 1, BLOCK):
            blocks.append(common_pb2.KvBlock(block_hash=h, token_ids=p[start:start + BLOCK],
                                             block_size=BLOCK))
            h += 1
        index.apply_event(f"grpc://w{i % tenants}:1", common_pb2.KvCacheEvent(
            stored=common_pb2.KvBlocksStored(blocks=blocks)))
    index_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    million = total_tokens / 1e6
    return {"tokens": total_tokens, "tree_mib_per_m_tokens": tree_bytes / 2**20 / million,
            "tree_bytes_per_token": tree_bytes / total_tokens,
            "evict_half_s": evict_s, "tree_tokens_after_evict": size_after,
            "kv_index_mib_per_m_tokens": index_bytes / 2**20 / million,
            "kv_index_bytes_per_token": index_bytes / total_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="*", default=[8, 64, 512])
    parser.add_argument("--conversations", type=int, default=256)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--tree-tokens", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="64 conversations, 4 turns")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.turns = 64, 4
    requests = workload(args.conversations, args.turns, args.prompt_tokens)
    mean_len = statistics.fmean(len(r.token_ids) for r in requests)
    print(f"workload: {len(requests)} requests, mean prompt {mean_len:.0f} tokens, "
          f"{args.conversations} conversations x {args.turns} turns; python {sys.version.split()[0]}")
    results: dict[str, object] = {"requests": len(requests), "mean_prompt_tokens": mean_len}
    rows = []
    print(f"{'policy':22} {'workers':>7} {'mean us':>9} {'p50 us':>8} {'p99 us':>8} {'state KiB':>10}")
    for name in POLICIES:
        for n in args.workers:
            cost = decision_cost(name, n, requests)
            mem = policy_memory(name, n, requests)
            rows.append({"policy": name, "workers": n, **cost, "state_kib": mem / 1024})
            print(f"{name:22} {n:7d} {cost['mean_us']:9.1f} {cost['p50_us']:8.1f} "
                  f"{cost['p99_us']:8.1f} {mem / 1024:10.0f}")
    results["decisions"] = rows
    print(f"{'Router.select p50 us':22} " + " ".join(f"{n:>7}w" for n in args.workers))
    selects = {}
    for name in ("round_robin", "cache_aware"):
        selects[name] = [router_select_cost(name, n, requests) for n in args.workers]
        print(f"{name:22} " + " ".join(f"{v:8.1f}" for v in selects[name]))
    results["router_select_p50_us"] = selects
    tree = tree_memory(args.tree_tokens)
    results["tree"] = tree
    print(f"radix tree: {tree['tree_mib_per_m_tokens']:.1f} MiB per million cached tokens "
          f"({tree['tree_bytes_per_token']:.1f} B/token, {tree['tokens']} distinct tokens, "
          f"1,000-token prompts, 8 workers); evicting half took {tree['evict_half_s'] * 1000:.0f} ms")
    print(f"KV block index: {tree['kv_index_mib_per_m_tokens']:.1f} MiB per million cached "
          f"tokens ({tree['kv_index_bytes_per_token']:.1f} B/token, block size {BLOCK})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
