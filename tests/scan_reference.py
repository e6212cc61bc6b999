"""Float64 NumPy oracles of the scans: the selective scan (Mamba) and the first-order linear recurrence."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .reference import f64


def linear_scan64(a, b, axis: int) -> np.ndarray:
    """``h_t = a_t h_{t-1} + b_t`` along ``axis``, sequentially in float64."""
    a, b = np.moveaxis(f64(a), axis, 0), np.moveaxis(f64(b), axis, 0)
    h = np.zeros_like(b)
    state = np.zeros(b.shape[1:])
    for t in range(b.shape[0]):
        state = a[t] * state + b[t]
        h[t] = state
    return np.moveaxis(h, 0, axis)


def selective_scan64(x, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """Mamba's recurrence in float64: returns ``(y (batch, L, D), last_state (batch, D, N))``."""
    x, dt, A, B, C = (f64(t) for t in (x, delta, A, B, C))
    if delta_bias is not None:
        dt = dt + f64(delta_bias)
    if delta_softplus:
        dt = np.logaddexp(dt, 0.0)
    batch, length, dims = x.shape
    h = np.zeros((batch, dims, A.shape[1]))
    y = np.zeros((batch, length, dims))
    for t in range(length):
        step = dt[:, t, :, None]
        h = np.exp(step * A) * h + step * x[:, t, :, None] * B[:, t, None, :]
        y[:, t] = np.einsum("bdn,bn->bd", h, C[:, t])
    if D is not None:
        y = y + x * f64(D)
    if z is not None:
        zf = f64(z)
        y = y * zf / (1.0 + np.exp(-zf))
    return y, h


def random_selective_inputs(batch, length, dims, state_size, dtype=mx.float32, options=()):
    """Fresh inputs in Mamba's ranges: dt in (0.01, 0.5) (before softplus), A < 0; ``options`` from
    ``"D"``, ``"z"``, ``"bias"``, ``"softplus"``. Returns (args, kwargs) of selective_scan."""
    x = mx.random.normal((batch, length, dims)).astype(dtype)
    delta = mx.random.uniform(0.01, 0.5, (batch, length, dims)).astype(dtype)
    A = -mx.random.uniform(0.2, 2.0, (dims, state_size))
    B = mx.random.normal((batch, length, state_size)).astype(dtype)
    C = mx.random.normal((batch, length, state_size)).astype(dtype)
    D = mx.random.normal((dims,)) if "D" in options else None
    z = mx.random.normal((batch, length, dims)).astype(dtype) if "z" in options else None
    kwargs = {"delta_softplus": "softplus" in options}
    if "bias" in options:
        kwargs["delta_bias"] = mx.random.uniform(-1.0, 0.0, (dims,))
    return (x, delta, A, B, C, D, z), kwargs
