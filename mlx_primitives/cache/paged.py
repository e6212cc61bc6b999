"""Paged key/value storage: argument checks, the append of new keys through a block table, gathers.

A page pool is ``(num_pages, page_size, num_kv_heads, head_dim)``; sequence ``b``'s key ``j`` is row
``j % page_size`` of page ``block_table[b, j // page_size]``. Slots of the table past a sequence's
pages hold -1. Every check reads the (small) lengths and tables on the host and raises before any
kernel runs, so no kernel is handed a page the pool does not have.
"""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

from ..validation import check_array, check_same_dtype

UNUSED = -1  # block-table slot without a page


def check_pool(k_cache: mx.array, v_cache: mx.array, paged: bool) -> None:
    """k_cache/v_cache: a page pool (``paged``) or contiguous ``(batch, seqlen_cache, kv_heads, head_dim)``."""
    layout = "(num_pages, page_size, num_kv_heads, head_dim)" if paged else \
        "(batch_size_cache, seqlen_cache, num_kv_heads, head_dim)"
    check_array("k_cache", k_cache, layout, ndim=4)
    check_array("v_cache", v_cache, layout, ndim=4)
    check_same_dtype(("k_cache", "v_cache"), (k_cache, v_cache))
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must have shape {tuple(k_cache.shape[:3])} + (head_dim_v,) like k_cache; "
                         f"got {tuple(v_cache.shape)}")


def host_lengths(cache_seqlens, batch: int) -> np.ndarray:
    """``cache_seqlens`` (an int or int32 ``(batch,)``) as int64 NumPy, checked non-negative."""
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        lengths = np.full((batch,), cache_seqlens, np.int64)
    else:
        check_array("cache_seqlens", cache_seqlens, f"({batch},) int32, or an int", shape=(batch,),
                    dtypes=(mx.int32,))
        lengths = np.array(cache_seqlens, np.int64)
    if (lengths < 0).any():
        b = int(np.argmax(lengths < 0))
        raise ValueError(f"cache_seqlens[{b}] = {lengths[b]} is negative")
    return lengths


