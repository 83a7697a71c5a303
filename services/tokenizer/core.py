"""The tokenizer service's operations, transport-free: what server.py maps to and from gRPC."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.tokenizer.chat_template import ChatTemplateError
from services.tokenizer.errors import InvalidRequest
from services.tokenizer.reasoning import (
    PASSTHROUGH,
    REASONING_PARSERS,
    create_reasoning_parser,
    detect_reasoning_parser,
)
from services.tokenizer.registry import (
    LoadedTokenizer,
    TokenizerRegistry,
    load_from_dir,
    unpack_bundle,
)
from services.tokenizer.stream import DecodeOptions, DecodeSession, StreamDelta
from services.tokenizer.tool_parsers import TOOL_PARSERS, create_tool_parser, detect_tool_parser
from services.tokenizer.tools import validate_tools

# --tool-call-parser values besides parser names: pick from the model name / never parse.
AUTO, NONE = "auto", "none"


def require_model(model: str) -> None:
    if not model:
        raise InvalidRequest("model", "model is required")


class TokenizerCore:
    """Loads tokenizers into a registry and runs the CPU-side operations on them."""

    def __init__(self, cache_dir: str | Path, registry: TokenizerRegistry | None = None, *,
                 tool_call_parser: str = AUTO, reasoning_parser: str = AUTO,
                 cache_max_bytes: int = 0, cache_max_entries: int = 10000,
                 prefix_cache_max_bytes: int = 0) -> None:
        self.registry = registry or TokenizerRegistry()
        self.cache_limits = (cache_max_bytes, cache_max_entries, prefix_cache_max_bytes)
        self.cache_dir = Path(cache_dir).expanduser()
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser

    def resolve_tool_parser(self, model: str, requested: str) -> str:
        """The request's parser, else the service default; ``auto`` goes by the model name,
        JSON when the name is not known (the request has tools, and JSON is what models
        without a format of their own write; text that is not a call stays content)."""
        name = requested or self.tool_call_parser
        if name == AUTO:
            return detect_tool_parser(model) or "json"
        return "" if name == NONE else name

    # -- loading -----------------------------------------------------------------------------

    def load_dir(self, model: str, path: str, chat_template: str | None = None,
                 source: str | None = None) -> LoadedTokenizer:
        require_model(model)
        loaded = load_from_dir(model, path, source=source, chat_template=chat_template or None)
        loaded.enable_cache(*self.cache_limits)
        return self.registry.put(loaded)

    def load_bundle(self, model: str, target: str, data: bytes, sha256: str,
                    chat_template: str | None = None) -> LoadedTokenizer:
        require_model(model)
        directory = unpack_bundle(data, sha256, self.cache_dir)
        source = target if target.startswith("grpc://") else f"grpc://{target}"
        return self.load_dir(model, str(directory), chat_template, source=source)

    def get(self, model: str) -> LoadedTokenizer:
        require_model(model)
        return self.registry.get(model)

    # -- operations ----------------------------------------------------------------------------

    def tokenize(self, model: str, texts: Sequence[str],
                 add_special_tokens: bool) -> list[list[int]]:
        tok = self.get(model)
        if not texts:
            return []
        return tok.encode_batch(texts, add_special_tokens)

    def detokenize(self, model: str, sequences: Sequence[Sequence[int]],
                   skip_special_tokens: bool) -> list[str]:
        tok = self.get(model)
        for n, seq in enumerate(sequences):
            bad = tok.invalid_ids(seq)
            if bad:
                raise InvalidRequest(f"sequences[{n}].token_ids",
                                     f"token id {bad[0]} is out of range "
                                     f"(vocab size {tok.vocab_size})")
        if not sequences:
            return []
        return list(tok.tokenizer.decode_batch([list(s) for s in sequences],
                                               skip_special_tokens=skip_special_tokens))

    def render_chat(self, model: str, messages: list[dict[str, Any]], *,
                    tools: list[dict[str, Any]] | None = None,
                    documents: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool | None = None,
                    template_kwargs: dict[str, Any] | None = None,
                    continue_final_message: bool = False) -> tuple[str, list[int]]:
        tok = self.get(model)
        if tok.chat_template is None:
            raise InvalidRequest("model", f"model {model!r} has no chat template")
        if not messages:
            raise InvalidRequest("messages", "messages must not be empty")
        for n, message in enumerate(messages):
            if not isinstance(message.get("role"), str) or not message["role"]:
                raise InvalidRequest(f"messages[{n}].role", "every message needs a role")
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if add_generation_prompt and continue_final_message:
            raise InvalidRequest("continue_final_message", "continue_final_message and "
                                 "add_generation_prompt cannot both be set")
        validate_tools(tools)
        prompt = tok.chat_template.render(
            messages, tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            special_tokens=tok.special_tokens, template_kwargs=template_kwargs,
        )
        return prompt, tok.encode(prompt, add_special_tokens=False)

    def open_stream(self, model: str, options: DecodeOptions, reasoning_parser: str = "",
                    tool_parser: str = "", reasoning_open: bool = False,
                    tools: list[dict[str, Any]] | None = None) -> DecodeStreamSpec:
        """Validates a DecodeStart; the spec makes one DecodeSession per choice.

        Tool calls are parsed only when the request has tools: with ``tool_parser`` when it
        names one, else with the service's ``--tool-call-parser`` (``auto``: by model name).
        """
        tok = self.get(model)
        reasoning_parser = reasoning_parser or self.reasoning_parser
        if reasoning_parser == AUTO:
            reasoning_parser = detect_reasoning_parser(model)
        if reasoning_parser and reasoning_parser not in REASONING_PARSERS:
            raise InvalidRequest("reasoning_parser",
                                 f"unknown reasoning parser {reasoning_parser!r}; known: "
                                 f"{', '.join(sorted(REASONING_PARSERS))}")
        if tool_parser and tool_parser not in TOOL_PARSERS:
            raise InvalidRequest("tool_parser", f"unknown tool parser {tool_parser!r}; known: "
                                 f"{', '.join(sorted(TOOL_PARSERS))}")
        tool_names = validate_tools(tools)
        parser_name = self.resolve_tool_parser(model, tool_parser) if tool_names else ""
        bad = tok.invalid_ids(options.prompt_token_ids)
        if bad:
            raise InvalidRequest("prompt_token_ids", f"token id {bad[0]} is out of range "
                                 f"(vocab size {tok.vocab_size})")
        parameters = ({t["function"]["name"]: t["function"].get("parameters") for t in tools or ()}
                      if parser_name else {})
        return DecodeStreamSpec(tok, options, reasoning_parser, reasoning_open, parser_name,
                                tool_names, parameters)


@dataclass
class DecodeStreamSpec:
    """A validated DecodeStart: everything each choice's session is built from."""

    tokenizer: LoadedTokenizer
    options: DecodeOptions
    reasoning_parser: str = ""
    reasoning_open: bool = False
    tool_parser: str = ""
    tool_names: list[str] = field(default_factory=list)
    # Tool name -> its JSON-schema parameters (argument types for tag-delimited formats).
    tool_parameters: dict[str, Any] = field(default_factory=dict)

    def new_session(self) -> DecodeSession:
        parser = (create_reasoning_parser(self.reasoning_parser, self.reasoning_open)
                  if self.reasoning_parser and self.reasoning_parser != PASSTHROUGH else None)
        tools = (create_tool_parser(self.tool_parser, self.tool_names,
                                    parameters=self.tool_parameters)
                 if self.tool_parser else None)
        return DecodeSession(self.tokenizer, self.options, parser, tools,
                             self.tokenizer.special_token_ids)

    def step(self, session: DecodeSession, token_ids: Sequence[int], finished: bool) -> StreamDelta:
        bad = self.tokenizer.invalid_ids(token_ids)
        if bad:
            raise InvalidRequest("tokens.token_ids", f"token id {bad[0]} is out of range "
                                 f"(vocab size {self.tokenizer.vocab_size})")
        if session.finished:
            raise InvalidRequest("tokens.index", "this choice already finished")
        return session.step(token_ids, finished)


__all__ = ["ChatTemplateError", "InvalidRequest", "TokenizerCore"]
