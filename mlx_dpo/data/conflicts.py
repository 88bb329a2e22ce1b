"""Exact duplicates and contradicting preferences among pairs that share a prompt.

For one prompt, every pair is an edge "chosen -> rejected" between two responses. The labels
contradict each other when the edges form a cycle: A over B and B over A, or A > B > C > A.
Edges inside a strongly connected component of two or more responses are exactly the
edges on some cycle, so each such component is reported as one conflict.

Resolution policies (`data clean --conflicts`):
  drop        remove every pair of every conflict.
  majority    for each two responses, keep the direction most pairs give (an exact duplicate
              counts as a vote) and drop ties; a cycle that votes cannot break (A > B > C > A,
              one vote each) is dropped.
  keep-first  walk the pairs in file order and keep a pair unless, with the pairs kept so far,
              it would close a cycle.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

POLICIES = ("drop", "majority", "keep-first")


def is_identical_pair(err) -> bool:
    """Whether a RecordError is records.py rejecting a pair whose chosen equals its rejected."""
    return err.kind == "identical"


@dataclass
class Conflict:
    """Pairs (by line) of one prompt whose preferences form a cycle."""
    prompt_line: int            # line of the first pair with this prompt
    responses: int              # responses in the cycle (2: A>B and B>A)
    lines: list[int]

    @property
    def kind(self) -> str:
        return "contradiction" if self.responses == 2 else "cycle"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "prompt_line": self.prompt_line, "responses": self.responses,
                "lines": self.lines}


@dataclass(slots=True)
class _Edge:
    chosen: int
    rejected: int
    line: int


@dataclass
class PairIndex:
    """The identity of every valid pair, fed one at a time, for duplicate and conflict checks."""
    by_prompt: dict = field(default_factory=lambda: defaultdict(list))  # prompt key -> [_Edge]
    first_line: dict = field(default_factory=dict)                       # triple key -> line
    duplicates: list = field(default_factory=list)                       # (line, first line)

    def add(self, prompt: int, chosen: int, rejected: int, line: int) -> None:
        triple = (prompt, chosen, rejected)
        first = self.first_line.setdefault(triple, line)
        if first != line:
            self.duplicates.append((line, first))
        self.by_prompt[prompt].append(_Edge(chosen, rejected, line))

    def conflicts(self) -> list[Conflict]:
        found = []
        for edges in self.by_prompt.values():
            if len(edges) < 2:
                continue
            for component in _cyclic_components(edges):
                lines = sorted(e.line for e in edges if e.chosen in component and e.rejected in component)
                found.append(Conflict(edges[0].line, len(component), lines))
        return sorted(found, key=lambda c: c.lines[0])

    def lines_to_drop(self, policy: str) -> set[int]:
        """Lines `data clean` removes: later exact duplicates, and conflicts per `policy`."""
        if policy not in POLICIES:
            raise ValueError(f"unknown conflict policy {policy!r}; choose one of {', '.join(POLICIES)}")
        drop = {line for line, _ in self.duplicates}
        for edges in self.by_prompt.values():
            if len(edges) >= 2:
                drop |= _resolve(edges, policy)
        return drop


def _resolve(edges: list[_Edge], policy: str) -> set[int]:
    if policy == "keep-first":
        kept: dict[int, set[int]] = defaultdict(set)
        dropped = set()
        for e in edges:  # file order
            if _reaches(kept, e.rejected, e.chosen):
                dropped.add(e.line)
            else:
                kept[e.chosen].add(e.rejected)
        return dropped
    cyclic = _cyclic_components(edges)
    if not cyclic:
        return set()
    in_conflict = [e for e in edges if any(e.chosen in c and e.rejected in c for c in cyclic)]
    if policy == "drop":
        return {e.line for e in in_conflict}
    votes: dict[tuple, int] = defaultdict(int)
    for e in in_conflict:
        votes[(e.chosen, e.rejected)] += 1
    dropped = {e.line for e in in_conflict if votes[(e.rejected, e.chosen)] >= votes[(e.chosen, e.rejected)]}
    survivors = [e for e in in_conflict if e.line not in dropped]
    unbroken = _cyclic_components(survivors)
    return dropped | {e.line for e in survivors if any(e.chosen in c and e.rejected in c for c in unbroken)}


def _reaches(graph: dict, start: int, goal: int) -> bool:
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


def _cyclic_components(edges: list[_Edge]) -> list[frozenset]:
    """Strongly connected components with two or more responses (Tarjan, iterative)."""
    graph: dict[int, list[int]] = defaultdict(list)
    for e in edges:
        graph[e.chosen].append(e.rejected)
        graph.setdefault(e.rejected, [])
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack, on_stack, found = [], set(), []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found
