"""tiktoken-format tokenizers (``tiktoken.model`` / ``*.tiktoken``), e.g. Kimi K2's.

A tiktoken BPE file holds one ``<base64 token> <rank>`` per line. The split pattern comes from
``tokenizer_config.json`` (``pat_str`` or ``pattern``; cl100k's otherwise), the added tokens
from its ``added_tokens_decoder`` (``{"id": {"content", "special"}}``) or ``special_tokens``
(``{"content": id}``). ``TiktokenTokenizer`` offers the part of ``tokenizers.Tokenizer`` the
service uses, with HuggingFace semantics: added tokens written in the text are parsed as such,
``skip_special_tokens`` drops the ones marked special.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

TIKTOKEN_FILES = ("tiktoken.model",)
TIKTOKEN_SUFFIX = ".tiktoken"
# cl100k_base's split pattern (tiktoken_ext.openai_public).
DEFAULT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?"""
                   r"""[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


class TiktokenLoadError(ValueError):
    pass


@dataclass
class AddedToken:
    content: str
    special: bool = True


@dataclass
class Encoded:
    ids: list[int]


def is_tiktoken_file(name: str) -> bool:
    return name in TIKTOKEN_FILES or name.endswith(TIKTOKEN_SUFFIX)


def find_tiktoken_file(directory: Path) -> Path | None:
    for name in TIKTOKEN_FILES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*" + TIKTOKEN_SUFFIX))
    return found[0] if found else None


def read_bpe_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as exc:
            raise TiktokenLoadError(f"{path.name} line {n} is not '<base64> <rank>'") from exc
    if not ranks:
        raise TiktokenLoadError(f"{path.name} holds no tokens")
    return ranks


def _added_tokens(config: dict[str, Any]) -> dict[int, AddedToken]:
    added: dict[int, AddedToken] = {}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for key, value in decoder.items():
            if isinstance(value, dict) and isinstance(value.get("content"), str):
                added[int(key)] = AddedToken(value["content"], bool(value.get("special", True)))
    special = config.get("special_tokens")
    if isinstance(special, dict):
        for content, token_id in special.items():
            if isinstance(token_id, int) and token_id not in added:
                added[token_id] = AddedToken(content, True)
    return added


class TiktokenTokenizer:
    """A tiktoken Encoding behind the ``tokenizers.Tokenizer`` methods this service calls."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        ranks = read_bpe_ranks(path)
        pattern = config.get("pat_str") or config.get("pattern") or DEFAULT_PATTERN
        if not isinstance(pattern, str):
            raise TiktokenLoadError("tokenizer_config.json: pat_str must be a string")
        self._added = _added_tokens(config)
        clashes = set(self._added) & set(ranks.values())
        if clashes:
            raise TiktokenLoadError(f"added token id {min(clashes)} is also a BPE rank")
        try:
            self.encoding = tiktoken.Encoding(
                name=path.stem, pat_str=pattern, mergeable_ranks=ranks,
                special_tokens={t.content: i for i, t in self._added.items()})
        except Exception as exc:  # bad regex, inconsistent ranks
            raise TiktokenLoadError(f"cannot build a tiktoken encoding: {exc}") from exc
        self._special_ids = frozenset(i for i, t in self._added.items() if t.special)
        self._by_content = {t.content: i for i, t in self._added.items()}
        self._ranks = ranks
        self.add_bos_id: int | None = None  # set by the loader when add_bos_token is on

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self.encoding.encode(text, allowed_special="all", disallowed_special=())
        if add_special_tokens and self.add_bos_id is not None:
            ids.insert(0, self.add_bos_id)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoded:
        return Encoded(self._encode(text, add_special_tokens))

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[Encoded]:
        if len(texts) == 1:
            return [self.encode(texts[0], add_special_tokens)]
        batches = self.encoding.encode_batch(list(texts), allowed_special="all",
                                             disallowed_special=())
        if add_special_tokens and self.add_bos_id is not None:
            batches = [[self.add_bos_id, *ids] for ids in batches]
        return [Encoded(ids) for ids in batches]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        try:
            data = self.encoding.decode_bytes(list(ids))
        except KeyError:  # ids in gaps of the vocabulary decode to nothing
            known = [i for i in ids if i in self._added or i < len(self._ranks)]
            data = self.encoding.decode_bytes(known)
        return data.decode("utf-8", errors="replace")

    def decode_batch(self, sequences: Sequence[Sequence[int]],
                     skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in sequences]

    def token_to_id(self, token: str) -> int | None:
        if token in self._by_content:
            return self._by_content[token]
        return self._ranks.get(token.encode("utf-8"))

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return int(self.encoding.n_vocab) if with_added_tokens else len(self._ranks)

    def get_added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(self._added)
