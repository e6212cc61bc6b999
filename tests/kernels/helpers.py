"""Float64 NumPy oracles and the accuracy rule of the kernel tests.

Rule (as flash-attention tests it): the max error of our result against float64 may be at most twice
the error of a naive computation in the input dtype, plus a small floor for results that round
exactly.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

DTYPES = (mx.float16, mx.bfloat16, mx.float32)
FLOOR = {mx.float16: 2e-3, mx.bfloat16: 1.6e-2, mx.float32: 2e-5}


def f64(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def max_error(result: mx.array, exact: np.ndarray) -> float:
    return float(np.max(np.abs(f64(result) - exact))) if exact.size else 0.0


def assert_accurate(result: mx.array, naive: mx.array, exact: np.ndarray, dtype) -> None:
    assert result.shape == exact.shape and result.dtype == dtype
    ours, base = max_error(result, exact), max_error(naive, exact)
    assert ours <= 2 * base + FLOOR[dtype], f"error {ours:.3g} > 2 x naive {base:.3g} + {FLOOR[dtype]}"


def random(shape, dtype, scale=1.0) -> mx.array:
    return (mx.random.normal(shape) * scale).astype(dtype)


def rms_norm64(h, w, eps):
    return h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + eps) * w


def layer_norm64(h, w, b, eps):
    centred = h - h.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred**2, axis=-1, keepdims=True) + eps) * w + b


def rope64(x, offsets, dims, traditional, base, scale, wavelengths=None):
    """Float64 RoPE of BHSD ``x``; pair j turns by position / ``wavelengths[j]`` (default ``base ** (j / half)``)."""
    half = dims // 2
    pos = (offsets[:, None] + np.arange(x.shape[2])[None]) * scale
    if wavelengths is None:
        wavelengths = base ** (np.arange(half) / half)
    theta = pos[:, None, :, None] / wavelengths
    cos, sin = np.cos(theta), np.sin(theta)
    out = x.copy()
    if traditional:
        a, b = x[..., 0:dims:2], x[..., 1:dims:2]
        out[..., 0:dims:2], out[..., 1:dims:2] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = x[..., :half], x[..., half:dims]
        out[..., :half], out[..., half:dims] = a * cos - b * sin, b * cos + a * sin
    return out


def glu64(gate, up, activation):
    if activation == "silu":
        act = gate / (1 + np.exp(-gate))
    elif activation == "gelu":
        act = 0.5 * gate * (1 + np.vectorize(math.erf)(gate / math.sqrt(2)))
    else:
        act = 0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
    return act * up
