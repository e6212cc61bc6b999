"""Decode attention over heads-first caches, mlx-lm's layout, read in place.

mlx-lm's caches (and :class:`~mlx_primitives.cache.KVCache`, :class:`~mlx_primitives.cache.QuantizedKVCache`)
hold keys as ``(batch, kv_heads, capacity, head_dim)``; :func:`~.decode.decode_attention` reads
``(batch, capacity, kv_heads, head_dim)``. Instead of a transposed copy of the whole cache per step,
each (batch, kv head) pair becomes one sequence of a one-kv-head cache: a reshape of the buffer, free
when it is row-contiguous (a cache's whole buffer, not a slice of it). Only the queries (a few rows)
are transposed.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx

from ..validation import FLOAT_DTYPES, check_array
from .decode import Cache, Output, decode_attention


def _as_sequences(cache: Cache) -> Cache:
    """``(B, Hk, S, ...)`` -> ``(B * Hk, S, 1, ...)``, each part of a quantized tuple alike."""
    if isinstance(cache, (tuple, list)):
        return tuple(_as_sequences(part) for part in cache)
    batch, heads, length, last = cache.shape
    return cache.reshape(batch * heads, length, 1, last)


def decode_heads_first(
    q: mx.array,
    k_cache: Cache,
    v_cache: Cache,
    cache_seqlens: Union[int, mx.array],
    *,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    quantization: Optional[Tuple[int, int]] = None,
    return_lse: bool = False,
    path: str = "auto",
) -> Output:
    """:func:`~.decode.decode_attention` for BHSD queries and caches.

    Args:
        q: ``(batch, num_heads, seqlen_q, head_dim)``.
        k_cache, v_cache: ``(batch, num_kv_heads, capacity, head_dim)``, or with ``quantization``
            ``(packed, scales, biases)`` tuples of ``(batch, num_kv_heads, capacity, ...)``
            (``mx.quantize``'s layout). Pass whole buffers: a slice along ``capacity`` is copied.
        cache_seqlens: keys per sequence, an int (every sequence) or int32 ``(batch,)``.
        softmax_scale, causal, window_size, softcap, quantization, return_lse, path: as
            :func:`~.decode.decode_attention`.
        alibi_slopes: float ``(num_heads,)`` or ``(batch, num_heads)``.

    Returns:
        ``out`` ``(batch, num_heads, seqlen_q, head_dim)``, with ``return_lse`` also ``lse``
        float32 ``(batch, num_heads, seqlen_q)``.
    """
    check_array("q", q, "(batch, num_heads, seqlen_q, head_dim)", ndim=4)
    quantized = isinstance(k_cache, (tuple, list))
    first = k_cache[0] if quantized else k_cache
    check_array("k_cache[0]" if quantized else "k_cache", first, "(batch, num_kv_heads, capacity, ...)", ndim=4,
                dtypes=(mx.uint32,) if quantized else FLOAT_DTYPES)
    batch, num_heads, q_len, head_dim = q.shape
    kv_heads = first.shape[1]
    if first.shape[0] != batch or num_heads % kv_heads:
        raise ValueError(f"k_cache must have shape ({batch}, num_kv_heads dividing num_heads={num_heads}, capacity, "
                         f"...); got {tuple(first.shape)}")
    groups = num_heads // kv_heads
    if isinstance(cache_seqlens, int):
        lengths = mx.full((batch * kv_heads,), cache_seqlens, mx.int32)
    else:
        check_array("cache_seqlens", cache_seqlens, f"({batch},)", shape=(batch,), dtypes=(mx.int32,))
        lengths = mx.repeat(cache_seqlens, kv_heads)
    if alibi_slopes is not None:
        slopes = mx.broadcast_to(alibi_slopes, (batch, num_heads)) if alibi_slopes.ndim == 1 else alibi_slopes
        alibi_slopes = slopes.reshape(batch * kv_heads, groups)
    rows = q.reshape(batch, kv_heads, groups, q_len, head_dim).transpose(0, 1, 3, 2, 4)
    out, lse = decode_attention(
        rows.reshape(batch * kv_heads, q_len, groups, head_dim), _as_sequences(k_cache), _as_sequences(v_cache),
        lengths, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, return_lse=True, path=path, quantization=quantization,
    )
    out = out.reshape(batch, kv_heads, q_len, groups, head_dim).transpose(0, 1, 3, 2, 4)
    out = out.reshape(batch, num_heads, q_len, head_dim)
    return (out, lse.reshape(batch, num_heads, q_len)) if return_lse else out
