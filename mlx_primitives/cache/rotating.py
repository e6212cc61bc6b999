"""A fixed-size key/value cache that keeps the first ``keep`` positions (attention sinks) and a ring of
the most recent ones, with mlx-lm's ``RotatingKVCache`` interface and behaviour."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import mlx.core as mx

from ..validation import check_int
from .base import Cache, Mask, causal_mask, mlx_lm_cache


def _check_sizes(max_size: int, keep: int) -> Tuple[int, int]:
    """``(max_size, keep)`` as ints, checked: ``max_size >= 1``, ``0 <= keep < max_size``."""
    max_size, keep = check_int("max_size", max_size), check_int("keep", keep)
    if max_size < 1:
        raise ValueError(f"max_size must be an int >= 1; got {max_size!r}")
    if not 0 <= keep < max_size:
        raise ValueError(f"keep must be an int in [0, max_size={max_size}); got {keep!r}")
    return max_size, keep


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

    state_fields = ("keys", "values", "offset", "keep", "max_size", "_idx")

    def __init__(self, max_size: int, keep: int = 0):
        self.max_size, self.keep = _check_sizes(max_size, keep)
        self.keys = None
        self.values = None
        self.offset = 0
        self._idx = 0  # next write slot of the buffer

    def _drop(self, x: mx.array, count: int) -> mx.array:
        """``x`` without the ``count`` oldest positions after the sinks (buffer in time order)."""
        if count <= 0:
            return x
        return mx.concatenate([x[..., : self.keep, :], x[..., self.keep + count :, :]], axis=2)

    def _temporal_order(self, x: mx.array) -> mx.array:
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
            ordered_k, ordered_v = self._temporal_order(self.keys), self._temporal_order(self.values)
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
        return self.keys_and_values()

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """Add ``keys``/``values`` ``(batch, kv_heads, new, head_dim)``; return the kept positions."""
        if keys.shape[2] == 1:
            return self._write_one(keys, values)
        return self._append(keys, values)

    def size(self) -> int:
        return min(self.offset, self.max_size)

    @property
    def state(self) -> Tuple[Optional[mx.array], Optional[mx.array], int, int, int, int]:
        """mlx-lm's ``(keys, values, offset, keep, max_size, _idx)``; keys and values in buffer order."""
        return (*self.keys_and_values(), self.offset, self.keep, self.max_size, self._idx)

    @state.setter
    def state(self, value) -> None:
        keys, values, offset, keep, max_size, idx = self._unpack_state(value)
        max_size, keep = _check_sizes(max_size, keep)
        length = self._check_arrays(keys, values)
        if not isinstance(offset, int) or offset < 0 or (length == 0 and offset):
            raise ValueError(f"RotatingKVCache.state: offset = {offset!r} must be an int >= 0 (0 without keys)")
        self._check_length("_idx", idx, min(offset, length))
        if length > max_size and idx != length:
            raise ValueError(f"RotatingKVCache.state holds {length} keys, more than max_size = {max_size}, "
                             f"which only a prompt chunk's keys in time order (_idx = {length}) may; _idx = {idx}")
        self.keys, self.values, self.offset, self.keep, self.max_size, self._idx = (keys, values, offset, keep, max_size,
                                                                                     idx)

    def is_trimmable(self) -> bool:
        return self.offset < self.max_size

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions (only before the ring wraps); returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        self._idx -= n
        return n

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False) -> Mask:
        """The mask of ``N`` new queries against the keys ``update_and_fetch`` returns for them
        (mlx-lm's parameter order: ``window_size`` before ``return_array``)."""
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

    @classmethod
    def merge(cls, caches: Sequence["RotatingKVCache"]):
        """mlx-lm's ``BatchRotatingKVCache`` holding ``caches`` (one sequence each, left-padded to the
        longest; all of one ``max_size``), as mlx-lm's batch generation builds; needs mlx-lm."""
        return mlx_lm_cache().BatchRotatingKVCache.merge(caches)

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        """Not available, as in mlx-lm (whose ``maybe_quantize_kv_cache`` then stops with this error)."""
        raise NotImplementedError("RotatingKVCache has no quantized version (as in mlx-lm)")

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