def host_block_table(block_table: mx.array, batch: int, num_pages: int, page_size: int,
                     lengths: np.ndarray) -> np.ndarray:
    """Check ``block_table`` against the pool and the lengths; return it as int64 NumPy.

    Every slot is a page id in ``[0, num_pages)`` or -1 (unused); the first
    ``ceil(lengths[b] / page_size)`` slots of row ``b`` must be pages.
    """
    check_array("block_table", block_table, f"({batch}, max_pages) int32", ndim=2, dtypes=(mx.int32,))
    if block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise ValueError(f"block_table must have shape ({batch}, max_pages >= 1); got {tuple(block_table.shape)}")
    table = np.array(block_table, np.int64)
    capacity = table.shape[1] * page_size
    over = lengths > capacity
    if over.any():
        b = int(np.argmax(over))
        raise ValueError(f"sequence {b} needs {lengths[b]} keys, beyond block_table's capacity of "
                         f"{table.shape[1]} pages x page_size {page_size} = {capacity}")
    bad = (table < UNUSED) | (table >= num_pages)
    if bad.any():
        b, slot = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"block_table[{b}, {slot}] = {table[b, slot]} is not a page of the pool "
                         f"(0..{num_pages - 1}, or -1 for an unused slot)")
    needed = np.arange(table.shape[1])[None, :] < -(-lengths[:, None] // page_size)
    missing = needed & (table == UNUSED)
    if missing.any():
        b, slot = (int(i) for i in np.argwhere(missing)[0])
        raise ValueError(f"block_table[{b}, {slot}] is -1 (unused) but sequence {b} needs that page for its "
                         f"{lengths[b]} keys")
    return table


def check_new(name: str, new: mx.array, cache: mx.array, batch: int, seqlen_new: Optional[int] = None) -> None:
    """New keys or values ``(batch, seqlen_new, num_kv_heads, head_dim)`` matching the cache."""
    heads, dim = cache.shape[2:]
    expected = f"({batch}, seqlen_new, {heads}, {dim})"
    check_array(name, new, expected, ndim=4)
    if new.dtype != cache.dtype:
        raise TypeError(f"{name} must have the cache's dtype {cache.dtype}; got {new.dtype}")
    wrong_len = seqlen_new is not None and new.shape[1] != seqlen_new
    if new.shape[0] != batch or new.shape[2:] != (heads, dim) or wrong_len:
        raise ValueError(f"{name} must have shape {expected}; got {tuple(new.shape)}")


def page_slots(table: np.ndarray, lengths: np.ndarray, count: int, page_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """(pages, rows), each ``(batch * count,)``, of keys ``lengths[b] .. lengths[b] + count - 1``."""
    positions = lengths[:, None] + np.arange(count)[None, :]
    pages = np.take_along_axis(table, positions // page_size, axis=1)
    return pages.reshape(-1), (positions % page_size).reshape(-1)


def update_paged_kv_cache(
    k_cache: mx.array,
    v_cache: mx.array,
    new_k: mx.array,
    new_v: mx.array,
    block_table: mx.array,
    cache_seqlens,
) -> mx.array:
    """Write new keys and values after each sequence's cached ones, in place, through the block table.

    Key ``i`` of sequence ``b`` lands at position ``cache_seqlens[b] + i``: row
    ``(cache_seqlens[b] + i) % page_size`` of page ``block_table[b, (cache_seqlens[b] + i) // page_size]``.
    ``k_cache`` and ``v_cache`` are updated in place (MLX slice assignment: every holder of these
    arrays sees the new keys).

    Args:
        k_cache, v_cache: page pools ``(num_pages, page_size, num_kv_heads, head_dim)``.
        new_k, new_v: ``(batch, seqlen_new, num_kv_heads, head_dim)`` in the pools' dtype.
        block_table: int32 ``(batch, max_pages)``, page ids or -1 for unused slots.
        cache_seqlens: int32 ``(batch,)`` (or an int) keys already cached per sequence.

    Returns:
        int32 ``(batch,)``: ``cache_seqlens + seqlen_new``.

    Raises:
        ValueError / TypeError: page ids outside the pool, a needed slot left -1, lengths past the
        table's capacity, two new keys mapped to the same slot, shapes or dtypes that do not match.
    """
    check_pool(k_cache, v_cache, paged=True)
    check_array("new_k", new_k, "(batch, seqlen_new, num_kv_heads, head_dim)", ndim=4)
    batch, count = new_k.shape[:2]
    check_new("new_k", new_k, k_cache, batch)
    check_new("new_v", new_v, v_cache, batch, count)
    lengths = host_lengths(cache_seqlens, batch)
    num_pages, page_size = k_cache.shape[:2]
    table = host_block_table(block_table, batch, num_pages, page_size, lengths + count)
    write_pages(k_cache, v_cache, new_k, new_v, table, lengths)
    return mx.array(lengths + count, mx.int32)


def write_pages(k_cache: mx.array, v_cache: mx.array, new_k: mx.array, new_v: mx.array, table: np.ndarray,
                lengths: np.ndarray) -> None:
    """Scatter new keys/values (checked arguments, host ``table`` and ``lengths``) into the pools in place."""
    count, page_size = new_k.shape[1], k_cache.shape[1]
    pages, rows = page_slots(table, lengths, count, page_size)
    slots = pages * page_size + rows
    if len(np.unique(slots)) != len(slots):
        raise ValueError("block_table maps two new keys to the same page slot (sequences sharing a page must "
                         "copy it before writing: PagedKVCache.reserve does)")
    if count:
        index = (mx.array(pages, mx.int32), mx.array(rows, mx.int32))
        k_cache[index] = new_k.reshape(-1, *new_k.shape[2:])
        v_cache[index] = new_v.reshape(-1, *new_v.shape[2:])


def gather_pages(pool: mx.array, pages, length: int) -> mx.array:
    """The first ``length`` keys ``(length, num_kv_heads, head_dim)`` held by ``pages`` of ``pool``."""
    page_size = pool.shape[1]
    used = list(pages)[: -(-length // page_size)]
    if not used:
        return mx.zeros((0,) + pool.shape[2:], pool.dtype)
    return pool[mx.array(used, mx.int32)].reshape(-1, *pool.shape[2:])[:length]
