"""Our protos: buf lint passes, and the committed stubs match what protoc generates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh() -> None:
    result = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint() -> None:
    if shutil.which("npm") is None and not (ROOT / ".tools/node_modules/.bin/buf").exists():
        pytest.skip("npm is not installed, so buf (@bufbuild/buf) cannot run")
    result = subprocess.run(["bash", "scripts/buf.sh", "lint"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_client_package_stands_alone() -> None:
    """The stubs import nothing of the suite, and the package needs only gRPC and protobuf."""
    code = ("import sys; "
            "from sglmesh.tokenizer.v1 import tokenizer_pb2_grpc; "
            "from sglmesh.router.v1 import router_admin_pb2_grpc; "
            "from sglmesh.history.v1 import history_pb2_grpc; "
            "bad = [m for m in sys.modules if m == 'services' or m.startswith('services.')]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    from importlib.metadata import requires

    names = {r.split(">")[0].split("<")[0].split("=")[0].strip() for r in requires("sglmesh-client") or []}
    assert names == {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}
