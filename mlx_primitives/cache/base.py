"""What the contiguous caches share with mlx-lm's: the state protocol and the attention-mask helper.

mlx-lm models call ``cache.update_and_fetch(keys, values)``, read ``cache.offset`` for RoPE, ask
``cache.make_mask(N, return_array=..., window_size=...)`` for the mask of ``N`` new queries and look
for ``bits``/``group_size`` on quantized caches; the caches here answer all of these as mlx-lm's do.
For persistence they keep the ``state`` (arrays) + ``meta_state`` (strings) + ``from_state(state,
meta_state)`` split of earlier mlx-lm releases (mlx-lm 0.32 folds the scalars into ``state``), which
:func:`save_cache` / :func:`load_cache` read.
"""

from __future__ import annotations

from typing import Optional, Union

import mlx.core as mx

Mask = Union[None, str, mx.array]


def causal_mask(num_queries: int, offset: int, window_size: Optional[int] = None) -> mx.array:
    """bool ``(num_queries, offset + num_queries)``: query ``i`` (at position ``offset + i``) sees key ``j``
    iff ``j <= offset + i`` and, with ``window_size``, ``offset + i - j < window_size``."""
    query_pos = mx.arange(offset, offset + num_queries)[:, None]
    key_pos = mx.arange(offset + num_queries)[None]
    visible = query_pos >= key_pos
    if window_size is not None:
        visible = visible & (query_pos < key_pos + window_size)
    return visible


def attention_mask(num_queries: int, offset: int, return_array: bool = False,
                   window_size: Optional[int] = None) -> Mask:
    """The mask of ``num_queries`` new rows after ``offset`` cached keys, as mlx-lm's models want it:
    None for one row, ``"causal"`` (or the array with ``return_array``) otherwise; an array with a window."""
    if window_size is not None:
        return causal_mask(num_queries, offset, window_size)
    if num_queries == 1:
        return None
    return causal_mask(num_queries, offset) if return_array else "causal"


class Cache:
    """mlx-lm's cache protocol: ``state`` (arrays), ``meta_state`` (strings), ``from_state``, trimming the
    last positions of an ``offset``-counted cache."""

    step = 256

    @property
    def meta_state(self):
        return ""

    @meta_state.setter
    def meta_state(self, value) -> None:
        if value:
            raise ValueError(f"{type(self).__name__} has no meta_state; got {value!r}")

    @classmethod
    def from_state(cls, state, meta_state):
        """A cache holding ``state`` and ``meta_state`` (what :func:`load_cache` and mlx-lm's loader call)."""
        cache = cls.__new__(cls)
        cache.keys = cache.values = None
        cache.offset = 0
        cache.state = state
        cache.meta_state = meta_state
        return cache

    def size(self) -> int:
        return self.offset

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    def empty(self) -> bool:
        return self.keys is None

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None) -> Mask:
        """The mask of ``N`` new queries against the cache after their keys are added."""
        return attention_mask(N, self.offset, return_array=return_array, window_size=window_size)
