"""``flash_attn_with_kvcache``: flash-attention's decoding entry point on MLX arrays.

New keys and values are written into the cache (contiguous, or paged through a block table) at
each sequence's length, rotary embedding is applied to q and the new keys when tables are given,
then the queries attend over the cache. Decode-sized calls (``seqlen_q <= 16``) run the split-KV
decode kernel (:func:`mlx_primitives.kernels.decode_attention`), which reads a paged cache through
the block table in place; longer query chunks (prefill) gather each sequence's keys and go through
the attention dispatcher. On the CPU both fall back to the reference path.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from ..cache.paged import check_new, check_pool, host_block_table, host_lengths, write_pages
from ..kernels.decode import MAX_Q_LEN, decode_attention
from ..validation import check_array
from .dispatch import run_attention
from .spec import describe_attention, to_bhsd

Output = Union[mx.array, Tuple[mx.array, mx.array]]


def _rotate(x: mx.array, cos: mx.array, sin: mx.array, positions: np.ndarray, interleaved: bool) -> mx.array:
    """Rotary embedding of ``x`` ``(batch, seqlen, heads, head_dim)``: row ``(b, i)`` by the table rows
    ``positions[b, i]`` of ``cos``/``sin`` ``(seqlen_ro, rotary_dim / 2)``, in float32."""
    half = cos.shape[1]
    index = mx.array(positions, mx.int32)
    c = cos[index].astype(mx.float32)[:, :, None, :]
    s = sin[index].astype(mx.float32)[:, :, None, :]
    x32 = x.astype(mx.float32)
    if interleaved:
        even, odd = x32[..., 0 : 2 * half : 2], x32[..., 1 : 2 * half : 2]
        rotated = mx.stack([even * c - odd * s, odd * c + even * s], axis=-1).reshape(*x.shape[:-1], 2 * half)
    else:
        first, second = x32[..., :half], x32[..., half : 2 * half]
        rotated = mx.concatenate([first * c - second * s, second * c + first * s], axis=-1)
    return mx.concatenate([rotated.astype(x.dtype), x[..., 2 * half :]], axis=-1)


def _check_rotary(rotary_cos, rotary_sin, head_dim: int, needed: int) -> None:
    check_array("rotary_cos", rotary_cos, "(seqlen_ro, rotary_dim / 2)", ndim=2)
    check_array("rotary_sin", rotary_sin, f"rotary_cos's shape {tuple(rotary_cos.shape)}", shape=rotary_cos.shape)
    if 2 * rotary_cos.shape[1] > head_dim:
        raise ValueError(f"rotary_cos must have shape (seqlen_ro, rotary_dim / 2) with rotary_dim <= head_dim "
                         f"({head_dim}); got {tuple(rotary_cos.shape)}")
    if rotary_cos.shape[0] < needed:
        raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} positions; this call needs {needed}")


def _prefill(q, k_cache, v_cache, table, rows, lengths, starts, spec_args, need_lse) -> Tuple[mx.array, mx.array]:
    """Gather each sequence's keys ``[starts[b], lengths[b])`` and attend through the dispatcher."""
    batch = q.shape[0]
    page_size = k_cache.shape[1]

    def keys_of(pool, b, start, stop):
        if table is None:
            return pool[rows[b] : rows[b] + 1, start:stop]
        pages = mx.array(table[b, : -(-stop // page_size)].astype(np.int32))
        return pool[pages].reshape(1, -1, *pool.shape[2:])[:, start:stop]

    uniform = (lengths == lengths[0]).all() and (starts == starts[0]).all()
    groups = [range(batch)] if uniform and (table is not None or (rows == np.arange(batch)).all()) else \
        [[b] for b in range(batch)]
    outs, lses = [], []
    for group in groups:
        first, last = group[0], group[-1] + 1
        start, stop = int(starts[first]), int(lengths[first])
        if len(group) == batch and table is None:
            k, v = k_cache[:, start:stop], v_cache[:, start:stop]
        else:
            k = mx.concatenate([keys_of(k_cache, b, start, stop) for b in group])
            v = mx.concatenate([keys_of(v_cache, b, start, stop) for b in group])
        slopes = spec_args["alibi_slopes"]
        if slopes is not None and slopes.ndim == 2:
            slopes = slopes[first:last]
        spec = describe_attention(q[first:last], k, v, layout="BSHD", **{**spec_args, "alibi_slopes": slopes})
        out, lse = run_attention(to_bhsd(q[first:last], "BSHD"), to_bhsd(k, "BSHD"), to_bhsd(v, "BSHD"), spec,
                                 need_lse=need_lse)
        outs.append(to_bhsd(out, "BSHD"))
        lses.append(lse)
    return mx.concatenate(outs), (mx.concatenate(lses) if need_lse else None)


def _host_layout(k_cache, batch: int, new: int, cache_seqlens, cache_batch_idx, cache_leftpad, block_table):
    """Check the cache's lengths, rows, padding and page table on the host.

    Returns ``(lengths, table, rows, starts)`` as int64 NumPy: keys cached before the new ones, the
    block table (None for a contiguous cache), each sequence's cache row and first unpadded key.
    """
    paged = block_table is not None
    capacity = k_cache.shape[1] * (block_table.shape[1] if paged and isinstance(block_table, mx.array) else 1)
    lengths = host_lengths(capacity if cache_seqlens is None else cache_seqlens, batch)
    total = lengths + new
    table, rows = None, np.arange(batch)
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx indexes a contiguous cache; with block_table, each sequence's row "
                             "of the table gives its pages")
        table = host_block_table(block_table, batch, k_cache.shape[0], k_cache.shape[1], total)
    else:
        if cache_batch_idx is not None:
            check_array("cache_batch_idx", cache_batch_idx, f"({batch},) int32", shape=(batch,), dtypes=(mx.int32,))
            rows = np.array(cache_batch_idx, np.int64)
            bad = (rows < 0) | (rows >= k_cache.shape[0])
            if bad.any():
                b = int(np.argmax(bad))
                raise ValueError(f"cache_batch_idx[{b}] = {rows[b]} is not a row of k_cache "
                                 f"(batch_size_cache = {k_cache.shape[0]})")
            if new and len(np.unique(rows)) != batch:
                raise ValueError(f"cache_batch_idx must name distinct cache rows when k and v are appended (two "
                                 f"sequences would write the same row); got {rows.tolist()}")
        elif k_cache.shape[0] != batch:
            raise ValueError(f"k_cache must have batch_size_cache = batch = {batch} without cache_batch_idx; "
                             f"got {tuple(k_cache.shape)}")
        over = total > k_cache.shape[1]
        if over.any():
            b = int(np.argmax(over))
            raise ValueError(f"sequence {b} needs {total[b]} keys (cache_seqlens + seqlen_new); k_cache holds "
                             f"seqlen_cache = {k_cache.shape[1]}")
    starts = np.zeros((batch,), np.int64)
    if cache_leftpad is not None:
        check_array("cache_leftpad", cache_leftpad, f"({batch},) int32", shape=(batch,), dtypes=(mx.int32,))
        starts = np.array(cache_leftpad, np.int64)
        if ((starts < 0) | (starts > total)).any():
            b = int(np.argmax((starts < 0) | (starts > total)))
            raise ValueError(f"cache_leftpad[{b}] = {starts[b]} is outside [0, {total[b]}]")
    return lengths, table, rows, starts


def flash_attn_with_kvcache(
    q: mx.array,
    k_cache: mx.array,
    v_cache: mx.array,
    k: Optional[mx.array] = None,
    v: Optional[mx.array] = None,
    rotary_cos: Optional[mx.array] = None,
    rotary_sin: Optional[mx.array] = None,
    cache_seqlens: Union[None, int, mx.array] = None,
    cache_batch_idx: Optional[mx.array] = None,
    cache_leftpad: Optional[mx.array] = None,
    block_table: Optional[mx.array] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Optional[mx.array] = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
) -> Output:
    """Attention of ``q`` over a KV cache, after appending ``k``/``v`` to it (flash-attention's semantics).

    With ``k`` and ``v``, sequence ``b``'s new keys are written *in place* into ``k_cache``/``v_cache``
    at positions ``cache_seqlens[b] ..`` (the caller's arrays see them; the cache must have room),
    and attention covers ``cache_seqlens[b] + seqlen_new`` keys; without them it covers
    ``cache_seqlens[b]``. Masks align bottom-right per sequence: query ``i`` sits at key position
    ``length_b - seqlen_q + i``.

    With ``rotary_cos``/``rotary_sin`` (only together with ``k``), the new keys are rotated at
    positions ``cache_seqlens[b] - cache_leftpad[b] + i``, and so are the queries when ``causal`` or a
    window is set; otherwise every query row is rotated at ``cache_seqlens[b] - cache_leftpad[b]``.
    The tables are arbitrary (any base or scaling: flash-attention's cos/sin tables, not ``rope``'s
    base or wavelengths), so this applies them directly.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, float16, bfloat16 or float32.
        k_cache, v_cache: ``(batch_size_cache, seqlen_cache, nheads_k, headdim)``, or with
            ``block_table`` page pools ``(num_blocks, page_block_size, nheads_k, headdim)``; q's dtype.
        k, v: optional new keys/values ``(batch, seqlen_new, nheads_k, headdim)``.
        rotary_cos, rotary_sin: optional ``(seqlen_ro, rotary_dim / 2)``; rotary_dim <= headdim.
        cache_seqlens: int or int32 ``(batch,)`` keys already cached; default: the whole cache.
        cache_batch_idx: int32 ``(batch,)``: the row of a contiguous cache each sequence uses
            (default ``0 .. batch - 1``).
        cache_leftpad: int32 ``(batch,)``: keys before this index are padding, never attended.
        block_table: int32 ``(batch, max_num_blocks_per_seq)``: page ids, -1 for unused slots.
        softmax_scale: default ``1 / sqrt(headdim)``.
        causal: bottom-right aligned causal mask.
        window_size: ``(left, right)`` keys visible around the aligned position; -1 unbounded.
        softcap: ``c`` of ``c * tanh(s / c)``; 0 disables.
        rotary_interleaved: rotate pairs ``(2j, 2j + 1)`` (True, flash-attention's default) or
            ``(j, j + rotary_dim / 2)`` (False, GPT-NeoX style, as ``mx.fast.rope``'s default).
        alibi_slopes: float ``(nheads,)`` or ``(batch, nheads)``: adds ``-slope * |pos - j|``.
        num_splits: accepted for compatibility; the decode kernel picks its split count.
        return_softmax_lse: also return the log-sum-exp.

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim)`` in q's dtype; with ``return_softmax_lse``
        ``(out, softmax_lse)``, ``softmax_lse`` float32 ``(batch, nheads, seqlen_q)``.

    Raises:
        TypeError, ValueError: before any write or kernel, for shapes, dtypes, page ids outside the
        pool (or -1 where a page is needed), lengths beyond the cache's capacity, cache rows outside
        the cache.
    """
    del num_splits
    check_array("q", q, "(batch, seqlen_q, nheads, headdim)", ndim=4)
    batch, q_len, _, head_dim = q.shape
    paged = block_table is not None
    check_pool(k_cache, v_cache, paged)
    if k_cache.dtype != q.dtype:
        raise TypeError(f"k_cache and v_cache must have q's dtype {q.dtype}; got {k_cache.dtype}")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    new = 0
    if k is not None:
        check_array("k", k, "(batch, seqlen_new, nheads_k, headdim)", ndim=4)
        new = k.shape[1]
        check_new("k", k, k_cache, batch)
        check_new("v", v, v_cache, batch, new)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None and k is None:
        raise ValueError("rotary_cos/rotary_sin need k and v (they rotate the new keys)")

    lengths, table, rows, starts = _host_layout(k_cache, batch, new, cache_seqlens, cache_batch_idx, cache_leftpad,
                                                block_table)
    total = lengths + new
    spec_args = dict(scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                     alibi_slopes=alibi_slopes)
    # Validate the attention options once on a stand-in of the cache, before anything is written.
    stand_in = mx.zeros((batch, 1) + k_cache.shape[2:], q.dtype)
    describe_attention(q, stand_in, mx.zeros((batch, 1) + v_cache.shape[2:], q.dtype), layout="BSHD", **spec_args)

    if rotary_cos is not None:
        first = lengths - starts
        _check_rotary(rotary_cos, rotary_sin, head_dim, int((first + max(new, q_len)).max()))
        k_pos = first[:, None] + np.arange(new)[None, :]
        local = causal or tuple(window_size) != (-1, -1)
        q_pos = first[:, None] + (np.arange(q_len)[None, :] if local else np.zeros((1, q_len), np.int64))
        k = _rotate(k, rotary_cos, rotary_sin, k_pos, rotary_interleaved)
        q = _rotate(q, rotary_cos, rotary_sin, q_pos, rotary_interleaved)
    if new and paged:
        write_pages(k_cache, v_cache, k, v, table, lengths)
    elif new:
        positions = lengths[:, None] + np.arange(new)[None, :]
        index = (mx.array(np.repeat(rows, new), mx.int32), mx.array(positions.reshape(-1), mx.int32))
        k_cache[index] = k.reshape(-1, *k.shape[2:])
        v_cache[index] = v.reshape(-1, *v.shape[2:])

    if q_len > MAX_Q_LEN or cache_leftpad is not None:
        out, lse = _prefill(q, k_cache, v_cache, table, rows, total, starts, spec_args, return_softmax_lse)
    else:
        pool_k, pool_v, pages = k_cache, v_cache, block_table
        if not paged and cache_batch_idx is not None:
            if k_cache.shape[1] & (k_cache.shape[1] - 1) == 0:
                # Each sequence's cache row is one page of seqlen_cache keys: the kernel reads it in place.
                pages = mx.array(rows[:, None].astype(np.int32))
            else:
                index = mx.array(rows.astype(np.int32))
                pool_k, pool_v = k_cache[index], v_cache[index]
        out, lse = decode_attention(q, pool_k, pool_v, mx.array(total, mx.int32), block_table=pages,
                                    softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                    softcap=softcap, alibi_slopes=alibi_slopes, return_lse=True)
    return (out, lse) if return_softmax_lse else out


def paged_attention(
    q: mx.array,
    k_pool: mx.array,
    v_pool: mx.array,
    block_table: mx.array,
    context_lens: Union[int, mx.array],
    scale: Optional[float] = None,
    causal: bool = True,
) -> mx.array:
    """Attention of ``q`` over keys already in a paged cache: :func:`flash_attn_with_kvcache` without
    new keys (decode-sized calls read the pages in place through the block table).

    Sequence ``b`` attends over its first ``context_lens[b]`` keys: key ``j`` is row ``j % page_size``
    of page ``block_table[b, j // page_size]``. The queries are the sequence's last ``seqlen_q``
    positions, so ``causal`` aligns the mask bottom-right (query ``i`` sees keys
    ``<= context_lens[b] - seqlen_q + i``); a single query row sees every key either way.

    Args:
        q: ``(batch, seqlen_q, num_heads, head_dim)``.
        k_pool, v_pool: page pools ``(num_pages, page_size, num_kv_heads, head_dim)`` in q's dtype
            (e.g. :class:`~mlx_primitives.cache.PagedKVCache`'s ``k_pools[layer]``).
        block_table: int32 ``(batch, max_pages)`` page ids, -1 for unused slots.
        context_lens: int32 ``(batch,)`` (or an int) keys cached per sequence.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        causal: bottom-right aligned causal mask. Default: ``True``.

    Returns:
        ``(batch, seqlen_q, num_heads, head_dim)`` in q's dtype.
    """
    return flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=context_lens, block_table=block_table,
                                   softmax_scale=scale, causal=causal)
