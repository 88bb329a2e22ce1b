"""Conflicting preferences (A>B with B>A, cycles) and duplicates, and the three policies."""
import random

import pytest

from mlx_dpo.data.conflicts import PairIndex


def index_of(edges, prompt="p"):
    """edges: "AB" means A chosen over B; line numbers are positions from 1."""
    index = PairIndex()
    for line, edge in enumerate(edges, start=1):
        p, (c, r) = (edge[0], edge[1:]) if len(edge) == 3 else (prompt, edge)
        index.add(hash(p), hash(c), hash(r), line)
    return index


def test_no_conflict_in_a_consistent_order():
    index = index_of(["AB", "BC", "AC"])  # A > B > C, all consistent
    assert index.conflicts() == [] and index.lines_to_drop("drop") == set()


def test_contradiction_and_cycle_are_reported_with_lines():
    index = index_of(["AB", "CD", "BA", "DE", "EC", "XY"])
    found = [(c.kind, c.responses, c.lines) for c in index.conflicts()]
    assert found == [("contradiction", 2, [1, 3]), ("cycle", 3, [2, 4, 5])]


def test_same_pair_under_different_prompts_is_no_conflict():
    index = index_of(["pAB", "qBA"])
    assert index.conflicts() == []


def test_duplicates_are_found_and_later_copies_dropped():
    index = index_of(["AB", "CD", "AB", "AB"])
    assert index.duplicates == [(3, 1), (4, 1)]
    assert index.lines_to_drop("drop") == {3, 4}


@pytest.mark.parametrize("policy, dropped", [
    # lines: 1 A>B, 2 B>A, 3 A>B (duplicate of 1), 4 B>C (not in a cycle)
    ("drop", {1, 2, 3}),          # every pair of the conflict; 3 is also a duplicate
    ("majority", {2, 3}),         # A>B has 2 votes, B>A 1: drop B>A; 3 is a duplicate
    ("keep-first", {2, 3}),       # B>A would close a cycle with the kept A>B
])
def test_policies_on_a_contradiction(policy, dropped):
    assert index_of(["AB", "BA", "AB", "BC"]).lines_to_drop(policy) == dropped


@pytest.mark.parametrize("policy, dropped", [
    # lines: 1 A>B, 2 B>C, 3 C>A, 4 C>D
    ("drop", {1, 2, 3}),
    ("majority", {1, 2, 3}),  # one vote each way round the cycle: votes cannot break it
    ("keep-first", {3}),      # C>A closes A>B>C
])
def test_policies_on_a_three_cycle(policy, dropped):
    assert index_of(["AB", "BC", "CA", "CD"]).lines_to_drop(policy) == dropped


def test_majority_tie_drops_both_directions():
    assert index_of(["AB", "BA"]).lines_to_drop("majority") == {1, 2}


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="drop, majority, keep-first"):
        index_of(["AB"]).lines_to_drop("newest")


def is_acyclic(edges):
    graph = {}
    for c, r in edges:
        graph.setdefault(c, set()).add(r)
    state = {}

    def visit(node):
        if state.get(node) == 1:
            return False
        if state.get(node) == 2:
            return True
        state[node] = 1
        ok = all(visit(n) for n in graph.get(node, ()))
        state[node] = 2
        return ok

    return all(visit(n) for n in list(graph))


@pytest.mark.parametrize("seed", range(20))
def test_every_policy_leaves_no_conflict(seed):
    rng = random.Random(seed)
    edges = []
    for _ in range(40):
        c, r = rng.sample("ABCDEF", 2)
        edges.append(rng.choice("pq") + c + r)
    index = index_of(edges)
    conflicted = {line for c in index.conflicts() for line in c.lines}
    for policy in ("drop", "majority", "keep-first"):
        dropped = index.lines_to_drop(policy)
        kept = [e for line, e in enumerate(edges, start=1) if line not in dropped]
        assert index_of(kept).conflicts() == [], policy
        for prompt in "pq":
            assert is_acyclic([(e[1], e[2]) for e in kept if e[0] == prompt])
        # Only duplicates and pairs in a conflict are ever dropped.
        assert dropped <= conflicted | {line for line, _ in index.duplicates}
