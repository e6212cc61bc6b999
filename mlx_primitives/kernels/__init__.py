"""The kernel layer: the portable Metal/CUDA dialect, one launcher, and the fused kernels.

Functions: ``decode_attention`` (split-KV attention over a contiguous or paged KV cache), ``rms_norm``,
``layer_norm`` (optionally fused with a residual add), ``rope`` (q and k in
one launch), ``swiglu``, ``geglu`` and ``tiled_matmul`` (the matrix-unit primitive's proof).
Layers: ``RMSNorm``, ``LayerNorm``, ``SwiGLU``, ``GeGLU``. Kernel bodies live in ``src/``; see
``launcher`` for how they are compiled and ``catalog`` for their tile configurations.
"""

from .decode import decode_attention
from .glu import geglu, swiglu
from .launcher import Kernel, Launch, launch
from .layers import GeGLU, LayerNorm, RMSNorm, SwiGLU
from .matmul import tiled_matmul
from .norms import layer_norm, rms_norm
from .rotary import rope

__all__ = [
    "GeGLU",
    "Kernel",
    "LayerNorm",
    "Launch",
    "RMSNorm",
    "SwiGLU",
    "decode_attention",
    "geglu",
    "launch",
    "layer_norm",
    "rms_norm",
    "rope",
    "swiglu",
    "tiled_matmul",
]
