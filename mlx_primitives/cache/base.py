"""What the contiguous caches share with mlx-lm's: the state protocol and the attention-mask helper.

mlx-lm models call ``cache.update_and_fetch(keys, values)`` or ``cache.keys_and_values()``, read
``cache.offset`` for RoPE, ask ``cache.make_mask(N, ...)`` for the mask of ``N`` new queries and look
for ``bits``/``group_size`` on quantized caches; the caches here answer all of these as mlx-lm's do.
``state`` is mlx-lm 0.32's tuple (arrays and scalars, e.g. ``(keys, values, offset)``) and
``from_state(state)`` rebuilds a cache from it, so mlx-lm's ``save_prompt_cache`` /
``load_prompt_cache`` and ``their_cache.state = our_cache.state`` (either way) work; setting a state
checks that its scalars agree with its arrays.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

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


def mlx_lm_cache():
    """mlx-lm's ``mlx_lm.models.cache`` module (its batch caches), or ImportError saying what needs it."""
    try:
        from mlx_lm.models import cache
    except ImportError as error:
        raise ImportError("merging caches into a batch cache needs mlx-lm (pip install mlx-lm)") from error
    return cache


class Cache:
    """mlx-lm's cache protocol: ``state`` / ``from_state``, ``keys_and_values``, trimming the last
    positions of an ``offset``-counted cache. Subclasses say which ``state`` fields they hold."""

    step = 256
    state_fields: Tuple[str, ...] = ()

    @classmethod
    def from_state(cls, state):
        """A cache holding ``state`` (what :func:`load_cache` and mlx-lm's ``load_prompt_cache`` call)."""
        cache = cls.__new__(cls)
        cache.state = state
        return cache

    def _unpack_state(self, value) -> tuple:
        """``value`` as a tuple of :attr:`state_fields`, or ValueError naming the fields expected."""
        if not isinstance(value, (tuple, list)) or len(value) != len(self.state_fields):
            got = f"{len(value)} items" if isinstance(value, (tuple, list)) else type(value).__name__
            raise ValueError(f"{type(self).__name__}.state must be ({', '.join(self.state_fields)}); got {got}")
        return tuple(value)

    def _check_arrays(self, keys, values) -> int:
        """The cached length of state ``keys``/``values``: both None (length 0), or 4-d arrays (tuples of
        them in a quantized cache) of one ``(batch, kv_heads, length)``; ValueError otherwise."""
        if keys is None and values is None:
            return 0
        parts = [x for part in (keys, values) for x in (part if isinstance(part, (tuple, list)) else (part,))]
        if not all(isinstance(x, mx.array) and x.ndim == 4 for x in parts) or len({x.shape[:3] for x in parts}) > 1:
            shapes = [tuple(x.shape) if isinstance(x, mx.array) else type(x).__name__ for x in parts]
            raise ValueError(f"{type(self).__name__}.state: keys and values must both be None or arrays "
                             f"(batch, kv_heads, length, ...) of one (batch, kv_heads, length); got {shapes}")
        return parts[0].shape[2]

    def _check_length(self, name: str, value: int, length: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= length:
            raise ValueError(f"{type(self).__name__}.state: {name} = {value!r} must be an int in [0, {length}] "
                             f"(the cached keys' length)")

    def keys_and_values(self):
        """Every cached position: what the last ``update_and_fetch`` returned (every layer of a decode
        step asks, so no tree walk: a quantized cache's tuples have their own)."""
        if self.keys is None:
            return None, None
        if self.offset >= self.keys.shape[2]:
            return self.keys, self.values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

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
