"""Configuration of the tokenizer/parser service (``python -m services.tokenizer``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from services.common.config import ServiceConfig, option
from services.tokenizer.reasoning import REASONING_PARSERS
from services.tokenizer.tool_parsers import TOOL_PARSERS

DEFAULT_CACHE_DIR = str(Path.home() / ".cache" / "sglmesh" / "tokenizers")


def parse_tokenizer_spec(spec: str) -> tuple[str, str]:
    """``MODEL=SOURCE`` -> (model, source); SOURCE is a directory or ``grpc://host:port``."""
    model, sep, source = spec.partition("=")
    model, source = model.strip(), source.strip()
    if not sep or not model or not source:
        raise ValueError(f"--tokenizer expects MODEL=SOURCE (a directory or grpc://host:port), "
                         f"got {spec!r}")
    return model, source


@dataclass
class TokenizerConfig(ServiceConfig):
    """Tokenizer/parser service: chat templates, tokenize, incremental detokenize, parsers."""

    service_name: ClassVar[str] = "tokenizer"

    tokenizer: list[str] = option(
        [], help="Tokenizers to load at start-up, as MODEL=SOURCE where SOURCE is a directory "
                 "holding tokenizer.json or grpc://host:port of a worker serving GetTokenizer.")
    chat_template: str = option(
        "", help="A Jinja file whose template replaces the chat template of the models "
                 "loaded at start-up.")
    cache_dir: str = option(DEFAULT_CACHE_DIR,
                            help="Where tokenizer bundles fetched from workers are unpacked.")
    workers: int = option(0, help="Size of the CPU thread pool (0 = number of cores).")
    inline_max_bytes: int = option(
        8192, help="Requests up to this size (serialized bytes; a decode step: up to this many "
                   "/ 8 tokens) run on the event loop: for them a thread-pool hop costs more than "
                   "the work. Larger ones go to the pool. 0 = always the pool.")
    worker_timeout: float = option(
        120.0, help="Seconds to wait for a worker's GetTokenizer bundle at start-up.")
    tool_call_parser: str = option(
        "auto", help="Tool-call parser for requests that have tools and name none: auto (by "
                     "model name, json when the name is not known), none, or one of "
                     + ", ".join(sorted(TOOL_PARSERS)) + ".",
        metadata={"choices": ["auto", "none", *sorted(TOOL_PARSERS)]})
    reasoning_parser: str = option(
        "auto", help="Reasoning parser for requests that name none: auto (gpt_oss for gpt-oss "
                     "models, whose raw output is harmony markup; none for others), empty "
                     "(none), or one of " + ", ".join(sorted(REASONING_PARSERS)) + ".",
        metadata={"choices": ["auto", "", *sorted(REASONING_PARSERS)]})
    cache_max_bytes: int = option(
        64 << 20, help="Memory bound (bytes, per model) of the exact-match prompt cache; "
                       "0 disables it.")
    cache_max_entries: int = option(
        10000, help="Entry bound (per model) of the exact-match prompt cache.")
    prefix_cache_max_bytes: int = option(
        64 << 20, help="Memory bound (bytes, per model) of the prefix cache at special-token "
                       "boundaries (multi-turn chats tokenize only the new turn); 0 disables it.")

    def __post_init__(self) -> None:
        super().__post_init__()
        seen: set[str] = set()
        for spec in self.tokenizer:
            model, _ = parse_tokenizer_spec(spec)
            if model in seen:
                raise ValueError(f"--tokenizer: model {model!r} given twice")
            seen.add(model)
        if self.chat_template and not Path(self.chat_template).expanduser().is_file():
            raise ValueError(f"--chat-template: no such file {self.chat_template!r}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.inline_max_bytes < 0:
            raise ValueError(f"--inline-max-bytes must be >= 0, got {self.inline_max_bytes}")
        if self.workers == 0:
            self.workers = os.cpu_count() or 1
        for name in ("cache_max_bytes", "cache_max_entries", "prefix_cache_max_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, "
                                 f"got {getattr(self, name)}")
        if self.worker_timeout <= 0:
            raise ValueError(f"--worker-timeout must be > 0, got {self.worker_timeout}")
        self.cache_dir = str(Path(self.cache_dir).expanduser())

    def tokenizer_specs(self) -> list[tuple[str, str]]:
        return [parse_tokenizer_spec(spec) for spec in self.tokenizer]

    def chat_template_source(self) -> str | None:
        if not self.chat_template:
            return None
        return Path(self.chat_template).expanduser().read_text(encoding="utf-8")
