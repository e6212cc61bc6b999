"""One model call over a :class:`~mlx_primitives.cache.PagedKVCache`: what its layers share, and each layer's cache.

The model is an mlx-lm model run through :func:`~mlx_primitives.models.swap_attention`: each layer
gets a :class:`PagedLayerCache`, whose ``attend`` writes the new keys into the layer's pages and
attends over them: decode steps with :func:`~mlx_primitives.kernels.decode_attention` (the split-KV
kernel reading pages in place on a GPU, the reference path on the CPU), prefill chunks with
:func:`~mlx_primitives.attention.flash_attn_with_kvcache`. Host work happens once per model call,
not once per layer, and reads no array: lengths and write slots are Python ints kept by the cache,
the device block table is rebuilt only when a sequence's page list changes, and the decode call is
validated and prepared once per step (:func:`~mlx_primitives.kernels.decode.bind_decode`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..attention.kvcache import flash_attn_with_kvcache
from ..cache import PagedKVCache
from ..kernels.decode import MAX_Q_LEN, bind_decode
from ..validation import FLOAT_DTYPES

Window = Tuple[int, int]  # flash-attention's (left, right) window_size; (-1, -1) unbounded
FULL: Window = (-1, -1)


class WindowMask(NamedTuple):
    """The mask :meth:`PagedLayerCache.make_mask` gives a sliding-window layer (mlx-lm's
    ``window_size``): each query sees itself and the ``size - 1`` keys before it."""

    size: int


def window_of(mask: Any) -> Window:
    """The ``window_size`` of a mask from :meth:`PagedLayerCache.make_mask` (None or ``"causal"``: plain
    causal); ValueError for any other mask (an array), which paged attention cannot apply."""
    if isinstance(mask, WindowMask):
        return (mask.size - 1, 0)
    if mask is None or (isinstance(mask, str) and mask == "causal"):
        return FULL
    raise ValueError(f"paged attention masks causally per sequence (within make_mask's sliding window); got a "
                     f"mask it cannot apply ({type(mask).__name__})")


def bind_paged_decode(queries: mx.array, k_pool: mx.array, v_pool: mx.array, lengths: mx.array,
                      block_table: mx.array, scale: float, softcap: float,
                      window: Window) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """:func:`~mlx_primitives.kernels.decode.bind_decode` of one step's causal decode over page pools;
    ``call(q, k_pool, v_pool)`` with ``q`` ``(batch, new, heads, head_dim)``."""
    return bind_decode(queries, k_pool, v_pool, lengths, block_table=block_table, softmax_scale=scale, causal=True,
                       window_size=window, softcap=softcap)


class StepDecode:
    """The decode call of one step, prepared by :meth:`bind` on the first layer and reused by the others
    (every layer shares the step's lengths and block table); subclasses set ``self._decode = {}``."""

    def bind(self, queries: mx.array, k_pool: mx.array, v_pool: mx.array, scale: float, softcap: float,
             window: Window) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
        raise NotImplementedError

    def decode(self, queries: mx.array, k_pool: mx.array, v_pool: mx.array, scale: float, softcap: float,
               window: Window = FULL) -> mx.array:
        """Attention of ``queries`` ``(batch, new, heads, head_dim)`` over the layer's pools."""
        key = (scale, softcap, window)
        call = self._decode.get(key)
        if call is None:
            call = self._decode[key] = self.bind(queries, k_pool, v_pool, scale, softcap, window)
        return call(queries, k_pool, v_pool)


class PagedStep(StepDecode):
    """What every layer of one model call over a :class:`PagedKVCache` shares, computed once on the host.

    Args:
        cache: the paged cache of every layer.
        seqs: the sequences of the call, in batch order.
        new: tokens each sequence appends.
    """

    def __init__(self, cache: PagedKVCache, seqs: Sequence[int], new: int):
        offsets = [cache.offset(s) for s in seqs]
        self.offset = offsets[0] if len(seqs) == 1 else mx.array(offsets, mx.int32)
        self.cache, self.new = cache, new
        self.k_pools, self.v_pools = cache.k_pools, cache.v_pools
        before = cache.reserve_host(seqs, new)
        self.block_table = cache.device_block_table(seqs)
        self.cache_seqlens = mx.array(before, mx.int32)
        self.lengths = mx.array([n + new for n in before], mx.int32)
        self.slots = None
        self._decode: dict = {}  # (scale, softcap, window) -> the bound decode call
        if new <= MAX_Q_LEN:
            pages, rows = cache.write_slots(seqs, before, new)
            if len(seqs) == 1 and rows[0] + new <= cache.page_size:  # one page: a slice update, no index arrays
                self.slots = (slice(pages[0], pages[0] + 1), slice(rows[0], rows[0] + new))
            else:
                self.slots = (mx.array(pages, mx.int32), mx.array(rows, mx.int32))

    def write(self, pool: mx.array, new: mx.array) -> None:
        """Write ``new`` ``(batch, self.new, kv_heads, head_dim)`` into ``pool`` in place at the step's slots."""
        if isinstance(self.slots[0], slice):
            pool[self.slots] = new
        else:
            pool[self.slots] = new.reshape(-1, *new.shape[2:])

    def bind(self, queries: mx.array, k_pool: mx.array, v_pool: mx.array, scale: float, softcap: float,
             window: Window) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
        """The decode kernel over the pages (its reference path on the CPU), validated and prepared."""
        return bind_paged_decode(queries, k_pool, v_pool, self.lengths, self.block_table, scale, softcap, window)


class PagedLayerCache:
    """One layer's view of a :class:`PagedStep` (or a compiled step's
    :class:`~mlx_primitives.models.compiled.TracedStep`), with mlx-lm's cache interface
    (``offset``, ``update_and_fetch``, ``make_mask``) and the ``attend`` that
    :class:`SwappedAttention` calls. The step holds the layers' pools (``k_pools``, ``v_pools``),
    ``write`` and ``decode``."""

    def __init__(self, step: PagedStep, layer: int):
        self.step, self.layer = step, layer
        self.offset = step.offset
        self._new = None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Keep the new ``(batch, kv_heads, new, head_dim)`` keys/values for :meth:`attend`; return them."""
        pool = self.step.k_pools[self.layer]
        if keys.shape[1] != pool.shape[2] or keys.shape[3] != pool.shape[3] or values.shape != keys.shape:
            raise ValueError(f"paged generation holds (kv_heads={pool.shape[2]}, head_dim={pool.shape[3]}) keys and "
                             f"values per layer; layer {self.layer} gives keys {tuple(keys.shape)} and values "
                             f"{tuple(values.shape)} (e.g. multi-head latent attention), which it cannot page")
        self._new = (keys.swapaxes(1, 2), values.swapaxes(1, 2))
        return keys, values

    def make_mask(self, *args: Any, window_size: Optional[int] = None, **kwargs: Any) -> Optional[WindowMask]:
        """None (:meth:`attend` masks causally per sequence), or a :class:`WindowMask` of ``window_size``."""
        return None if window_size is None else WindowMask(window_size)

    def attend(self, queries: mx.array, scale: float, softcap: float = 0.0, sinks: Optional[mx.array] = None,
               mask: Optional[WindowMask] = None) -> mx.array:
        """Write the new keys into the pages, then attend ``queries`` ``(batch, heads, new, head_dim)``
        causally (within ``mask``'s sliding window, from :meth:`make_mask`).

        Decode-sized calls (``new <= 16``) go straight to the split-KV decode kernel over the pages;
        longer ones (prefill) through :func:`flash_attn_with_kvcache`, which gathers the pages.
        """
        if sinks is not None:
            raise ValueError("paged generation takes no attention sinks")
        window = window_of(mask)
        step, (k_new, v_new) = self.step, self._new
        k_pool, v_pool = step.k_pools[self.layer], step.v_pools[self.layer]
        queries = queries.swapaxes(1, 2)
        if queries.shape[1] > MAX_Q_LEN:
            out = flash_attn_with_kvcache(queries, k_pool, v_pool, k=k_new, v=v_new, cache_seqlens=step.cache_seqlens,
                                          block_table=step.block_table, softmax_scale=scale, causal=True,
                                          window_size=window, softcap=softcap)
        else:
            step.write(k_pool, k_new)
            step.write(v_pool, v_new)
            out = step.decode(queries, k_pool, v_pool, scale, softcap, window)
        return out.swapaxes(1, 2)


def paged_forward(model: nn.Module, cache: PagedKVCache, seqs: Sequence[int], tokens: mx.array) -> mx.array:
    """Logits ``(batch, new, vocab)`` of ``tokens`` ``(batch, new)`` appended to ``seqs`` of ``cache``.

    Every sequence gets ``new`` tokens at its own position; ``model`` is swapped (:func:`swap_attention`).
    """
    step = PagedStep(cache, seqs, tokens.shape[1])
    return model(tokens, cache=[PagedLayerCache(step, layer) for layer in range(len(cache.k_pools))])


def activation_dtype(module: nn.Module) -> mx.Dtype:
    """The float dtype ``module`` computes in: its first float parameter's (a quantized layer's
    ``scales``, since its packed weights are uint32); float16 when it has none."""
    for _, value in tree_flatten(module.parameters()):
        if value.dtype in FLOAT_DTYPES:
            return value.dtype
    return mx.float16


def paged_cache_for(model: nn.Module, num_pages: int, page_size: int = 16) -> PagedKVCache:
    """An empty :class:`PagedKVCache` shaped for every layer of the mlx-lm ``model``, in its
    attention's dtype (:func:`activation_dtype`; bfloat16 for a 4-bit model of bfloat16 scales)."""
    for index, layer in enumerate(model.layers):
        if not isinstance(getattr(layer, "self_attn", None), nn.Module):
            raise ValueError(f"paged generation needs softmax attention (self_attn) in every layer; layer {index} "
                             f"({type(layer).__name__}) has none, e.g. a linear-attention layer of a hybrid model")
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    return PagedKVCache(num_pages, page_size, args.num_key_value_heads, head_dim, num_layers=len(model.layers),
                        dtype=activation_dtype(model.layers[0].self_attn))
