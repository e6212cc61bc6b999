"""Integer quantization of tensors: INT8 and INT4, per tensor, per channel or per group, symmetric or not.

The scale of a block of values is chosen from its range; values become integers
``q = round(x / scale)`` clipped to ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (symmetric) or
``q = round(x / scale) + zero`` clipped to ``[0, 2^b - 1]`` (asymmetric, ``zero`` the integer that
stands for 0.0), and ``dequantize`` gives back ``(q - zero) * scale``. Blocks run along the last
axis: ``"tensor"`` is one block, ``"channel"`` one block per row (an output channel of a
``(out, in)`` weight, a token of a ``(tokens, features)`` activation), ``"group"`` blocks of
``group_size`` consecutive elements of a row.

The asymmetric range of a block always includes 0 and its zero point is an integer (PyTorch's
convention: 0.0 is stored exactly), so a block far from 0 (e.g. values near 3.0) gets no finer
steps than the symmetric one; MLX's affine format (a float bias per group) spans just the group's
range. Values are not checked for being finite: an infinity makes its block's scale infinite (the
block dequantizes to NaN), a NaN is stored as 0.

Storage: 8-bit values are ``int8`` (symmetric) or ``uint8`` (asymmetric); 4-bit values are packed
two to a ``uint8`` along the last axis (element ``2i`` in the low nibble), symmetric ones offset by
8. Scales are float32; zero points uint8. MLX's own formats (``mx.quantize``: affine groups in
``uint32`` words) are what :class:`~mlx_primitives.kernels.Int4Linear` uses for its matrix products;
:meth:`QuantizedTensor.to_mlx` writes a group-quantized tensor in it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx

from ..validation import FLOAT_DTYPES, check_array

GRANULARITIES = ("tensor", "channel", "group")
MLX_GROUP_SIZES = (32, 64, 128)  # the group sizes of mx.quantize's affine format
MLX_BITS = (2, 3, 4, 5, 6, 8)  # the bit widths mx.quantize packs


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized tensor and what its inverse needs.

    Attributes:
        values: the integers, stored as described in the module docstring; shape ``shape`` (8-bit)
            or ``shape[:-1] + (shape[-1] // 2,)`` (4-bit).
        scales: float32, ``()`` (tensor), ``shape[:-1]`` (channel) or ``shape[:-1] + (groups,)`` (group).
        zeros: uint8 zero points shaped like ``scales``, or ``None`` when symmetric.
        bits: 8 or 4.
        granularity: ``"tensor"``, ``"channel"`` or ``"group"``.
        group_size: elements per group along the last axis (``"group"`` only).
        shape: shape of the float tensor.
    """

    values: mx.array
    scales: mx.array
    zeros: Optional[mx.array]
    bits: int
    granularity: str
    group_size: Optional[int]
    shape: Tuple[int, ...]

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def to_mlx(self) -> Tuple[mx.array, mx.array, mx.array]:
        """``(weight, scales, biases)`` in MLX's affine format (``mx.quantize``'s, for ``mx.dequantize``,
        ``mx.quantized_matmul`` or an :class:`~mlx_primitives.kernels.Int4Linear`'s parameters): the same
        integers, unsigned (symmetric ones offset by ``2^(bits-1)``), packed in ``uint32`` words, with
        ``bias = -zero * scale``. MLX computes ``q * scale + bias``, equal to :func:`dequantize`'s
        ``(q - zero) * scale`` up to float32 rounding. Needs ``granularity="group"`` with a group size of
        32, 64 or 128.
        """
        if self.granularity != "group" or self.group_size not in MLX_GROUP_SIZES:
            raise ValueError("to_mlx needs granularity='group' with group_size 32, 64 or 128; got "
                             f"granularity={self.granularity!r}, group_size={self.group_size!r}")
        offset = 2 ** (self.bits - 1)
        unsigned = self.values
        if self.bits == 8 and self.symmetric:  # int8 in [-127, 127]; symmetric 4-bit values are stored offset
            unsigned = (self.values.astype(mx.int16) + offset).astype(mx.uint8)
        zeros = mx.full(self.scales.shape, offset, mx.float32) if self.symmetric else self.zeros.astype(mx.float32)
        return unsigned.view(mx.uint32), self.scales, -zeros * self.scales


