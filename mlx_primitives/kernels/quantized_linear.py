"""Quantized Linear layers: ``Int8Linear`` (W8A8 or 8-bit weights) and ``Int4Linear`` (4-bit weights).

Weight-only layers keep MLX's affine group format (``mx.quantize``: ``uint32`` words, a float scale
and bias per group) and multiply with ``mx.quantized_matmul``. Where MLX's own kernel for that call
fails to build (MLX 0.32.4's CUDA JIT of ``quantized_matmul`` on H100 misses ``crt/mma.h`` in
NVRTC), :func:`quantized_matmul` dequantizes the weight and multiplies with ``@`` instead, warning
once. W8A8 has no MLX format (per-token activation scales): it runs :func:`~.w8a8.w8a8_linear`.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..hardware import device_profile
from .launcher import next_pow2, run_checked, verified
from .quantization import quantize_int8
from .w8a8 import w8a8_linear

ACTIVATION_MODES = ("int8", "float")


def _dequantized_matmul(x, weight, scales, biases, group_size: int, bits: int) -> mx.array:
    w = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits)
    return x @ w.astype(x.dtype).T


def _call_key(x: mx.array, weight: mx.array, group_size: int, bits: int) -> tuple:
    """The kind of ``mx.quantized_matmul`` call MLX builds one kernel for (its first launch is checked)."""
    rows = min(next_pow2(x.size // max(x.shape[-1], 1)), 1024)
    name = f"mx.quantized_matmul(bits={bits}, group_size={group_size})"
    return (device_profile().backend, name, x.dtype, rows, tuple(weight.shape))


def quantized_matmul(
    x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, *, group_size: int, bits: int
) -> mx.array:
    """``x @ W^T`` for a weight ``W (out, in)`` in MLX's affine format, through ``mx.quantized_matmul``.

    The first call per (backend, dtype, bits, group size, rows rounded up to a power of two, weight
    shape) is evaluated on the spot: MLX picks its kernel by those. If MLX's kernel fails there, that
    kind of call dequantizes ``W`` and uses ``@`` from then on.

    Args:
        x (array): ``(..., in)``.
        weight, scales, biases: ``mx.quantize(W, group_size, bits)``.

    Returns:
        ``(..., out)`` array of ``x``'s dtype.
    """
    key = _call_key(x, weight, group_size, bits)
    name = key[1]

    def run():
        return [mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)]

    def fallback():
        return [_dequantized_matmul(x, weight, scales, biases, group_size, bits)]

    return run_checked(key, name, run, fallback)[0]


def _layer_matmul(layer: nn.Module, x: mx.array, group_size: int, bits: int) -> mx.array:
    """:func:`quantized_matmul` of a layer's affine weight (``weight``, ``scales``, ``biases``).

    A decode step calls each layer with the same kind of input every time: once MLX's kernel ran for
    the layer's last kind of call (row count and dtype, kept on the layer), calls of that kind go
    straight to ``mx.quantized_matmul``, without building the checked call's key (a few microseconds
    of Python on a 20-40 us GEMV).
    """
    weight, scales, biases = layer["weight"], layer["scales"], layer["biases"]
    rows = x.size // max(x.shape[-1], 1)
    if rows == layer._ready_rows and x.dtype == layer._ready_dtype:
        return mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)
    out = quantized_matmul(x, weight, scales, biases, group_size=group_size, bits=bits)
    if verified(_call_key(x, weight, group_size, bits)):
        layer._ready_rows, layer._ready_dtype = rows, x.dtype
    return out


class _AffineLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (affine mode) whose product goes through :func:`_layer_matmul`."""

    _ready_rows: int = -1  # the row count and dtype of calls known to run MLX's kernel (_layer_matmul)
    _ready_dtype: Optional[mx.Dtype] = None

    def __call__(self, x: mx.array) -> mx.array:
        out = _layer_matmul(self, x, self.group_size, self.bits)
        return out + self["bias"] if "bias" in self else out


