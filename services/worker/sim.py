"""The ``sim`` engine: a simulated SGLang worker for load and routing benchmarks (no model).

What is modelled (all timings scaled by plain parameters, see :class:`SimParams`):

* **Token ids** are deterministic: output token ``i`` of a request is a hash of the prompt and
  ``i`` (and the sample index), never an EOS or stop id, so the same prompt always gives the
  same output. With no ``max_new_tokens`` a request emits ``output_tokens`` tokens and then
  the first EOS id (finish ``stop``).
* **Time**: one engine step is ``decode_ms + decode_ms_per_running * running`` (the decode
  iteration grows with the batch) plus ``prefill_ms_per_token`` for every *uncached* prompt
  token admitted in that step. So a cached prefix makes TTFT shorter, and a big batch makes
  every request slower, as on a real GPU.
* **Prefix cache**: a block radix tree (``block_size`` tokens per block, chained block hashes)
  of finite capacity (``max_total_num_tokens`` minus the KV the running requests hold), LRU
  eviction of unreferenced leaves. Prompt blocks are stored when the prefill finishes, prompt +
  output blocks when the request finishes. ``cached_tokens`` is the matched prefix.
* **KV events**: every store / eviction / flush becomes a stored / removed / cleared event,
  published once per engine step into the shared :class:`services.worker.kv_events.KvEventLog`
  (monotonic sequence numbers, replay window, snapshot for new subscribers), the same
  information SGLang's ZMQ publisher carries.
* **Failure injection**: ``error_rate`` (a request fails with :class:`EngineError`),
  ``hang_rate`` (a request is admitted and then never advances until aborted), ``slow_start``
  (seconds before the engine is ready). Health probes (request ids ``health-*``) are exempt.

Everything runs on the asyncio loop (no threads), so dozens of sim engines fit in one process.
Plain Python: no grpc, no torch.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import random
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from services.worker.engine_api import (
    EngineError,
    EngineLoads,
    EngineOutput,
    SamplingOptions,
    TokenLogprobs,
)
from services.worker.kv_events import (
    Block,
    BlocksRemoved,
    BlocksStored,
    CacheCleared,
    KvEvent,
    KvEventLog,
    block_hash,
)

SIM_VERSION = "sglmesh-sim 0.1.0"


@dataclass
class SimParams:
    """The simulated engine's knobs (flags ``--sim-*`` of the worker)."""

    vocab_size: int = 49152
    eos_token_id: int = 2
    bos_token_id: int = 1
    context_length: int = 8192
    max_running_requests: int = 64
    max_total_num_tokens: int = 65536  # KV capacity (running requests + prefix cache)
    block_size: int = 16
    decode_ms: float = 20.0  # one decode step with one running request
    decode_ms_per_running: float = 0.5  # added per running request
    prefill_ms_per_token: float = 0.05  # per uncached prompt token
    output_tokens: int = 128  # output length when max_new_tokens is not set
    error_rate: float = 0.0
    hang_rate: float = 0.0
    slow_start: float = 0.0
    seed: int = 0
    event_log_batches: int = 4096  # replay window of the KV event log (batches)

    def __post_init__(self) -> None:
        if self.vocab_size < 16:
            raise ValueError(f"--sim-vocab-size must be >= 16, got {self.vocab_size}")
        if self.block_size < 1:
            raise ValueError(f"--sim-block-size must be >= 1, got {self.block_size}")
        if self.max_total_num_tokens < self.block_size:
            raise ValueError("--sim-max-total-tokens must hold at least one block")
        for name in ("error_rate", "hang_rate"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"--sim-{name.replace('_', '-')} must be in [0, 1], got {value}")
        for name in ("decode_ms", "decode_ms_per_running", "prefill_ms_per_token", "slow_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"--sim-{name.replace('_', '-')} must be >= 0")


# ----------------------------------------------------------------------------- radix cache


class _Node:
    __slots__ = ("key", "hash", "parent", "children", "last_access", "refs")

    def __init__(self, key: tuple[int, ...], hash_: int, parent: _Node | None) -> None:
        self.key = key
        self.hash = hash_
        self.parent = parent
        self.children: dict[tuple[int, ...], _Node] = {}
        self.last_access = 0.0
        self.refs = 0


class RadixBlockCache:
    """A radix tree of full token blocks with LRU eviction of unreferenced leaves."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.root = _Node((), 0, None)
        self.pending: list[KvEvent] = []  # events since the engine last published
        self.num_blocks = 0
        self._clock = 0

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def _tick(self) -> float:
        self._clock += 1
        return float(self._clock)

    def _blocks(self, tokens: list[int]) -> list[tuple[int, ...]]:
        bs = self.block_size
        return [tuple(tokens[i:i + bs]) for i in range(0, len(tokens) - bs + 1, bs)]

    def match(self, tokens: list[int]) -> list[_Node]:
        """The cached blocks that prefix ``tokens`` (touched: LRU recency updated)."""
        node, now = self.root, self._tick()
        path: list[_Node] = []
        for key in self._blocks(tokens):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            path.append(child)
            node = child
        return path

    def lock(self, path: list[_Node], delta: int) -> None:
        for node in path:
            node.refs += delta

    def insert(self, tokens: list[int], room_tokens: int) -> list[_Node]:
        """Stores the full blocks of ``tokens``; evicts LRU leaves to stay within
        ``room_tokens`` cached tokens. Returns the cached path (possibly shorter)."""
        node, now = self.root, self._tick()
        path: list[_Node] = []
        new: list[_Node] = []
        parent_of_new: _Node | None = None
        for key in self._blocks(tokens):
            child = node.children.get(key)
            if child is None:
                if self.num_tokens + self.block_size > room_tokens:
                    node.refs += 1  # keep the path we are extending
                    for p in path:
                        p.refs += 1
                    self.evict(self.num_tokens + self.block_size - room_tokens)
                    node.refs -= 1
                    for p in path:
                        p.refs -= 1
                    if self.num_tokens + self.block_size > room_tokens:
                        break
                child = _Node(key, block_hash(node.hash if node is not self.root else None, key),
                              node)
                node.children[key] = child
                self.num_blocks += 1
                if not new:
                    parent_of_new = node
                new.append(child)
            child.last_access = now
            path.append(child)
            node = child
        if new:
            self.pending.append(BlocksStored(
                tuple(Block(n.hash, n.key) for n in new),
                parent_of_new.hash if parent_of_new is not None and parent_of_new is not self.root
                else None))
        return path

    def evict(self, tokens: int) -> int:
        """Evicts at least ``tokens`` worth of unreferenced leaf blocks (LRU first)."""
        leaves = [n for n in self._iter_nodes() if not n.children and n.refs == 0]
        heap = [(n.last_access, id(n), n) for n in leaves]
        heapq.heapify(heap)
        freed, removed = 0, []
        while heap and freed < tokens:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.key]
            self.num_blocks -= 1
            freed += self.block_size
            removed.append(node.hash)
            if parent is not self.root and not parent.children and parent.refs == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        if removed:
            self.pending.append(BlocksRemoved(tuple(removed)))
        return freed

    def clear(self) -> None:
        self.root = _Node((), 0, None)
        self.num_blocks = 0
        self.pending.append(CacheCleared())

    def _iter_nodes(self) -> Iterable[_Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())


# ----------------------------------------------------------------------------- the engine


class _Seq:
    """One sample index of one request."""

    def __init__(self, req: _SimRequest, index: int) -> None:
        self.req = req
        self.index = index
        self.output_ids: list[int] = []
        self.finished = False
        self.logprobs = TokenLogprobs()


class _SimRequest:
    def __init__(self, request_id: str, input_ids: list[int], options: SamplingOptions,
                 max_new: int, hang: bool) -> None:
        self.request_id = request_id
        self.input_ids = input_ids
        self.options = options
        self.max_new = max_new
        self.natural_stop = options.max_new_tokens is None
        self.hang = hang
        self.queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        n = max(1, int(getattr(options, "n", 1) or 1))
        self.seqs = [_Seq(self, i) for i in range(n)]
        self.cached_tokens = 0
        self.path: list[_Node] = []
        self.prefilled = False
        self.prompt_key = block_hash(None, input_ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def kv_tokens(self) -> int:
        """KV held beyond the locked cached prefix."""
        if not self.prefilled:
            return 0
        return (len(self.input_ids) - self.cached_tokens) + sum(len(s.output_ids) for s in self.seqs)


class SimEngine:
    """Implements :class:`services.worker.engine_api.Engine` with simulated time and tokens."""

    name = "sim"
    hf_config: Any = None  # compatibility with servicers that read the torch engine's fields
    batch_decode = True
    weight_bytes = 0
    kv_bytes_per_token = 0

    def __init__(self, params: SimParams | None = None) -> None:
        self.params = params or SimParams()
        p = self.params
        self.context_length = p.context_length
        self.vocab_size = p.vocab_size
        self.eos_token_ids = [p.eos_token_id]
        self.bos_token_id: int | None = p.bos_token_id
        self.max_running_requests = p.max_running_requests
        self.max_total_num_tokens = p.max_total_num_tokens
        self.load_seconds = 0.0
        self.steps = 0
        self.kv_events: KvEventLog | None = KvEventLog(p.block_size, p.event_log_batches)
        self.cache = RadixBlockCache(p.block_size)
        self._rng = random.Random(p.seed)
        self._requests: dict[str, _SimRequest] = {}
        self._waiting: collections.deque[_SimRequest] = collections.deque()
        self._running: list[_SimRequest] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._generated: collections.deque[tuple[float, int]] = collections.deque()
        self.total_requests = 0
        self._prompt_tokens = 0
        self._cached_prompt_tokens = 0
        self.ready = asyncio.Event()
        self.on_prefill_done: Any = None  # callback(request_id) for PD rendezvous
        # PD decode role: requests whose prompt KV came from the prefill peer (no prefill time)
        self.transferred: set[str] = set()
        self.last_step: tuple[int, int, float] = (0, 0, 0.0)  # (batch, uncached tokens, ms)

    # --------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine")

    async def wait_ready(self) -> None:
        if self.params.slow_start:
            await asyncio.sleep(self.params.slow_start)
        self.load_seconds = self.params.slow_start
        self.ready.set()

    def stop(self) -> None:
        self._stopped = True
        for rid in list(self._requests):
            self.abort(rid, "engine stopped")
        if self._task is not None:
            self._task.cancel()
        self._wake.set()

    # --------------------------------------------------------------- public API

    def _submit(self, request_id: str, input_ids: list[int], options: SamplingOptions) -> _SimRequest:
        if self._stopped:
            raise EngineError("the engine is stopped")
        if not input_ids:
            raise EngineError("input_ids is empty")
        if len(input_ids) >= self.context_length:
            raise EngineError(f"prompt has {len(input_ids)} tokens; the context length is "
                              f"{self.context_length}")
        if request_id in self._requests:
            raise EngineError(f"request_id {request_id!r} is already running")
        probe = request_id.startswith("health-")
        if not probe and self.params.error_rate and self._rng.random() < self.params.error_rate:
            raise EngineError(f"sim: injected failure for request {request_id!r}")
        hang = bool(not probe and self.params.hang_rate
                    and self._rng.random() < self.params.hang_rate)
        budget = self.context_length - len(input_ids)
        wanted = self.params.output_tokens if options.max_new_tokens is None \
            else options.max_new_tokens
        req = _SimRequest(request_id, list(input_ids), options, max(1, min(wanted, budget)), hang)
        self._requests[request_id] = req
        self._waiting.append(req)
        self.total_requests += 1
        self._wake.set()
        return req

    async def generate(self, request_id: str, input_ids: list[int],
                       options: SamplingOptions) -> AsyncIterator[EngineOutput]:
        req = self._submit(request_id, input_ids, options)
        remaining = len(req.seqs)
        try:
            while remaining:
                out = await req.queue.get()
                yield out
                if out.finished:
                    remaining -= 1
        finally:
            if not req.finished:
                self.abort(request_id, "consumer went away")

    def abort(self, request_id: str, message: str = "aborted") -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        if req in self._waiting:
            self._waiting.remove(req)
        if req in self._running:
            self._running.remove(req)
        self.cache.lock(req.path, -1)
        req.path = []
        for seq in req.seqs:
            if not seq.finished:
                seq.finished = True
                req.queue.put_nowait(EngineOutput(
                    request_id, [], len(req.input_ids), len(seq.output_ids),
                    cached_tokens=req.cached_tokens, finished=True, finish_reason="abort",
                    output_ids=list(seq.output_ids), abort_message=message, index=seq.index))
        self._wake.set()
        return True

    def active_requests(self) -> int:
        return len(self._requests)

    def _active_tokens(self) -> int:
        return sum(r.kv_tokens for r in self._running)

    def loads(self) -> EngineLoads:
        now = time.monotonic()
        while self._generated and now - self._generated[0][0] > 5.0:
            self._generated.popleft()
        generated = sum(n for _, n in self._generated)
        window = min(5.0, now - self._generated[0][0]) if self._generated else 0.0
        active = self._active_tokens()
        waiting_uncached = 0
        for req in self._waiting:
            waiting_uncached += len(req.input_ids) - self._peek_cached(req.input_ids)
        return EngineLoads(
            num_running=len(self._running), num_waiting=len(self._waiting),
            num_used_tokens=self.cache.num_tokens + active,
            max_total_num_tokens=self.max_total_num_tokens,
            max_running_requests=self.max_running_requests,
            gen_throughput=generated / max(window, 1.0) if generated else 0.0,
            total_requests=self.total_requests, num_waiting_tokens=waiting_uncached,
            cache_hit_rate=(self._cached_prompt_tokens / self._prompt_tokens
                            if self._prompt_tokens else 0.0),
            num_active_tokens=active)

    def flush_cache(self) -> tuple[bool, str]:
        if self._running:
            return False, f"{len(self._running)} requests are running; flush when idle"
        blocks = self.cache.num_blocks
        self.cache.clear()
        self._publish()
        return True, f"flushed {blocks} cached blocks"

    def info(self) -> dict[str, Any]:
        p = self.params
        return {"engine": "sim", "version": SIM_VERSION, "block_size": p.block_size,
                "decode_ms": p.decode_ms, "decode_ms_per_running": p.decode_ms_per_running,
                "prefill_ms_per_token": p.prefill_ms_per_token,
                "max_running_requests": p.max_running_requests,
                "max_total_num_tokens": p.max_total_num_tokens,
                "cached_blocks": self.cache.num_blocks, "steps": self.steps,
                "total_requests": self.total_requests,
                "kv_event_sequence": self.kv_events.last_sequence if self.kv_events else 0}

    def _peek_cached(self, tokens: list[int]) -> int:
        node, n = self.cache.root, 0
        for key in self.cache._blocks(tokens):
            node = node.children.get(key)  # type: ignore[assignment]
            if node is None:
                break
            n += len(key)
        return n

    # --------------------------------------------------------------- the loop

    def token_for(self, req: _SimRequest, seq: _Seq) -> int:
        """Deterministic output id: a hash of (prompt, sample index, position)."""
        position = len(seq.output_ids)
        if req.natural_stop and position >= req.max_new - 1 and not req.options.ignore_eos:
            return self.params.eos_token_id
        value = block_hash(req.prompt_key, (seq.index, position)) & 0x7FFFFFFF
        forbidden = set(self.eos_token_ids) | set(req.options.stop_token_ids)
        low = 3  # keep clear of the usual special ids 0..2
        tok = low + value % (self.vocab_size - low)
        while tok in forbidden:
            tok = low + (tok + 1 - low) % (self.vocab_size - low)
        return tok

    async def _run(self) -> None:
        p = self.params
        while not self._stopped:
            if not self._waiting and not any(not r.hang for r in self._running):
                self._wake.clear()
                await self._wake.wait()
                continue
            admitted: list[_SimRequest] = []
            uncached = 0
            while self._waiting and len(self._running) + len(admitted) < p.max_running_requests:
                req = self._waiting[0]
                cached = self._peek_cached(req.input_ids)
                need = len(req.input_ids) - cached + req.max_new * len(req.seqs)
                busy = self._active_tokens() + sum(len(r.input_ids) for r in admitted)
                if admitted and busy + need > p.max_total_num_tokens:
                    break  # no KV room this step
                self._waiting.popleft()
                req.path = self.cache.match(req.input_ids)
                self.cache.lock(req.path, +1)
                req.cached_tokens = min(len(req.path) * p.block_size, len(req.input_ids) - 1)
                if req.request_id in self.transferred:
                    req.cached_tokens = len(req.input_ids) - 1
                uncached += len(req.input_ids) - req.cached_tokens
                admitted.append(req)
            decoding = [r for r in self._running if not r.hang]
            batch = len(decoding) + len(admitted)
            step = p.decode_ms + p.decode_ms_per_running * max(0, batch - 1) \
                + p.prefill_ms_per_token * uncached
            self.last_step = (batch, uncached, step)
            await asyncio.sleep(step / 1000.0)
            self.steps += 1
            self._running.extend(admitted)
            for req in admitted:
                if req.request_id not in self._requests:
                    continue
                req.prefilled = True
                self._prompt_tokens += len(req.input_ids)
                self._cached_prompt_tokens += req.cached_tokens
                self._store(req, req.input_ids)
                if self.on_prefill_done is not None:
                    self.on_prefill_done(req.request_id)
                if not req.hang:
                    self._advance(req)
            for req in decoding:
                if req.request_id in self._requests:
                    self._advance(req)
            self._publish()

    def _publish(self) -> None:
        events, self.cache.pending = self.cache.pending, []
        if events and self.kv_events is not None:
            self.kv_events.publish(events)

    def _store(self, req: _SimRequest, tokens: list[int]) -> None:
        room = self.max_total_num_tokens - self._active_tokens()
        path = self.cache.insert(tokens, max(room, 0))
        self.cache.lock(path, +1)
        self.cache.lock(req.path, -1)
        req.path = path

    def _advance(self, req: _SimRequest) -> None:
        now = time.monotonic()
        opts = req.options
        for seq in req.seqs:
            if seq.finished:
                continue
            tok = self.token_for(req, seq)
            seq.output_ids.append(tok)
            self._generated.append((now, 1))
            reason: str | None = None
            matched: int | None = None
            if not opts.ignore_eos and len(seq.output_ids) >= opts.min_new_tokens \
                    and tok in self.eos_token_ids:
                reason, matched = "stop", tok
            elif len(seq.output_ids) >= req.max_new:
                reason = "length"
            logprobs = None
            if getattr(opts, "return_logprob", False):
                k = int(getattr(opts, "top_logprobs_num", 0) or 0)
                lp = -0.05 - (tok % 7) * 0.01
                top = [(tok, lp)] + [((tok + j) % self.vocab_size, lp - j) for j in range(1, k)]
                logprobs = TokenLogprobs([tok], [lp], [top[:k]] if k else [[]], [[]])
                seq.logprobs.extend(logprobs)
            out = EngineOutput(
                req.request_id, [tok], len(req.input_ids), len(seq.output_ids),
                cached_tokens=req.cached_tokens, finished=reason is not None,
                finish_reason=reason, matched_token_id=matched, index=seq.index,
                output_logprobs=logprobs)
            if reason is not None:
                seq.finished = True
                out.output_ids = list(seq.output_ids)
                if logprobs is not None:
                    out.all_output_logprobs = seq.logprobs
            req.queue.put_nowait(out)
        if req.finished:
            self._requests.pop(req.request_id, None)
            if req in self._running:
                self._running.remove(req)
            longest = max(req.seqs, key=lambda s: len(s.output_ids))
            self._store(req, req.input_ids + longest.output_ids)
            self.cache.lock(req.path, -1)
            req.path = []
