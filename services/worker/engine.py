"""The embedded ``torch`` engine: a transformers causal LM served from one background thread.

Scheduling is iteration-level (continuous batching): one engine loop step admits waiting
requests (one prefill forward pass each, which also samples their first token) and advances
every other running request by exactly one token. Requests join and leave between two steps.

Each request owns its KV cache (a transformers ``DynamicCache``). With ``batch_decode`` (the
default) the decode tokens of all running requests are computed in ONE batched forward pass:
their caches are left-padded to a common length and stacked, an attention mask hides the
padding, and position ids continue each request's own sequence; each request then takes back
its slice. Prefills run one request at a time. In float32 batched greedy output equals
unbatched greedy output token for token; in bfloat16 the different reduction shapes can flip a
near-tie after a few dozen tokens (numerics, not a masking error). ``batch_decode=False``
interleaves one forward pass per request instead.

All model work happens in the engine thread; the asyncio side only enqueues work and reads
outputs, so the event loop is never blocked. Plain Python: no transport types here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EngineError(Exception):
    """A request the engine cannot take (duplicate id, too long, engine stopped)."""


@dataclass
class SamplingOptions:
    """Semantic sampling parameters (already defaulted: no proto3 zeros here)."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    max_new_tokens: int | None = None  # None = up to the context length
    min_new_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass
class EngineOutput:
    """One step's result for one request. Token counts are cumulative."""

    request_id: str
    new_token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_token_id: int | None = None
    output_ids: list[int] = field(default_factory=list)  # all output ids so far (on finish)
    abort_message: str = ""


@dataclass
class EngineLoads:
    num_running: int
    num_waiting: int
    num_used_tokens: int
    max_total_num_tokens: int
    max_running_requests: int
    gen_throughput: float  # generated tokens per second over the last few seconds
    total_requests: int
    num_waiting_tokens: int = 0  # prompt tokens of waiting requests (none are cached)

    @property
    def token_usage(self) -> float:
        if not self.max_total_num_tokens:
            return 0.0
        return self.num_used_tokens / self.max_total_num_tokens


class _Request:
    def __init__(self, request_id: str, input_ids: list[int], options: SamplingOptions,
                 loop: asyncio.AbstractEventLoop, max_new_tokens: int) -> None:
        self.request_id = request_id
        self.input_ids = list(input_ids)
        self.options = options
        self.loop = loop
        self.queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self.max_new_tokens = max_new_tokens
        self.output_ids: list[int] = []
        self.cache: Any = None
        self.next_input: list[int] = self.input_ids
        self.finished = False
        self.generator: Any = None
        self.counts: Any = None  # output token counts (for frequency/presence penalties)
        self.seen: Any = None  # prompt+output token ids (for the repetition penalty)
        self.admitted_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    def post(self, output: EngineOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, output)
        except RuntimeError:  # the consumer's loop is gone
            pass


