"""Attention functions: flash-attention's interface on MLX arrays, one dispatcher behind it."""

from .dispatch import Route, choose_route
from .flex import BlockMask, create_block_mask, flex_attention
from .flash import (
    explain,
    flash_attention,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
)
from .layers import Attention, ChunkedCrossAttention, FlashAttention, SlidingWindowAttention
from .reference import reference_attention
from .sage import SageAttention, sageattn, sageattn_mlx
from .sage_quant import QuantizedQK, dequantize, quantize_qk
from .spec import AttentionSpec, describe_attention
from .varlen import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func
from .kvcache import flash_attn_with_kvcache

__all__ = [
    "Attention",
    "AttentionSpec",
    "BlockMask",
    "ChunkedCrossAttention",
    "FlashAttention",
    "QuantizedQK",
    "SageAttention",
    "Route",
    "SlidingWindowAttention",
    "choose_route",
    "create_block_mask",
    "dequantize",
    "describe_attention",
    "explain",
    "flash_attention",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "flex_attention",
    "quantize_qk",
    "reference_attention",
    "sageattn",
    "sageattn_mlx",
]
