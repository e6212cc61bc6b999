"""mlx_primitives: fast, composable building blocks for MLX.

Layers are exported here; functions live in ``mlx_primitives.attention``,
``mlx_primitives.cache``, ``mlx_primitives.kernels`` and ``mlx_primitives.hardware``.
"""

from .attention import (
    Attention,
    ChunkedCrossAttention,
    FlashAttention,
    SageAttention,
    SlidingWindowAttention,
    flash_attention,
)
from .kernels import GeGLU, Int4Linear, Int8Linear, LayerNorm, RMSNorm, RoPE, SwiGLU, W8A8Linear
from .checkpointing import checkpoint, checkpoint_sequential
from .gather import selective_gather, selective_scatter_add
from .moe import ExpertDispatch, SparseMoELayer, build_expert_dispatch, compute_load_balancing_loss
from .scan import associative_scan, selective_scan

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "ChunkedCrossAttention",
    "FlashAttention",
    "SageAttention",
    "SlidingWindowAttention",
    "flash_attention",
    "GeGLU",
    "Int4Linear",
    "Int8Linear",
    "W8A8Linear",
    "LayerNorm",
    "RMSNorm",
    "RoPE",
    "SwiGLU",
    "associative_scan",
    "selective_scan",
    "ExpertDispatch",
    "SparseMoELayer",
    "build_expert_dispatch",
    "compute_load_balancing_loss",
    "selective_gather",
    "selective_scatter_add",
    "checkpoint",
    "checkpoint_sequential",
]
