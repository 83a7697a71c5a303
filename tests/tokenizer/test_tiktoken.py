"""tiktoken-format tokenizers, with a small BPE file trained here (no download)."""

from __future__ import annotations

import base64
import collections
import json
import random
from pathlib import Path

import pytest
import tiktoken

from services.tokenizer.incremental import IncrementalDecoder
from services.tokenizer.registry import TokenizerLoadError, load_from_dir, unpack_bundle
from services.tokenizer.tiktoken_backend import DEFAULT_PATTERN

CORPUS = ("The quick brown fox jumps over the lazy dog. Hello world, hello tokenizer! "
          "Tokenizers split text into tokens; the tokens become ids. 你好，世界。 café "
          "naïve résumé 12345 67890 ") * 4
SPECIALS = {"<|im_start|>": 0, "<|im_end|>": 1, "<|endoftext|>": 2, "<tool_call>": 3}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_bpe(text: str, merges: int) -> dict[bytes, int]:
    """Byte-level BPE: the 256 bytes, then the most frequent adjacent pairs, in order."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in text.split(" ")]
    for _ in range(merges):
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for w in words:
            pairs.update(zip(w, w[1:], strict=False))
        if not pairs:
            break
        (a, b), _count = pairs.most_common(1)[0]
        ranks.setdefault(a + b, len(ranks))
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return ranks


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiktoken-model")
    ranks = train_bpe(CORPUS, 150)
    (d / "tiktoken.model").write_text("".join(
        f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in ranks.items()))
    base = len(ranks)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "pat_str": DEFAULT_PATTERN, "chat_template": TEMPLATE,
        "eos_token": "<|im_end|>", "bos_token": "<|endoftext|>",
        "added_tokens_decoder": {str(base + i): {"content": c, "special": c != "<tool_call>"}
                                 for c, i in SPECIALS.items()}}))
    return d


def reference(d: Path) -> tiktoken.Encoding:
    ranks = {base64.b64decode(t): int(r) for t, r in
             (line.split() for line in (d / "tiktoken.model").read_text().splitlines())}
    return tiktoken.Encoding("ref", pat_str=DEFAULT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={c: len(ranks) + i for c, i in SPECIALS.items()})


def test_load_encode_decode(tiktoken_dir: Path) -> None:
    tok = load_from_dir("tiny-tiktoken", tiktoken_dir)
    ref = reference(tiktoken_dir)
    base = tok.vocab_size - len(SPECIALS)
    assert tok.eos_token_ids == [base + 1] and tok.bos_token_id == base + 2
    assert len(tok.fingerprint) == 64
    text = "Hello world! <|im_start|>user\n你好 café<|im_end|>\n"
    ids = tok.encode(text)
    assert ids == ref.encode(text, allowed_special="all")
    assert base + 0 in ids and base + 1 in ids  # special tokens in the text are parsed
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "Hello world! user\n你好 café\n"
    assert tok.decode(tok.encode("x <tool_call> y")) == "x <tool_call> y"  # not special
    assert tok.encode_batch(["a b", "naïve"]) == [ref.encode("a b"), ref.encode("naïve")]


def test_chat_and_prefix_cache(tiktoken_dir: Path) -> None:
    tok = load_from_dir("tiny-tiktoken", tiktoken_dir)
    tok.enable_cache(1 << 20, 100, 1 << 20)
    assert tok.cache is not None and "<|im_end|>" in tok.cache.boundary_tokens
    assert tok.chat_template is not None
    messages = [{"role": "system", "content": "Be brief."}]
    for n in range(5):
        messages.append({"role": "user", "content": f"Hello tokenizer {n}, 你好"})
        prompt = tok.chat_template.render(messages)
        assert tok.encode(prompt) == tok.encode_batch_uncached([prompt])[0]
        messages.append({"role": "assistant", "content": "The quick brown fox."})
    assert tok.cache.stats()["prefix"].hits == 4


def test_incremental_decode_matches_full(tiktoken_dir: Path) -> None:
    tok = load_from_dir("tiny-tiktoken", tiktoken_dir)
    rnd = random.Random(7)
    for _ in range(20):
        text = "".join(rnd.choice(["你好", "café", " the", " fox", "!", "\n", "é", "世界"])
                       for _ in range(30))
        ids = tok.encode(text)
        decoder = IncrementalDecoder(tok)
        out = "".join(decoder.step([i]) for i in ids) + decoder.finish()
        assert out == text == tok.decode(ids)


def test_bad_tiktoken_files(tmp_path: Path) -> None:
    (tmp_path / "broken.tiktoken").write_text("not base64!! x\n")
    with pytest.raises(TokenizerLoadError, match="line 1"):
        load_from_dir("m", tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerLoadError, match="tiktoken"):
        load_from_dir("m", empty)


def test_bundle_with_tiktoken(tiktoken_dir: Path, tmp_path: Path) -> None:
    import hashlib
    import io
    import zipfile
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in tiktoken_dir.iterdir():
            zf.write(f, f.name)
    data = buf.getvalue()
    directory = unpack_bundle(data, hashlib.sha256(data).hexdigest(), tmp_path)
    assert load_from_dir("m", directory).encode("Hello") == reference(tiktoken_dir).encode("Hello")
