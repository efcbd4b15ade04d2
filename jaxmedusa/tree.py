"""Medusa candidate trees: parsing, validation and the static buffers the verify step gathers with.

A tree is a list of paths of top-k ranks (`[0, 1]` = head 0's best token, then head 1's second best);
the root (the base model's own next token) is implicit. Buffers are numpy, built once per tree, and
static under jit.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import json
import os
from typing import Sequence

import numpy as np

TREES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "medusa_trees.json")
DEFAULT_TREE = "mc_sim_7b_63"
DEFAULT_TOP_K = 10


class TreeError(ValueError):
    """An invalid tree; the message names the offending path."""


@functools.cache
def _published_trees() -> dict[str, tuple[tuple[int, ...], ...]]:
    with open(TREES_FILE) as f:
        return {name: tuple(map(tuple, paths)) for name, paths in json.load(f)["trees"].items()}


def published_trees() -> dict[str, list[list[int]]]:
    """The nine trees published with the Medusa paper's reference implementation, by name (a fresh copy; the
    file is read once)."""
    return {name: [list(p) for p in paths] for name, paths in _published_trees().items()}


def chain_tree(depth: int) -> list[list[int]]:
    """Top-1 of each head: [[0], [0, 0], ...] (what vLLM verifies)."""
    return [[0] * d for d in range(1, depth + 1)]


def cartesian_tree(top_ks: Sequence[int]) -> list[list[int]]:
    """Every combination of the top-k_d tokens of head d, for d = 0 .. len(top_ks) - 1."""
    paths = []
    for depth in range(1, len(top_ks) + 1):
        paths.extend(list(p) for p in itertools.product(*(range(k) for k in top_ks[:depth])))
    return paths


def grow_tree(acc: np.ndarray, size: int) -> tuple[list[list[int]], list[float]]:
    """The size-node tree (root included) maximising expected tokens per step under independent heads.

    acc [K, top_k]: acc[k][r] = probability that head k's rank-r token is right. A node is accepted with
    the product of its path's probabilities, so greedy growth (a child is never likelier than its parent)
    is optimal. Returns (paths, expected tokens per step after each node is added, starting at 1.0).
    """
    acc = np.asarray(acc, np.float64)
    k, top_k = acc.shape
    heap = [(-acc[0, r], (r,)) for r in range(top_k)]
    heapq.heapify(heap)
    paths, expected = [], [1.0]
    while heap and len(paths) < size - 1:
        neg_p, path = heapq.heappop(heap)
        paths.append(list(path))
        expected.append(expected[-1] - neg_p)
        if len(path) < k:
            for r in range(top_k):
                heapq.heappush(heap, (neg_p * acc[len(path), r], path + (r,)))
    return paths, expected


@dataclasses.dataclass(frozen=True, eq=False)
class TreeBuffers:
    """Static description of a tree of T nodes (node 0 = root), nodes sorted by (depth, path).

    depth [T]; head [T] (which head proposes the node, -1 for the root); rank [T] (its top-k rank);
    parent [T] (-1 for the root); mask [T, T] (ancestor-or-self); paths [P, max_depth + 1]: the
    root-to-leaf node indices of every leaf, padded with -1; children [T, C] padded with -1.
    """

    nodes: tuple[tuple[int, ...], ...]
    depth: np.ndarray
    head: np.ndarray
    rank: np.ndarray
    parent: np.ndarray
    mask: np.ndarray
    paths: np.ndarray
    children: np.ndarray
    top_k: int

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    @property
    def ranks_used(self) -> int:
        """How many of each head's best tokens the tree reads (its largest rank + 1, at most top_k): the
        heads' top-k is taken this wide, not top_k wide."""
        return int(self.rank[1:].max()) + 1 if self.size > 1 else 1

    def __hash__(self) -> int:  # static argument of jitted functions: identity by content
        return hash((self.nodes, self.top_k))

    def __eq__(self, other) -> bool:
        return isinstance(other, TreeBuffers) and (self.nodes, self.top_k) == (other.nodes, other.top_k)


