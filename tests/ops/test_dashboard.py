"""The gateway's /dashboard page in a real headless Chromium (Debian's `chromium`)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.common.net import free_port
from services.supervisor import Suite, SuiteConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed "
                                "(apt-get install chromium; .ci/run does this)")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, embedded_model_dir: Path) -> Iterator[Suite]:
    tmp = tmp_path_factory.mktemp("dashboard")
    suite = Suite(SuiteConfig(port=free_port(), log_dir=tmp / "logs", workers=2,
                              worker_args=["--num-threads", "1"],
                              history_backend="memory", startup_timeout=300),
                  out=io.StringIO(), env={"SGLMESH_MODEL_CACHE": str(embedded_model_dir.parent)})
    try:
        suite.start()
        yield suite
    finally:
        suite.stop()


def render(url: str, tmp: Path, budget_ms: int = 5000) -> str:
    """The page's DOM after ``budget_ms`` of (virtual) time: its timers and fetches have run."""
    result = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp}", f"--virtual-time-budget={budget_ms}",
         "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"#{element_id} not on the page"
    return match.group(1)


def test_dashboard_shows_the_workers_and_updates(suite: Suite, tmp_path: Path) -> None:
    base = f"http://127.0.0.1:{suite.ports['gateway']}"
    dom = render(f"{base}/dashboard", tmp_path / "profile1")
    assert int(text_of(dom, "refreshes")) >= 2  # it polled by itself
    rows = re.findall(r'<tr data-url="(grpc://[^"]+)">(.*?)</tr>', dom)
    assert len(rows) == 2, dom[-3000:]
    for url, row in rows:
        assert 'class="ready">ready<' in row and 'class="closed">closed<' in row
        assert url.startswith("grpc://127.0.0.1:")
    before = int(text_of(dom, "total"))

    for _ in range(2):
        reply = httpx.post(f"{base}/v1/chat/completions", trust_env=False, timeout=120, json={
            "model": "SmolLM2-135M-Instruct", "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert reply.status_code == 200
    dom = render(f"{base}/dashboard", tmp_path / "profile2")
    assert int(text_of(dom, "total")) == before + 2
    processed = sum(int(re.findall(r"<td>(\d+)</td>", row)[-1]) for _, row in
                    re.findall(r'<tr data-url="(grpc://[^"]+)">(.*?)</tr>', dom))
    assert processed >= 2
