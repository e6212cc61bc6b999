"""Eviction policies: which cached positions of a sequence to keep.

A policy is one method, ``keep(length, scores) -> sorted positions to keep``; the caches apply it
(:meth:`PagedKVCache.evict` frees the pages left without a kept key). Policies:

* :class:`SlidingWindow` -- the last ``window`` positions.
* :class:`AttentionSinks` -- StreamingLLM: the first ``sinks`` positions and the last ``window``.
* :class:`HeavyHitters` -- H2O: the last ``recent`` positions and, of the others, the ones with the
  highest accumulated attention (``scores``), ``budget`` in all. :func:`received_attention` gives
  the attention each key received in one step, from the queries, the keys and the log-sum-exp the
  attention call returned; after an eviction, ``scores[kept]`` carries the scores of the keys kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import mlx.core as mx
import numpy as np

from ..validation import check_array
from .base import causal_mask


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


def received_attention(q: mx.array, k: mx.array, lse: mx.array, scale: Optional[float] = None,
                       causal: bool = False) -> mx.array:
    """The attention each key of one sequence received: softmax probabilities summed over heads and
    query rows, ``sum_{h,i} exp(q_i . k_j * scale - lse[h, i])`` (what H2O accumulates into ``scores``).

    Exact for attention without softcap, ALiBi or a window, given the log-sum-exp that call returned
    (``flash_attn_with_kvcache(..., return_softmax_lse=True)``'s ``lse[b]`` for sequence ``b``).

    Args:
        q: ``(seqlen_q, num_heads, head_dim)``: the queries as attended (after rotary).
        k: ``(length, num_kv_heads, head_dim)``: the sequence's keys (e.g. ``PagedKVCache.gather``).
        lse: float32 ``(num_heads, seqlen_q)``.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        causal: the call's bottom-right aligned causal mask (query ``i`` sees keys
            ``<= length - seqlen_q + i``).

    Returns:
        float32 ``(length,)``.
    """
    check_array("q", q, "(seqlen_q, num_heads, head_dim)", ndim=3)
    q_len, heads, dim = q.shape
    check_array("k", k, f"(length, num_kv_heads, {dim})", ndim=3)
    check_array("lse", lse, f"({heads}, {q_len}) float32", shape=(heads, q_len), dtypes=(mx.float32,))
    if k.shape[2] != dim or heads % k.shape[1]:
        raise ValueError(f"k must have shape (length, num_kv_heads, {dim}) with num_kv_heads dividing {heads}; "
                         f"got {tuple(k.shape)}")
    keys = mx.repeat(k.astype(mx.float32), heads // k.shape[1], axis=1)
    logits = mx.einsum("qhd,khd->hqk", q.astype(mx.float32), keys) * (1 / math.sqrt(dim) if scale is None else scale)
    probs = mx.exp(logits - lse[..., None])
    if causal:
        probs = mx.where(causal_mask(q_len, k.shape[0] - q_len), probs, 0.0)
    return probs.sum(axis=(0, 1))
