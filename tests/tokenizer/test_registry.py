"""Loading tokenizers from directories and worker bundles."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from services.tokenizer.registry import (
    TokenizerLoadError,
    TokenizerRegistry,
    UnknownModel,
    load_from_dir,
    unpack_bundle,
)


def make_zip(files: dict[str, bytes]) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def tokenizer_files(directory: Path) -> dict[str, bytes]:
    names = ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json",
             "chat_template.jinja"]
    return {n: (directory / n).read_bytes() for n in names if (directory / n).is_file()}


def test_load_dir_info(tokenizer_dir: Path, hf_tokenizer: Any) -> None:
    tok = load_from_dir("smollm2", tokenizer_dir)
    assert tok.vocab_size == 49152 == len(hf_tokenizer)
    assert tok.eos_token_ids == [2]
    assert tok.bos_token_id == 1 and tok.pad_token_id == 2
    assert tok.chat_template is not None
    digest = hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert tok.fingerprint == digest
    assert tok.model_max_length == 8192  # the tokenizer does not say; config.json does
    assert tok.source == str(tokenizer_dir)
    text = "Hello world, 2024 🎉"
    assert tok.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


def test_several_eos_ids_and_override_template(tokenizer_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tokenizer_dir, d, ignore=shutil.ignore_patterns("*.safetensors"))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (d / "chat_template.jinja").unlink()
    tok = load_from_dir("m", d, chat_template="{{ messages[0].content }}!")
    assert tok.eos_token_ids == [2, 0]
    assert tok.chat_template is not None
    assert tok.chat_template.render([{"role": "user", "content": "x"}]) == "x!"


def test_missing_dir_and_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError, match="not a directory"):
        load_from_dir("m", tmp_path / "nope")
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        load_from_dir("m", tmp_path)


def test_registry_one_per_model(tokenizer_dir: Path, tmp_path: Path) -> None:
    reg = TokenizerRegistry()
    a = reg.put(load_from_dir("a", tokenizer_dir))
    b = reg.put(load_from_dir("b", tokenizer_dir, chat_template="B"))
    assert reg.get("a") is a and reg.get("b") is b and a.tokenizer is not b.tokenizer
    assert [t.model for t in reg.list()] == ["a", "b"]
    with pytest.raises(UnknownModel):
        reg.get("c")


def test_unpack_bundle(tokenizer_dir: Path, tmp_path: Path) -> None:
    data, sha = make_zip(tokenizer_files(tokenizer_dir))
    directory = unpack_bundle(data, sha, tmp_path / "cache")
    assert directory == tmp_path / "cache" / sha
    tok = load_from_dir("m", directory)
    assert tok.vocab_size == 49152 and tok.eos_token_ids == [2]
    assert unpack_bundle(data, sha.upper(), tmp_path / "cache") == directory  # cached


def test_bundle_in_subdirectory(tokenizer_dir: Path, tmp_path: Path) -> None:
    files = {f"tok/{k}": v for k, v in tokenizer_files(tokenizer_dir).items()}
    data, sha = make_zip(files)
    assert unpack_bundle(data, sha, tmp_path).name == "tok"


def test_bundle_sha_mismatch(tmp_path: Path) -> None:
    data, _ = make_zip({"tokenizer.json": b"{}"})
    with pytest.raises(TokenizerLoadError, match="sha256"):
        unpack_bundle(data, "0" * 64, tmp_path)
    with pytest.raises(TokenizerLoadError, match="no sha256"):
        unpack_bundle(data, "", tmp_path)


@pytest.mark.parametrize("name", ["../evil.json", "/abs/evil.json", "a/../../evil.json",
                                  "C:/evil.json"])
def test_bundle_path_traversal(tmp_path: Path, name: str) -> None:
    data, sha = make_zip({"tokenizer.json": b"{}", name: b"x"})
    cache = tmp_path / "cache"
    with pytest.raises(TokenizerLoadError, match="unsafe"):
        unpack_bundle(data, sha, cache)
    assert not (tmp_path / "evil.json").exists()
    assert not any(p.name == "evil.json" for p in tmp_path.rglob("*"))


def test_bundle_symlink_rejected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("tokenizer.json", b"{}")
        info = zipfile.ZipInfo("link")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    data = buf.getvalue()
    with pytest.raises(TokenizerLoadError, match="unsafe"):
        unpack_bundle(data, hashlib.sha256(data).hexdigest(), tmp_path)


def test_bundle_without_tokenizer_json(tmp_path: Path) -> None:
    data, sha = make_zip({"config.json": b"{}"})
    with pytest.raises(TokenizerLoadError, match="no tokenizer.json"):
        unpack_bundle(data, sha, tmp_path)
    with pytest.raises(TokenizerLoadError, match="not a zip"):
        unpack_bundle(b"garbage", hashlib.sha256(b"garbage").hexdigest(), tmp_path)
