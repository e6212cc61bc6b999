"""PagedKVCache: page pools for every layer, one page list per sequence, copy-on-write forks, eviction."""

from __future__ import annotations

import json
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..validation import FLOAT_DTYPES
from .eviction import EvictionPolicy
from .pages import OutOfPagesError, PageAllocator
from .paged import UNUSED, check_new, gather_pages, write_pages


def _pages_for(length: int, page_size: int) -> int:
    return -(-length // page_size)


class PagedKVCache:
    """A batch of sequences of different lengths in shared page pools.

    Each layer has a key pool and a value pool ``(num_pages, page_size, num_kv_heads, head_dim)``
    (``k_pools[layer]``, ``v_pools[layer]``); every layer uses the same pages for a sequence, so one
    block table serves the whole model. A sequence holds ``ceil(length / page_size)`` pages; forked
    sequences share their pages until one of them writes into a shared page, which it copies first.

    A decode step::

        table, seqlens = cache.reserve(seqs, 1)        # pages for one more key per sequence
        for layer in range(num_layers):                # writes k/v in place, attends over the cache
            out = flash_attn_with_kvcache(q, cache.k_pools[layer], cache.v_pools[layer], k=k, v=v,
                                          cache_seqlens=seqlens, block_table=table, causal=True)

    Args:
        num_pages (int): pages per pool.
        page_size (int): keys per page (a power of two for the decode kernel).
        num_kv_heads (int), head_dim (int): the key layout.
        num_layers (int): pools to keep, one pair per layer. Default: ``1``.
        dtype: float16, bfloat16 or float32. Default: ``mx.float16``.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *, num_layers: int = 1,
                 dtype: mx.Dtype = mx.float16):
        for name, value in (("page_size", page_size), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32; got {dtype}")
        self.allocator = PageAllocator(num_pages)
        self.page_size = page_size
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k_pools = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        self.v_pools = [mx.zeros(shape, dtype) for _ in range(num_layers)]
        self._pages: Dict[int, List[int]] = {}
        self._lengths: Dict[int, int] = {}
        self._offsets: Dict[int, int] = {}
        self._next_id = 0
        self._tables: Dict[Tuple[int, ...], mx.array] = {}  # device block tables of the current page lists

    # Sequences -----------------------------------------------------------------------------------

    @property
    def sequences(self) -> List[int]:
        return list(self._pages)

    def add_sequence(self) -> int:
        """A new empty sequence; returns its id."""
        seq = self._next_id
        self._next_id += 1
        self._pages[seq], self._lengths[seq], self._offsets[seq] = [], 0, 0
        self._tables.clear()
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence sharing every page of ``seq`` (beam search, parallel sampling); returns its id."""
        self._check(seq)
        child = self.add_sequence()
        self.allocator.share(self._pages[seq])
        self._pages[child] = list(self._pages[seq])
        self._lengths[child], self._offsets[child] = self._lengths[seq], self._offsets[seq]
        return child

    def free(self, seq: int) -> None:
        """Drop ``seq``; its pages return to the pool unless another sequence still holds them."""
        self._check(seq)
        self.allocator.release(self._pages.pop(seq))
        del self._lengths[seq], self._offsets[seq]
        self._tables.clear()

    def length(self, seq: int) -> int:
        """Keys cached for ``seq``."""
        self._check(seq)
        return self._lengths[seq]

    def offset(self, seq: int) -> int:
        """Positions ever added to ``seq`` (its RoPE offset; past ``length`` once keys were evicted)."""
        self._check(seq)
        return self._offsets[seq]

    def pages(self, seq: int) -> Tuple[int, ...]:
        self._check(seq)
        return tuple(self._pages[seq])

    def _check(self, seq: int) -> None:
        if seq not in self._pages:
            raise KeyError(f"no sequence {seq!r} in the cache (sequences: {self.sequences})")

    # Writing -------------------------------------------------------------------------------------

    def reserve(self, seqs: Sequence[int], num_new: int) -> Tuple[mx.array, mx.array]:
        """Make room for ``num_new`` keys after each of ``seqs`` and count them as cached.

        Allocates the pages the new keys need and copies a shared last page before it is written
        (copy-on-write). Raises :class:`OutOfPagesError` without changing anything when the pool is
        short.

        Returns:
            ``(block_table, cache_seqlens)`` for ``seqs``: int32 ``(batch, max_pages)`` (-1 past a
            sequence's pages) and int32 ``(batch,)`` lengths *before* the new keys: what
            :func:`update_paged_kv_cache` and ``flash_attn_with_kvcache`` take.
        """
        before = self.reserve_host(seqs, num_new)
        return self.block_table(seqs), mx.array(before, mx.int32)

    def reserve_host(self, seqs: Sequence[int], num_new: int) -> List[int]:
        """:meth:`reserve` without building arrays: the lengths before the new keys, as Python ints."""
        for seq in seqs:
            self._check(seq)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs must be distinct; got {list(seqs)}")
        if num_new < 0:
            raise ValueError(f"num_new must be >= 0; got {num_new}")
        size = self.page_size
        copies = self._copies_before_write(seqs) if num_new else []
        needed = len(copies) + sum(_pages_for(self._lengths[s] + num_new, size) - len(self._pages[s]) for s in seqs)
        if needed > self.allocator.free_pages:
            raise OutOfPagesError(f"{num_new} new keys for {len(seqs)} sequences need {needed} pages; "
                                  f"{self.allocator.free_pages} of {self.allocator.num_pages} are free")
        for seq in copies:
            self._copy_last_page(seq)
        before = [self._lengths[s] for s in seqs]
        for seq in seqs:
            length = self._lengths[seq] + num_new
            added = _pages_for(length, size) - len(self._pages[seq])
            if added:
                self._pages[seq] += self.allocator.allocate(added)
                self._tables.clear()
            self._lengths[seq] = length
            self._offsets[seq] += num_new
        return before

    def _copies_before_write(self, seqs: Sequence[int]) -> List[int]:
        """The sequences of ``seqs`` that must copy their partly filled last page before writing into it:
        those sharing it, except one when ``seqs`` hold every holder (that one then writes in place)."""
        partial = [s for s in seqs if self._lengths[s] % self.page_size]
        holders = Counter(self._pages[s][-1] for s in partial)
        copies, writers = [], set()
        for seq in partial:
            page = self._pages[seq][-1]
            if holders[page] == self.allocator.refcount(page) and page not in writers:
                writers.add(page)
            else:
                copies.append(seq)
        return copies

    def _copy_last_page(self, seq: int) -> None:
        old = self._pages[seq][-1]
        (new,) = self.allocator.allocate(1)
        for pools in (self.k_pools, self.v_pools):
            for pool in pools:
                pool[new] = pool[old]
        self.allocator.release([old])
        self._pages[seq][-1] = new
        self._tables.clear()

    def append(self, seqs: Sequence[int], keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        """One-layer cache: reserve room and write ``keys``/``values`` ``(batch, new, kv_heads, head_dim)``.

        The keys and values are checked before anything changes: a bad call leaves the cache as it was.

        Returns ``(block_table, cache_seqlens)`` after the write (lengths include the new keys).
        """
        if len(self.k_pools) != 1:
            raise ValueError(f"append writes a one-layer cache; this one has {len(self.k_pools)} layers: call "
                             "reserve once per step, then write each layer's pools")
        check_new("keys", keys, self.k_pools[0], len(seqs))
        check_new("values", values, self.v_pools[0], len(seqs), keys.shape[1])
        before = np.array(self.reserve_host(seqs, keys.shape[1]))
        table = self._host_block_table(seqs)  # valid by construction: no update_paged_kv_cache checks
        write_pages(self.k_pools[0], self.v_pools[0], keys, values, table, before)
        return mx.array(table), mx.array(before + keys.shape[1], mx.int32)

    # Reading -------------------------------------------------------------------------------------

    def block_table(self, seqs: Sequence[int], width: Optional[int] = None) -> mx.array:
        """int32 ``(len(seqs), width)`` page ids, -1 past each sequence's pages; ``width`` defaults to
        the most pages a sequence of ``seqs`` holds (a fixed width keeps a compiled step's shapes)."""
        return mx.array(self._host_block_table(seqs, width))

    def _host_block_table(self, seqs: Sequence[int], width: Optional[int] = None) -> np.ndarray:
        held = max([1] + [len(self._pages[s]) for s in seqs])
        if width is None:
            width = held
        elif width < held:
            raise ValueError(f"width {width} is less than the {held} pages a sequence holds")
        table = np.full((len(seqs), width), UNUSED, np.int32)
        for row, seq in enumerate(seqs):
            table[row, : len(self._pages[seq])] = self._pages[seq]
        return table

    def device_block_table(self, seqs: Sequence[int], width: Optional[int] = None) -> mx.array:
        """:meth:`block_table`, built once and reused until a page list changes (a new page, a copy,
        an eviction): the array a decode step reads every layer. Read it; never write into it."""
        key = (tuple(seqs), width)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = self.block_table(seqs, width)
        return table

    def write_slots(self, seqs: Sequence[int], before: Sequence[int], count: int) -> Tuple[List[int], List[int]]:
        """(pages, rows), each ``len(seqs) * count`` Python ints: where keys ``before[b] ..
        before[b] + count - 1`` of ``seqs[b]`` go (pages reserved already)."""
        size, pages, rows = self.page_size, [], []
        for seq, start in zip(seqs, before):
            held = self._pages[seq]
            for position in range(start, start + count):
                pages.append(held[position // size])
                rows.append(position % size)
        return pages, rows

    def cache_seqlens(self, seqs: Sequence[int]) -> mx.array:
        """int32 ``(len(seqs),)`` keys cached per sequence."""
        return mx.array([self._lengths[s] for s in seqs], mx.int32)

    def gather(self, seq: int, layer: int = 0) -> Tuple[mx.array, mx.array]:
        """The cached keys and values of ``seq`` as contiguous ``(length, num_kv_heads, head_dim)`` copies."""
        self._check(seq)
        pages, length = self._pages[seq], self._lengths[seq]
        return gather_pages(self.k_pools[layer], pages, length), gather_pages(self.v_pools[layer], pages, length)

    @property
    def nbytes(self) -> int:
        """Bytes of every pool."""
        return sum(p.nbytes for p in self.k_pools + self.v_pools)

    # Eviction ------------------------------------------------------------------------------------

    def evict(self, seq: int, policy: EvictionPolicy, scores: Optional[np.ndarray] = None,
              compact: bool = False) -> np.ndarray:
        """Apply ``policy`` to ``seq`` and free the pages it no longer needs.

        Without ``compact`` eviction works in whole pages: a page goes back to the pool when the
        policy keeps none of its keys, and the keys sharing a page with a kept key stay. With
        ``compact`` exactly the kept keys stay, copied together into fresh pages (a copy of the
        kept keys of every layer) unless they already fill whole pages.

        Returns:
            The positions (in the sequence before eviction) of the keys that stay, in order: the new
            order of the cache, to carry scores or positions along.
        """
        self._check(seq)
        length, size, pages = self._lengths[seq], self.page_size, self._pages[seq]
        kept = np.asarray(policy.keep(length, scores), np.int64)
        if kept.ndim != 1 or (kept.size and (kept[0] < 0 or kept[-1] >= length or (np.diff(kept) <= 0).any())):
            raise ValueError(f"the policy must return sorted distinct positions in [0, {length}); got {kept}")
        kept_pages = np.unique(kept // size)
        whole = np.concatenate([np.arange(p * size, min((p + 1) * size, length)) for p in kept_pages]) \
            if kept_pages.size else np.zeros((0,), np.int64)
        if not compact or np.array_equal(whole, kept):
            staying = set(kept_pages.tolist())
            self.allocator.release([p for i, p in enumerate(pages) if i not in staying])
            self._pages[seq] = [pages[i] for i in kept_pages]
            self._lengths[seq] = int(whole.size)
            self._tables.clear()
            return whole
        source = mx.array(np.asarray(pages, np.int64)[kept // size], mx.int32), mx.array(kept % size, mx.int32)
        needed = _pages_for(kept.size, size)
        freed = sum(self.allocator.refcount(p) == 1 for p in pages)
        if needed > self.allocator.free_pages + freed:  # shared pages stay with their other holders
            raise OutOfPagesError(f"compacting {kept.size} keys needs {needed} fresh pages; "
                                  f"{self.allocator.free_pages + freed} would be free")
        moved = [pool[source] for pool in self.k_pools + self.v_pools]
        self.allocator.release(pages)
        fresh = self.allocator.allocate(needed)
        slots = np.arange(kept.size)
        target = (mx.array(np.asarray(fresh, np.int64)[slots // size], mx.int32), mx.array(slots % size, mx.int32))
        for pool, rows in zip(self.k_pools + self.v_pools, moved):
            pool[target] = rows
        self._pages[seq], self._lengths[seq] = fresh, int(kept.size)
        self._tables.clear()
        return kept

    # Persistence (the state save_cache writes and from_state reads) -----------------------------

    @property
    def state(self) -> Tuple[Tuple[mx.array, ...], Tuple[mx.array, ...], str]:
        """``(k_pools, v_pools, layout)``: the pools of every layer and a JSON string of the page size,
        the next sequence id and each sequence's ``[id, pages, length, offset]``."""
        layout = {"page_size": self.page_size, "next_id": self._next_id,
                  "sequences": [[s, self._pages[s], self._lengths[s], self._offsets[s]] for s in self._pages]}
        return tuple(self.k_pools), tuple(self.v_pools), json.dumps(layout)

    @classmethod
    def from_state(cls, state) -> "PagedKVCache":
        """The cache :attr:`state` describes; ValueError when its layout and pools disagree."""
        if not isinstance(state, (tuple, list)) or len(state) != 3:
            raise ValueError("PagedKVCache.state must be (k_pools, v_pools, layout)")
        k_pools, v_pools, layout = state
        listed = all(isinstance(p, (tuple, list)) for p in (k_pools, v_pools))
        pools = [*k_pools, *v_pools] if listed else [k_pools, v_pools]
        arrays = listed and k_pools and len(k_pools) == len(v_pools) and all(isinstance(p, mx.array) for p in pools)
        if not arrays or any(p.shape != pools[0].shape or p.dtype != pools[0].dtype or p.ndim != 4 for p in pools):
            got = [(tuple(p.shape), str(p.dtype)) if isinstance(p, mx.array) else type(p).__name__ for p in pools]
            raise ValueError(f"PagedKVCache.state: k_pools and v_pools must be as many 4-d pools (one per layer) of "
                             f"one shape and dtype; got {got}")
        meta = _layout(layout, pools[0].shape[1])
        num_pages, page_size, heads, head_dim = pools[0].shape
        cache = cls(num_pages, page_size, heads, head_dim, num_layers=len(k_pools), dtype=pools[0].dtype)
        cache.k_pools, cache.v_pools = list(k_pools), list(v_pools)
        for seq, pages, length, offset in meta["sequences"]:
            cache._pages[seq], cache._lengths[seq], cache._offsets[seq] = list(pages), length, offset
        cache.allocator.restore(page for pages in cache._pages.values() for page in pages)
        cache._next_id = meta["next_id"]
        return cache


def _layout(text: str, page_size: int) -> dict:
    """The checked layout JSON of :attr:`PagedKVCache.state` for pools of ``page_size`` keys a page."""
    try:
        meta = json.loads(text)
        fields = meta["page_size"], meta["next_id"], meta["sequences"]
        rows = [(int(seq), list(pages), int(length), int(offset)) for seq, pages, length, offset in fields[2]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"PagedKVCache.state: malformed layout (needs page_size, next_id and sequences of "
                         f"[id, pages, length, offset]): {error!r}") from None
    if meta["page_size"] != page_size:
        raise ValueError(f"PagedKVCache.state: layout page_size {meta['page_size']} but the pools hold "
                         f"{page_size} keys a page")
    ids = [seq for seq, _, _, _ in rows]
    if len(set(ids)) != len(ids) or not isinstance(meta["next_id"], int) or meta["next_id"] <= max(ids, default=-1):
        raise ValueError(f"PagedKVCache.state: sequence ids {ids} must be distinct and below next_id "
                         f"{meta['next_id']!r}")
    for seq, pages, length, offset in rows:
        if length < 0 or offset < length or len(pages) != _pages_for(length, page_size):
            raise ValueError(f"PagedKVCache.state: sequence {seq} holds {len(pages)} pages for {length} keys at "
                             f"offset {offset} (needs {_pages_for(max(length, 0), page_size)} pages, "
                             f"0 <= length <= offset)")
    meta["sequences"] = rows
    return meta
