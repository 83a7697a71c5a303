"""Kubernetes pod discovery.

No Kubernetes API server runs here, so the router's real ``kubernetes`` client talks to a
small local fake of the pods list + watch API (``FakePodApi`` below: HTTP, JSON, watch streams
of JSON lines, resource versions). The workers behind the pods are real ``sim`` workers on
their own loopback addresses (127.0.0.2, 127.0.0.3) and one shared port.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.common.net import free_port
from services.router.discovery import Action, PodInfo, PodReconciler, parse_selector
from services.router.router import Router
from services.router.workers import Health, WorkerType
from tests.router.fleet import router_config, sim_config, sim_fleet

kubernetes = pytest.importorskip("kubernetes")


# ------------------------------------------------------------------ reconciler


def pod(name: str, ip: str = "10.0.0.1", ready: bool = True, **labels: str) -> PodInfo:
    return PodInfo(name=name, namespace="ns", ip=ip, ready=ready, labels=labels or {"app": "w"})


def test_selector_parsing() -> None:
    assert parse_selector(["app=sglang,tier=gpu", "zone=a"]) == {
        "app": "sglang", "tier": "gpu", "zone": "a"}
    with pytest.raises(ValueError):
        parse_selector(["app"])


def test_reconciler_events() -> None:
    rec = PodReconciler({"app": "w"}, WorkerType.REGULAR, 30000)
    [add] = rec.on_event("ADDED", pod("a"))
    assert add.add is not None and add.add.url == "grpc://10.0.0.1:30000"
    assert rec.on_event("MODIFIED", pod("a")) == []  # nothing changed
    assert rec.on_event("MODIFIED", pod("a", ready=False)) == [Action(remove=add.add.url)]
    assert rec.on_event("ADDED", pod("b", ready=False)) == []
    [again] = rec.on_event("MODIFIED", pod("a"))
    assert again.add is not None
    assert rec.on_event("MODIFIED", pod("a", app="other")) == [Action(remove=add.add.url)]
    # a new IP for the same pod: old url out, new url in
    rec.on_event("MODIFIED", pod("a"))
    moved = rec.on_event("MODIFIED", pod("a", ip="10.0.0.9"))
    assert [m.remove for m in moved if m.remove] == ["grpc://10.0.0.1:30000"]
    assert [m.add.url for m in moved if m.add] == ["grpc://10.0.0.9:30000"]
    assert rec.on_event("DELETED", pod("a", ip="10.0.0.9")) == [
        Action(remove="grpc://10.0.0.9:30000")]


def test_reconciler_full_listing_removes_what_it_no_longer_shows() -> None:
    rec = PodReconciler({"app": "w"}, WorkerType.REGULAR, 80)
    rec.on_list([pod("a", "10.0.0.1"), pod("b", "10.0.0.2")])
    actions = rec.on_list([pod("b", "10.0.0.2"), pod("c", "10.0.0.3")])
    assert Action(remove="grpc://10.0.0.1:80") in actions
    assert [a.add.url for a in actions if a.add] == ["grpc://10.0.0.3:80"]


def test_prefill_pods_carry_their_bootstrap_port() -> None:
    rec = PodReconciler({"role": "prefill"}, WorkerType.PREFILL, 80)
    info = PodInfo(name="p", namespace="ns", ip="10.0.0.5", ready=True,
                   labels={"role": "prefill"}, annotations={"sglang.ai/bootstrap-port": "9001"})
    [act] = rec.on_event("ADDED", info)
    assert act.add is not None and act.add.worker_type is WorkerType.PREFILL
    assert act.add.bootstrap_port == 9001


# ------------------------------------------------------------------ fake API server


def k8s_pod(name: str, ip: str, labels: dict[str, str], ready: bool = True,
            annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "sim", "uid": f"uid-{name}",
                         "labels": labels, "annotations": annotations or {}},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


class FakePodApi:
    """Pods of one namespace: list and watch (JSON lines), label selectors, resource versions."""

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.version = 1
        self.cond = threading.Condition()
        self.lists = 0

    def _bump(self, kind: str, obj: dict[str, Any], emit: bool = True) -> None:
        with self.cond:
            self.version += 1
            obj = json.loads(json.dumps(obj))
            obj["metadata"]["resourceVersion"] = str(self.version)
            if kind == "DELETED":
                self.pods.pop(obj["metadata"]["name"], None)
            else:
                self.pods[obj["metadata"]["name"]] = obj
            if emit:
                self.events.append((self.version, kind, obj))
            self.cond.notify_all()

    def put(self, obj: dict[str, Any], emit: bool = True) -> None:
        kind = "MODIFIED" if obj["metadata"]["name"] in self.pods else "ADDED"
        self._bump(kind, obj, emit)

    def delete(self, name: str, emit: bool = True) -> None:
        self._bump("DELETED", self.pods[name], emit)

    @staticmethod
    def matches(obj: dict[str, Any], selector: str) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return all(labels.get(k) == v for k, v in parse_selector([selector]).items())

    def handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                url = urllib.parse.urlparse(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                if url.path != "/api/v1/namespaces/sim/pods":
                    self.send_error(404)
                    return
                selector = query.get("labelSelector", "")
                if query.get("watch") in ("true", "True", "1"):
                    self._watch(int(query.get("resourceVersion", "0")), selector,
                                float(query.get("timeoutSeconds", "5")))
                    return
                with api.cond:
                    api.lists += 1
                    items = [p for p in api.pods.values() if api.matches(p, selector)]
                    body = {"apiVersion": "v1", "kind": "PodList", "items": items,
                            "metadata": {"resourceVersion": str(api.version)}}
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _watch(self, since: int, selector: str, timeout: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                deadline = threading.Event()
                threading.Timer(timeout, deadline.set).start()
                sent = since
                try:
                    while not deadline.is_set():
                        with api.cond:
                            fresh = [e for e in api.events if e[0] > sent]
                            if not fresh:
                                api.cond.wait(0.1)
                                continue
                        for version, kind, obj in fresh:
                            sent = version
                            if kind == "MODIFIED" or api.matches(obj, selector):
                                line = json.dumps({"type": kind, "object": obj}) + "\n"
                                self.wfile.write(line.encode())
                                self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        return Handler


@contextmanager
def fake_api() -> Iterator[tuple[FakePodApi, Any]]:
    from kubernetes import client

    api = FakePodApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), api.handler())
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield api, client.CoreV1Api(client.ApiClient(configuration))
    finally:
        server.shutdown()
        server.server_close()


@asynccontextmanager
async def discovering_router(core: Any, **kw: Any) -> AsyncIterator[Router]:
    router = Router(router_config(service_discovery=True, service_discovery_namespace="sim",
                                  **kw), kube_api=core)
    await router.start()
    try:
        yield router
    finally:
        await router.stop()


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    async def loop() -> None:
        while not predicate():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(loop(), timeout)


async def test_pods_come_and_go_with_the_watch_and_relist() -> None:
    port = free_port()
    async with sim_fleet(sim_config(host="127.0.0.2", port=port),
                         sim_config(host="127.0.0.3", port=port)):
        a, b = f"grpc://127.0.0.2:{port}", f"grpc://127.0.0.3:{port}"
        with fake_api() as (api, core):
            api.put(k8s_pod("a", "127.0.0.2", {"app": "sim"}))
            api.put(k8s_pod("b", "127.0.0.3", {"app": "sim"}, ready=False))
            api.put(k8s_pod("other", "127.0.0.4", {"app": "else"}))
            async with discovering_router(core, selector=["app=sim"], service_discovery_port=port,
                                          service_discovery_relist_secs=1) as router:
                assert router.config.remove_unhealthy_workers  # on with discovery
                await wait_for(lambda: router.registry.get(a) is not None
                               and router.registry.get(a).health is Health.READY)
                assert router.registry.get(b) is None
                api.put(k8s_pod("b", "127.0.0.3", {"app": "sim"}))  # becomes Ready
                await wait_for(lambda: router.registry.get(b) is not None)
                api.put(k8s_pod("a", "127.0.0.2", {"app": "moved"}))  # label change
                await wait_for(lambda: router.registry.get(a) is None)
                api.delete("b")  # deleted
                await wait_for(lambda: router.registry.get(b) is None)
                # A missed event: the pod comes back without a watch event; the periodic
                # full re-list finds it (and would drop a pod that vanished silently).
                lists = api.lists
                api.put(k8s_pod("b", "127.0.0.3", {"app": "sim"}), emit=False)
                await wait_for(lambda: router.registry.get(b) is not None)
                assert api.lists > lists
                api.delete("b", emit=False)
                await wait_for(lambda: router.registry.get(b) is None)


async def test_prefill_and_decode_selectors() -> None:
    port = free_port()
    async with sim_fleet(sim_config(host="127.0.0.2", port=port, disaggregation_mode="prefill",
                                    bootstrap_port=0),
                         sim_config(host="127.0.0.3", port=port, disaggregation_mode="decode")):
        with fake_api() as (api, core):
            api.put(k8s_pod("p", "127.0.0.2", {"role": "prefill"},
                            annotations={"sglang.ai/bootstrap-port": "9123"}))
            api.put(k8s_pod("d", "127.0.0.3", {"role": "decode"}))
            async with discovering_router(core, prefill_selector=["role=prefill"],
                                          decode_selector=["role=decode"],
                                          service_discovery_port=port) as router:
                await wait_for(lambda: len(router.registry) == 2)
                p = router.registry.get(f"grpc://127.0.0.2:{port}")
                d = router.registry.get(f"grpc://127.0.0.3:{port}")
                assert p is not None and p.worker_type is WorkerType.PREFILL
                assert p.bootstrap_port == 9123 and p.labels == {"role": "prefill"}
                assert d is not None and d.worker_type is WorkerType.DECODE
