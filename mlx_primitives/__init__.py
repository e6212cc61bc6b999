"""mlx_primitives: fast, composable building blocks for MLX.

Layers are exported here; functions live in ``mlx_primitives.attention``,
``mlx_primitives.cache``, ``mlx_primitives.kernels`` and ``mlx_primitives.hardware``.
"""

from .attention import (
    Attention,
    ChunkedCrossAttention,
    FlashAttention,
    SlidingWindowAttention,
    flash_attention,
)
from .kernels import GeGLU, LayerNorm, RMSNorm, SwiGLU
from .scan import associative_scan, selective_scan

__version__ = "0.1.0"

__all__ = [
    "Attention",
    "ChunkedCrossAttention",
    "FlashAttention",
    "SlidingWindowAttention",
    "flash_attention",
    "GeGLU",
    "LayerNorm",
    "RMSNorm",
    "SwiGLU",
    "associative_scan",
    "selective_scan",
]
