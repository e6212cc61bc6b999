"""Models: a composed transformer, attention swapped into mlx-lm models, paged batched generation."""

from .compiled import CompiledDecode, masked_decode
from .generate import Generation, generate, sample
from .paged_step import PagedLayerCache, PagedStep, paged_cache_for, paged_forward
from .swap import KERNELS, Replaced, SwappedAttention, model_attention, restore_attention, swap_attention
from .transformer import ModelArgs, Transformer, TransformerBlock

__all__ = [
    "CompiledDecode",
    "Generation",
    "KERNELS",
    "ModelArgs",
    "PagedLayerCache",
    "PagedStep",
    "Replaced",
    "SwappedAttention",
    "Transformer",
    "TransformerBlock",
    "generate",
    "masked_decode",
    "model_attention",
    "paged_cache_for",
    "paged_forward",
    "restore_attention",
    "sample",
    "swap_attention",
]
