"""The prompt-state cache: snapshots of a sequence's whole recurrent state at exact token
boundaries, keyed by the token ids they cover. Torch-free (the snapshots are opaque here).

A linear-attention sequence's past is one fixed-size state, so a snapshot after token k lets
any prompt that starts with those k tokens skip them: copy the state into its slot, prefill
the rest. Snapshots are taken at boundaries the caller names (the end of each chat message,
the end of the prompt, the end of a finished generation), never on a block grid, so a hit
is exact wherever the boundary falls.

The index is a radix tree over token ids (edges are runs of ids; a node holds a snapshot when
one ends there): insert and lookup walk the prompt once, O(length). Entries are evicted least
recently used first, where "used" means a hit took it; pinned entries are never evicted.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field


@dataclass(eq=False)
class CacheEntry:
    """A snapshot of the state after `ids` (all of them) entered it.

    state: the engine's per-layer state tensors (opaque here); logits: the next-token logits
    after the last id, when known (a whole-prompt hit samples from them), else None.
    nbytes: what the entry costs against the budget."""

    ids: tuple[int, ...]
    state: object
    logits: object | None
    nbytes: int
    pinned: bool = False
    last_used: int = 0
    _node: object = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.ids)


class _Node:
    __slots__ = ("key", "children", "parent", "entry")

    def __init__(self, key: tuple[int, ...], parent: "_Node | None"):
        self.key = key                       # the ids on the edge from the parent to here
        self.children: dict[int, _Node] = {}   # first id of a child's edge -> child
        self.parent = parent
        self.entry: CacheEntry | None = None


def _common(a: tuple[int, ...], ids: list[int] | tuple[int, ...], start: int) -> int:
    """How many leading ids of edge `a` equal ids[start:]."""
    n = min(len(a), len(ids) - start)
    i = 0
    while i < n and a[i] == ids[start + i]:
        i += 1
    return i


class PrefixCache:
    """Args:
        budget_bytes: the snapshots' total size limit (pinned ones count too; when pinned
            entries alone fill it, new snapshots are not kept).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.root = _Node((), None)
        self.entries: set[CacheEntry] = set()
        self.bytes = 0
        self._clock = itertools.count(1)
        # cumulative counters for /metrics
        self.queries = self.hits = self.query_tokens = self.hit_tokens = self.evictions = 0

    # ---- lookup ------------------------------------------------------------------------------
    def lookup(self, ids: list[int], usable=None) -> CacheEntry | None:
        """The longest entry whose ids are a prefix of `ids` (and that `usable(entry)` accepts),
        or None. Does not count as a use: `use` does, once the caller takes the hit."""
        node, i, best = self.root, 0, None
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                break
            n = _common(child.key, ids, i)
            if n < len(child.key):
                break
            node, i = child, i + n
            if node.entry is not None and (usable is None or usable(node.entry)):
                best = node.entry
        return best

    def record_query(self, num_tokens: int, hit: CacheEntry | None, hit_tokens: int = 0) -> None:
        self.queries += 1
        self.query_tokens += num_tokens
        if hit is not None:
            self.hits += 1
            self.hit_tokens += hit_tokens
            hit.last_used = next(self._clock)

    def get(self, ids: list[int] | tuple[int, ...]) -> CacheEntry | None:
        """The entry for exactly `ids`, if any."""
        e = self.lookup(list(ids))
        return e if e is not None and e.num_tokens == len(ids) else None

    # ---- insert / evict ----------------------------------------------------------------------
    def insert(self, ids: list[int] | tuple[int, ...], state: object, logits: object | None, nbytes: int,
               pinned: bool = False) -> CacheEntry | None:
        """Keep a snapshot after `ids`; an existing entry for the same ids is replaced only to
        add logits it lacked, or to pin it. Evicts least-recently-used entries to make room;
        returns None (nothing kept) when the snapshot cannot fit beside the pinned ones."""
        ids = tuple(ids)
        if not ids:
            return None
        old = self.get(ids)
        if old is not None:
            if old.logits is None and logits is not None:
                old.logits = logits
            old.pinned = old.pinned or pinned
            return old
        if not self._make_room(nbytes):
            return None
        entry = CacheEntry(ids, state, logits, nbytes, pinned, next(self._clock))
        node = self._node_for(ids)
        node.entry, entry._node = entry, node
        self.entries.add(entry)
        self.bytes += nbytes
        return entry

    def _make_room(self, nbytes: int) -> bool:
        if nbytes > self.budget_bytes:
            return False
        while self.bytes + nbytes > self.budget_bytes:
            victims = [e for e in self.entries if not e.pinned]
            if not victims:
                return False
            self.remove(min(victims, key=lambda e: e.last_used))
            self.evictions += 1
        return True

    def remove(self, entry: CacheEntry) -> None:
        if entry not in self.entries:
            return
        self.entries.discard(entry)
        self.bytes -= entry.nbytes
        node = entry._node
        node.entry, entry._node = None, None
        # prune: drop empty leaves, merge a node left with one child into it
        while node is not self.root and node.entry is None and len(node.children) <= 1:
            parent = node.parent
            if not node.children:
                del parent.children[node.key[0]]
            else:
                (child,) = node.children.values()
                child.key = node.key + child.key
                child.parent = parent
                parent.children[node.key[0]] = child
            node = parent

    def unpin_all(self) -> int:
        n = 0
        for e in self.entries:
            n += e.pinned
            e.pinned = False
        return n

    def _node_for(self, ids: tuple[int, ...]) -> _Node:
        """The node where `ids` ends, splitting an edge if it ends inside one."""
        node, i = self.root, 0
        while i < len(ids):
            child = node.children.get(ids[i])
            if child is None:
                leaf = _Node(ids[i:], node)
                node.children[ids[i]] = leaf
                return leaf
            n = _common(child.key, ids, i)
            if n < len(child.key):   # split the edge at n
                mid = _Node(child.key[:n], node)
                node.children[ids[i]] = mid
                child.key = child.key[n:]
                child.parent = mid
                mid.children[child.key[0]] = child
                child = mid
            node, i = child, i + n
        return node

    def stats(self) -> dict[str, int]:
        return {"prefix_cache_queries": self.queries, "prefix_cache_hits": self.hits,
                "prefix_cache_query_tokens": self.query_tokens, "prefix_cache_hit_tokens": self.hit_tokens,
                "prefix_cache_entries": len(self.entries), "prefix_cache_bytes": self.bytes,
                "prefix_cache_evictions": self.evictions}
