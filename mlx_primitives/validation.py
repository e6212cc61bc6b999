"""Argument checks shared by every public function: errors that name the argument and the expected shape."""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import mlx.core as mx
import numpy as np

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


def check_real(name: str, value) -> float:
    """``value`` as a float: a finite real number (Python or NumPy scalar; not a bool, not an array).

    Raises TypeError when ``value`` is no real number, ValueError when it is NaN or infinite.
    """
    # Plain floats and ints first: isinstance against numbers.Real (an abstract class) is slow.
    exact = type(value) in (float, int)
    if not exact and (isinstance(value, (bool, mx.array)) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number (int, float or NumPy scalar); got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return float(value)


def is_int(value) -> bool:
    """Whether ``value`` is a Python or NumPy integer (not a bool)."""
    return type(value) is int or (not isinstance(value, bool) and isinstance(value, numbers.Integral))


def check_int(name: str, value) -> int:
    """``value`` as an int: a Python or NumPy integer, not a bool; TypeError naming ``name`` otherwise."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
    return int(value)


def check_positive_real(name: str, value) -> float:
    """``value`` as a float > 0: TypeError or ValueError (:func:`check_real`), or ValueError naming ``name``."""
    if check_real(name, value) <= 0:
        raise ValueError(f"{name} must be a positive float; got {value!r}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    """``value`` as an int > 0: TypeError (:func:`check_int`) or ValueError naming ``name``."""
    if check_int(name, value) <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value``, one of the strings ``choices``: TypeError naming ``name`` for a non-string, ValueError for
    another string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(choices)}; got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` as a bool: True, False or a NumPy bool; TypeError naming ``name`` otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__} {value!r}")
    return bool(value)


def is_traced_error(error: Exception) -> bool:
    """Whether ``error`` is MLX refusing to read or evaluate a traced array (inside ``mx.compile``,
    ``mx.vmap`` or a gradient it depends on)."""
    return "transformation" in str(error)


def host_values(array: mx.array) -> Optional[Any]:
    """``array.tolist()``, or None where the host cannot read it: a traced array (:func:`is_traced_error`)."""
    try:
        return array.tolist()
    except ValueError as error:
        if is_traced_error(error):
            return None
        raise


def check_index_range(name: str, indices: mx.array, size: int, expected: str) -> None:
    """Raise ValueError unless every value of the integer array ``indices`` lies in ``[0, size)``.

    One device-to-host read of the extremes; skipped where ``indices`` is traced (inside ``mx.compile``,
    ``mx.vmap`` or a gradient it depends on), where the host cannot read it. ``expected`` names the bound
    for the message, e.g. ``"x.shape[0]"``.
    """
    if not indices.size:
        return
    extremes = host_values(mx.stack([indices.min(), indices.max()]))
    if extremes is None:
        return
    low, high = extremes
    if low < 0 or high >= size:
        raise ValueError(f"{name} must lie in [0, {size}) ({expected}); got values in [{low}, {high}]")
