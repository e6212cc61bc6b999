"""Models: a composed transformer, attention swapped into mlx-lm models, paged batched generation."""

from .generate import Generation, PagedLayerCache, PagedStep, generate, paged_cache_for, paged_forward, sample
from .swap import KERNELS, Replaced, SwappedAttention, model_attention, restore_attention, swap_attention
from .transformer import ModelArgs, Transformer, TransformerBlock

__all__ = [
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
    "model_attention",
    "paged_cache_for",
    "paged_forward",
    "restore_attention",
    "sample",
    "swap_attention",
]
