"""Worker test helpers: the chat prompt as token ids, rendered like the tokenizer service does."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

QUESTION = "What is the capital of France?"


def render_chat(model_dir: Path, messages: list[dict[str, str]]) -> list[int]:
    import jinja2
    from tokenizers import Tokenizer

    template = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(messages=messages, add_generation_prompt=True)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="session")
def chat_ids(embedded_model_dir: Path) -> Callable[[str], list[int]]:
    def build(question: str = QUESTION) -> list[int]:
        return render_chat(embedded_model_dir, [{"role": "user", "content": question}])

    return build


@pytest.fixture(scope="session")
def decode(embedded_model_dir: Path) -> Callable[[list[int]], str]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(embedded_model_dir / "tokenizer.json"))
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
