"""Load-balancing policies: one ``select_worker(workers, info)`` interface (as in SMG).

A policy gets the routable workers of one model and picks one, or None when none fits.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.router.workers import Worker


@dataclass(frozen=True)
class SelectionInfo:
    """What a policy may look at besides the workers."""

    token_ids: Sequence[int] = field(default=())
    routing_key: str = ""
    request_id: str = ""


class LoadBalancingPolicy(Protocol):
    name: str

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        """Picks one of ``workers`` (all routable, one model) or None."""
        ...


class RoundRobinPolicy:
    """Cycles through the workers in url order."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        if not workers:
            return None
        return workers[next(self._counter) % len(workers)]


class RandomPolicy:
    """Picks uniformly at random."""

    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        return self._rng.choice(list(workers)) if workers else None


class PowerOfTwoPolicy:
    """Samples two workers and keeps the one with fewer in-flight requests."""

    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select_worker(self, workers: Sequence[Worker], info: SelectionInfo) -> Worker | None:
        if not workers:
            return None
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(list(workers), 2)
        return a if a.in_flight <= b.in_flight else b


_POLICIES: dict[str, type] = {
    p.name: p for p in (RoundRobinPolicy, RandomPolicy, PowerOfTwoPolicy)
}
POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def create_policy(name: str) -> LoadBalancingPolicy:
    try:
        return _POLICIES[name]()  # type: ignore[no-any-return]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None
