"""A contiguous key/value cache with mlx-lm's interface (``update_and_fetch``, ``offset``, ``state``)."""

from __future__ import annotations

from typing import List, Tuple

import mlx.core as mx

from .base import Cache


class KVCache(Cache):
    """Keys and values of past positions, ``(batch, kv_heads, capacity, head_dim)``, grown in steps.

    Args:
        step (int): positions added to the capacity each time it runs out. Default: ``256``.
    """

    def __init__(self, step: int = 256):
        self.step = step
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
        return self.keys[..., :needed, :], self.values[..., :needed, :]

    @property
    def state(self) -> List[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]

    @state.setter
    def state(self, value: List[mx.array]) -> None:
        self.keys, self.values = value if value else (None, None)
        self.offset = 0 if self.keys is None else self.keys.shape[2]

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedKVCache":
        """The same positions in a :class:`QuantizedKVCache`."""
        from .quantized import QuantizedKVCache

        cache = QuantizedKVCache(group_size=group_size, bits=bits)
        if self.keys is not None:
            keys, values = self.state
            cache.update_and_fetch(keys, values)
        return cache

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
