"""``sglmesh up`` / ``sglmesh status`` as a user runs them: real processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.net import free_port

ROOT = Path(__file__).resolve().parents[2]
SGLMESH = [sys.executable, "-m", "services.cli"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


class Up:
    """A `sglmesh up` process in its own working directory."""

    def __init__(self, cwd: Path, *args: str, model_cache: Path) -> None:
        self.cwd = cwd
        self.port = free_port()
        env = {**os.environ, "SGLMESH_MODEL_CACHE": str(model_cache),
               "PYTHONPATH": str(ROOT)}
        self.out = cwd / "up.out"
        self.proc = subprocess.Popen(
            [*SGLMESH, "up", "--port", str(self.port), *args], cwd=cwd, env=env,
            stdout=open(self.out, "wb"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_up(self, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "sglmesh is up" in self.output():
                return json.loads((self.cwd / ".sglmesh" / "state.json").read_text())
            if self.proc.poll() is not None:
                raise AssertionError(f"sglmesh up exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.2)
        raise AssertionError(f"sglmesh up not up in {timeout}s:\n{self.output()}")

    def wait_exit(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def up_factory(tmp_path: Path, embedded_model_dir: Path) -> Iterator:
    started: list[Up] = []

    def factory(*args: str) -> Up:
        up = Up(tmp_path, *args, model_cache=embedded_model_dir.parent)
        started.append(up)
        return up

    yield factory
    for up in started:
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.wait()


def test_up_status_and_sigterm_leaves_no_orphans(up_factory) -> None:
    up = up_factory()
    state = up.wait_up()
    pids = [c["pid"] for c in state["children"]]
    assert len(pids) == 5
    assert {"history", "router", "tokenizer", "gateway"} <= set(state["ports"])

    status = subprocess.run([*SGLMESH, "status", "--json"], cwd=up.cwd, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert set(report["services"].values()) == {"SERVING"}
    assert [w["health"] for w in report["workers"]] == ["ready"]
    assert report["models"][0]["id"] == "SmolLM2-135M-Instruct"
    table = subprocess.run([*SGLMESH, "status"], cwd=up.cwd, capture_output=True, text=True,
                           timeout=60).stdout
    assert "workers:" in table and "grpc://127.0.0.1:" in table and " ready " in table

    # Ctrl-C/SIGTERM drains: a stream that is running when the signal arrives completes.
    body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": 12,
            "ignore_eos": True, "messages": [{"role": "user", "content": "Count to ten."}]}
    lines: list[str] = []
    with httpx.Client(trust_env=False, timeout=60) as http, http.stream(
            "POST", f"{state['gateway_url']}/v1/chat/completions", json=body) as stream:
        for line in stream.iter_lines():
            lines.append(line)
            if len(lines) == 3:
                up.proc.send_signal(signal.SIGTERM)
    assert "data: [DONE]" in lines[-2:]
    assert up.wait_exit() == 0
    assert _wait_gone(pids) == []
    assert not (up.cwd / ".sglmesh" / "state.json").exists()


def test_killed_supervisor_takes_its_children_along(up_factory) -> None:
    up = up_factory("--worker-arg=--log-level=warning")
    pids = [c["pid"] for c in up.wait_up()["children"]]
    up.proc.kill()  # SIGKILL: no chance to clean up; the children must still go
    up.wait_exit()
    assert _wait_gone(pids) == []


def test_a_service_that_cannot_start_is_named_with_its_log(up_factory, tmp_path: Path) -> None:
    up = up_factory("--model-path", str(tmp_path / "no-such-model"))
    assert up.wait_exit(120) == 1
    out = up.output()
    assert "sglmesh failed to start" in out
    assert "worker-" in out and ".log" in out
    assert "no-such-model" in out  # the worker's own message, from its log


@pytest.mark.parametrize("service", ["gateway", "tokenizer", "router", "history", "worker"])
def test_each_service_documents_its_flags(service: str) -> None:
    result = subprocess.run([*SGLMESH, service, "--help"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for flag in ("--host", "--port", "--log-level", "--log-json", "--error-log",
                 "--otlp-endpoint"):
        assert flag in result.stdout
    assert "(default:" in result.stdout


def test_json_logs_and_error_sink(tmp_path: Path) -> None:
    errors = tmp_path / "errors.log"
    port = free_port()
    proc = subprocess.Popen(
        [*SGLMESH, "router", "--port", str(port), "--log-json", "--error-log", str(errors),
         "--worker-urls", f"grpc://127.0.0.1:{free_port()}", "--worker-startup-timeout-secs",
         "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (errors.exists() and errors.read_text()):
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records, out
    assert all({"ts", "level", "service", "msg"} <= set(r) for r in records)
    assert any(r["level"] == "info" for r in records)
    sink = [json.loads(line) for line in errors.read_text().splitlines()]
    assert sink and all(r["level"] in ("warning", "error") for r in sink)
    assert any("did not answer GetModelInfo" in r["msg"] for r in sink)


@pytest.mark.parametrize("layout", [["--workers", "3"],
                                    ["--prefill-workers", "1", "--decode-workers", "1"],
                                    ["--workers", "2", "--embedded"]],
                         ids=["sim-fleet", "sim-pd", "sim-embedded"])
def test_up_with_sim_workers(up_factory, layout: list[str]) -> None:
    up = up_factory("--worker-engine", "sim", "--history-backend", "memory", *layout)
    state = up.wait_up()
    status = json.loads(subprocess.run([*SGLMESH, "status", "--json"], cwd=up.cwd,
                                       capture_output=True, text=True, timeout=60).stdout)
    types = sorted(w["type"] for w in status["workers"])
    regular = int(layout[1]) if layout[0] == "--workers" else 0
    assert types == (["regular"] * regular if regular else ["decode", "prefill"])
    if "--embedded" in layout:  # one gateway process serves the router and the tokenizer
        names = sorted(c["name"].split("-")[0] for c in state["children"])
        assert names == ["gateway", "history", "worker", "worker"]
        assert "router" not in state["ports"] and "tokenizer" not in state["ports"]
    assert {w["health"] for w in status["workers"]} == {"ready"}
    reply = httpx.post(f"{state['gateway_url']}/v1/chat/completions", trust_env=False, timeout=60,
                       json={"model": "SmolLM2-135M-Instruct", "max_tokens": 5,
                             "messages": [{"role": "user", "content": "Hi"}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 5
    up.proc.send_signal(signal.SIGTERM)
    assert up.wait_exit() == 0
