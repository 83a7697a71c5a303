"""Tokenizers per model: loading from a directory or a worker bundle (plain Python).

One tokenizer per model id, never shared or keyed by anything else. A worker bundle is a
zip (SglangScheduler.GetTokenizer) whose SHA-256 is checked before it is unpacked, safely,
into the cache directory.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import tokenizers

from services.tokenizer.cache import EncodeCache
from services.tokenizer.chat_template import ChatTemplate
from services.tokenizer.tiktoken_backend import (
    TiktokenLoadError,
    TiktokenTokenizer,
    find_tiktoken_file,
    is_tiktoken_file,
)

MAX_BUNDLE_FILES = 1000
MAX_BUNDLE_BYTES = 1 << 30  # uncompressed
_UINT32_MAX = (1 << 32) - 1


class TokenizerLoadError(ValueError):
    """A tokenizer source is missing, malformed or unsafe."""


class UnknownModel(KeyError):
    """No tokenizer is loaded for the model."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


@dataclass
class LoadedTokenizer:
    """One model's tokenizer and what the service needs around it."""

    model: str
    tokenizer: Any = field(repr=False)  # tokenizers.Tokenizer or TiktokenTokenizer
    source: str
    directory: Path
    fingerprint: str
    vocab_size: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int | None
    model_max_length: int
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: ChatTemplate | None = field(default=None, repr=False)
    cache: EncodeCache | None = field(default=None, repr=False)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if self.cache is not None:
            return self.cache.encode(text, add_special_tokens)
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str],
                     add_special_tokens: bool = False) -> list[list[int]]:
        if self.cache is not None:
            return self.cache.encode_batch(texts, add_special_tokens)
        return self.encode_batch_uncached(texts, add_special_tokens)

    def encode_batch_uncached(self, texts: Sequence[str],
                              add_special_tokens: bool = False) -> list[list[int]]:
        if len(texts) == 1:
            return [list(self.tokenizer.encode(texts[0],
                                               add_special_tokens=add_special_tokens).ids)]
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encodings]

    def enable_cache(self, max_bytes: int, max_entries: int, prefix_max_bytes: int) -> None:
        """Puts exact-match and prefix caches (0 bytes: off) in front of encode."""
        if max_bytes <= 0 and prefix_max_bytes <= 0:
            self.cache = None
            return
        self.cache = EncodeCache(self.encode_batch_uncached, list(self.special_token_ids),
                                 max_bytes=max_bytes, max_entries=max_entries,
                                 prefix_max_bytes=prefix_max_bytes)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def invalid_ids(self, ids: Sequence[int]) -> list[int]:
        return [i for i in ids if i >= self.vocab_size]

    @functools.cached_property
    def special_token_ids(self) -> dict[str, int]:
        """Added tokens marked special (those skip_special_tokens drops): content -> id."""
        return {tok.content: i for i, tok in self.tokenizer.get_added_tokens_decoder().items()
                if tok.special}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TokenizerLoadError(f"{path.name} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _first(*configs_and_key: Any) -> int | None:
    *configs, key = configs_and_key
    for config in configs:
        ids = _ids(config.get(key))
        if ids:
            return ids[0]
    return None


def _chat_template_source(directory: Path, tok_config: dict[str, Any]) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template:
        return template
    extra = _read_json(directory / "chat_template.json").get("chat_template")
    return extra if isinstance(extra, str) and extra else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_from_dir(model: str, directory: str | Path, *, source: str | None = None,
                  chat_template: str | None = None) -> LoadedTokenizer:
    """Loads tokenizer.json (or a tiktoken file) plus tokenizer_config.json /
    generation_config.json / config.json."""
    if not model:
        raise TokenizerLoadError("model id is empty")
    path = Path(directory).expanduser()
    tok_file = path / "tokenizer.json"
    if not path.is_dir():
        raise TokenizerLoadError(f"{str(path)!r} is not a directory")
    tok: Any
    if tok_file.is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise TokenizerLoadError(f"cannot load {tok_file}: {exc}") from exc
    else:
        tiktoken_file = find_tiktoken_file(path)
        if tiktoken_file is None:
            raise TokenizerLoadError(f"{str(path)!r} has no tokenizer.json (nor a tiktoken "
                                     "file: tiktoken.model or *.tiktoken)")
        try:
            tok = TiktokenTokenizer(tiktoken_file, _read_json(path / "tokenizer_config.json"))
        except TiktokenLoadError as exc:
            raise TokenizerLoadError(f"cannot load {tiktoken_file}: {exc}") from exc
        tok_file = tiktoken_file
    tok_config = _read_json(path / "tokenizer_config.json")
    gen_config = _read_json(path / "generation_config.json")
    model_config = _read_json(path / "config.json")

    special: dict[str, str] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content = _token_content(tok_config.get(name))
        if content is not None:
            special[name] = content

    def token_id(name: str) -> int | None:
        content = special.get(name)
        return tok.token_to_id(content) if content is not None else None

    eos: list[int] = []
    for candidate in (_ids(gen_config.get("eos_token_id")), _ids(model_config.get("eos_token_id")),
                      [i for i in [token_id("eos_token")] if i is not None]):
        for i in candidate:
            if i not in eos:
                eos.append(i)
    bos = token_id("bos_token")
    if bos is None:
        bos = _first(gen_config, model_config, "bos_token_id")
    pad = token_id("pad_token")
    if pad is None:
        pad = _first(gen_config, model_config, "pad_token_id")

    max_len = tok_config.get("model_max_length")
    if not isinstance(max_len, int) or not 0 < max_len <= _UINT32_MAX:
        max_len = model_config.get("max_position_embeddings")
    if not isinstance(max_len, int) or not 0 < max_len <= _UINT32_MAX:
        max_len = 0

    if isinstance(tok, TiktokenTokenizer) and tok_config.get("add_bos_token") and bos is not None:
        tok.add_bos_id = bos

    template_source = chat_template if chat_template else _chat_template_source(path, tok_config)
    template = ChatTemplate(template_source) if template_source else None
    return LoadedTokenizer(
        model=model, tokenizer=tok, source=source or str(path), directory=path,
        fingerprint=sha256_file(tok_file), vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eos_token_ids=eos, bos_token_id=bos, pad_token_id=pad, model_max_length=max_len,
        special_tokens=special, chat_template=template,
    )


def _safe_member(name: str) -> PurePosixPath | None:
    """The relative path of a zip member, or None when it is unsafe (absolute, ``..``)."""
    normalized = name.replace("\\", "/")
    rel = PurePosixPath(normalized)
    if not rel.parts or normalized.startswith("/") or rel.is_absolute():
        return None
    if ".." in rel.parts or ":" in rel.parts[0]:  # parent escapes, drive letters
        return None
    return rel


def unpack_bundle(data: bytes, sha256: str, cache_dir: str | Path) -> Path:
    """Verifies a worker's tokenizer zip and unpacks it under ``cache_dir/<sha256>``.

    Returns the directory holding tokenizer.json. Unsafe members (absolute paths, ``..``,
    links) fail the whole bundle; nothing is written outside the cache directory.
    """
    actual = hashlib.sha256(data).hexdigest()
    if not sha256:
        raise TokenizerLoadError("tokenizer bundle has no sha256 in its final chunk")
    if actual != sha256.strip().lower():
        raise TokenizerLoadError(f"tokenizer bundle sha256 mismatch: got {actual}, "
                                 f"the worker says {sha256}")
    if not data:
        raise TokenizerLoadError("tokenizer bundle is empty")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise TokenizerLoadError(f"tokenizer bundle is not a zip file: {exc}") from exc
    members = [m for m in archive.infolist() if not m.is_dir()]
    if len(members) > MAX_BUNDLE_FILES:
        raise TokenizerLoadError(f"tokenizer bundle has too many files ({len(members)})")
    if sum(m.file_size for m in members) > MAX_BUNDLE_BYTES:
        raise TokenizerLoadError("tokenizer bundle is too large when unpacked")
    plan: list[tuple[zipfile.ZipInfo, PurePosixPath]] = []
    for member in members:
        rel = _safe_member(member.filename)
        mode = member.external_attr >> 16
        if rel is None or stat.S_ISLNK(mode):
            raise TokenizerLoadError(f"tokenizer bundle has an unsafe entry {member.filename!r}")
        plan.append((member, rel))
    found = sorted((rel for _, rel in plan if rel.name == "tokenizer.json"),
                   key=lambda r: len(r.parts))
    found = found or sorted((rel for _, rel in plan if is_tiktoken_file(rel.name)),
                            key=lambda r: len(r.parts))
    if not found:
        raise TokenizerLoadError("tokenizer bundle has no tokenizer.json (nor a tiktoken file)")

    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    final = root / actual
    if not (final / found[0]).is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
        try:
            base = tmp.resolve()
            for member, rel in plan:
                target = (tmp / rel).resolve()
                if base not in target.parents:
                    raise TokenizerLoadError(
                        f"tokenizer bundle has an unsafe entry {member.filename!r}")
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final / found[0].parent


class TokenizerRegistry:
    """model id -> LoadedTokenizer; replacing one is atomic for readers."""

    def __init__(self) -> None:
        self._by_model: dict[str, LoadedTokenizer] = {}
        self._lock = threading.Lock()

    def put(self, loaded: LoadedTokenizer) -> LoadedTokenizer:
        with self._lock:
            self._by_model[loaded.model] = loaded
        return loaded

    def get(self, model: str) -> LoadedTokenizer:
        try:
            return self._by_model[model]
        except KeyError:
            raise UnknownModel(model) from None

    def find(self, model: str) -> LoadedTokenizer | None:
        return self._by_model.get(model)

    def list(self) -> list[LoadedTokenizer]:
        with self._lock:
            return [self._by_model[m] for m in sorted(self._by_model)]

    def __len__(self) -> int:
        return len(self._by_model)
