"""The suite spread over separate network hosts (Linux network namespaces on one bridge).

Each service runs in its own namespace with its own address, bound to 0.0.0.0 and reached by
address; every environment carries a dead HTTP proxy. Skipped where namespaces cannot be made
(not root, no `ip`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
DEAD_PROXY = "http://10.233.255.254:3128"  # nothing listens there
SUBNET = "10.233.{net}"
HOSTS = {"history": 11, "worker": 12, "router": 13, "tokenizer": 14, "gateway": 15}
PORTS = {"history": 30300, "worker": 30000, "router": 30100, "tokenizer": 30200, "gateway": 8000}


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class Network:
    """A bridge in the root namespace with one namespace (host) per service."""

    def __init__(self) -> None:
        tag = secrets.token_hex(2)
        self.net = 100 + secrets.randbelow(100)
        self.bridge = f"sglbr{tag}"
        self.namespaces = {name: f"sgl-{name}-{tag}" for name in HOSTS}
        self.veths = {name: f"sv{name[:3]}{tag}" for name in HOSTS}

    def address(self, name: str) -> str:
        return f"{SUBNET.format(net=self.net)}.{HOSTS[name]}"

    def up(self) -> None:
        prefix = SUBNET.format(net=self.net)
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{prefix}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for name, ns in self.namespaces.items():
            _ip("netns", "add", ns)
            _ip("link", "add", self.veths[name], "type", "veth", "peer", "name", "eth0",
                "netns", ns)
            _ip("link", "set", self.veths[name], "master", self.bridge)
            _ip("link", "set", self.veths[name], "up")
            _ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def down(self) -> None:
        for name, ns in self.namespaces.items():
            _ip("link", "del", self.veths[name], check=False)
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)


@pytest.fixture
def network() -> Iterator[Network]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    net = Network()
    try:
        net.up()
    except subprocess.CalledProcessError as exc:
        net.down()
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.strip()}")
    try:
        yield net
    finally:
        net.down()


def test_services_on_separate_hosts(network: Network, tmp_path: Path,
                                    embedded_model_dir: Path) -> None:
    addr = network.address
    args = {
        "history": ["--history-db", f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"],
        "worker": [],
        "router": ["--worker-urls", f"grpc://{addr('worker')}:{PORTS['worker']}"],
        "tokenizer": [],
        "gateway": ["--router", f"{addr('router')}:{PORTS['router']}",
                    "--tokenizer", f"{addr('tokenizer')}:{PORTS['tokenizer']}",
                    "--history", f"{addr('history')}:{PORTS['history']}"],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SGLMESH_MODEL_CACHE": str(embedded_model_dir.parent),
           **{k: DEAD_PROXY for k in ("http_proxy", "https_proxy", "grpc_proxy", "HTTP_PROXY",
                                       "HTTPS_PROXY", "all_proxy")},
           "no_proxy": "", "NO_PROXY": ""}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in ("history", "worker", "router", "tokenizer", "gateway"):
            log = open(tmp_path / f"{name}.log", "wb")
            procs[name] = subprocess.Popen(
                ["ip", "netns", "exec", network.namespaces[name], sys.executable, "-m",
                 f"services.{name}", "--host", "0.0.0.0", "--port", str(PORTS[name]),
                 *args[name]], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        gateway = f"http://{addr('gateway')}:{PORTS['gateway']}"
        deadline = time.monotonic() + 180
        with httpx.Client(trust_env=False, timeout=60) as http:
            while True:
                dead = [n for n, p in procs.items() if p.poll() is not None]
                assert not dead, {n: (tmp_path / f"{n}.log").read_text()[-2000:] for n in dead}
                try:
                    if http.get(f"{gateway}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()
                time.sleep(0.5)
            reply = http.post(f"{gateway}/v1/chat/completions", json={
                "model": "SmolLM2-135M-Instruct", "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]})
            assert reply.status_code == 200, reply.text
            assert "Paris" in reply.json()["choices"][0]["message"]["content"]
            # The router registered the worker by its own address, not by loopback.
            workers = http.get(f"{gateway}/v1/models").json()
            assert workers["data"][0]["id"] == "SmolLM2-135M-Instruct"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
