"""Argument checks shared by every public function: errors that name the argument and the expected shape."""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

FLOAT_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def check_array(
    name: str,
    value,
    expected: str,
    *,
    ndim: Optional[int] = None,
    min_ndim: int = 0,
    shape: Optional[Sequence[int]] = None,
    dtypes: Sequence[mx.Dtype] = FLOAT_DTYPES,
) -> mx.array:
    """Raise TypeError (not an array, wrong dtype) or ValueError (wrong shape) about ``name``.

    ``expected`` describes the shape in words for the message, e.g. ``"(..., dims)"``.
    """
    if not isinstance(value, mx.array):
        raise TypeError(f"{name} must be an mx.array of shape {expected}; got {type(value).__name__}")
    if value.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("mlx.core.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {value.dtype}")
    wrong_ndim = (ndim is not None and value.ndim != ndim) or value.ndim < min_ndim
    if wrong_ndim or (shape is not None and tuple(value.shape) != tuple(shape)):
        raise ValueError(f"{name} must have shape {expected}; got {tuple(value.shape)}")
    return value


def check_same_dtype(names: Sequence[str], arrays: Sequence[mx.array]) -> None:
    dtypes = [a.dtype for a in arrays]
    if len(set(dtypes)) > 1:
        got = ", ".join(f"{n}={d}" for n, d in zip(names, dtypes))
        raise TypeError(f"{' and '.join(names)} must share one dtype; got {got}")
