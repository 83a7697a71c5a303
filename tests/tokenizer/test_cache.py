"""Exact-match and prefix tokenization caches: ids identical to a full tokenize, bounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from services.tokenizer.cache import EncodeCache, LruBytes, atomic_boundary_tokens
from services.tokenizer.registry import LoadedTokenizer, load_from_dir


def fresh(tokenizer_dir: Path, **limits: int) -> LoadedTokenizer:
    tok = load_from_dir("smollm2", tokenizer_dir)
    tok.enable_cache(limits.get("max_bytes", 1 << 20), limits.get("max_entries", 1000),
                     limits.get("prefix_max_bytes", 1 << 20))
    return tok


def conversation(turns: int) -> list[list[dict[str, str]]]:
    """The message lists of a growing chat, one per user turn."""
    messages = [{"role": "system", "content": "You are a concise assistant."}]
    out = []
    for n in range(turns):
        messages.append({"role": "user", "content": f"Question {n}: what about item {n}? " * 3})
        out.append(list(messages))
        messages.append({"role": "assistant", "content": f"Item {n} is fine. " * 5})
    return out


def test_multi_turn_reuses_prefixes(tokenizer_dir: Path) -> None:
    tok = fresh(tokenizer_dir)
    assert tok.cache is not None and "<|im_end|>" in tok.cache.boundary_tokens
    assert tok.chat_template is not None
    for messages in conversation(20):
        prompt = tok.chat_template.render(messages)
        assert tok.encode(prompt) == tok.encode_batch_uncached([prompt])[0]
    stats = tok.cache.stats()
    assert stats["prefix"].hits == 19 and stats["prefix"].misses == 1
    assert stats["prefix"].tokens_reused > 0
    assert stats["exact"].misses == 20 and stats["exact"].hits == 0
    # the same prompt again: an exact hit
    prompt = tok.chat_template.render(conversation(3)[-1])
    assert tok.encode(prompt) == tok.encode_batch_uncached([prompt])[0]
    assert tok.cache.stats()["exact"].hits == 1


_PIECES = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "user", "assistant", "\n", " ",
           "  ", "Hello", " world", "é", "你好", "\t", "<|im", "end|>", "123", "!"]


@settings(max_examples=80, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(_PIECES), max_size=25).map("".join),
                      min_size=1, max_size=6))
def test_cached_ids_equal_full_tokenize(loaded: Any, texts: list[str]) -> None:
    cache = EncodeCache(loaded.encode_batch_uncached, list(loaded.special_token_ids),
                        max_bytes=1 << 16, max_entries=50, prefix_max_bytes=1 << 16)
    for text in texts:  # prefixes of earlier texts are cached when later ones arrive
        assert cache.encode(text) == loaded.encode_batch_uncached([text])[0], repr(text)
    batch = texts + [texts[0] + t for t in texts]
    assert cache.encode_batch(batch) == loaded.encode_batch_uncached(batch)
    assert cache.encode_batch(batch, True) == loaded.encode_batch_uncached(batch, True)


def test_non_atomic_tokens_are_not_boundaries(tokenizer_dir: Path) -> None:
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.add_special_tokens([tokenizers.AddedToken("<sep>", special=True, rstrip=True),
                            tokenizers.AddedToken("<ok>", special=True)])

    def encode_batch(texts: list[str], add: bool) -> list[list[int]]:
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=add)]

    assert atomic_boundary_tokens(encode_batch, ["<sep>", "<ok>"]) == ["<ok>"]


def test_bounds_and_eviction() -> None:
    lru = LruBytes(max_bytes=2000, max_entries=3)
    from array import array
    for n in range(5):
        lru.put(bytes([n]), array("I", [n] * 10))
    stats = lru.snapshot()
    assert stats.entries == 3 and stats.evictions == 2
    assert lru.get(bytes([0])) is None and lru.get(bytes([4])) is not None
    lru.put(b"big", array("I", range(1000)))  # larger than the whole budget: not kept
    assert lru.get(b"big") is None
    small = LruBytes(max_bytes=700)
    for n in range(10):
        small.put(bytes([n]), array("I", range(50)))
    assert small.snapshot().bytes <= 700 and small.snapshot().entries == 1


def test_cache_off(tokenizer_dir: Path) -> None:
    tok = fresh(tokenizer_dir, max_bytes=0, prefix_max_bytes=0)
    assert tok.cache is None
    tok = fresh(tokenizer_dir, max_bytes=0)
    assert tok.cache is not None and set(tok.cache.stats()) == {"prefix"}
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == \
        tok.encode_batch_uncached(["<|im_start|>user\nhi<|im_end|>"])[0]
