"""The engine API that :class:`services.worker.server.WorkerServicer` serves over gRPC.

Every worker engine (``torch``: :class:`services.worker.engine.TorchEngine`; ``sim``; any
other) implements the :class:`Engine` protocol below and speaks in the plain dataclasses of
this module. The servicer maps them to and from ``sglang.grpc.scheduler`` messages and holds
no engine-specific logic. Plain Python: no torch, no grpc imports here.

Conventions every engine keeps:

* ``generate`` is an async generator. It yields :class:`EngineOutput` items for every sample
  index ``0 .. options.n - 1`` (interleaved; ``EngineOutput.index`` tells them apart); each
  index ends with exactly one output whose ``finished`` is true, and the generator returns
  once all ``n`` indices have finished. Closing the generator (or cancelling its consumer)
  before that aborts the request: its slots and KV are freed at once.
* Token counts in :class:`EngineOutput` are cumulative per index; ``new_token_ids`` and
  ``output_logprobs`` are incremental; ``output_ids`` is filled on the finishing output.
* ``abort(request_id)`` aborts every index of a request; each unfinished index then yields
  a finishing output with ``finish_reason == "abort"``.
* ``submit``-time problems (duplicate id, prompt too long, engine stopped) raise
  :class:`EngineError` from the first ``__anext__`` of ``generate``.
* ``kv_events`` is the engine's :class:`services.worker.kv_events.KvEventLog` (stored /
  removed / cleared blocks mirroring its prefix cache), or ``None`` when it publishes none
  (``SubscribeKvEvents`` is then UNIMPLEMENTED).
* ``start``/``stop`` are synchronous; ``stop`` aborts whatever still runs.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from services.worker.kv_events import KvEventLog


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
    seed: int | None = None  # sample index i > 0 uses seed + i
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1  # independent samples of the same prompt
    # Stop strings: the engine decodes the tail of the output and stops on a match
    # (finish "stop", ``matched_stop_str`` set). Unless ``no_stop_trim``, the output tokens
    # that lie entirely inside the matched stop string are dropped from the final output.
    stop: list[str] = field(default_factory=list)
    no_stop_trim: bool = False
    skip_special_tokens: bool = True  # how the tail is decoded for stop-string matching
    # Log probabilities.
    return_logprob: bool = False
    top_logprobs_num: int = 0  # top-k alternatives per position (0 = none)
    logprob_start_len: int = -1  # first prompt position with input logprobs; -1 = none
    token_ids_logprob: list[int] = field(default_factory=list)


@dataclass
class TokenLogprobs:
    """Log probabilities for a run of positions (prompt or output).

    ``logprobs[i]`` is the log probability of ``token_ids[i]`` (``None`` for the very first
    prompt token, which has no context); ``top[i]`` lists ``(token_id, logprob)`` best first
    (empty when no top-k was asked); ``requested[i]`` the ``token_ids_logprob`` values.
    """

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    requested: list[list[tuple[int, float]]] = field(default_factory=list)

    def extend(self, other: TokenLogprobs) -> None:
        self.token_ids += other.token_ids
        self.logprobs += other.logprobs
        self.top += other.top
        self.requested += other.requested

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class EngineOutput:
    """One step's result for one sample index of one request. Token counts are cumulative."""

    request_id: str
    new_token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    matched_token_id: int | None = None
    output_ids: list[int] = field(default_factory=list)  # all output ids (on finish)
    abort_message: str = ""
    index: int = 0  # sample index (n > 1)
    matched_stop_str: str | None = None
    output_logprobs: TokenLogprobs | None = None  # for new_token_ids (incremental)
    input_logprobs: TokenLogprobs | None = None  # on the first output of each index
    all_output_logprobs: TokenLogprobs | None = None  # cumulative, on the finishing output


@dataclass
class EngineLoads:
    num_running: int
    num_waiting: int
    num_used_tokens: int  # KV tokens held (running requests + retained prefix cache)
    max_total_num_tokens: int
    max_running_requests: int
    gen_throughput: float  # generated tokens per second over the last few seconds
    total_requests: int
    num_waiting_tokens: int = 0  # prompt tokens of waiting requests not in the prefix cache
    cache_hit_rate: float = 0.0  # cached prompt tokens / prompt tokens (lifetime)
    num_active_tokens: int | None = None  # non-evictable KV tokens (running requests only)
    weight_bytes: int = 0
    kv_cache_bytes: int = 0  # bytes of KV held (num_used_tokens worth)

    @property
    def token_usage(self) -> float:
        if not self.max_total_num_tokens:
            return 0.0
        return min(1.0, self.num_used_tokens / self.max_total_num_tokens)

    @property
    def active_token_usage(self) -> float | None:
        if self.num_active_tokens is None or not self.max_total_num_tokens:
            return None
        return min(1.0, self.num_active_tokens / self.max_total_num_tokens)


@runtime_checkable
class Engine(Protocol):
    """What :class:`~services.worker.server.WorkerServicer` needs from an engine."""

    name: str  # "torch", "sim", ...: reported in GetServerInfo's scheduler_info
    context_length: int  # prompt + output tokens per request
    vocab_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None  # for the 1-token health probe (None: token id 1 is used)
    max_running_requests: int
    max_total_num_tokens: int  # KV capacity in tokens
    load_seconds: float
    steps: int  # engine iterations so far
    kv_events: KvEventLog | None

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def generate(self, request_id: str, input_ids: list[int],
                 options: SamplingOptions) -> AsyncGenerator[EngineOutput, None]: ...

    def abort(self, request_id: str, message: str = "aborted") -> bool: ...

    def active_requests(self) -> int: ...

    def loads(self) -> EngineLoads: ...

    def flush_cache(self) -> tuple[bool, str]:
        """Drops the prefix cache (emitting ``cleared``); ``(False, why)`` when it cannot."""
        ...

    def info(self) -> dict[str, Any]:
        """Engine facts for GetServerInfo's ``scheduler_info`` (JSON-able values)."""
        ...
