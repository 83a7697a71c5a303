"""A multi-tenant token radix tree: which workers ("tenants") have seen which prompt prefixes.

The approximate cache_aware policy keeps one tree per model (SMG ``kv_index::TokenTree``):
every node is an edge of token ids; ``tenants`` maps each worker url that was sent a prompt
through this node to the last time it did. Invariant: a tenant present on a node is present on
all of its ancestors (a worker that holds a prefix holds every shorter one).

* :meth:`insert` records that ``tenant`` was sent ``tokens`` (splitting edges as needed);
* :meth:`prefix_match` returns the longest prefix of a prompt any tenant holds, and the tenants
  that hold all of it;
* :meth:`evict` drops least-recently-used (tenant, leaf) entries until the tree holds at most
  ``max_size`` tokens (SMG's ``--max-tree-size``);
* :meth:`remove_tenant` purges a worker everywhere.

``size`` counts tokens on edges (shared prefixes once), the unit of ``--max-tree-size``.
Token edges are ``array('I')`` (4 bytes a token); comparisons run in C on slices.
Plain Python, no I/O; not thread-safe (the router runs on one event loop).
"""

from __future__ import annotations

import heapq
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass


def _as_array(tokens: Sequence[int] | array) -> array:
    return tokens if isinstance(tokens, array) and tokens.typecode == "I" else array("I", tokens)