def resolve_tree(tree) -> list[list[int]]:
    """A tree given by name (published), by JSON file (a list of paths, or {"trees": ...} + name), or as paths."""
    if tree is None:
        tree = DEFAULT_TREE
    if isinstance(tree, str):
        named = _published_trees()
        if tree in named:
            return [list(p) for p in named[tree]]
        if tree.startswith("chain-") and tree[6:].isdigit():
            return chain_tree(int(tree[6:]))
        if os.path.isfile(tree):
            with open(tree) as f:
                data = json.load(f)
            if isinstance(data, dict) and "trees" in data:
                raise TreeError(f"{tree} holds several trees ({', '.join(data['trees'])}); pass one by name")
            return data
        raise TreeError(f"unknown tree {tree!r}: not a published tree ({', '.join(named)}), not 'chain-N', "
                        f"and not a file")
    return [list(p) for p in tree]


def build_tree(paths, *, num_heads: int, top_k: int = DEFAULT_TOP_K) -> TreeBuffers:
    """Validates a tree against the heads (depth <= num_heads, ranks < top_k, prefix-closed) and builds buffers.

    A tree of plain int paths is built once and cached (its buffers are read-only): generate() builds its tree
    on every call, ~1 ms for a 64-node tree on a slow CPU."""
    paths = resolve_tree(paths)
    if isinstance(paths, list) and all(isinstance(p, (list, tuple)) and all(type(r) is int for r in p)
                                       for p in paths):
        return _cached_tree(tuple(map(tuple, paths)), num_heads, top_k)
    return _build_tree(paths, num_heads=num_heads, top_k=top_k)


@functools.lru_cache(maxsize=64)
def _cached_tree(paths: tuple[tuple[int, ...], ...], num_heads: int, top_k: int) -> TreeBuffers:
    return _build_tree([list(p) for p in paths], num_heads=num_heads, top_k=top_k)


def _build_tree(paths, *, num_heads: int, top_k: int) -> TreeBuffers:
    if not isinstance(paths, list) or not paths:
        raise TreeError("a tree must be a non-empty list of paths of top-k ranks")
    seen: set[tuple[int, ...]] = set()
    for p in paths:
        if not isinstance(p, (list, tuple)) or not p or not all(isinstance(r, int) and not isinstance(r, bool)
                                                                 for r in p):
            raise TreeError(f"tree path {p!r} is not a non-empty list of integer ranks")
        t = tuple(p)
        if t in seen:
            raise TreeError(f"tree path {list(t)} appears twice")
        seen.add(t)
        if len(t) > num_heads:
            raise TreeError(f"tree path {list(t)} has depth {len(t)} but the model has {num_heads} Medusa heads")
        bad = [r for r in t if not 0 <= r < top_k]
        if bad:
            raise TreeError(f"tree path {list(t)} has rank {bad[0]}, outside the top-{top_k} candidates")
    for t in seen:
        if len(t) > 1 and t[:-1] not in seen:
            raise TreeError(f"tree is not prefix-closed: {list(t)} is present but its parent {list(t[:-1])} is not")
    nodes = [()] + sorted(seen, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(nodes)}
    n = len(nodes)
    depth = np.array([len(p) for p in nodes], np.int32)
    head = depth - 1
    rank = np.array([p[-1] if p else 0 for p in nodes], np.int32)
    parent = np.array([index[p[:-1]] if p else -1 for p in nodes], np.int32)
    mask = np.zeros((n, n), bool)
    for p, i in index.items():
        for j in range(len(p) + 1):
            mask[i, index[p[:j]]] = True
    is_parent = set(parent[1:].tolist())
    leaves = [i for i in range(n) if i not in is_parent]
    max_depth = int(depth.max())
    paths_arr = np.full((len(leaves), max_depth + 1), -1, np.int32)
    for row, leaf in enumerate(leaves):
        p = nodes[leaf]
        for j in range(len(p) + 1):
            paths_arr[row, j] = index[p[:j]]
    kids = [[c for c in range(n) if parent[c] == i] for i in range(n)]
    width = max(1, max(len(k) for k in kids))
    children = np.full((n, width), -1, np.int32)
    for i, k in enumerate(kids):  # in rank order: nodes are sorted by path
        children[i, :len(k)] = k
    for a in (depth, head, rank, parent, mask, paths_arr, children):
        a.setflags(write=False)  # shared by every request with this tree
    return TreeBuffers(nodes=tuple(nodes), depth=depth, head=head, rank=rank, parent=parent, mask=mask,
                       paths=paths_arr, children=children, top_k=top_k)
