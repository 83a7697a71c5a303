"""Kubernetes pod discovery: pods matching a label selector become workers.

:class:`PodReconciler` is the plain part: it turns pod events and full listings of one selector
group into add/remove decisions (ready pods are added; deleted, not-ready, terminating or
no-longer-matching pods are removed; a full listing removes every pod it no longer shows, so
no stale worker survives a missed event). :class:`KubernetesDiscovery` runs list + watch with
the ``kubernetes`` client in a thread per selector group, re-listing every
``relist_secs`` (the watch's server-side timeout) and after any watch error (e.g. 410 Gone).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.net import format_target
from services.router.workers import WorkerType

log = logging.getLogger(__name__)


def parse_selector(items: Iterable[str]) -> dict[str, str]:
    """``["app=sglang", "tier=gpu"]`` (or ``"app=sglang,tier=gpu"``) -> dict."""
    selector: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            key, sep, value = part.partition("=")
            if not sep or not key:
                raise ValueError(f"selector {part!r} must be key=value")
            selector[key.strip()] = value.strip()
    return selector


def selector_string(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


@dataclass(frozen=True)
class PodInfo:
    name: str
    namespace: str
    ip: str
    ready: bool
    terminating: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Target:
    """A worker discovery wants registered."""

    url: str
    worker_type: WorkerType
    bootstrap_port: int | None
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Action:
    add: Target | None = None
    remove: str = ""  # url


class PodReconciler:
    """Pods of one selector group -> worker targets."""

    def __init__(self, selector: Mapping[str, str], worker_type: WorkerType, port: int,
                 bootstrap_annotation: str = "sglang.ai/bootstrap-port") -> None:
        self.selector = dict(selector)
        self.worker_type = worker_type
        self.port = port
        self.bootstrap_annotation = bootstrap_annotation
        self.current: dict[str, Target] = {}  # pod key -> registered target

    def target(self, pod: PodInfo) -> Target | None:
        """The worker a pod stands for, or None when it should not be routed to."""
        if not pod.ready or pod.terminating or not pod.ip:
            return None
        if any(pod.labels.get(k) != v for k, v in self.selector.items()):
            return None
        bootstrap = None
        raw = pod.annotations.get(self.bootstrap_annotation)
        if self.worker_type is WorkerType.PREFILL and raw and raw.isdigit():
            bootstrap = int(raw)
        return Target(url=f"grpc://{format_target(pod.ip, self.port)}",
                      worker_type=self.worker_type, bootstrap_port=bootstrap,
                      labels=tuple(sorted(pod.labels.items())))

    def on_event(self, kind: str, pod: PodInfo) -> list[Action]:
        wanted = None if kind == "DELETED" else self.target(pod)
        return self._set(pod.key, wanted)

    def on_list(self, pods: Iterable[PodInfo]) -> list[Action]:
        """A full listing: the pods it shows are the truth; everything else goes."""
        seen: dict[str, Target | None] = {pod.key: self.target(pod) for pod in pods}
        actions: list[Action] = []
        for key in list(self.current):
            if key not in seen:
                actions += self._set(key, None)
        for key, wanted in seen.items():
            actions += self._set(key, wanted)
        return actions

    def _set(self, key: str, wanted: Target | None) -> list[Action]:
        have = self.current.get(key)
        if have == wanted:
            return []
        actions = []
        if have is not None:
            del self.current[key]
            actions.append(Action(remove=have.url))
        if wanted is not None:
            self.current[key] = wanted
            actions.append(Action(add=wanted))
        return actions


def pod_info(pod: Any) -> PodInfo:
    """A ``kubernetes.client.V1Pod`` as :class:`PodInfo`."""
    meta, status = pod.metadata, pod.status
    conditions = (status.conditions or []) if status else []
    ready = bool(status and status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in conditions))
    return PodInfo(name=meta.name, namespace=meta.namespace or "", ip=(status.pod_ip or "")
                   if status else "", ready=ready,
                   terminating=meta.deletion_timestamp is not None,
                   labels=dict(meta.labels or {}), annotations=dict(meta.annotations or {}))


class KubernetesDiscovery:
    """List + watch pods per selector group with the ``kubernetes`` client (one thread each)."""

    def __init__(self, groups: list[PodReconciler], namespace: str,
                 apply: Callable[[list[Action]], None], relist_secs: float = 60.0,
                 api: Any = None) -> None:
        self.groups = groups
        self.namespace = namespace
        self.apply = apply
        self.relist_secs = relist_secs
        self._api = api
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.relists = 0
        self.errors = 0

    def _core_api(self) -> Any:
        if self._api is None:
            from kubernetes import client, config

            configuration = client.Configuration()
            try:
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                config.load_kube_config(client_configuration=configuration)
            self._api = client.CoreV1Api(client.ApiClient(configuration))
        return self._api

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        api = self._core_api()
        for group in self.groups:
            thread = threading.Thread(target=self._run, args=(api, group), daemon=True,
                                      name=f"k8s-discovery {selector_string(group.selector)}")
            thread.start()
            self._threads.append(thread)

    async def stop(self) -> None:
        """Stops posting at once; the (daemon) threads end at their watch's next event or
        timeout, so shutdown never waits for a long-poll."""
        self._stop.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, 0.1)

    def _post(self, actions: list[Action]) -> None:
        if actions and self._loop is not None and not self._stop.is_set():
            self._loop.call_soon_threadsafe(self.apply, actions)

    def _lister(self, api: Any) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        # The API method itself (not a wrapper): Watch reads its return type from its doc.
        if self.namespace:
            return api.list_namespaced_pod, (self.namespace,)
        return api.list_pod_for_all_namespaces, ()

    def _run(self, api: Any, group: PodReconciler) -> None:
        from kubernetes import watch

        selector = selector_string(group.selector)
        lister, args = self._lister(api)
        while not self._stop.is_set():
            try:
                listing = lister(*args, label_selector=selector)
                self.relists += 1
                self._post(group.on_list(pod_info(p) for p in listing.items))
                version = listing.metadata.resource_version
                stream = watch.Watch().stream(
                    lister, *args, label_selector=selector, resource_version=version,
                    timeout_seconds=max(1, int(self.relist_secs)),
                    _request_timeout=self.relist_secs + 10)
                for event in stream:
                    if self._stop.is_set():
                        return
                    kind = event.get("type", "")
                    obj = event.get("object")
                    if kind in ("ADDED", "MODIFIED", "DELETED") and obj is not None:
                        self._post(group.on_event(kind, pod_info(obj)))
                # The watch timed out: re-list (periodic full resync).
            except Exception as exc:  # 410 Gone, API server down, ...: re-list after a pause
                self.errors += 1
                log.warning("kubernetes discovery (%s): %s; re-listing", selector, exc)
                self._stop.wait(1.0)
