"""Counter-based dropout randomness shared by the reference path and the kernels.

Whether weight ``(b, h, i, j)`` of an attention matrix is kept depends only on a
32-bit seed and those four indices, through three rounds of the MurmurHash3
finalizer. Any implementation that evaluates the same integer recipe (MLX ops
here, a kernel body elsewhere) drops exactly the same weights, so a kernel's
forward and the reference's backward agree bit for bit.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

_GOLDEN = 0x9E3779B9
_ROW_MIX = 0x85EBCA6B
_COL_MIX = 0xC2B2AE35


def _u32(value: int) -> mx.array:
    return mx.array(value & 0xFFFFFFFF, dtype=mx.uint32)


def fmix32(x: mx.array) -> mx.array:
    """MurmurHash3's 32-bit finalizer (uint32 in, uint32 out, wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * _u32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * _u32(0xC2B2AE35)
    return x ^ (x >> 16)


def draw_seed(key: Optional[mx.array] = None) -> mx.array:
    """A uint32 scalar seed from ``key`` (``mx.random.key``) or MLX's global generator."""
    # MLX has no raw-bits draw; randint goes through floats, so draw two exact 16-bit halves.
    halves = mx.random.randint(0, 1 << 16, (2,), key=key).astype(mx.uint32)
    return (halves[0] << 16) | halves[1]


def keep_threshold(dropout_p: float) -> int:
    """Hashes at or above this uint32 value keep their weight."""
    return min(int(round(dropout_p * 2.0**32)), 2**32 - 1)


def keep_mask(
    seed: mx.array,
    batch_head: mx.array,
    rows: mx.array,
    cols: mx.array,
    dropout_p: float,
) -> mx.array:
    """Boolean keep mask for the broadcast of ``batch_head``, ``rows`` and ``cols``.

    Args:
        seed: uint32 scalar.
        batch_head: uint32 ``b * num_heads + h`` indices, broadcastable.
        rows: uint32 query indices, broadcastable.
        cols: uint32 key indices, broadcastable.
        dropout_p: drop probability.
    """
    h = fmix32(seed + (batch_head + 1) * _u32(_GOLDEN))
    h = fmix32(h ^ (rows * _u32(_ROW_MIX)))
    h = fmix32(h ^ (cols * _u32(_COL_MIX)))
    return h >= _u32(keep_threshold(dropout_p))
