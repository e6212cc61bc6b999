"""A contiguous key/value cache with mlx-lm's interface (``update_and_fetch``, ``offset``, ``state``)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import mlx.core as mx

from ..validation import check_int
from .base import Cache, mlx_lm_cache


class KVCache(Cache):
    """Keys and values of past positions, ``(batch, kv_heads, capacity, head_dim)``, grown in steps.

    Args:
        step (int): positions added to the capacity each time it runs out. Default: ``256``.
    """

    state_fields = ("keys", "values", "offset")

    def __init__(self, step: int = 256):
        self.step = check_int("step", step)
        if self.step < 1:
            raise ValueError(f"step must be an int >= 1; got {step!r}")
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Append ``keys``/``values`` ``(batch, kv_heads, new, head_dim)``; return all cached so far."""
        previous = self.offset
        needed = previous + keys.shape[2]
        if self.keys is None or needed > self.keys.shape[2]:
            batch, heads, _, k_dim = keys.shape
            capacity = ((needed + self.step - 1) // self.step) * self.step
            grow = capacity - previous  # the positions past ``previous`` are dropped below
            new_k = mx.zeros((batch, heads, grow, k_dim), keys.dtype)
            new_v = mx.zeros((batch, heads, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :previous, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :previous, :], new_v], axis=2)
        self.offset = needed
        self.keys[..., previous:needed, :] = keys
        self.values[..., previous:needed, :] = values
        return self.keys_and_values()

    @property
    def state(self) -> Tuple[Optional[mx.array], Optional[mx.array], int]:
        """mlx-lm's ``(keys, values, offset)``: the cached positions, ``(None, None, 0)`` when empty."""
        return (*self.keys_and_values(), self.offset)

    @state.setter
    def state(self, value) -> None:
        keys, values, offset = self._unpack_state(value)
        self._check_length("offset", offset, self._check_arrays(keys, values))
        self.keys, self.values, self.offset = keys, values, offset

    @classmethod
    def merge(cls, caches: Sequence["KVCache"]):
        """mlx-lm's ``BatchKVCache`` holding ``caches`` (one sequence each, left-padded to the longest),
        as mlx-lm's batch generation builds from per-prompt caches; needs mlx-lm."""
        return mlx_lm_cache().BatchKVCache.merge(caches)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedKVCache":
        """The same positions in a :class:`QuantizedKVCache`."""
        from .quantized import QuantizedKVCache

        cache = QuantizedKVCache(group_size=group_size, bits=bits)
        if self.keys is not None:
            cache.update_and_fetch(*self.keys_and_values())
        return cache

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
