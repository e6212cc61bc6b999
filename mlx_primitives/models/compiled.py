"""A decode step of a swapped mlx-lm model over a :class:`~mlx_primitives.cache.PagedKVCache` as one
``mx.compile``'d call.

Decoding one token is host-bound on a GPU: Python builds each layer's graph (~120 us a layer for
a 1B Llama) and MLX launches every op on its own. :class:`CompiledDecode` traces the step once per
batch size and replays it: no Python runs per layer, and MLX fuses the elementwise ops. The trace
is shape-fixed, so everything that changes from step to step is an array: RoPE offsets, lengths,
write slots (four int32 ``(batch,)`` arrays, :class:`Positions`) and a block table of a fixed width.
New keys and values are scattered into the layers' page pools; the step returns the updated pools,
which replace the cache's, so MLX writes them in place where the old pool has no other holder when the
step runs (else it copies the pool; H100, 8 queued steps of a 1B Llama at 8k context: peak memory
2.9 MB over the start, less than one 8.5 MB pool, so none was copied). The step also returns the next
step's positions, computed on the device: a step whose sequences and block table are those of the one
before takes them instead of arrays built on the host, since the GPU's first read of a host-written
array stalls on its migration (MLX's CUDA memory is managed; H100: ~200 us a step, 6% of a 1B Llama's).

Attention runs in the split-KV decode kernel (:func:`~mlx_primitives.kernels.decode.bind_decode`)
where it supports the call on a GPU, otherwise in :func:`masked_decode` (MLX ops of fixed shape
that read no array on the host, as tracing requires).
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from ..attention.spec import describe_attention
from ..cache import PagedKVCache
from ..hardware import device_profile
from ..kernels.decode import unsupported
from .paged_step import FULL, PagedLayerCache, StepDecode, Window, bind_paged_decode
from .swap import require_swapped


def masked_decode(q: mx.array, k_pool: mx.array, v_pool: mx.array, lengths: mx.array, block_table: mx.array,
                  scale: float, softcap: float = 0.0, window: Window = FULL) -> mx.array:
    """Causal attention of ``q`` over each sequence's pages, in MLX ops of fixed shape (float32 math).

    Args:
        q: ``(batch, seqlen_q, num_heads, head_dim)``; query row ``i`` of sequence ``b`` sits at key
            position ``p = lengths[b] - seqlen_q + i`` and sees the keys up to it (from
            ``p - window[0]`` on where ``window[0] >= 0``).
        k_pool, v_pool: page pools ``(num_pages, page_size, num_kv_heads, head_dim)``.
        lengths: int32 ``(batch,)`` keys per sequence, at least ``seqlen_q``.
        block_table: int32 ``(batch, width)`` page ids (slots past a sequence's pages: any value,
            read as page 0 and masked).
        scale: softmax scale; softcap: ``c`` of ``c * tanh(s / c)``, 0 disables.
        window: flash-attention's ``(left, right)`` window_size; only ``left`` is read (causal).

    Returns:
        ``(batch, seqlen_q, num_heads, head_dim)`` in q's dtype.
    """
    batch, q_len, num_heads, head_dim = q.shape
    kv_heads = k_pool.shape[2]
    groups = num_heads // kv_heads
    pages = mx.maximum(block_table, 0)
    k, v = (pool[pages].reshape(batch, -1, kv_heads, head_dim).transpose(0, 2, 3, 1).astype(mx.float32)
            for pool in (k_pool, v_pool))  # (batch, kv_heads, head_dim, keys)
    rows = q.reshape(batch, q_len, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
    rows = rows.reshape(batch, kv_heads, groups * q_len, head_dim).astype(mx.float32)
    scores = (rows * scale) @ k
    if softcap:
        scores = softcap * mx.tanh(scores / softcap)
    last = lengths[:, None, None, None] - q_len + mx.arange(groups * q_len)[None, None, :, None] % q_len
    keys = mx.arange(scores.shape[-1])
    visible = (keys <= last) if window[0] < 0 else (keys <= last) & (keys >= last - window[0])
    scores = mx.where(visible, scores, -mx.inf)
    out = mx.softmax(scores, axis=-1) @ v.swapaxes(-1, -2)  # (batch, kv_heads, groups * q_len, head_dim)
    out = out.reshape(batch, kv_heads, groups, q_len, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, q_len, num_heads, head_dim).astype(q.dtype)


def kernel_decodes(q: mx.array, pool: mx.array, scale: float, softcap: float, window: Window = FULL) -> bool:
    """Whether :func:`~mlx_primitives.kernels.decode.bind_decode` runs the decode kernel for ``q``
    ``(batch, seqlen_q, num_heads, head_dim)`` over page pools like ``pool`` (else its reference
    path, which reads lengths on the host and so cannot be traced)."""
    if not device_profile().is_gpu:
        return False
    view = mx.broadcast_to(pool[:1, :1], (q.shape[0], 1) + tuple(pool.shape[2:]))
    spec = describe_attention(q, view, view, layout="BSHD", scale=scale, causal=True, window_size=window,
                              softcap=softcap)
    return unsupported(spec, pool.shape[1]) is None


class Positions(NamedTuple):
    """Where a decode step's new token goes, each int32 ``(batch,)``: RoPE offsets, lengths after the new
    key, and the page and row the key is written to."""

    offsets: mx.array
    lengths: mx.array
    pages: mx.array
    rows: mx.array

    def advanced(self, block_table: mx.array, page_size: int) -> "Positions":
        """The next step's positions, one more token on, while the block table holds its pages (the
        page of a key past the table's width is clamped to the last slot; the host uploads the next
        positions then, since the table changes)."""
        slot = mx.minimum(self.lengths // page_size, block_table.shape[1] - 1)
        pages = mx.take_along_axis(block_table, slot[:, None], axis=1)[:, 0]
        return Positions(self.offsets + 1, self.lengths + 1, pages, self.lengths % page_size)


class TracedStep(StepDecode):
    """A decode step's shared state inside the trace, with :class:`~mlx_primitives.models.PagedStep`'s
    interface for :class:`~mlx_primitives.models.PagedLayerCache`: one new token per sequence.

    Args:
        positions: the step's :class:`Positions`.
        block_table: int32 ``(batch, width)``.
        k_pools, v_pools: the layers' pools; :meth:`write` replaces them with their updated arrays.
    """

    new = 1

    def __init__(self, positions: Positions, block_table: mx.array, k_pools: List[mx.array],
                 v_pools: List[mx.array]):
        self.offset, self.lengths = positions.offsets, positions.lengths
        self.slots = (positions.pages, positions.rows)
        self.block_table, self.k_pools, self.v_pools = block_table, k_pools, v_pools
        self._decode: Dict[Tuple[float, float, Window], Callable] = {}  # (scale, softcap, window) -> bound call

    def write(self, pool: mx.array, new: mx.array) -> None:
        """Scatter ``new`` ``(batch, 1, kv_heads, head_dim)`` into ``pool`` at the step's slots."""
        pool[self.slots] = new.reshape(-1, *new.shape[2:])

    def bind(self, queries: mx.array, k_pool: mx.array, v_pool: mx.array, scale: float, softcap: float,
             window: Window) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
        """The decode kernel where it runs the call, else :func:`masked_decode` (both traceable)."""
        if not kernel_decodes(queries, k_pool, scale, softcap, window):
            return lambda q, k, v: masked_decode(q, k, v, self.lengths, self.block_table, scale, softcap, window)
        return bind_paged_decode(queries, k_pool, v_pool, self.lengths, self.block_table, scale, softcap, window)


