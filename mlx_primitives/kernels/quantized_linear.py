"""Quantized Linear layers: ``Int8Linear`` / ``Int4Linear`` (8- or 4-bit weights) and ``W8A8Linear``.

Weight-only layers are ``nn.QuantizedLinear`` (so mlx-lm's tools take them as MLX's own): MLX's
affine group format (``mx.quantize``: ``uint32`` words, a float scale and bias per group),
multiplied with ``mx.quantized_matmul``. Where MLX's own kernel for that call
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
from ..validation import check_int
from .launcher import next_pow2, run_checked, verified
from .quantization import MLX_GROUP_SIZES, quantize_int8
from .w8a8 import w8a8_linear


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


def check_group_size(group_size, input_dims: Optional[int] = None) -> int:
    """``group_size`` of MLX's affine format (32, 64 or 128) that divides ``input_dims`` (when given);
    TypeError or ValueError naming the argument otherwise."""
    check_int("group_size", group_size)
    if group_size not in MLX_GROUP_SIZES:
        raise ValueError(f"group_size must be 32, 64 or 128; got {group_size!r}")
    if input_dims is not None and input_dims % group_size:
        raise ValueError(f"input_dims ({input_dims}) must be a multiple of group_size ({group_size})")
    return group_size


class _AffineLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` (affine mode, ``BITS`` bits) whose product goes through :func:`_layer_matmul`.

    Args:
        input_dims (int): input features, a multiple of ``group_size``.
        output_dims (int): output features.
        bias (bool): learnable bias. Default: ``True``.
        group_size (int): weights sharing one scale and bias (32, 64 or 128). Default: ``64``.
    """

    BITS: int
    _ready_rows: int = -1  # the row count and dtype of calls known to run MLX's kernel (_layer_matmul)
    _ready_dtype: Optional[mx.Dtype] = None

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True, group_size: int = 64):
        check_int("input_dims", input_dims)
        check_group_size(group_size, input_dims)
        super().__init__(input_dims, output_dims, bias, group_size=group_size, bits=self.BITS)

    def __call__(self, x: mx.array) -> mx.array:
        out = _layer_matmul(self, x, self.group_size, self.bits)
        return out + self["bias"] if "bias" in self else out

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int = 64) -> "_AffineLinear":
        """The quantized version of an ``nn.Linear`` (``mx.quantize`` of its weight)."""
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, "bias" in linear, group_size)
        layer.weight, layer.scales, layer.biases = mx.quantize(linear.weight, group_size, cls.BITS)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer


class Int4Linear(_AffineLinear):
    """A Linear layer with 4-bit weights in MLX's affine group format: an ``nn.QuantizedLinear`` (so
    mlx-lm's tools, e.g. ``dequantize_model`` and LoRA, take it as one). Arguments: see
    :class:`_AffineLinear`."""

    BITS = 4


class Int8Linear(_AffineLinear):
    """A Linear layer with 8-bit weights in MLX's affine group format and float activations: an
    ``nn.QuantizedLinear(bits=8)``. For int8 activations too, see :class:`W8A8Linear`. Arguments: see
    :class:`_AffineLinear`."""

    BITS = 8


class W8A8Linear(nn.Module):
    """A Linear layer in W8A8: int8 weights and per-token int8 activations.

    The weight ``(out, in)`` is int8 with one scale per output channel (``scales``, float32; where a
    ``set_dtype`` has rounded them to a half type, the call takes them back to float32 as rounded), and
    each call quantizes every token of ``x`` to int8 with its own scale, then runs
    :func:`~.w8a8.w8a8_linear` (the s8 matrix-unit kernel on the GPU). MLX has no format for it, so it
    is not an ``nn.QuantizedLinear``; :meth:`to_float` gives the ``nn.Linear`` it stands for.

    Args:
        input_dims (int): input features.
        output_dims (int): output features.
        bias (bool): learnable bias. Default: ``True``.
    """

    def __init__(self, input_dims: int, output_dims: int, bias: bool = True):
        super().__init__()
        bound = 1.0 / math.sqrt(check_int("input_dims", input_dims))
        self._set_weight(mx.random.uniform(-bound, bound, (output_dims, input_dims)))
        if bias:
            self.bias = mx.zeros((output_dims,))
        self.freeze()

    def _set_weight(self, weight: mx.array) -> None:
        q = quantize_int8(weight, granularity="channel")
        self.weight, self.scales = q.values, q.scales

    @property
    def input_dims(self) -> int:
        return self.weight.shape[1]

    @property
    def output_dims(self) -> int:
        return self.weight.shape[0]

    def _extra_repr(self) -> str:
        return f"input_dims={self.input_dims}, output_dims={self.output_dims}, bias={'bias' in self}"

    def __call__(self, x: mx.array) -> mx.array:
        return w8a8_linear(x, self["weight"], self["scales"].astype(mx.float32), self.get("bias"))

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "W8A8Linear":
        """The W8A8 version of an ``nn.Linear``."""
        output_dims, input_dims = linear.weight.shape
        layer = cls(input_dims, output_dims, "bias" in linear)
        layer._set_weight(linear.weight)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer

    def to_float(self) -> nn.Linear:
        """The ``nn.Linear`` of the dequantized float32 weight (and the bias)."""
        linear = nn.Linear(self.input_dims, self.output_dims, bias="bias" in self)
        linear.weight = dequantized_weight(self)
        if "bias" in self:
            linear.bias = self.bias
        return linear


def is_affine_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a layer of MLX's quantized formats (``nn.QuantizedLinear``,
    ``nn.QuantizedEmbedding``, ... and :class:`Int8Linear` / :class:`Int4Linear`): ``bits``, ``group_size``,
    ``mode`` and a ``scales`` parameter."""
    return all(hasattr(module, name) for name in ("bits", "group_size", "mode")) and "scales" in module


def dequantized_weight(layer: nn.Module) -> Optional[mx.array]:
    """The float32 weight a quantized layer multiplies by, ``(out, in)`` for a Linear (``None`` for a
    module that is not quantized): a :class:`W8A8Linear`, or a layer of MLX's quantized formats
    (``nn.QuantizedLinear``, ``nn.QuantizedEmbedding``, ...)."""
    if isinstance(layer, W8A8Linear):
        return layer.weight.astype(mx.float32) * layer.scales.astype(mx.float32)[:, None]
    if is_affine_quantized(layer):
        weight = mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                               bits=layer.bits, mode=layer.mode)
        return weight.astype(mx.float32)
    return None
