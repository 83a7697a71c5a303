"""The multi-tenant token radix tree: unit tests and a property test against a naive model."""

from __future__ import annotations

from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from services.router.radix_tree import RadixTree, common_prefix_len


def test_common_prefix_len() -> None:
    a = array("I", [1, 2, 3, 4, 5])
    assert common_prefix_len(a, 0, array("I", [1, 2, 3])) == 3
    assert common_prefix_len(a, 1, array("I", [2, 3, 9])) == 2
    assert common_prefix_len(a, 0, array("I", [9])) == 0
    assert common_prefix_len(a, 5, array("I", [1])) == 0
    for cut in range(6):
        b = array("I", list(a[:cut]) + [99])
        assert common_prefix_len(a, 0, b) == cut


def test_insert_split_match() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], "a", now=1)
    tree.insert([1, 2, 5], "b", now=2)
    tree.check_invariants()
    assert tree.size == 5  # 1 2 | 3 4 | 5
    assert tree.tenant_sizes == {"a": 4, "b": 3}
    m = tree.prefix_match([1, 2, 3, 9])
    assert m.matched == 3 and m.tenants == {"a"}
    m = tree.prefix_match([1, 2, 7])
    assert m.matched == 2 and m.tenants == {"a", "b"}
    m = tree.prefix_match([1])  # inside an edge
    assert m.matched == 1 and m.tenants == {"a", "b"}
    assert tree.prefix_match([8]).matched == 0 and not tree.prefix_match([8]).tenants
    assert tree.prefix_match([]).matched == 0
    assert tree.match_per_tenant([1, 2, 3, 4, 6]) == {"a": 4, "b": 2}


def test_reinsert_updates_time_only() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3], "a", now=1)
    tree.insert([1, 2, 3], "a", now=5)
    assert tree.size == 3 and tree.tenant_sizes == {"a": 3}
    (node,) = tree.root.children.values()
    assert node.tenants == {"a": 5}


def test_remove_tenant_purges_and_compacts() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], "a", now=1)
    tree.insert([1, 2, 5, 6], "b", now=2)
    tree.insert([1, 2, 5, 7], "b", now=3)
    tree.remove_tenant("b")
    tree.check_invariants()
    assert tree.size == 4 and tree.tenants() == {"a"}
    assert len(tree.root.children) == 1  # 1 2 | 3 4 merged back into one edge
    (node,) = tree.root.children.values()
    assert list(node.key) == [1, 2, 3, 4] and not node.children
    tree.remove_tenant("a")
    assert tree.size == 0 and not tree.root.children
    tree.remove_tenant("nobody")


def test_evict_lru_until_under_the_limit() -> None:
    tree = RadixTree()
    tree.insert(range(100, 110), "a", now=1)   # oldest
    tree.insert(range(200, 210), "b", now=2)
    tree.insert(range(300, 310), "a", now=3)   # newest
    assert tree.size == 30
    freed = tree.evict(25)
    tree.check_invariants()
    assert freed == 10 and tree.size == 20
    assert tree.prefix_match(range(100, 110)).matched == 0
    assert tree.prefix_match(range(300, 310)).matched == 10
    assert tree.evict(100) == 0


def test_evict_drops_the_stale_tenant_of_a_shared_prefix_first() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], "a", now=1)
    tree.insert([1, 2, 3, 4, 5, 6], "b", now=9)
    tree.insert([7, 8], "c", now=5)
    tree.evict(6)  # a's leaf is oldest, but dropping a frees no tokens; then c goes
    tree.check_invariants()
    assert tree.size == 6 and tree.tenants() == {"b"}
    assert tree.prefix_match([1, 2, 3, 4, 5, 6]).tenants == {"b"}


def test_evict_is_lru_across_a_chain() -> None:
    tree = RadixTree()
    for i in range(50):
        tree.insert([i, i + 1000, i + 2000], f"w{i % 3}", now=i)
    tree.evict(30)
    tree.check_invariants()
    assert tree.size <= 30
    assert tree.prefix_match([49, 1049, 2049]).matched == 3  # the newest survive
    assert tree.prefix_match([0, 1000, 2000]).matched == 0


# ---------------------------------------------------------------- property test

TOKENS = st.lists(st.integers(0, 5), min_size=0, max_size=12)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), TOKENS, st.sampled_from("abc")),
        st.tuples(st.just("remove"), st.just([]), st.sampled_from("abc")),
    ),
    max_size=40,
)


def _naive_match(model: dict[str, set[tuple[int, ...]]], query: list[int]) -> tuple[int, set[str]]:
    def common(seq: tuple[int, ...]) -> int:
        n = 0
        while n < min(len(seq), len(query)) and seq[n] == query[n]:
            n += 1
        return n

    best = max((common(s) for seqs in model.values() for s in seqs), default=0)
    if best == 0:
        return 0, set()
    holders = {t for t, seqs in model.items() if any(common(s) >= best for s in seqs)}
    return best, holders


@settings(max_examples=300, deadline=None)
@given(OPS, st.lists(TOKENS, min_size=1, max_size=5))
def test_tree_matches_a_naive_model(ops: list[tuple[str, list[int], str]],
                                    queries: list[list[int]]) -> None:
    tree = RadixTree()
    model: dict[str, set[tuple[int, ...]]] = {}
    for now, (op, tokens, tenant) in enumerate(ops):
        if op == "insert":
            tree.insert(tokens, tenant, now=now)
            if tokens:
                model.setdefault(tenant, set()).add(tuple(tokens))
        else:
            tree.remove_tenant(tenant)
            model.pop(tenant, None)
        tree.check_invariants()
    prefixes = {s[:i] for seqs in model.values() for s in seqs for i in range(1, len(s) + 1)}
    assert tree.size == len(prefixes)
    for tenant, seqs in model.items():
        held = {s[:i] for s in seqs for i in range(1, len(s) + 1)}
        assert tree.tenant_sizes.get(tenant, 0) == len(held)
    for query in queries + [list(s) for seqs in model.values() for s in seqs]:
        match = tree.prefix_match(query)
        assert (match.matched, set(match.tenants)) == _naive_match(model, query)
        per = tree.match_per_tenant(query)
        for tenant in model:
            expected = _naive_match({tenant: model[tenant]}, query)[0]
            assert per.get(tenant, 0) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(TOKENS, st.sampled_from("abc")), max_size=30), st.integers(0, 40))
def test_eviction_keeps_invariants_and_bound(inserts: list[tuple[list[int], str]],
                                             limit: int) -> None:
    tree = RadixTree()
    for now, (tokens, tenant) in enumerate(inserts):
        tree.insert(tokens, tenant, now=now)
    tree.evict(limit)
    tree.check_invariants()
    assert tree.size <= limit
    # Whatever survived is a prefix some tenant was really sent.
    sent = {(t, tuple(tok[:i])) for tok, t in inserts for i in range(len(tok) + 1)}
    for node in tree._nodes():
        path: list[int] = []
        cur = node
        while cur is not None and cur is not tree.root:
            path[:0] = list(cur.key)
            cur = cur.parent
        for tenant in node.tenants:
            assert (tenant, tuple(path)) in sent