class CompiledDecode:
    """Decode steps of a swapped mlx-lm ``model`` over ``cache``, each one compiled call.

    ``step(seqs, tokens)`` appends one token to each sequence of ``seqs`` (ids of ``cache``) and
    returns the logits of the next ``(batch, vocab)``, as ``paged_forward(model, cache, seqs,
    tokens[:, None])[:, -1]`` does. Each batch size is traced once, on its first step, and the
    trace holds the model's weights as constants (passing them as inputs costs ~8 us a layer per
    step): after changing weights (``load_weights``, ``update``) or the model's attention
    (``swap_attention`` again), make a new ``CompiledDecode``.

    Args:
        model: an mlx-lm model after :func:`~mlx_primitives.models.swap_attention`.
        cache: its :class:`~mlx_primitives.cache.PagedKVCache` (e.g. ``paged_cache_for(model, ...)``).
        max_pages: the block table's width, the most pages a sequence may hold; default the pool's.
            The decode kernel's split count follows the width: keep it near the longest sequence.
    """

    def __init__(self, model: nn.Module, cache: PagedKVCache, max_pages: Optional[int] = None):
        require_swapped(model, "CompiledDecode")
        self.model, self.cache = model, cache
        self.width = cache.allocator.num_pages if max_pages is None else max_pages
        if not isinstance(self.width, int) or self.width < 1:
            raise ValueError(f"max_pages must be a positive int; got {max_pages!r}")
        self._compiled = mx.compile(self._step)
        # The last step's table and host positions, and the positions it computed for the step after it.
        self._last: Optional[Tuple[mx.array, List[int], List[int], Positions]] = None

    def __call__(self, seqs: Sequence[int], tokens: mx.array) -> mx.array:
        """Logits ``(len(seqs), vocab)`` after appending ``tokens`` ``(len(seqs),)`` to ``seqs``."""
        cache = self.cache
        if any(cache.length(s) >= self.width * cache.page_size for s in seqs):
            raise ValueError(f"a sequence of {list(seqs)} would pass max_pages={self.width} pages of "
                             f"{cache.page_size} keys")
        offsets = [cache.offset(s) for s in seqs]
        before = cache.reserve_host(seqs, 1)
        table = cache.device_block_table(seqs, self.width)
        last = self._last
        if last is not None and last[0] is table and last[1] == [n - 1 for n in offsets] \
                and last[2] == [n - 1 for n in before]:
            positions = last[3]  # one token on from the last step, same pages: already on the device
        else:
            pages, rows = cache.write_slots(seqs, before, 1)
            positions = Positions(*(mx.array(values, mx.int32) for values in
                                    (offsets, [n + 1 for n in before], pages, rows)))
        logits, k_pools, v_pools, upcoming = self._compiled(tokens.reshape(len(seqs), 1), positions, table,
                                                            cache.k_pools, cache.v_pools)
        cache.k_pools[:], cache.v_pools[:] = k_pools, v_pools  # the old pools' last holders go
        self._last = (table, offsets, before, Positions(*upcoming))
        return logits

    def _step(self, tokens: mx.array, positions: Positions, table: mx.array, k_pools: List[mx.array],
              v_pools: List[mx.array]):
        positions = Positions(*positions)
        step = TracedStep(positions, table, list(k_pools), list(v_pools))
        logits = self.model(tokens, cache=[PagedLayerCache(step, layer) for layer in range(len(k_pools))])
        return logits[:, -1], step.k_pools, step.v_pools, list(positions.advanced(table, self.cache.page_size))