class Int4Linear(_AffineLinear):
    """A Linear layer with 4-bit weights in MLX's affine group format (``nn.QuantizedLinear``'s).

    Args:
        input_dims (int): input features, a multiple of ``group_size``.
        output_dims (int): output features.
        bias (bool): learnable bias. Default: ``True``.
        group_size (int): weights sharing one scale and bias (32, 64 or 128). Default: ``64``.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, group_size: int = 64):
        super().__init__(input_dims, output_dims, bias, group_size=group_size, bits=4)

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = 64) -> "Int4Linear":
        """The 4-bit version of an ``nn.Linear``."""
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, "bias" in linear, group_size)
        layer.weight, layer.scales, layer.biases = mx.quantize(linear.weight, group_size, 4)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer


class Int8Linear(nn.Module):
    """A Linear layer with 8-bit weights.

    ``activations="int8"`` (W8A8): the weight ``(out, in)`` is int8 with one float32 scale per output
    channel (``scales``), and each call quantizes every token of ``x`` to int8 with its own scale, then
    runs :func:`~.w8a8.w8a8_linear` (the s8 matrix-unit kernel on the GPU). ``activations="float"``:
    8-bit weights only, in MLX's affine group format, multiplied by ``mx.quantized_matmul``.

    Args:
        input_dims (int): input features.
        output_dims (int): output features.
        bias (bool): learnable bias. Default: ``True``.
        activations (str): ``"int8"`` or ``"float"``. Default: ``"int8"``.
        group_size (int): weights per scale when ``activations="float"``. Default: ``64``.
    """

    _ready_rows: int = -1  # as in _AffineLinear (weight-only calls)
    _ready_dtype: Optional[mx.Dtype] = None

    def __init__(
        self, input_dims: int, output_dims: int, bias: bool = True, activations: str = "int8", group_size: int = 64
    ):
        super().__init__()
        if activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {ACTIVATION_MODES}; got {activations!r}")
        self.activations = activations
        self.group_size = group_size if activations == "float" else None
        bound = 1.0 / math.sqrt(input_dims)
        self._set_weight(mx.random.uniform(-bound, bound, (output_dims, input_dims)))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    def _set_weight(self, weight: mx.array) -> None:
        if self.activations == "int8":
            q = quantize_int8(weight, granularity="channel")
            self.weight, self.scales = q.values, q.scales
        else:
            self.weight, self.scales, self.biases = mx.quantize(weight, self.group_size, 8)

    @property
    def input_dims(self) -> int:
        return self.weight.shape[1] * (4 if self.activations == "float" else 1)

    def _extra_repr(self) -> str:
        return (f"input_dims={self.input_dims}, output_dims={self.weight.shape[0]}, bias={'bias' in self}, "
                f"activations={self.activations!r}, group_size={self.group_size}")

    def __call__(self, x: mx.array) -> mx.array:
        if self.activations == "int8":
            return w8a8_linear(x, self["weight"], self["scales"], self.get("bias"))
        out = _layer_matmul(self, x, self.group_size, 8)
        return out + self["bias"] if "bias" in self else out

    @classmethod
    def from_linear(cls, linear: nn.Module, activations: str = "int8", group_size: int = 64) -> "Int8Linear":
        """The 8-bit version of an ``nn.Linear``."""
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, "bias" in linear, activations, group_size)
        layer._set_weight(linear.weight)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer


def dequantized_weight(layer: nn.Module) -> Optional[mx.array]:
    """The float32 ``(out, in)`` weight a quantized layer multiplies by (``None`` for other modules)."""
    if isinstance(layer, Int8Linear) and layer.activations == "int8":
        return layer.weight.astype(mx.float32) * layer.scales[:, None]
    if isinstance(layer, (Int8Linear, _AffineLinear)):
        bits = 8 if isinstance(layer, Int8Linear) else layer.bits
        return mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=bits)
    return None
