"""Eviction policies: which cached positions of a sequence to keep.

A policy is one method, ``keep(length, scores) -> sorted positions to keep``; the caches apply it
(:meth:`PagedKVCache.evict` frees the pages left without a kept key). Policies:

* :class:`SlidingWindow` -- the last ``window`` positions.
* :class:`AttentionSinks` -- StreamingLLM: the first ``sinks`` positions and the last ``window``.
* :class:`HeavyHitters` -- H2O: the last ``recent`` positions and, of the others, the ones with the
  highest accumulated attention (``scores``), ``budget`` in all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np


class EvictionPolicy(Protocol):
    needs_scores: bool

    def keep(self, length: int, scores: Optional[np.ndarray] = None) -> np.ndarray:
        """Sorted int64 positions in ``[0, length)`` to keep; ``scores`` ``(length,)`` when ``needs_scores``."""


def _positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


@dataclass(frozen=True)
class SlidingWindow:
    """Keep the last ``window`` positions."""

    window: int
    needs_scores = False

    def __post_init__(self):
        _positive("window", self.window)

    def keep(self, length: int, scores: Optional[np.ndarray] = None) -> np.ndarray:
        return np.arange(max(0, length - self.window), length, dtype=np.int64)


@dataclass(frozen=True)
class AttentionSinks:
    """StreamingLLM: keep the first ``sinks`` positions (attention sinks) and the last ``window``."""

    sinks: int
    window: int
    needs_scores = False

    def __post_init__(self):
        _positive("sinks", self.sinks, 0)
        _positive("window", self.window)

    def keep(self, length: int, scores: Optional[np.ndarray] = None) -> np.ndarray:
        recent = max(min(self.sinks, length), length - self.window)
        return np.concatenate([np.arange(min(self.sinks, length)), np.arange(recent, length)]).astype(np.int64)


@dataclass(frozen=True)
class HeavyHitters:
    """H2O: keep ``budget`` positions, the last ``recent`` and the heaviest of the rest by ``scores``
    (the attention each key has received so far, e.g. probabilities summed over heads and queries).
    Ties go to the older position."""

    budget: int
    recent: int = 0
    needs_scores = True

    def __post_init__(self):
        _positive("budget", self.budget)
        _positive("recent", self.recent, 0)
        if self.recent > self.budget:
            raise ValueError(f"recent ({self.recent}) must be <= budget ({self.budget})")

    def keep(self, length: int, scores: Optional[np.ndarray] = None) -> np.ndarray:
        if scores is None or np.shape(scores) != (length,):
            raise ValueError(f"HeavyHitters needs scores of shape ({length},); got "
                             f"{None if scores is None else np.shape(scores)}")
        if length <= self.budget:
            return np.arange(length, dtype=np.int64)
        older = length - self.recent
        heavy = np.argsort(-np.asarray(scores[:older], np.float64), kind="stable")[: self.budget - self.recent]
        return np.sort(np.concatenate([heavy, np.arange(older, length)])).astype(np.int64)
