"""SageAttention's quantization of q and k: INT8 per block of tokens, after smoothing k.

Subtracting the mean of k over the sequence (``smooth_k``) shifts every score of a query row by
the same amount, so the softmax is unchanged, and it removes the per-channel offsets of k that
would otherwise dominate the absmax of a block and crush the other channels to a few levels.

A block of ``block`` tokens (of one batch row and head) shares one float32 scale
``absmax / 127``; its values become ``round(x * (127 / absmax))`` (half to even), in [-127, 127].
The granularities give the block sizes of q and k:

* ``"per_block"``: 64 queries, 64 keys;
* ``"per_warp"``: 16 queries (the rows one warp of the attention kernel owns), 64 keys;
* ``"per_thread"``: one scale per query and per key (per token), the finest (every score the
  kernel dequantizes gets its own row and column scale). Upstream SageAttention's per-thread
  granularity is coarser (one scale per group of tokens one thread holds), so its scale shapes
  differ and our per_thread accuracy is a best case for it.

Layout is BHSD here; :func:`quantize_qk` also takes NHD tensors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

from ..hardware import device_profile
from ..kernels import sage as sage_kernels
from ..validation import check_array, check_bool, check_choice, check_int

GRANULARITIES = {"per_block": (64, 64), "per_warp": (16, 64), "per_thread": (1, 1)}
LAYOUTS = {"HND": "BHSD", "NHD": "BSHD"}


class QuantizedQK(NamedTuple):
    """INT8 q and k with their scales, BHSD.

    Attributes:
        q: int8 ``(batch, num_heads, q_len, head_dim)``.
        q_scale: float32 ``(batch, num_heads, ceil(q_len / q_block))``.
        k: int8 ``(batch, num_kv_heads, k_len, head_dim)`` of the smoothed keys.
        k_scale: float32 ``(batch, num_kv_heads, ceil(k_len / k_block))``.
        k_mean: float32 ``(batch, num_kv_heads, 1, head_dim)`` subtracted from k, or None.
        q_block, k_block: tokens per scale.
    """

    q: mx.array
    q_scale: mx.array
    k: mx.array
    k_scale: mx.array
    k_mean: Optional[mx.array]
    q_block: int
    k_block: int


def check_granularity(gran: str, name: str = "qk_quant_gran") -> Tuple[int, int]:
    """``(q_block, k_block)`` of a granularity name; an error naming the argument ``name`` otherwise."""
    return GRANULARITIES[check_choice(name, gran, tuple(GRANULARITIES))]


def quantize_reference(x: mx.array, block: int, mean: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
    """INT8 values and float32 scales of ``x - mean`` per block of ``block`` tokens, in MLX ops.

    Args:
        x: ``(batch, heads, seq, dim)``, any float dtype.
        block: tokens per scale.
        mean: ``(batch, heads, 1, dim)`` float32 subtracted first, or None.

    Returns:
        ``(values, scales)``: int8 like ``x``; float32 ``(batch, heads, ceil(seq / block))``.
    """
    batch, heads, seq, dim = x.shape
    blocks = -(-seq // block)
    x32 = x.astype(mx.float32)
    if mean is not None:
        x32 = x32 - mean
    padded = mx.pad(x32, [(0, 0), (0, 0), (0, blocks * block - seq), (0, 0)])
    padded = padded.reshape(batch, heads, blocks, block * dim)
    absmax = mx.abs(padded).max(axis=-1)
    inverse = mx.where(absmax > 0, 127.0 / mx.where(absmax > 0, absmax, 1.0), 0.0)
    values = mx.clip(mx.round(padded * inverse[..., None]), -127, 127).astype(mx.int8)
    values = values.reshape(batch, heads, blocks * block, dim)[:, :, :seq]
    return values, absmax / 127.0


def dequantize(values: mx.array, scales: mx.array, block: int, mean: Optional[mx.array] = None) -> mx.array:
    """Float32 ``values * scale`` (plus ``mean``): the inverse of the quantization, up to its rounding.

    Args:
        values: int8 ``(batch, heads, seq, dim)``.
        scales: float32 ``(batch, heads, ceil(seq / block))``.
        block: tokens per scale (:data:`GRANULARITIES`), a positive int.
        mean: ``(batch, heads, 1, dim)`` to add back (k's ``k_mean``), or None for the smoothed keys.
    """
    check_array("values", values, "(batch, heads, seq, dim) int8", ndim=4, dtypes=(mx.int8,))
    if check_int("block", block) <= 0:
        raise ValueError(f"block must be a positive int (tokens per scale); got {block!r}")
    batch, heads, seq, dim = values.shape
    expected = (batch, heads, -(-seq // block))
    check_array("scales", scales, f"{expected} float32", shape=expected, dtypes=(mx.float32,))
    if mean is not None:
        check_array("mean", mean, f"{(batch, heads, 1, dim)}", shape=(batch, heads, 1, dim))
    per_token = mx.repeat(scales, block, axis=-1)[..., :seq, None]
    out = values.astype(mx.float32) * per_token
    return out if mean is None else out + mean


def key_mean(k: mx.array) -> mx.array:
    """Mean of ``k`` ``(batch, heads, seq, dim)`` over the sequence, float32 ``(batch, heads, 1, dim)``."""
    return k.astype(mx.float32).mean(axis=2, keepdims=True)


def quantize_bhsd(q: mx.array, k: mx.array, gran: str, smooth_k: bool, path: str = "auto") -> QuantizedQK:
    """:func:`quantize_qk` on validated BHSD tensors: on the kernel where the backend and shape allow,
    unless ``path="reference"``."""
    q_block, k_block = check_granularity(gran)
    mean = key_mean(k) if smooth_k and k.shape[2] > 0 else None

    def quantize(x, block, mean=None):
        if path != "reference" and device_profile().is_gpu and sage_kernels.quantize_unsupported(x) is None:
            return sage_kernels.quantize(x, block, mean)
        return quantize_reference(x, block, mean)

    q8, q_scale = quantize(q, q_block)
    k8, k_scale = quantize(k, k_block, mean)
    return QuantizedQK(q8, q_scale, k8, k_scale, mean, q_block, k_block)


def quantize_qk(q: mx.array, k: mx.array, gran: str = "per_block", smooth_k: bool = True,
                tensor_layout: str = "HND") -> QuantizedQK:
    """Quantize q and k to INT8 as :func:`~mlx_primitives.attention.sageattn` does (one kernel pass each
    on a GPU backend: mean-subtract, per-block absmax, scale, round).

    Args:
        q: ``(batch, num_heads, q_len, head_dim)`` for ``"HND"``, ``(batch, q_len, num_heads, head_dim)``
            for ``"NHD"``; float16, bfloat16 or float32.
        k: ``(batch, num_kv_heads, k_len, head_dim)`` (``"HND"``), same dtype.
        gran: ``"per_block"``, ``"per_warp"`` or ``"per_thread"`` (see the module docstring).
        smooth_k: subtract the mean of k over the sequence before quantizing.
        tensor_layout: ``"HND"`` or ``"NHD"``.

    Returns:
        :class:`QuantizedQK`, BHSD whatever the input layout; ``dequantize(out.k, out.k_scale,
        out.k_block, out.k_mean)`` approximates k.
    """
    layout = check_layout(tensor_layout)
    check_granularity(gran, "gran")
    smooth_k = check_bool("smooth_k", smooth_k)
    head_axis = 1 if layout == "BHSD" else 2
    for name, x in (("q", q), ("k", k)):
        check_array(name, x, f"(batch, heads, seq, head_dim) [{tensor_layout}]", ndim=4)
    if q.dtype != k.dtype or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"k must share q's dtype, batch and head_dim; got q {q.shape} {q.dtype}, k {k.shape} {k.dtype}"
        )
    if q.shape[head_axis] % max(k.shape[head_axis], 1):
        raise ValueError(f"q's heads ({q.shape[head_axis]}) must be a multiple of k's ({k.shape[head_axis]})")
    if layout == "BSHD":
        q, k = q.swapaxes(1, 2), k.swapaxes(1, 2)
    return quantize_bhsd(q, k, gran, smooth_k)


def check_layout(tensor_layout: str) -> str:
    """The internal layout name of ``tensor_layout``; an error naming it otherwise."""
    return LAYOUTS[check_choice("tensor_layout", tensor_layout, tuple(LAYOUTS))]