def _blocks(x: mx.array, granularity: str, group_size: Optional[int]) -> mx.array:
    """``x`` reshaped so that each quantization block is one row of the last axis."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity == "channel":
        return x
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


def _check(x, bits: int, granularity: str, group_size: Optional[int], name: str = "x") -> None:
    check_array(name, x, "(..., features)", min_ndim=1)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    if granularity == "group":
        if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
            raise ValueError(f"group_size must be an even integer >= 2 for granularity='group'; got {group_size!r}")
        if x.shape[-1] % group_size:
            raise ValueError(
                f"{name}'s last axis ({x.shape[-1]}) must be a multiple of group_size ({group_size})"
            )
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError(f"{name}'s last axis must be even for 4-bit packing; got {x.shape[-1]}")


@functools.lru_cache(maxsize=None)
def _integer_math(bits: int, symmetric: bool):
    """``blocks -> (stored integers, scales, zeros)`` over the last axis, compiled (one fused pass where
    MLX can) per bit width and symmetry; 4-bit integers come unpacked, one per uint8."""

    def math(blocks):
        blocks = blocks.astype(mx.float32)
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            scales = mx.max(mx.abs(blocks), axis=-1) / qmax
            scales = mx.where(scales > 0, scales, 1.0)
            q = mx.clip(mx.round(blocks / scales[..., None]), -qmax, qmax)
            stored = q.astype(mx.int8) if bits == 8 else (q + 8).astype(mx.uint8)
            return stored, scales, scales
        qmax = 2**bits - 1
        low = mx.minimum(mx.min(blocks, axis=-1), 0.0)
        high = mx.maximum(mx.max(blocks, axis=-1), 0.0)
        scales = (high - low) / qmax
        scales = mx.where(scales > 0, scales, 1.0)
        zeros = mx.clip(mx.round(-low / scales), 0, qmax)
        q = mx.clip(mx.round(blocks / scales[..., None]) + zeros[..., None], 0, qmax)
        return q.astype(mx.uint8), scales, zeros.astype(mx.uint8)

    return mx.compile(math)


def _quantize(x, bits, granularity, group_size, symmetric) -> QuantizedTensor:
    _check(x, bits, granularity, group_size)
    stored, scales, zeros = _integer_math(bits, symmetric)(_blocks(x, granularity, group_size))
    zeros = None if symmetric else zeros
    if granularity == "tensor":
        scales, zeros = scales.reshape(()), None if zeros is None else zeros.reshape(())
    values = stored.reshape(x.shape)
    if bits == 4:
        pairs = values.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
        values = pairs[..., 0] | (pairs[..., 1] << 4)
    return QuantizedTensor(values, scales, zeros, bits, granularity,
                           group_size if granularity == "group" else None, tuple(x.shape))


def _integers(q: QuantizedTensor) -> mx.array:
    """The stored integers as float32, symmetric ones centred on 0, in ``q.shape``."""
    if q.bits == 8:
        return q.values.astype(mx.float32)
    low, high = q.values & 0xF, q.values >> 4
    unpacked = mx.stack([low, high], axis=-1).reshape(q.shape).astype(mx.float32)
    return unpacked - 8 if q.symmetric else unpacked


def dequantize(q: QuantizedTensor, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The float tensor ``(q - zero) * scale`` of ``q``, in ``dtype`` (float16, bfloat16 or float32),
    shape ``q.shape``."""
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"q must be a QuantizedTensor (from quantize_int8 / quantize_int4); got {type(q).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32; got {dtype}")
    blocks = _blocks(_integers(q), q.granularity, q.group_size)
    scales = q.scales.reshape(1) if q.granularity == "tensor" else q.scales
    if q.zeros is not None:
        zeros = q.zeros.reshape(1) if q.granularity == "tensor" else q.zeros
        blocks = blocks - zeros[..., None].astype(mx.float32)
    return (blocks * scales[..., None]).reshape(q.shape).astype(dtype)


def quantize_int8(
    x: mx.array, *, granularity: str = "channel", group_size: Optional[int] = None, symmetric: bool = True
) -> QuantizedTensor:
    """Quantize ``x`` to 8-bit integers.

    Args:
        x (array): ``(..., features)`` float tensor.
        granularity (str): ``"tensor"``, ``"channel"`` (one scale per row) or ``"group"``.
            Default: ``"channel"``.
        group_size (int, optional): elements per group along the last axis, for ``"group"``.
        symmetric (bool): ``int8`` in ``[-127, 127]`` with no zero point, else ``uint8`` in
            ``[0, 255]`` with one. Default: ``True``.

    Returns:
        :class:`QuantizedTensor`; :func:`dequantize_int8` inverts it.
    """
    return _quantize(x, 8, granularity, group_size, symmetric)


def quantize_int4(
    x: mx.array, *, granularity: str = "group", group_size: Optional[int] = 64, symmetric: bool = True
) -> QuantizedTensor:
    """Quantize ``x`` to 4-bit integers packed two to a byte (last axis even).

    Args:
        x (array): ``(..., features)`` float tensor.
        granularity (str): ``"tensor"``, ``"channel"`` or ``"group"``. Default: ``"group"``.
        group_size (int): elements per group along the last axis, for ``"group"``. Default: ``64``.
        symmetric (bool): integers in ``[-7, 7]`` (stored offset by 8), else ``[0, 15]`` with a zero
            point. Default: ``True``.

    Returns:
        :class:`QuantizedTensor`; :func:`dequantize_int4` inverts it.
    """
    return _quantize(x, 4, granularity, group_size, symmetric)


def dequantize_int8(q: QuantizedTensor, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The float tensor of an 8-bit :class:`QuantizedTensor` (see :func:`dequantize`)."""
    if isinstance(q, QuantizedTensor) and q.bits != 8:
        raise ValueError(f"dequantize_int8 needs an 8-bit QuantizedTensor; got {q.bits} bits")
    return dequantize(q, dtype)


def dequantize_int4(q: QuantizedTensor, dtype: mx.Dtype = mx.float32) -> mx.array:
    """The float tensor of a 4-bit :class:`QuantizedTensor` (see :func:`dequantize`)."""
    if isinstance(q, QuantizedTensor) and q.bits != 4:
        raise ValueError(f"dequantize_int4 needs a 4-bit QuantizedTensor; got {q.bits} bits")
    return dequantize(q, dtype)
