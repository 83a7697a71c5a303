"""Tokenization caches of one model's tokenizer (plain Python, thread-safe).

* Exact-match cache: the token ids of whole texts (prompts), keyed by a 128-bit BLAKE2b
  digest of the text, LRU, bounded in bytes and entries.
* Prefix cache at special-token boundaries: a tokenizer splits its input at added special
  tokens before anything else, so ``encode(a + b) == encode(a) + encode(b)`` when ``a`` ends
  with such a token. A multi-turn chat re-sends the previous turns unchanged: the ids of the
  longest cached prefix ending at a boundary are reused and only the rest is tokenized.
  Keys are a hash chain over the segments between boundaries (one pass over the text);
  values are the prefix's ids. LRU, bounded in bytes.

Which tokens are boundaries is checked per tokenizer when the cache is built: a special
token counts only if splitting after it gives the same ids as a whole-text encode on probe
texts (this rules out tokens that strip the following whitespace, normalizers that prepend
to every piece, and the like). With no such token the prefix cache stays off.
"""

from __future__ import annotations

import hashlib
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

EncodeBatch = Callable[[list[str], bool], list[list[int]]]

ENTRY_OVERHEAD = 200  # bytes per entry besides the ids: key, array header, LRU links
MAX_PROBED_TOKENS = 1024
_PROBE_HEADS = ["Hello world", "  indented\n", "你好", ""]
_PROBE_TAILS = [" hi there", "\nuser\nWhat is 2+2?", "assistant", "  x", "é"]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    tokens_reused: int = 0  # prefix cache: ids served from cache instead of tokenized


class LruBytes:
    """key -> array of ids, least recently used evicted first past either bound."""

    def __init__(self, max_bytes: int, max_entries: int = 0) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._items: OrderedDict[bytes, array[int]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @staticmethod
    def size_of(ids: array[int]) -> int:
        return ids.itemsize * len(ids) + ENTRY_OVERHEAD

    def get(self, key: bytes, count: bool = True) -> array[int] | None:
        with self._lock:
            ids = self._items.get(key)
            if ids is not None:
                self._items.move_to_end(key)
            if count:
                if ids is None:
                    self.stats.misses += 1
                else:
                    self.stats.hits += 1
            return ids

    def contains(self, key: bytes) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: bytes, ids: array[int]) -> None:
        size = self.size_of(ids)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.stats.bytes -= self.size_of(old)
            self._items[key] = ids
            self.stats.bytes += size
            while self._items and (self.stats.bytes > self.max_bytes or (
                    self.max_entries and len(self._items) > self.max_entries)):
                _, evicted = self._items.popitem(last=False)
                self.stats.bytes -= self.size_of(evicted)
                self.stats.evictions += 1
            self.stats.entries = len(self._items)

    def snapshot(self) -> CacheStats:
        with self._lock:
            return CacheStats(**vars(self.stats))


def _ids(values: Sequence[int]) -> array[int]:
    return array("I", values)


def _digest(data: bytes, flag: bool) -> bytes:
    return hashlib.blake2b(data, digest_size=16, person=b"T" if flag else b"F").digest()


def atomic_boundary_tokens(encode_batch: EncodeBatch, candidates: Sequence[str]) -> list[str]:
    """The special tokens after which a split never changes the ids (checked on probes)."""
    candidates = [c for c in candidates if c][:MAX_PROBED_TOKENS]
    if not candidates:
        return []
    texts: list[str] = []
    cases: list[tuple[str, int, int, int]] = []  # token, whole, head, tail indexes
    for token in candidates:
        for head in _PROBE_HEADS:
            for tail in _PROBE_TAILS:
                cases.append((token, len(texts), len(texts) + 1, len(texts) + 2))
                texts += [head + token + tail, head + token, tail]
    ids = encode_batch(texts, False)
    bad = {token for token, whole, head, tail in cases if ids[whole] != ids[head] + ids[tail]}
    return [c for c in candidates if c not in bad]


