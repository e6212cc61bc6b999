"""A fixed-size key/value cache that keeps the first ``keep`` positions (attention sinks) and a ring of
the most recent ones, with mlx-lm's ``RotatingKVCache`` interface and behaviour."""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx

from .base import Cache, Mask, causal_mask


class RotatingKVCache(Cache):
    """At most ``max_size`` positions ``(batch, kv_heads, max_size, head_dim)``: the first ``keep`` ones
    (StreamingLLM's attention sinks) and the latest ``max_size - keep`` ones.

    One new position at a time is written in place into a ring after the sinks, so the keys
    ``update_and_fetch`` returns are in ring order, not time order (keys carry their position through
    RoPE; one query row needs no mask). Several new positions (a prompt chunk) are appended to the
    time-ordered keep + latest ``max_size - 1`` positions, so each new row still sees ``max_size``
    positions; the buffer shrinks back to ``max_size`` at the next single-position update.

    Args:
        max_size (int): positions kept.
        keep (int): leading positions never evicted. Default: ``0``.
    """

    def __init__(self, max_size: int, keep: int = 0):
        if not 0 <= keep < max_size:
            raise ValueError(f"keep must be in [0, max_size={max_size}); got {keep}")
        self.max_size = max_size
        self.keep = keep
        self.keys = None
        self.values = None
        self.offset = 0
        self._idx = 0  # next write slot of the buffer

    def _drop(self, x: mx.array, count: int) -> mx.array:
        """``x`` without the ``count`` oldest positions after the sinks (buffer in time order)."""
        if count <= 0:
            return x
        return mx.concatenate([x[..., : self.keep, :], x[..., self.keep + count :, :]], axis=2)

    def _in_time_order(self, x: mx.array) -> mx.array:
        if self._idx == x.shape[2]:
            return x
        if self._idx < self.offset:  # the ring wrapped: the oldest kept position sits at _idx
            return mx.concatenate([x[..., : self.keep, :], x[..., self._idx :, :], x[..., self.keep : self._idx, :]],
                                  axis=2)
        return x[..., : self._idx, :]

    def _append(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            ordered_k, ordered_v = self._in_time_order(self.keys), self._in_time_order(self.values)
            surplus = ordered_k.shape[2] - self.max_size + 1
            self.keys = mx.concatenate([self._drop(ordered_k, surplus), keys], axis=2)
            self.values = mx.concatenate([self._drop(ordered_v, surplus), values], axis=2)
        self.offset += keys.shape[2]
        self._idx = self.keys.shape[2]
        return self.keys, self.values

    def _write_one(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        length = 0 if self.keys is None else self.keys.shape[2]
        if self.keys is None or (self.offset >= length and length < self.max_size):
            grow = min(self.step, self.max_size - self.offset)
            batch, heads = keys.shape[:2]
            new_k = mx.zeros((batch, heads, grow, keys.shape[3]), keys.dtype)
            new_v = mx.zeros((batch, heads, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys, new_k], axis=2)
                self.values = mx.concatenate([self.values, new_v], axis=2)
            self._idx = self.offset
        surplus = self.keys.shape[2] - self.max_size
        if surplus > 0:  # a multi-position update left the buffer past max_size
            self.keys, self.values = self._drop(self.keys, surplus), self._drop(self.values, surplus)
            self._idx = self.max_size
        if self._idx == self.max_size:
            self._idx = self.keep
        self.keys[..., self._idx : self._idx + 1, :] = keys
        self.values[..., self._idx : self._idx + 1, :] = values
        self.offset += 1
        self._idx += 1
        if self.offset < self.max_size:
            return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        return self.keys, self.values

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Add ``keys``/``values`` ``(batch, kv_heads, new, head_dim)``; return the kept positions."""
        if keys.shape[2] == 1:
            return self._write_one(keys, values)
        return self._append(keys, values)

    def size(self) -> int:
        return min(self.offset, self.max_size)

    @property
    def state(self) -> List[mx.array]:
        if self.keys is None:
            return []
        if self.offset < self.keys.shape[2]:
            return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]
        return [self.keys, self.values]

    @state.setter
    def state(self, value: List[mx.array]) -> None:
        self.keys, self.values = value if value else (None, None)

    @property
    def meta_state(self) -> Tuple[str, ...]:
        return tuple(map(str, (self.keep, self.max_size, self.offset, self._idx)))

    @meta_state.setter
    def meta_state(self, value) -> None:
        self.keep, self.max_size, self.offset, self._idx = map(int, value)

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions (only before the ring wraps); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        self._idx -= n
        return n

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None) -> Mask:
        """The mask of ``N`` new queries against the keys ``update_and_fetch`` returns for them."""
        if N > 1:
            window_size = window_size or self.max_size
            offset = min(self.max_size - 1, self.offset)
            if offset + N > window_size or return_array:
                return causal_mask(N, offset, window_size)
            return "causal"
        if window_size is None or self.offset < window_size or self.max_size <= window_size:
            return None
        # One row over a ring longer than the window: hide the ring slots older than the window.
        slot = 0 if self._idx >= self.max_size else self._idx
        size = self.offset + 1 if self.offset < self.max_size else self.max_size
        recent = mx.arange(size) >= size - window_size
        return mx.roll(recent, shift=slot + 1)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
