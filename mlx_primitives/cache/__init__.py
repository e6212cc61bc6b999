"""Key/value caches for autoregressive decoding.

Contiguous caches with mlx-lm's interface (:class:`KVCache`, :class:`RotatingKVCache`,
:class:`QuantizedKVCache`), paged storage (:class:`PagedKVCache` over a :class:`PageAllocator`,
:func:`update_paged_kv_cache`), eviction policies, persistence, and
:func:`flash_attn_with_kvcache` and :func:`paged_attention` (defined in :mod:`mlx_primitives.attention`).
"""

from .base import attention_mask, causal_mask
from .eviction import AttentionSinks, EvictionPolicy, HeavyHitters, SlidingWindow, received_attention
from .kv_cache import KVCache
from .paged import gather_pages, update_paged_kv_cache
from .paged_cache import PagedKVCache
from .pages import OutOfPagesError, PageAllocator
from .persistence import load_cache, save_cache
from .quantized import QuantizedKVCache, dequantize, quantized_attention
from .rotating import RotatingKVCache

__all__ = [
    "AttentionSinks",
    "EvictionPolicy",
    "HeavyHitters",
    "KVCache",
    "OutOfPagesError",
    "PageAllocator",
    "PagedKVCache",
    "QuantizedKVCache",
    "RotatingKVCache",
    "SlidingWindow",
    "attention_mask",
    "causal_mask",
    "dequantize",
    "flash_attn_with_kvcache",
    "gather_pages",
    "load_cache",
    "paged_attention",
    "quantized_attention",
    "received_attention",
    "save_cache",
    "update_paged_kv_cache",
]


def __getattr__(name: str):
    # These live in mlx_primitives.attention, which imports this package's checks.
    if name in ("flash_attn_with_kvcache", "paged_attention"):
        from ..attention import kvcache

        return getattr(kvcache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