class TorchEngine:
    """A transformers causal LM with continuous (iteration-level) scheduling on one thread."""

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "bfloat16",
                 max_running_requests: int = 8, context_length: int = 0,
                 num_threads: int = 0, batch_decode: bool = True) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        self.model_path = Path(model_path)
        self.device = torch.device(device)
        if num_threads <= 0:
            num_threads = max(1, os.cpu_count() or 1)
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        self.torch_dtype = getattr(torch, dtype)
        start = time.monotonic()
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.torch_dtype)
        self.model: Any = model.to(self.device)
        self.model.eval()
        self.load_seconds = time.monotonic() - start
        self.generation_config: Any = None
        try:
            self.generation_config = GenerationConfig.from_pretrained(self.model_path)
        except OSError:
            self.generation_config = None
        model_max = int(getattr(self.hf_config, "max_position_embeddings", 0) or 0) or 4096
        self.context_length = min(context_length, model_max) if context_length > 0 else model_max
        self.vocab_size = int(self.hf_config.vocab_size)
        self.eos_token_ids = self._eos_ids()
        self.max_running_requests = max_running_requests
        self.batch_decode = batch_decode
        self.max_total_num_tokens = self.context_length * max_running_requests
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        cfg = self.hf_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        self.kv_bytes_per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * element

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._requests: dict[str, _Request] = {}
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._generated: collections.deque[tuple[float, int]] = collections.deque()
        self.total_requests = 0
        self.steps = 0
        self.last_error: str = ""

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        for source in (self.generation_config, self.hf_config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is None:
                continue
            for v in value if isinstance(value, list | tuple) else [value]:
                if int(v) not in ids:
                    ids.append(int(v))
        return ids

    # --------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="torch-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            pending = list(self._requests.values())
            self._wake.notify_all()
        for req in pending:
            self.abort(req.request_id, "engine stopped")
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --------------------------------------------------------------------- public API

    def submit(self, request_id: str, input_ids: list[int],
               options: SamplingOptions) -> _Request:
        """Queues a request; its outputs arrive on the returned handle's queue."""
        if not input_ids:
            raise EngineError("input_ids is empty")
        if len(input_ids) >= self.context_length:
            raise EngineError(
                f"prompt has {len(input_ids)} tokens; the context length is {self.context_length}")
        budget = self.context_length - len(input_ids)
        max_new = budget if options.max_new_tokens is None else min(options.max_new_tokens, budget)
        req = _Request(request_id, input_ids, options, asyncio.get_running_loop(), max_new)
        with self._wake:
            if self._stopped:
                raise EngineError("the engine is stopped")
            if request_id in self._requests:
                raise EngineError(f"request_id {request_id!r} is already running")
            self._requests[request_id] = req
            self._waiting.append(req)
            self.total_requests += 1
            self._wake.notify_all()
        return req

    async def generate(self, request_id: str, input_ids: list[int],
                       options: SamplingOptions) -> AsyncGenerator[EngineOutput, None]:
        """Yields outputs until (and including) the finishing one.

        Closing the generator or cancelling its consumer before the end aborts the request.
        """
        req = self.submit(request_id, input_ids, options)
        try:
            while True:
                output = await req.queue.get()
                yield output
                if output.finished:
                    return
        finally:
            if not req.finished:
                self.abort(request_id, "consumer went away")

    def abort(self, request_id: str, message: str = "aborted") -> bool:
        """Frees the request now (KV cache included); its consumer gets a finish "abort"."""
        with self._wake:
            req = self._requests.pop(request_id, None)
            if req is None:
                return False
            req.finished = True
            if req in self._waiting:
                self._waiting.remove(req)
            if req in self._running:
                self._running.remove(req)
            req.cache = None
        req.post(EngineOutput(
            request_id, [], len(req.input_ids), len(req.output_ids), finished=True,
            finish_reason="abort", output_ids=list(req.output_ids), abort_message=message))
        return True

    def active_requests(self) -> int:
        with self._lock:
            return len(self._requests)

    def loads(self) -> EngineLoads:
        now = time.monotonic()
        with self._lock:
            used = sum(r.num_tokens for r in self._running)
            while self._generated and now - self._generated[0][0] > 5.0:
                self._generated.popleft()
            generated = sum(n for _, n in self._generated)
            window = min(5.0, now - self._generated[0][0]) if self._generated else 0.0
            return EngineLoads(
                num_running=len(self._running), num_waiting=len(self._waiting),
                num_used_tokens=used, max_total_num_tokens=self.max_total_num_tokens,
                max_running_requests=self.max_running_requests,
                gen_throughput=generated / max(window, 1.0) if generated else 0.0,
                total_requests=self.total_requests,
                num_waiting_tokens=sum(len(r.input_ids) for r in self._waiting))

    # --------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stopped and not self._waiting and not self._running:
                        self._wake.wait()
                    if self._stopped:
                        return
                    admitted: list[_Request] = []
                    while self._waiting and len(self._running) + len(admitted) < \
                            self.max_running_requests:
                        admitted.append(self._waiting.popleft())
                    decoding = list(self._running)
                    self._running.extend(admitted)
                try:
                    for req in admitted:
                        self._step(req, prefill=True)
                    live = [r for r in decoding if not r.finished]
                    if self.batch_decode and len(live) > 1:
                        self._decode_batch(live)
                    else:
                        for req in live:
                            self._step(req, prefill=False)
                    self.steps += 1
                except Exception as exc:  # a broken step fails its requests, not the thread
                    log.exception("engine step failed")
                    self.last_error = str(exc)
                    for req in admitted + decoding:
                        self.abort(req.request_id, f"engine error: {exc}")

    def _step(self, req: _Request, prefill: bool) -> None:
        """One forward pass for one request (its prefill, or one decode token)."""
        import torch
        from transformers import DynamicCache

        if req.finished:
            return
        if prefill:
            req.admitted_at = time.monotonic()
            req.cache = DynamicCache(config=self.hf_config)
            self._init_sampling_state(req)
        ids = torch.tensor([req.next_input], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, past_key_values=req.cache, use_cache=True,
                         logits_to_keep=1)
        self._accept(req, out.logits[0, -1].float())

    def _batchable(self, req: _Request) -> bool:
        from transformers.cache_utils import DynamicLayer

        return req.cache is not None and all(
            type(layer) is DynamicLayer for layer in req.cache.layers)

    def _decode_batch(self, reqs: list[_Request]) -> None:
        """One decode token for several requests in ONE forward pass.

        The requests' own KV caches are left-padded to a common length and stacked; an
        attention mask hides the padding and position ids continue each request's own
        sequence. Afterwards each request gets back its slice (old KV + the new token).
        """
        import torch
        import torch.nn.functional as F
        from transformers import DynamicCache

        singles = [r for r in reqs if not self._batchable(r)]
        reqs = [r for r in reqs if self._batchable(r)]
        for req in singles:
            self._step(req, prefill=False)
        if len(reqs) < 2:
            for req in reqs:
                self._step(req, prefill=False)
            return
        lengths = [r.cache.get_seq_length() for r in reqs]
        longest = max(lengths)
        layers = []
        for i in range(len(reqs[0].cache.layers)):
            keys, values = [], []
            for req, length in zip(reqs, lengths, strict=True):
                layer = req.cache.layers[i]
                pad = (0, 0, longest - length, 0)
                keys.append(F.pad(layer.keys, pad))
                values.append(F.pad(layer.values, pad))
            layers.append((torch.cat(keys), torch.cat(values)))
        batch = DynamicCache(ddp_cache_data=layers, config=self.hf_config)
        mask = torch.zeros((len(reqs), longest + 1), dtype=torch.long, device=self.device)
        for row, length in enumerate(lengths):
            mask[row, longest - length:] = 1
        ids = torch.tensor([r.next_input for r in reqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([[n] for n in lengths], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         past_key_values=batch, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        filled: list[Any] = list(batch.layers)
        for row, (req, length) in enumerate(zip(reqs, lengths, strict=True)):
            start = longest - length
            req.cache = DynamicCache(ddp_cache_data=[
                (layer.keys[row:row + 1, :, start:], layer.values[row:row + 1, :, start:])
                for layer in filled], config=self.hf_config)
            self._accept(req, logits[row])

    def _accept(self, req: _Request, logits: Any) -> None:
        """Samples the next token from ``logits`` and publishes it."""
        token = self._sample(req, logits)
        with self._lock:
            if req.finished:  # aborted while its forward pass ran
                req.cache = None
                return
            req.output_ids.append(token)
            req.next_input = [token]
            self._generated.append((time.monotonic(), 1))
            finish_reason, matched = self._check_finish(req, token)
            if finish_reason is not None:
                req.finished = True
                req.cache = None
                self._requests.pop(req.request_id, None)
                if req in self._running:
                    self._running.remove(req)
        if req.counts is not None:
            req.counts[token] += 1
        if req.seen is not None:
            req.seen[token] = True
        req.post(EngineOutput(
            req.request_id, [token], len(req.input_ids), len(req.output_ids),
            finished=finish_reason is not None, finish_reason=finish_reason,
            matched_token_id=matched,
            output_ids=list(req.output_ids) if finish_reason is not None else []))

    def _check_finish(self, req: _Request, token: int) -> tuple[str | None, int | None]:
        opts = req.options
        n = len(req.output_ids)
        if not opts.ignore_eos and n >= opts.min_new_tokens:
            if token in opts.stop_token_ids or token in self.eos_token_ids:
                return "stop", token
        if n >= req.max_new_tokens or req.num_tokens >= self.context_length:
            return "length", None
        return None, None

    def _init_sampling_state(self, req: _Request) -> None:
        import torch

        opts = req.options
        if opts.frequency_penalty or opts.presence_penalty:
            req.counts = torch.zeros(self.vocab_size, dtype=torch.float32)
        if opts.repetition_penalty != 1.0:
            req.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            req.seen[torch.tensor(req.input_ids, dtype=torch.long)] = True
        if opts.temperature > 0:
            req.generator = torch.Generator(device="cpu")
            if opts.seed is not None:
                req.generator.manual_seed(opts.seed)
            else:
                req.generator.seed()

    def _sample(self, req: _Request, logits: Any) -> int:
        import torch

        opts = req.options
        logits = logits[: self.vocab_size].cpu()
        for tok, bias in opts.logit_bias.items():
            logits[tok] += bias
        if req.seen is not None:
            penalty = opts.repetition_penalty
            picked = logits[req.seen]
            logits[req.seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        if req.counts is not None:
            logits -= opts.frequency_penalty * req.counts
            logits -= opts.presence_penalty * (req.counts > 0).float()
        if len(req.output_ids) < opts.min_new_tokens:
            blocked = set(opts.stop_token_ids) | set(self.eos_token_ids)
            for tok in blocked:
                if 0 <= tok < logits.shape[0]:
                    logits[tok] = float("-inf")
        if opts.temperature <= 0:
            return int(torch.argmax(logits).item())
        logits = logits / opts.temperature
        if 0 < opts.top_k < logits.shape[0]:
            kth = torch.topk(logits, opts.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        if opts.min_p > 0:
            probs[probs < opts.min_p * probs.max()] = 0.0
        if opts.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            drop = cumulative - sorted_probs > opts.top_p  # keep the smallest prefix >= top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        if float(probs.sum()) <= 0:
            return int(torch.argmax(logits).item())
        return int(torch.multinomial(probs, 1, generator=req.generator).item())
