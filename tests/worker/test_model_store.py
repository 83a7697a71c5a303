"""The embedded model's conversion and the model-directory preflight (real files, no mocks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from services.worker.model_store import (
    MARKER,
    ModelPathError,
    ensure_embedded_model,
    preflight_model_path,
)


def test_preflight_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelPathError, match="does not exist"):
        preflight_model_path(tmp_path / "nope")


def test_preflight_not_a_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelPathError, match="is not a directory"):
        preflight_model_path(tmp_path / "file")


def test_preflight_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelPathError, match="no config.json"):
        preflight_model_path(tmp_path)


def test_preflight_missing_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelPathError, match="no weights"):
        preflight_model_path(tmp_path)


def test_preflight_missing_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelPathError, match="no tokenizer.json"):
        preflight_model_path(tmp_path)


def test_preflight_resolves_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "m"
    model.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (model / name).write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert preflight_model_path("m") == model.resolve()


def test_embedded_model_converted(embedded_model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json", MARKER):
        assert (embedded_model_dir / name).is_file(), name
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (2, 1, 2)
    assert config["rope_theta"] == 100000.0
    assert config["torch_dtype"] == "bfloat16"
    assert "quantization_config" not in config
    tok = json.loads((embedded_model_dir / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == "<|im_end|>"
    assert tok["tokenizer_class"] == "GPT2Tokenizer"
    assert tok["add_bos_token"] is False
    assert "<|im_start|>" in tok["chat_template"]
    assert preflight_model_path(embedded_model_dir) == embedded_model_dir


def test_embedded_model_reused(embedded_model_dir: Path) -> None:
    weights = embedded_model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.monotonic()
    again = ensure_embedded_model(embedded_model_dir.parent)
    assert again == embedded_model_dir
    assert weights.stat().st_mtime_ns == before
    assert time.monotonic() - start < 5
