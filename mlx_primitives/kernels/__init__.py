"""The kernel layer: the portable Metal/CUDA dialect, one launcher, and the fused kernels.

Functions: ``decode_attention`` (split-KV attention over a contiguous or paged KV cache; ``decode_heads_first``
for mlx-lm's cache layout), ``rms_norm``,
``layer_norm`` (optionally fused with a residual add), ``rope`` (q and k in
one launch), ``swiglu``, ``geglu`` and ``tiled_matmul`` (the matrix-unit primitive's proof).
Layers: ``RMSNorm``, ``LayerNorm``, ``RoPE``, ``SwiGLU``, ``GeGLU``. Quantization: ``quantize_int8`` / ``quantize_int4``
and their inverses, ``w8a8_linear`` (INT8 activations x INT8 weights), ``Int8Linear``, ``Int4Linear``,
``W8A8Linear``, ``quantize_model``, ``save_quantized``, ``load_quantized``. Kernel bodies live in ``src/``; see
``launcher`` for how they are compiled and ``catalog`` for their tile configurations.
"""

from .decode import decode_attention
from .decode_heads_first import decode_heads_first
from .glu import geglu, swiglu
from .launcher import Kernel, Launch, launch
from .layers import GeGLU, LayerNorm, RMSNorm, RoPE, SwiGLU
from .matmul import tiled_matmul
from .norms import layer_norm, rms_norm
from .quantization import (
    QuantizedTensor,
    dequantize,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)
from .quantization_model import load_quantized, quantize_model, save_quantized
from .quantized_linear import Int4Linear, Int8Linear, W8A8Linear, quantized_matmul
from .w8a8 import w8a8_linear, w8a8_matmul
from .rotary import rope

__all__ = [
    "decode_heads_first",
    "Int4Linear",
    "Int8Linear",
    "W8A8Linear",
    "QuantizedTensor",
    "dequantize",
    "dequantize_int4",
    "dequantize_int8",
    "load_quantized",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "quantized_matmul",
    "save_quantized",
    "w8a8_linear",
    "w8a8_matmul",
    "GeGLU",
    "Kernel",
    "LayerNorm",
    "Launch",
    "RMSNorm",
    "RoPE",
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
