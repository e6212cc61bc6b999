"""Key/value caches for autoregressive decoding."""

from .kv_cache import KVCache

__all__ = ["KVCache"]
