"""Caches of sessions whose stream broke, kept a while so that a resynchronising edge skips the re-prefill.

When an edge loses its stream (a network blip, a proxy restart) it reopens a session whose prompt is
its prompt plus every committed token. If it comes back to the same server (with Ray Serve: the same
replica, by its routing key) the old session's KV cache is still useful: the new session adopts it,
cut to the longest common prefix, and only the tail is prefilled. The same idea as vLLM's and
SGLang's prefix caches, reduced to what a resync needs: whole sequences, adopted by one new session.

Only sessions whose stream ended without a Close are kept (a closed session's edge is done), at most
`capacity` of them, each for `ttl_s` seconds; any other session needing room evicts them first.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from handoff.shared.errors import ShapeError


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(diff[0]) if diff.size else n


@dataclass
class Retained:
    """A broken session's backend sequence and the tokens its cache holds (positions 0..len-1)."""

    seq: object
    tokens: list[int]
    since: float = field(default_factory=time.monotonic)


class RetainedSequences:
    """A small LRU of retained sequences; the service releases what it hands back."""

    def __init__(self, capacity: int, ttl_s: float, min_tokens: int = 1) -> None:
        """Args:
        capacity: sequences kept at most (0: keep none).
        ttl_s: seconds a sequence is kept.
        min_tokens: the shortest common prefix worth adopting a sequence for.
        """
        if capacity < 0 or ttl_s <= 0 or min_tokens < 1:
            raise ShapeError("capacity must be >= 0, ttl_s > 0 and min_tokens >= 1")
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.min_tokens = min_tokens
        self._items: list[Retained] = []  # oldest first

    def __len__(self) -> int:
        return len(self._items)

    def put(self, seq: object, tokens: Sequence[int]) -> list[object]:
        """Keep `seq` (its cache holds `tokens`); returns the sequences to release now (evicted, or `seq`)."""
        if self.capacity == 0 or len(tokens) < self.min_tokens:
            return [seq]
        self._items.append(Retained(seq, list(tokens)))
        evicted = []
        while len(self._items) > self.capacity:
            evicted.append(self._items.pop(0).seq)
        return evicted

    def take(self, prompt: Sequence[int]) -> tuple[object, int] | None:
        """The retained sequence sharing the longest prefix with `prompt` (at least min_tokens), removed.

        Returns:
            (seq, matched): the caller truncates seq's cache to `matched` tokens and feeds the rest;
            None when no sequence shares enough.
        """
        best, best_len = None, 0
        for item in self._items:
            n = common_prefix(item.tokens, prompt)
            if n >= self.min_tokens and n > best_len:
                best, best_len = item, n
        if best is None:
            return None
        self._items.remove(best)
        return best.seq, best_len

    def expired(self, now: float | None = None) -> list[object]:
        """Remove and return the sequences kept longer than ttl_s."""
        now = time.monotonic() if now is None else now
        old = [r for r in self._items if now - r.since > self.ttl_s]
        self._items = [r for r in self._items if now - r.since <= self.ttl_s]
        return [r.seq for r in old]

    def pop_oldest(self) -> object | None:
        """Remove and return the oldest sequence (to make room), or None when empty."""
        return self._items.pop(0).seq if self._items else None

    def drain(self) -> list[object]:
        """Remove and return every sequence."""
        items, self._items = self._items, []
        return [r.seq for r in items]
