"""TokenizerConfig flags and validation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.config import parse_config
from services.tokenizer.config import TokenizerConfig


def test_defaults_and_specs(tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    config = parse_config(TokenizerConfig, ["--tokenizer", "a=/x", "b=grpc://h:1",
                                            "--chat-template", str(template)], env={})
    assert config.tokenizer_specs() == [("a", "/x"), ("b", "grpc://h:1")]
    assert config.workers == (os.cpu_count() or 1)
    assert config.chat_template_source() == "{{ messages }}"
    assert config.cache_dir.endswith("sglmesh/tokenizers")


def test_env(tmp_path: Path) -> None:
    config = parse_config(TokenizerConfig, [], env={"SGLMESH_TOKENIZER_TOKENIZER": "m=/d",
                                                    "SGLMESH_TOKENIZER_WORKERS": "3"})
    assert config.tokenizer_specs() == [("m", "/d")] and config.workers == 3


@pytest.mark.parametrize("argv", [
    ["--tokenizer", "no-equals"],
    ["--tokenizer", "=src"],
    ["--tokenizer", "a=/x", "a=/y"],
    ["--chat-template", "/does/not/exist.jinja"],
    ["--workers", "-1"],
])
def test_invalid(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_config(TokenizerConfig, argv, env={})
