"""A key/value cache stored quantized through ``mx.quantize`` (int8, int4, ...), with mlx-lm's
``QuantizedKVCache`` interface, and attention over it."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx

from ..attention.flash import flash_attention
from ..hardware import device_profile
from ..kernels.decode import MAX_Q_LEN
from ..kernels.decode_heads_first import decode_heads_first
from ..kernels.decode_launch import KERNEL_BITS
from ..kernels.quantization import MLX_BITS, MLX_GROUP_SIZES
from .base import Cache, Mask

Quantized = Tuple[mx.array, mx.array, mx.array]  # (packed uint32, scales, biases)


def check_quantization(group_size: int, bits: int) -> None:
    if bits not in MLX_BITS:
        raise ValueError(f"bits must be one of {MLX_BITS}; got {bits!r}")
    if group_size not in MLX_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {MLX_GROUP_SIZES}; got {group_size!r}")


def _check_parts(name: str, parts, group_size: int, bits: int) -> None:
    """State ``parts`` ``(packed uint32, scales, biases)`` of one head_dim = scales' width * group_size."""
    if not isinstance(parts, (tuple, list)) or len(parts) != 3:
        raise ValueError(f"QuantizedKVCache.state: {name} must be a (packed, scales, biases) tuple")
    packed, scales, biases = parts
    head_dim = scales.shape[3] * group_size
    if packed.dtype != mx.uint32 or packed.shape[3] * 32 != head_dim * bits or biases.shape != scales.shape:
        raise ValueError(f"QuantizedKVCache.state: {name} must be uint32 (..., {head_dim * bits // 32}) packed "
                         f"{bits}-bit values, scales and biases (..., {scales.shape[3]}) of head_dim {head_dim} at "
                         f"group_size {group_size}; got {packed.dtype} {tuple(packed.shape)}, "
                         f"{tuple(scales.shape)}, {tuple(biases.shape)}")


def _grow(parts: Quantized, extra: int) -> Quantized:
    return tuple(mx.concatenate([x, mx.zeros(x.shape[:2] + (extra, x.shape[3]), x.dtype)], axis=2) for x in parts)