def common_prefix_len(a: array, a_start: int, b: array) -> int:
    """Length of the common prefix of ``a[a_start:]`` and ``b`` (binary search on C compares)."""
    n = min(len(a) - a_start, len(b))
    if a[a_start:a_start + n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # the answer is < n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[a_start:a_start + mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class Node:
    __slots__ = ("key", "children", "tenants", "parent")

    def __init__(self, key: array, parent: Node | None) -> None:
        self.key = key
        self.children: dict[int, Node] = {}
        self.tenants: dict[str, float] = {}
        self.parent = parent


@dataclass(frozen=True)
class Match:
    """The longest cached prefix of a prompt: its length and the tenants holding all of it."""

    matched: int
    tenants: frozenset[str]


class RadixTree:
    def __init__(self) -> None:
        self.root = Node(array("I"), None)
        self.size = 0  # tokens on edges
        self.tenant_sizes: dict[str, int] = {}  # tokens each tenant holds

    # ------------------------------------------------------------------------- queries

    def prefix_match(self, tokens: Sequence[int] | array) -> Match:
        tokens = _as_array(tokens)
        node, pos = self.root, 0
        tenants: Iterable[str] = ()
        n = len(tokens)
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:
                break
            common = common_prefix_len(tokens, pos, child.key)
            pos += common
            tenants = child.tenants
            if common < len(child.key):
                break
            node = child
        return Match(pos, frozenset(tenants))

    def match_per_tenant(self, tokens: Sequence[int] | array) -> dict[str, int]:
        """For each tenant, how many leading tokens of ``tokens`` it holds (0s omitted)."""
        tokens = _as_array(tokens)
        result: dict[str, int] = {}
        node, pos = self.root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            common = common_prefix_len(tokens, pos, child.key)
            pos += common
            for tenant in child.tenants:
                result[tenant] = pos
            if common < len(child.key):
                break
            node = child
        return result

    def tenants(self) -> set[str]:
        return set(self.tenant_sizes)

    def __len__(self) -> int:
        return self.size

    # ------------------------------------------------------------------------- updates

    def insert(self, tokens: Sequence[int] | array, tenant: str, now: float | None = None) -> None:
        tokens = _as_array(tokens)
        now = time.monotonic() if now is None else now
        node, pos = self.root, 0
        n = len(tokens)
        while pos < n:
            child = node.children.get(tokens[pos])
            if child is None:
                leaf = Node(tokens[pos:], node)
                node.children[tokens[pos]] = leaf
                self.size += n - pos
                self._add_tenant(leaf, tenant, now)
                return
            common = common_prefix_len(tokens, pos, child.key)
            if common < len(child.key):
                child = self._split(child, common)
            self._add_tenant(child, tenant, now)
            pos += common
            node = child

    def _split(self, child: Node, at: int) -> Node:
        """Splits ``child``'s edge after ``at`` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = Node(child.key[:at], parent)
        upper.tenants = dict(child.tenants)
        parent.children[upper.key[0]] = upper
        child.key = child.key[at:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def _add_tenant(self, node: Node, tenant: str, now: float) -> None:
        if tenant not in node.tenants:
            self.tenant_sizes[tenant] = self.tenant_sizes.get(tenant, 0) + len(node.key)
        node.tenants[tenant] = now

    def _drop_tenant(self, node: Node, tenant: str) -> None:
        """Removes ``tenant`` from ``node`` (a leaf for that tenant); prunes an empty node."""
        del node.tenants[tenant]
        left = self.tenant_sizes[tenant] - len(node.key)
        if left:
            self.tenant_sizes[tenant] = left
        else:
            del self.tenant_sizes[tenant]
        if not node.tenants:
            assert not node.children, "a node without tenants has no children"
            parent = node.parent
            assert parent is not None
            del parent.children[node.key[0]]
            node.parent = None
            self.size -= len(node.key)
            self._merge(parent)
        else:
            self._merge(node)

    def _merge(self, node: Node) -> None:
        """Folds a single child into ``node`` when both have the same tenants (compaction)."""
        if node is self.root or len(node.children) != 1:
            return
        (child,) = node.children.values()
        if child.tenants.keys() != node.tenants.keys():
            return
        assert node.parent is not None
        child.key = node.key + child.key
        child.parent = node.parent
        node.parent.children[child.key[0]] = child
        for tenant, seen in node.tenants.items():
            child.tenants[tenant] = max(seen, child.tenants[tenant])
        node.parent = None

    def remove_tenant(self, tenant: str) -> None:
        """Purges ``tenant`` from every node (a removed worker)."""
        if tenant not in self.tenant_sizes:
            return
        for node in self._tenant_leaves_postorder(tenant):
            if node.parent is not None and tenant in node.tenants:
                self._drop_tenant(node, tenant)

    def _tenant_leaves_postorder(self, tenant: str) -> Iterator[Node]:
        stack: list[tuple[Node, bool]] = [(c, False) for c in self.root.children.values()
                                          if tenant in c.tenants]
        while stack:
            node, expanded = stack.pop()
            if expanded:
                yield node
                continue
            stack.append((node, True))
            stack.extend((c, False) for c in list(node.children.values()) if tenant in c.tenants)

    def evict(self, max_size: int) -> int:
        """Evicts LRU (tenant, leaf) entries until ``size <= max_size``; returns tokens freed."""
        if self.size <= max_size:
            return 0
        before = self.size
        heap: list[tuple[float, int, str, Node]] = []
        counter = 0
        for node in self._nodes():
            for tenant, seen in node.tenants.items():
                if self._is_tenant_leaf(node, tenant):
                    heap.append((seen, counter, tenant, node))
                    counter += 1
        heapq.heapify(heap)
        while self.size > max_size and heap:
            seen, _, tenant, node = heapq.heappop(heap)
            if node.parent is None or tenant not in node.tenants \
                    or not self._is_tenant_leaf(node, tenant):
                continue  # stale entry (merged away, or no longer this tenant's leaf)
            if node.tenants[tenant] != seen:  # re-touched or merged: requeue at its new time
                heapq.heappush(heap, (node.tenants[tenant], counter, tenant, node))
                counter += 1
                continue
            parent = node.parent
            self._drop_tenant(node, tenant)
            # The parent may now be this tenant's leaf; if it was merged into its only child,
            # that child stands in for it.
            candidate = parent
            if parent is not self.root and parent.parent is None and len(parent.children) == 1:
                (candidate,) = parent.children.values()
            if (candidate is not self.root and candidate.parent is not None
                    and tenant in candidate.tenants
                    and self._is_tenant_leaf(candidate, tenant)):
                heapq.heappush(heap, (candidate.tenants[tenant], counter, tenant, candidate))
                counter += 1
        return before - self.size

    @staticmethod
    def _is_tenant_leaf(node: Node, tenant: str) -> bool:
        return all(tenant not in c.tenants for c in node.children.values())

    def _nodes(self) -> Iterator[Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ------------------------------------------------------------------------- checks

    def check_invariants(self) -> None:
        """Asserts the tree's structural invariants (tests)."""
        size = 0
        tenant_sizes: dict[str, int] = {}
        for node in self._nodes():
            assert node.parent is not None and len(node.key) > 0
            assert node.parent.children[node.key[0]] is node
            assert node.tenants, "no empty nodes"
            if node.parent is not self.root:
                assert node.tenants.keys() <= node.parent.tenants.keys()
            size += len(node.key)
            for tenant in node.tenants:
                tenant_sizes[tenant] = tenant_sizes.get(tenant, 0) + len(node.key)
        assert size == self.size, (size, self.size)
        assert tenant_sizes == self.tenant_sizes
