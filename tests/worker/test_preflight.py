"""Model path pre-flight: each broken model path ends ``python -m services.worker`` with its
own one-line message and a non-zero exit, before any model code is imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.worker.preflight import PreflightError, preflight_model_path
from tests.procs import ROOT


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch directory for model directories."""
    path = Path(tempfile.mkdtemp(prefix="sglmesh-preflight-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def model_dir(base: Path, name: str = "m", config: bool = True, weights: bool = True,
              tokenizer: bool = True) -> Path:
    d = base / name
    d.mkdir(mode=0o755)
    if config:
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    if weights:
        (d / "model.safetensors").write_bytes(b"\0" * 16)
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def worker(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "services.worker", "--port", "0", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def test_relative_missing_path_says_what_it_resolved_to(base: Path) -> None:
    line = error_line(worker(["--model-path", "models/nope"], cwd=base))
    assert f"models/nope (resolved to {base}/models/nope) does not exist" in line
    assert "parent directory" in line


def test_dangling_symlink(base: Path) -> None:
    (base / "link").symlink_to(base / "gone")
    line = error_line(worker(["--model-path", str(base / "link")], cwd=base))
    assert "dangling symlink" in line and str(base / "gone") in line


def test_a_file_is_not_a_model_directory(base: Path) -> None:
    (base / "file.txt").write_text("x")
    line = error_line(worker(["--model-path", "file.txt"], cwd=base))
    assert "is a file, not a model directory" in line


def test_missing_config_weights_and_tokenizer(base: Path) -> None:
    model_dir(base, "noconfig", config=False)
    model_dir(base, "noweights", weights=False)
    model_dir(base, "notok", tokenizer=False)
    assert "has no config.json" in error_line(worker(["--model-path", "noconfig"], cwd=base))
    assert "has no weights" in error_line(worker(["--model-path", "noweights"], cwd=base))
    assert "has no tokenizer (tokenizer.json or tokenizer.model)" in error_line(
        worker(["--model-path", "notok"], cwd=base))


def test_sim_needs_no_weights(base: Path) -> None:
    d = model_dir(base, weights=False)
    assert preflight_model_path(d, require_weights=False) == d
    with pytest.raises(PreflightError, match="no weights"):
        preflight_model_path(d)


def test_invalid_config_json(base: Path) -> None:
    d = model_dir(base)
    (d / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in error_line(worker(["--model-path", str(d)], base))


# As root, file permissions do not bind (CAP_DAC_OVERRIDE); the permission cases then run the
# worker as root WITHOUT the DAC capabilities (util-linux setpriv), so a mode-000 file is as
# unreadable for it as for any user.
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
            "--inh-caps=-dac_override,-dac_read_search"]


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                    reason="running as root and util-linux setpriv is missing: permissions "
                           "cannot be made to bind")
@pytest.mark.parametrize("victim,expected", [
    ("config.json", "config.json is not readable (permission denied)"),
    ("model.safetensors", "weight file(s) not readable (permission denied): model.safetensors"),
    ("tokenizer.json", "tokenizer.json is not readable (permission denied)"),
    (".", "the directory is not readable (permission denied)"),
])
def test_unreadable_files(base: Path, victim: str, expected: str) -> None:
    d = model_dir(base)
    (d / victim).chmod(0o000)
    prefix = DROP_DAC if os.geteuid() == 0 else []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        proc = subprocess.run([*prefix, sys.executable, "-m", "services.worker", "--port", "0",
                               "--model-path", str(d)], cwd=base, env=env, capture_output=True,
                              text=True, timeout=60)
    finally:
        (d / victim).chmod(0o755 if victim == "." else 0o644)
    assert expected in error_line(proc)