class EncodeCache:
    """Exact-match and prefix caches in front of one tokenizer's batch encode."""

    def __init__(self, encode_batch: EncodeBatch, boundary_tokens: Sequence[str], *,
                 max_bytes: int = 64 << 20, max_entries: int = 10000,
                 prefix_max_bytes: int = 64 << 20, check_tokens: bool = True) -> None:
        self._encode_batch = encode_batch
        self.exact = LruBytes(max_bytes, max_entries) if max_bytes > 0 else None
        tokens = (atomic_boundary_tokens(encode_batch, boundary_tokens) if check_tokens
                  else [t for t in boundary_tokens if t])
        self.boundary_tokens = tokens
        self.prefix = LruBytes(prefix_max_bytes) if prefix_max_bytes > 0 and tokens else None
        self._boundary_re = (re.compile("|".join(re.escape(t) for t in
                                                 sorted(tokens, key=len, reverse=True)))
                             if tokens else None)
        # Whether add_special_tokens=True adds nothing (then prefixes serve both modes).
        self._specials_noop = bool(tokens) and (encode_batch(["a b"], True)
                                                == encode_batch(["a b"], False))

    # -- public ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.encode_batch([text], add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False
                     ) -> list[list[int]]:
        results: list[list[int] | None] = [None] * len(texts)
        keys: list[bytes] = []
        if self.exact is not None:
            for n, text in enumerate(texts):
                key = _digest(text.encode("utf-8", "surrogatepass"), add_special_tokens)
                keys.append(key)
                hit = self.exact.get(key)
                if hit is not None:
                    results[n] = hit.tolist()
        plain: list[int] = []
        for n, text in enumerate(texts):
            if results[n] is not None:
                continue
            if self.prefix is not None and (not add_special_tokens or self._specials_noop):
                bounds = self._boundaries(text)
                if bounds:
                    results[n] = self._encode_with_prefix(text, bounds)
                    continue
            plain.append(n)
        if plain:
            encoded = self._encode_batch([texts[n] for n in plain], add_special_tokens)
            for n, ids in zip(plain, encoded, strict=True):
                results[n] = ids
        if self.exact is not None:
            for n, key in enumerate(keys):
                found = results[n]
                if found is not None and not self.exact.contains(key):
                    self.exact.put(key, _ids(found))
        return [r if r is not None else [] for r in results]

    def stats(self) -> dict[str, CacheStats]:
        out = {}
        if self.exact is not None:
            out["exact"] = self.exact.snapshot()
        if self.prefix is not None:
            out["prefix"] = self.prefix.snapshot()
        return out

    # -- prefix cache ---------------------------------------------------------------------------

    def _boundaries(self, text: str) -> list[int]:
        assert self._boundary_re is not None
        return [m.end() for m in self._boundary_re.finditer(text)]

    def _encode_with_prefix(self, text: str, bounds: list[int]) -> list[int]:
        assert self.prefix is not None
        data = text.encode("utf-8", "surrogatepass")
        # char positions -> byte positions (only at the boundaries)
        keys: list[bytes] = []
        chain = b""
        prev_char = prev_byte = 0
        for b in bounds:
            byte_pos = prev_byte + len(text[prev_char:b].encode("utf-8", "surrogatepass"))
            chain = _digest(chain + data[prev_byte:byte_pos], False)
            keys.append(chain)
            prev_char, prev_byte = b, byte_pos
        hit_at = -1
        base: list[int] = []
        for k in range(len(keys) - 1, -1, -1):
            cached = self.prefix.get(keys[k], count=False)
            if cached is not None:
                hit_at, base = k, cached.tolist()
                break
        stats = self.prefix.stats
        if hit_at >= 0:
            stats.hits += 1
            stats.tokens_reused += len(base)
        else:
            stats.misses += 1
        # New prefixes to remember: the deepest boundary (the next turn extends it), the
        # second deepest, and the first (a shared system prompt).
        store = sorted({k for k in (len(keys) - 1, len(keys) - 2, 0) if hit_at < k})
        cuts = [bounds[k] for k in store]
        start = bounds[hit_at] if hit_at >= 0 else 0
        edges = [start, *cuts]
        pieces = [text[a:b] for a, b in zip(edges, edges[1:], strict=False)]
        pieces.append(text[edges[-1]:])
        encoded = self._encode_batch(pieces, False)
        ids = base
        for k, piece_ids in zip(store, encoded, strict=False):
            ids = ids + piece_ids
            self.prefix.put(keys[k], _ids(ids))
        return ids + encoded[-1]