class QuantizedKVCache(Cache):
    """Keys and values quantized per group of ``group_size`` features: each a tuple
    ``(packed uint32 (batch, kv_heads, capacity, head_dim * bits / 32), scales, biases
    (batch, kv_heads, capacity, head_dim / group_size))`` in the keys' dtype, grown in steps of 256.

    ``update_and_fetch`` returns the quantized tuples, as mlx-lm's cache does: mlx-lm's models see
    ``bits`` on the cache and attend through ``mx.quantized_matmul``; :func:`quantized_attention`
    computes the same through this package's attention.

    Args:
        group_size (int): features sharing one scale and bias: 32, 64 or 128. Default: ``64``.
        bits (int): bits per feature (8 = int8, 4 = int4, also 2, 3, 5, 6). Default: ``8``.
    """

    state_fields = ("keys", "values", "offset", "group_size", "bits")

    def __init__(self, group_size: int = 64, bits: int = 8):
        check_quantization(group_size, bits)
        self.group_size = group_size
        self.bits = bits
        self.keys = None
        self.values = None
        self.offset = 0

    def _quantize(self, x: mx.array, name: str) -> Quantized:
        if x.shape[-1] % self.group_size:
            raise ValueError(f"{name}' head_dim ({x.shape[-1]}) must be a multiple of group_size={self.group_size}")
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[Quantized, Quantized]:
        """Quantize and add ``keys``/``values`` ``(batch, kv_heads, new, head_dim)``; return every cached
        position as ``(packed, scales, biases)`` tuples."""
        new_k, new_v = self._quantize(keys, "keys"), self._quantize(values, "values")
        previous, needed = self.offset, self.offset + keys.shape[2]
        if self.keys is None:
            capacity = -(-needed // self.step) * self.step
            self.keys = tuple(mx.zeros(x.shape[:2] + (capacity, x.shape[3]), x.dtype) for x in new_k)
            self.values = tuple(mx.zeros(x.shape[:2] + (capacity, x.shape[3]), x.dtype) for x in new_v)
        elif needed > self.keys[0].shape[2]:
            extra = -(-(needed - previous) // self.step) * self.step
            self.keys = _grow(tuple(x[..., :previous, :] for x in self.keys), extra)
            self.values = _grow(tuple(x[..., :previous, :] for x in self.values), extra)
        for stored, new in zip(self.keys + self.values, new_k + new_v):
            stored[..., previous:needed, :] = new
        self.offset = needed
        return self.keys_and_values()

    @property
    def state(self) -> Tuple[Optional[Quantized], Optional[Quantized], int, int, int]:
        """mlx-lm's ``(keys, values, offset, group_size, bits)``; keys and values ``(packed, scales, biases)``."""
        return (*self.keys_and_values(), self.offset, self.group_size, self.bits)

    @state.setter
    def state(self, value) -> None:
        keys, values, offset, group_size, bits = self._unpack_state(value)
        check_quantization(group_size, bits)
        length = self._check_arrays(keys, values)
        if keys is not None:
            for name, parts in (("keys", keys), ("values", values)):
                _check_parts(name, parts, group_size, bits)
        self._check_length("offset", offset, length)
        self.keys, self.values = (None, None) if keys is None else (tuple(keys), tuple(values))
        self.offset, self.group_size, self.bits = offset, group_size, bits

    def keys_and_values(self) -> Tuple[Optional[Quantized], Optional[Quantized]]:
        """Every cached position as ``(packed, scales, biases)`` tuples: what ``update_and_fetch`` returned."""
        if self.keys is None:
            return None, None
        if self.offset >= self.keys[0].shape[2]:
            return self.keys, self.values
        return tuple(tuple(x[..., : self.offset, :] for x in parts) for parts in (self.keys, self.values))

    def dequantized(self) -> Tuple[mx.array, mx.array]:
        """Every cached position as float keys and values ``(batch, kv_heads, offset, head_dim)``."""
        keys, values = self.keys_and_values()
        return dequantize(keys, self.group_size, self.bits), dequantize(values, self.group_size, self.bits)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(x.nbytes for x in self.keys + self.values)


def dequantize(parts: Quantized, group_size: int, bits: int) -> mx.array:
    """``mx.dequantize`` of a ``(packed, scales, biases)`` tuple, in the scales' dtype."""
    packed, scales, biases = parts
    return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(scales.dtype)


def quantized_attention(
    queries: mx.array,
    keys: Union[Quantized, QuantizedKVCache],
    values: Optional[Quantized] = None,
    *,
    scale: Optional[float] = None,
    mask: Mask = None,
    group_size: int = 64,
    bits: int = 8,
) -> mx.array:
    """Attention of ``queries`` over quantized keys and values (mlx-lm's
    ``quantized_scaled_dot_product_attention``, without ``mx.quantized_matmul``).

    Over a quantized cache (this package's or mlx-lm's ``QuantizedKVCache``) on a GPU backend, a
    decode step (``q_len <= 16``, mask None or ``"causal"``, 2, 4 or 8 bits) runs the decode kernel
    on the cache's buffers in place, dequantizing in registers. Otherwise the keys and values are
    dequantized and attended through :func:`flash_attention` (the dispatcher picks sdpa, the flash
    kernel or the reference path).

    Args:
        queries: ``(batch, num_heads, q_len, head_dim)``.
        keys: ``(packed, scales, biases)`` of ``(batch, kv_heads, k_len, ...)``, or a quantized
            cache (then ``values``, ``group_size`` and ``bits`` come from it).
        values: like ``keys``.
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        mask: None, ``"causal"`` or a boolean/additive array broadcastable to
            ``(batch, num_heads, q_len, k_len)``.
        group_size, bits: the quantization of ``keys`` and ``values``.

    Returns:
        ``(batch, num_heads, q_len, head_dim)`` in the queries' dtype.
    """
    if hasattr(keys, "bits") and hasattr(keys, "keys"):  # a quantized cache
        if decodes_in_place(queries, keys, mask):
            return decode_heads_first(queries, keys.keys, keys.values, keys.offset, softmax_scale=scale,
                                      causal=mask == "causal", quantization=(keys.group_size, keys.bits))
        group_size, bits = keys.group_size, keys.bits
        keys, values = keys.keys_and_values()
    check_quantization(group_size, bits)
    if values is None or len(keys) != 3 or len(values) != 3:
        raise ValueError("keys and values must be (packed, scales, biases) tuples")
    k, v = dequantize(keys, group_size, bits), dequantize(values, group_size, bits)
    return flash_attention(queries, k.astype(queries.dtype), v.astype(queries.dtype), layout="BHSD", scale=scale,
                           mask=mask)


def decodes_in_place(queries: mx.array, cache, mask: Mask) -> bool:
    """Whether the decode kernel can read quantized ``cache``'s buffers for attention of ``queries``
    ``(batch, num_heads, q_len, head_dim)`` under ``mask`` (see :func:`quantized_attention`)."""
    return (device_profile().is_gpu and cache.keys is not None and queries.shape[2] <= MAX_Q_LEN
            and (mask is None or (isinstance(mask, str) and mask == "causal")) and cache.bits in KERNEL_BITS
            and cache.keys[1].dtype == queries.dtype)
