"""Model path pre-flight for every engine, before anything heavy is imported or loaded.

Each problem gets its own message (naming the flag, the path as given and what it resolved
to) instead of a stack trace deep inside a loader:

* a relative path is resolved against the working directory and the result is logged;
* a dangling symlink, a missing path, a file where a directory is expected;
* a directory that cannot be read (permissions);
* no ``config.json``, or an unreadable / invalid one;
* no weights (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``), or unreadable ones;
* no tokenizer (``tokenizer.json`` or ``tokenizer.model``), or an unreadable one.

For ``--engine sglang`` :func:`gpu_fit_warning` compares ``tp_size x dp_size`` with the GPUs
that ``CUDA_VISIBLE_DEVICES`` leaves visible. Plain Python.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


class PreflightError(ValueError):
    """A model path that cannot be served; the message says why, for the user."""


def _readable(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        return True
    except PermissionError:
        return False
    except OSError:
        return os.access(path, os.R_OK)


def resolve_path(raw: str | os.PathLike[str], flag: str = "--model-path") -> Path:
    """``raw`` made absolute (``~`` expanded, relative to the working directory), without
    following symlinks; logs what a relative path resolved to."""
    text = os.fspath(raw)
    if not text.strip():
        raise PreflightError(f"{flag} is empty")
    expanded = Path(text).expanduser()
    absolute = expanded if expanded.is_absolute() else Path.cwd() / expanded
    absolute = Path(os.path.normpath(absolute))
    if str(absolute) != text:
        log.info("%s %s resolved to %s", flag, text, absolute)
    return absolute


def _where(text: str, path: Path) -> str:
    return f"{text}" if text == str(path) else f"{text} (resolved to {path})"


def preflight_model_path(raw: str | os.PathLike[str], *, flag: str = "--model-path",
                         require_weights: bool = True, require_tokenizer: bool = True,
                         allow_gguf_file: bool = False) -> Path:
    """Checks a model path; returns the resolved path or raises :class:`PreflightError`."""
    text = os.fspath(raw)
    path = resolve_path(text, flag)
    where = _where(text, path)
    if path.is_symlink() and not path.exists():
        raise PreflightError(f"{flag} {where} is a dangling symlink: it points to "
                             f"{os.readlink(path)}, which does not exist")
    if not path.exists():
        parent = path.parent
        hint = "" if parent.is_dir() else f"; its parent directory {parent} does not exist either"
        raise PreflightError(f"{flag} {where} does not exist{hint}")
    real = path.resolve()
    if real != path:
        log.info("%s %s is a symlink to %s", flag, path, real)
    if real.is_file():
        if allow_gguf_file and real.suffix == ".gguf":
            if not _readable(real):
                raise PreflightError(f"{flag} {where} is not readable (permission denied)")
            return path
        raise PreflightError(f"{flag} {where} is a file, not a model directory"
                             + (" (or a .gguf file)" if allow_gguf_file else ""))
    if not real.is_dir():
        raise PreflightError(f"{flag} {where} is not a directory")
    if not os.access(real, os.R_OK | os.X_OK):
        raise PreflightError(f"{flag} {where}: the directory is not readable (permission denied)")
    config = real / "config.json"
    if not config.is_file():
        raise PreflightError(f"{flag} {where} has no config.json (not a model directory)")
    if not _readable(config):
        raise PreflightError(f"{flag} {where}: config.json is not readable (permission denied)")
    try:
        json.loads(config.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise PreflightError(f"{flag} {where}: config.json is not valid JSON ({exc})") from None
    if require_weights:
        weights = sorted({p for pattern in WEIGHT_PATTERNS for p in real.glob(pattern)})
        if not weights:
            raise PreflightError(
                f"{flag} {where} has no weights (*.safetensors, *.bin or *.gguf)")
        unreadable = [p.name for p in weights if not _readable(p)]
        if unreadable:
            raise PreflightError(f"{flag} {where}: weight file(s) not readable (permission "
                                 f"denied): {', '.join(unreadable[:5])}")
    if require_tokenizer:
        found = [real / name for name in TOKENIZER_FILES if (real / name).is_file()]
        if not found:
            raise PreflightError(f"{flag} {where} has no tokenizer (tokenizer.json or "
                                 "tokenizer.model)")
        if not any(_readable(p) for p in found):
            raise PreflightError(f"{flag} {where}: {found[0].name} is not readable "
                                 "(permission denied)")
    return path


def visible_gpus(env: Mapping[str, str] | None = None) -> int | None:
    """GPUs left visible by ``CUDA_VISIBLE_DEVICES`` (None: unset, so every GPU counts)."""
    env = os.environ if env is None else env
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    devices = [d.strip() for d in value.split(",") if d.strip()]
    count = 0
    for d in devices:
        if d.startswith("-"):  # CUDA stops at the first invalid (negative) id
            break
        count += 1
    return count


def count_gpus(env: Mapping[str, str] | None = None) -> int:
    """GPUs this process can use: CUDA_VISIBLE_DEVICES, else /dev/nvidia<N> devices."""
    visible = visible_gpus(env)
    if visible is not None:
        return visible
    return sum(1 for p in Path("/dev").glob("nvidia[0-9]*"))


def gpu_fit_warning(tp_size: int, dp_size: int, env: Mapping[str, str] | None = None,
                    gpus: int | None = None) -> str | None:
    """A warning when ``tp_size x dp_size`` exceeds the visible GPUs, naming both numbers."""
    needed = max(1, tp_size) * max(1, dp_size)
    have = count_gpus(env) if gpus is None else gpus
    if needed <= have:
        return None
    source = "CUDA_VISIBLE_DEVICES" if visible_gpus(env) is not None else "/dev/nvidia*"
    return (f"tp_size x dp_size = {tp_size} x {dp_size} = {needed} GPUs needed, but only "
            f"{have} visible ({source}); SGLang will fail to start its ranks")
