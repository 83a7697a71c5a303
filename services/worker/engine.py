"""The embedded ``torch`` engine: a transformers causal LM served from one background thread.

Scheduling is iteration-level (continuous batching). One engine step

1. admits waiting samples while fewer than ``max_running_requests`` run;
2. spends a prefill budget of ``prefill_chunk`` tokens on the samples still prefilling, in
   admission order (a long prompt is prefilled over several steps, so the others keep
   decoding in between); a sample whose prompt is complete samples its first token;
3. advances every sample that was already decoding by one token, in ONE batched forward
   pass (``batch_decode``): the samples' own KV caches are left-padded to a common length and
   stacked, an attention mask hides the padding and position ids continue each sample's own
   sequence; each sample then takes back its slice.

Each sample owns its KV cache (a transformers ``DynamicCache``). The prefix cache
(:class:`~services.worker.prefix_cache.BlockCache`) keeps copies of the KV of full
``block_size``-token blocks of prompts (and of finished outputs); a new sample copies the KV of
its longest cached prefix into its own cache and prefills only the rest, and reports those
tokens as ``cached_tokens``. The cache's stored / removed / cleared blocks are published on
:attr:`TorchEngine.kv_events`.

``n > 1`` runs ``n`` samples of one prompt (the later ones reuse the first one's prompt
blocks through the prefix cache); sample ``i`` of a seeded request uses ``seed + i``.
Log probabilities are those of the model's raw distribution (log-softmax of the logits before
temperature, penalties and filtering). Stop strings are matched on the decoded tail of the
output (:mod:`services.worker.stop_strings`).

In float32, batched and cached outputs equal unbatched, uncached greedy outputs token for token;
in bfloat16 different reduction shapes can flip a near-tie after a few dozen tokens.

All model work happens in the engine thread; the asyncio side only enqueues work and reads
outputs, so the event loop is never blocked. Plain Python: no transport types here.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from services.worker.engine_api import (
    EngineError,
    EngineLoads,
    EngineOutput,
    SamplingOptions,
    TokenLogprobs,
)
from services.worker.kv_events import KvEventLog
from services.worker.prefix_cache import BlockCache
from services.worker.stop_strings import StopStringMatcher

__all__ = ["EngineError", "EngineLoads", "EngineOutput", "InvalidRequest", "SamplingOptions",
           "TokenLogprobs", "TorchEngine"]

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW = 5.0


class InvalidRequest(EngineError):
    """A request the engine rejects for its content (the servicer answers INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class _Group:
    """One client request: ``n`` samples sharing a request id and an output queue."""

    def __init__(self, request_id: str, n: int, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self.samples: list[_Sample] = []
        self.submitted_at = time.monotonic()

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def post(self, output: EngineOutput) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, output)
        except RuntimeError:  # the consumer's loop is gone
            pass


class _Sample:
    def __init__(self, group: _Group, index: int, input_ids: list[int],
                 options: SamplingOptions, max_new_tokens: int, hashes: list[int]) -> None:
        self.group = group
        self.index = index
        self.request_id = group.request_id
        self.input_ids = input_ids
        self.options = options
        self.max_new_tokens = max_new_tokens
        self.hashes = hashes  # chained block hashes of the prompt
        self.output_ids: list[int] = []
        self.released = 0  # output tokens sent to the consumer
        self.cache: Any = None
        self.prefill_pos = 0  # prompt tokens whose KV is in ``cache``
        self.cached_tokens = 0
        self.decoding = False
        self.finished = False
        self.generator: Any = None
        self.counts: Any = None
        self.seen: Any = None
        self.stop_matcher: StopStringMatcher | None = None
        self.logprobs: TokenLogprobs | None = TokenLogprobs() if options.return_logprob else None
        self.input_logprobs: TokenLogprobs | None = None
        self.sent_first = False

    @property
    def num_tokens(self) -> int:
        return self.prefill_pos + len(self.output_ids)


class TorchEngine:
    """A transformers causal LM with continuous (iteration-level) scheduling on one thread."""

    name = "torch"

    def __init__(self, model_path: str | Path, device: str = "cpu", dtype: str = "bfloat16",
                 max_running_requests: int = 8, context_length: int = 0,
                 num_threads: int = 0, batch_decode: bool = True, block_size: int = 16,
                 prefix_cache_tokens: int = 16384, prefill_chunk: int = 256,
                 kv_event_buffer: int = 10000) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        if prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be > 0, got {prefill_chunk}")
        self.model_path = Path(model_path)
        self.device = torch.device(device)
        if num_threads <= 0:
            num_threads = max(1, os.cpu_count() or 1)
        if self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        self.dtype = dtype
        self.torch_dtype = getattr(torch, dtype)
        start = time.monotonic()
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.torch_dtype)
        self.model: Any = model.to(self.device)
        self.model.eval()
        # transformers 5.2x renamed forward's past_key_values to cache (the old name goes in
        # 5.40); the floor of our range (5.0) only knows the old one.
        self._cache_kwarg = ("cache" if "cache" in inspect.signature(self.model.forward).parameters
                             else "past_key_values")
        self.load_seconds = time.monotonic() - start
        self.generation_config: Any = None
        try:
            self.generation_config = GenerationConfig.from_pretrained(self.model_path)
        except OSError:
            self.generation_config = None
        self.tokenizer: Any = None
        tokenizer_file = self.model_path / "tokenizer.json"
        if tokenizer_file.is_file():
            from tokenizers import Tokenizer

            self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        model_max = int(getattr(self.hf_config, "max_position_embeddings", 0) or 0) or 4096
        self.context_length = min(context_length, model_max) if context_length > 0 else model_max
        self.vocab_size = int(self.hf_config.vocab_size)
        self.eos_token_ids = self._eos_ids()
        bos = getattr(self.hf_config, "bos_token_id", None)
        self.bos_token_id: int | None = int(bos) if isinstance(bos, int) else None
        self.max_running_requests = max_running_requests
        self.batch_decode = batch_decode
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self.kv_events: KvEventLog | None = KvEventLog(block_size, kv_event_buffer)
        self.prefix_cache = BlockCache(block_size, prefix_cache_tokens, self.kv_events)
        self.max_total_num_tokens = (self.context_length * max_running_requests
                                     + self.prefix_cache.capacity_tokens)
        self.weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        cfg = self.hf_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        self.kv_bytes_per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * element

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._groups: dict[str, _Group] = {}
        self._waiting: collections.deque[_Sample] = collections.deque()
        self._running: list[_Sample] = []
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._generated: collections.deque[tuple[float, int]] = collections.deque()
        self.total_requests = 0
        self.steps = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.generated_tokens_total = 0
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
            pending = list(self._groups)
            self._wake.notify_all()
        for rid in pending:
            self.abort(rid, "engine stopped")
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --------------------------------------------------------------------- public API

    def _validate(self, input_ids: list[int], options: SamplingOptions) -> int:
        if not input_ids:
            raise InvalidRequest("tokenized.input_ids", "input_ids is empty")
        if len(input_ids) >= self.context_length:
            raise InvalidRequest(
                "tokenized.input_ids",
                f"prompt has {len(input_ids)} tokens; the context length is "
                f"{self.context_length}")
        if options.n < 1:
            raise InvalidRequest("sampling_params.n", f"n must be >= 1, got {options.n}")
        if options.stop and self.tokenizer is None:
            raise InvalidRequest("sampling_params.stop",
                                 "stop strings need the model's tokenizer.json")
        if options.top_logprobs_num < 0:
            raise InvalidRequest("top_logprobs_num",
                                 f"top_logprobs_num must be >= 0, got {options.top_logprobs_num}")
        bad = [t for t in options.token_ids_logprob if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest("token_ids_logprob",
                                 f"token id {bad[0]} is out of the vocabulary")
        budget = self.context_length - len(input_ids)
        return budget if options.max_new_tokens is None else min(options.max_new_tokens, budget)

    def submit(self, request_id: str, input_ids: list[int], options: SamplingOptions) -> _Group:
        """Queues a request (``options.n`` samples); outputs arrive on the group's queue."""
        max_new = self._validate(input_ids, options)
        ids = [int(t) for t in input_ids]
        hashes = self.prefix_cache.hashes(ids)
        group = _Group(request_id, options.n, asyncio.get_running_loop())
        group.samples = [_Sample(group, i, ids, options, max_new, hashes)
                         for i in range(options.n)]
        with self._wake:
            if self._stopped:
                raise EngineError("the engine is stopped")
            if request_id in self._groups:
                raise EngineError(f"request_id {request_id!r} is already running")
            self._groups[request_id] = group
            self._waiting.extend(group.samples)
            self.total_requests += 1
            self._wake.notify_all()
        return group

    async def generate(self, request_id: str, input_ids: list[int],
                       options: SamplingOptions) -> AsyncGenerator[EngineOutput, None]:
        """Yields outputs of every sample index until each has finished.

        Closing the generator or cancelling its consumer before the end aborts the request.
        """
        group = self.submit(request_id, input_ids, options)
        remaining = options.n
        try:
            while remaining:
                output = await group.queue.get()
                yield output
                if output.finished:
                    remaining -= 1
        finally:
            if remaining:
                self.abort(request_id, "consumer went away")

    def abort(self, request_id: str, message: str = "aborted") -> bool:
        """Frees the request now (KV included); each unfinished sample ends with "abort"."""
        with self._wake:
            group = self._groups.pop(request_id, None)
            if group is None:
                return False
            victims = [s for s in group.samples if not s.finished]
            for sample in victims:
                sample.finished = True
                sample.cache = None
                if sample in self._waiting:
                    self._waiting.remove(sample)
                if sample in self._running:
                    self._running.remove(sample)
        for sample in victims:
            out = list(sample.output_ids[:sample.released])
            group.post(EngineOutput(
                request_id, [], len(sample.input_ids), len(out),
                cached_tokens=sample.cached_tokens, finished=True, finish_reason="abort",
                output_ids=out, abort_message=message, index=sample.index,
                all_output_logprobs=self._logprob_slice(sample, 0, len(out))))
        return True

    def active_requests(self) -> int:
        with self._lock:
            return len(self._groups)

    def flush_cache(self) -> tuple[bool, str]:
        """Drops the prefix cache. Running samples keep their own KV, so this is always safe."""
        count = self.prefix_cache.clear()
        return True, f"flushed {count} cached blocks ({count * self.block_size} tokens)"

    def loads(self) -> EngineLoads:
        now = time.monotonic()
        with self._lock:
            active = sum(s.num_tokens for s in self._running)
            waiting = list(self._waiting)
            while self._generated and now - self._generated[0][0] > THROUGHPUT_WINDOW:
                self._generated.popleft()
            generated = sum(n for _, n in self._generated)
            running = len(self._running)
        uncached = 0
        for sample in waiting:
            hit = self.prefix_cache.match(sample.hashes, len(sample.input_ids) - 1, touch=False)
            uncached += len(sample.input_ids) - len(hit) * self.block_size
        used = active + self.prefix_cache.num_tokens
        return EngineLoads(
            num_running=running, num_waiting=len(waiting), num_used_tokens=used,
            max_total_num_tokens=self.max_total_num_tokens,
            max_running_requests=self.max_running_requests,
            gen_throughput=generated / THROUGHPUT_WINDOW if generated else 0.0,
            total_requests=self.total_requests, num_waiting_tokens=uncached,
            cache_hit_rate=(self.cached_tokens_total / self.prompt_tokens_total
                            if self.prompt_tokens_total else 0.0),
            num_active_tokens=active, weight_bytes=self.weight_bytes,
            kv_cache_bytes=used * self.kv_bytes_per_token)

    def info(self) -> dict[str, Any]:
        return {"engine": self.name, "batch_decode": self.batch_decode, "dtype": self.dtype,
                "device": str(self.device),
                "scheduling": "iteration-level (continuous batching), chunked prefill",
                "max_running_requests": self.max_running_requests,
                "max_total_num_tokens": self.max_total_num_tokens,
                "prefill_chunk": self.prefill_chunk, "block_size": self.block_size,
                "prefix_cache_tokens": self.prefix_cache.capacity_tokens,
                "prefix_cache_blocks": self.prefix_cache.num_blocks,
                "model_load_seconds": round(self.load_seconds, 3), "steps": self.steps,
                "total_requests": self.total_requests}

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
                    while self._waiting and len(self._running) < self.max_running_requests:
                        self._running.append(self._waiting.popleft())
                    prefilling = [s for s in self._running if not s.decoding]
                    decoding = [s for s in self._running if s.decoding]
                try:
                    budget = self.prefill_chunk
                    for sample in prefilling:
                        if budget <= 0:
                            break
                        budget -= self._prefill(sample, budget)
                    live = [s for s in decoding if not s.finished]
                    if self.batch_decode and len(live) > 1:
                        self._decode_batch(live)
                    else:
                        for sample in live:
                            self._decode_one(sample)
                    self.steps += 1
                except Exception as exc:  # a broken step fails its requests, not the thread
                    log.exception("engine step failed")
                    self.last_error = str(exc)
                    for rid in {s.request_id for s in prefilling + decoding}:
                        self.abort(rid, f"engine error: {exc}")

    def _new_cache(self, layers: list[tuple[Any, Any]] | None = None) -> Any:
        from transformers import DynamicCache

        if layers:
            return DynamicCache(ddp_cache_data=layers, config=self.hf_config)
        return DynamicCache(config=self.hf_config)

    def _start_prefill(self, sample: _Sample) -> None:
        import torch

        opts = sample.options
        limit = len(sample.input_ids) - 1  # the last prompt token is always computed
        if opts.return_logprob and 0 <= opts.logprob_start_len < len(sample.input_ids):
            # input logprobs need the logits from position logprob_start_len - 1 on
            limit = min(limit, max(opts.logprob_start_len - 1, 0))
            sample.input_logprobs = TokenLogprobs()
        hits = self.prefix_cache.match(sample.hashes, limit)
        layers: list[tuple[Any, Any]] = []
        if hits:
            for i in range(len(hits[0].kv)):
                keys = torch.cat([b.kv[i][0] for b in hits], dim=2)
                values = torch.cat([b.kv[i][1] for b in hits], dim=2)
                layers.append((keys.to(self.device), values.to(self.device)))
        sample.cache = self._new_cache(layers)
        sample.prefill_pos = sample.cached_tokens = len(hits) * self.block_size
        with self._lock:
            self.prompt_tokens_total += len(sample.input_ids)
            self.cached_tokens_total += sample.cached_tokens
        self._init_sampling_state(sample)

    def _prefill(self, sample: _Sample, budget: int) -> int:
        """Prefills up to ``budget`` prompt tokens; samples the first token at the end."""
        import torch

        if sample.finished:
            return 0
        if sample.cache is None:
            self._start_prefill(sample)
        ids = sample.input_ids
        begin = sample.prefill_pos
        end = min(len(ids), begin + budget)
        want_input = sample.input_logprobs is not None and \
            end > sample.options.logprob_start_len - 1
        chunk = torch.tensor([ids[begin:end]], dtype=torch.long, device=self.device)
        positions = torch.arange(begin, end, device=self.device).unsqueeze(0)
        out = self.model(input_ids=chunk, position_ids=positions,
                         **{self._cache_kwarg: sample.cache},
                         use_cache=True, logits_to_keep=0 if want_input else 1)
        logits = out.logits[0].float()
        if want_input:
            self._input_logprobs(sample, begin, end, logits)
        with self._lock:
            if sample.finished:  # aborted while its forward pass ran
                sample.cache = None
                return end - begin
            sample.prefill_pos = end
        self._cache_blocks(sample, ids[:end])
        if end == len(ids):
            sample.decoding = True
            self._accept(sample, logits[-1])
        return end - begin

    def _input_logprobs(self, sample: _Sample, begin: int, end: int, logits: Any) -> None:
        """Input logprobs of prompt positions ``(begin, end]`` from this chunk's logits."""
        import torch

        acc = sample.input_logprobs
        assert acc is not None
        opts = sample.options
        ids = sample.input_ids
        start = max(opts.logprob_start_len, 0)
        if begin == 0 and start == 0:
            acc.token_ids.append(ids[0])
            acc.logprobs.append(None)
            acc.top.append([])
            acc.requested.append([])
        first = max(begin + 1, start, 1)
        last = min(end, len(ids) - 1)  # position end predicts ids[end]
        if first > last:
            return
        rows = logits[first - 1 - begin:last - begin]
        logprobs = torch.log_softmax(rows, dim=-1)
        targets = torch.tensor(ids[first:last + 1], dtype=torch.long)
        picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        acc.token_ids += ids[first:last + 1]
        acc.logprobs += picked
        acc.top += self._top(logprobs, opts.top_logprobs_num)
        acc.requested += self._requested(logprobs, opts.token_ids_logprob)

    @staticmethod
    def _top(logprobs: Any, k: int) -> list[list[tuple[int, float]]]:
        import torch

        if k <= 0:
            return [[] for _ in range(logprobs.shape[0])]
        values, indices = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
        return [list(zip(i, v, strict=True))
                for i, v in zip(indices.tolist(), values.tolist(), strict=True)]

    @staticmethod
    def _requested(logprobs: Any, token_ids: list[int]) -> list[list[tuple[int, float]]]:
        if not token_ids:
            return [[] for _ in range(logprobs.shape[0])]
        values = logprobs[:, token_ids].tolist()
        return [list(zip(token_ids, row, strict=True)) for row in values]

    def _cache_blocks(self, sample: _Sample, token_ids: list[int]) -> None:
        """Copies the KV of the full blocks of ``token_ids`` (all in the sample's cache)
        into the prefix cache (blocks cached already are only touched)."""
        if self.prefix_cache.capacity_blocks == 0 or sample.cache is None:
            return
        hashes = sample.hashes if len(token_ids) <= len(sample.input_ids) else \
            self.prefix_cache.hashes(token_ids)
        hashes = hashes[:len(token_ids) // self.block_size]
        if not hashes:
            return
        layers = sample.cache.layers
        bs = self.block_size

        def kv(i: int) -> list[tuple[Any, Any]]:
            return [(layer.keys[:, :, i * bs:(i + 1) * bs].clone(),
                     layer.values[:, :, i * bs:(i + 1) * bs].clone()) for layer in layers]

        self.prefix_cache.insert(token_ids, hashes, kv)

    def _decode_one(self, sample: _Sample) -> None:
        import torch

        if sample.finished:
            return
        position = sample.num_tokens - 1
        ids = torch.tensor([[sample.output_ids[-1]]], dtype=torch.long, device=self.device)
        positions = torch.tensor([[position]], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, position_ids=positions,
                         **{self._cache_kwarg: sample.cache}, use_cache=True, logits_to_keep=1)
        self._accept(sample, out.logits[0, -1].float())

    def _batchable(self, sample: _Sample) -> bool:
        from transformers.cache_utils import DynamicLayer

        return sample.cache is not None and all(
            type(layer) is DynamicLayer for layer in sample.cache.layers)

    def _decode_batch(self, samples: list[_Sample]) -> None:
        """One decode token for several samples in ONE forward pass (left padding + mask)."""
        import torch
        import torch.nn.functional as F

        singles = [s for s in samples if not self._batchable(s)]
        samples = [s for s in samples if self._batchable(s)]
        for sample in singles:
            self._decode_one(sample)
        if len(samples) < 2:
            for sample in samples:
                self._decode_one(sample)
            return
        lengths = [s.cache.get_seq_length() for s in samples]
        longest = max(lengths)
        layers = []
        for i in range(len(samples[0].cache.layers)):
            keys, values = [], []
            for sample, length in zip(samples, lengths, strict=True):
                layer = sample.cache.layers[i]
                pad = (0, 0, longest - length, 0)
                keys.append(F.pad(layer.keys, pad))
                values.append(F.pad(layer.values, pad))
            layers.append((torch.cat(keys), torch.cat(values)))
        batch = self._new_cache(layers)
        mask = torch.zeros((len(samples), longest + 1), dtype=torch.long, device=self.device)
        for row, length in enumerate(lengths):
            mask[row, longest - length:] = 1
        ids = torch.tensor([[s.output_ids[-1]] for s in samples], dtype=torch.long,
                           device=self.device)
        positions = torch.tensor([[n] for n in lengths], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         **{self._cache_kwarg: batch}, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        filled: list[Any] = list(batch.layers)
        for row, (sample, length) in enumerate(zip(samples, lengths, strict=True)):
            start = longest - length
            for mine, layer in zip(sample.cache.layers, filled, strict=True):
                # the sample's own slice (old KV + the new token); no new cache object
                mine.keys = layer.keys[row:row + 1, :, start:]
                mine.values = layer.values[row:row + 1, :, start:]
            self._accept(sample, logits[row])

    # --------------------------------------------------------------------- sampling

    def _accept(self, sample: _Sample, logits: Any) -> None:
        """Samples the next token from ``logits``, checks the finish and publishes."""
        import torch

        opts = sample.options
        logits = logits[: self.vocab_size].cpu()
        if sample.logprobs is not None:
            logprobs = torch.log_softmax(logits, dim=-1).unsqueeze(0)
        token = self._sample(sample, logits)
        if sample.logprobs is not None:
            sample.logprobs.token_ids.append(token)
            sample.logprobs.logprobs.append(float(logprobs[0, token]))
            sample.logprobs.top += self._top(logprobs, opts.top_logprobs_num)
            sample.logprobs.requested += self._requested(logprobs, opts.token_ids_logprob)
        sample.output_ids.append(token)
        if sample.counts is not None:
            sample.counts[token] += 1
        if sample.seen is not None:
            sample.seen[token] = True
        finish_reason, matched_token, matched_str = self._check_finish(sample, token)
        release = len(sample.output_ids)
        if sample.stop_matcher is not None:
            check = sample.stop_matcher.check(
                sample.output_ids, sample.released,
                allow_match=finish_reason is None and
                len(sample.output_ids) >= opts.min_new_tokens)
            if check.matched is not None:
                finish_reason, matched_token, matched_str = "stop", None, check.matched
                release = check.release
            elif finish_reason is None:
                release = check.release
        finished = finish_reason is not None
        with self._lock:
            if sample.finished:  # aborted while its forward pass ran
                sample.cache = None
                return
            self._generated.append((time.monotonic(), 1))
            self.generated_tokens_total += 1
            if finished:
                sample.finished = True
                if sample in self._running:
                    self._running.remove(sample)
                group = sample.group
                if group.finished and self._groups.get(group.request_id) is group:
                    del self._groups[group.request_id]
        if finished:
            self._cache_blocks(sample, sample.input_ids + sample.output_ids[:-1])
            sample.cache = None
            if release < len(sample.output_ids):  # trimmed stop string
                del sample.output_ids[release:]
        new = sample.output_ids[sample.released:release]
        first = sample.released
        sample.released = release
        if not new and not finished:
            return
        output = EngineOutput(
            sample.request_id, new, len(sample.input_ids), release,
            cached_tokens=sample.cached_tokens, finished=finished, finish_reason=finish_reason,
            matched_token_id=matched_token, matched_stop_str=matched_str,
            output_ids=list(sample.output_ids) if finished else [], index=sample.index,
            output_logprobs=self._logprob_slice(sample, first, release))
        if not sample.sent_first:
            sample.sent_first = True
            output.input_logprobs = sample.input_logprobs
        if finished:
            output.all_output_logprobs = self._logprob_slice(sample, 0, release)
        sample.group.post(output)

    @staticmethod
    def _logprob_slice(sample: _Sample, begin: int, end: int) -> TokenLogprobs | None:
        lp = sample.logprobs
        if lp is None:
            return None
        return TokenLogprobs(lp.token_ids[begin:end], lp.logprobs[begin:end],
                             lp.top[begin:end], lp.requested[begin:end])

    def _check_finish(self, sample: _Sample, token: int
                      ) -> tuple[str | None, int | None, str | None]:
        opts = sample.options
        n = len(sample.output_ids)
        if not opts.ignore_eos and n >= opts.min_new_tokens:
            if token in opts.stop_token_ids or token in self.eos_token_ids:
                return "stop", token, None
        if n >= sample.max_new_tokens or len(sample.input_ids) + n >= self.context_length:
            return "length", None, None
        return None, None, None

    def _decode_text(self, skip_special: bool) -> Any:
        tokenizer = self.tokenizer

        def decode(ids: list[int]) -> str:
            return str(tokenizer.decode(ids, skip_special_tokens=skip_special))

        return decode

    def _init_sampling_state(self, sample: _Sample) -> None:
        import torch

        opts = sample.options
        if opts.frequency_penalty or opts.presence_penalty:
            sample.counts = torch.zeros(self.vocab_size, dtype=torch.float32)
        if opts.repetition_penalty != 1.0:
            sample.seen = torch.zeros(self.vocab_size, dtype=torch.bool)
            sample.seen[torch.tensor(sample.input_ids, dtype=torch.long)] = True
        if opts.temperature > 0:
            sample.generator = torch.Generator(device="cpu")
            if opts.seed is not None:
                sample.generator.manual_seed(opts.seed + sample.index)
            else:
                sample.generator.seed()
        if opts.stop and self.tokenizer is not None:
            sample.stop_matcher = StopStringMatcher(
                opts.stop, self._decode_text(opts.skip_special_tokens), opts.no_stop_trim)

    def _sample(self, sample: _Sample, logits: Any) -> int:
        import torch

        opts = sample.options
        logits = logits.clone()
        for tok, bias in opts.logit_bias.items():
            logits[tok] += bias
        if sample.seen is not None:
            penalty = opts.repetition_penalty
            picked = logits[sample.seen]
            logits[sample.seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
        if sample.counts is not None:
            logits -= opts.frequency_penalty * sample.counts
            logits -= opts.presence_penalty * (sample.counts > 0).float()
        if len(sample.output_ids) < opts.min_new_tokens:
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
        return int(torch.multinomial(probs, 1, generator=sample.generator).item())
