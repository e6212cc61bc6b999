"""Index-driven row movement: ``selective_gather`` and its adjoint ``selective_scatter_add``.

Both run as one MLX op (``mx.take``, ``array.at[].add``), differentiate into each other, and check
the shapes and, by default, the index range (one device-to-host read) before anything runs, so an
index out of range is an error naming it instead of an undefined read or write. Under ``mx.compile``
or ``mx.vmap`` (and in a gradient the indices depend on) the host cannot read traced indices: the range
check is skipped there and an index out of range is undefined.
"""

from __future__ import annotations

import mlx.core as mx

from .validation import check_array, check_index_range, check_int

INDEX_DTYPES = (mx.int32, mx.uint32, mx.int64, mx.uint64, mx.int16, mx.uint16, mx.int8, mx.uint8)
VALUE_DTYPES = (mx.float16, mx.bfloat16, mx.float32, mx.int32, mx.int64, mx.uint32)


def _check(name: str, x: mx.array, indices: mx.array, axis: int, check_indices: bool) -> int:
    check_array(name, x, "(..., n, ...)", min_ndim=1, dtypes=VALUE_DTYPES)
    check_array("indices", indices, f"(...) of ints in [0, {name}.shape[axis])", dtypes=INDEX_DTYPES)
    if not -x.ndim <= check_int("axis", axis) < x.ndim:
        raise ValueError(f"axis must be an int in [{-x.ndim}, {x.ndim}) for {name} of shape {tuple(x.shape)}; "
                         f"got {axis!r}")
    axis %= x.ndim
    if check_indices:
        check_index_range("indices", indices, x.shape[axis], f"{name}.shape[{axis}]")
    return axis


def selective_gather(x: mx.array, indices: mx.array, axis: int = 0, *, check_indices: bool = True) -> mx.array:
    """The slices of ``x`` at ``indices`` along ``axis`` (e.g. the tokens routed to an expert).

    Args:
        x (array): source ``(..., n, ...)`` with ``n`` along ``axis``.
        indices (array): integer indices in ``[0, n)``, any shape; repeats allowed.
        axis (int): the gathered axis. Default: ``0``.
        check_indices (bool): check the index range on the host first (skipped where the indices are
            traced). Default: ``True``.

    Returns:
        array of shape ``x.shape[:axis] + indices.shape + x.shape[axis+1:]`` and x's dtype.
    """
    axis = _check("x", x, indices, axis, check_indices)
    return mx.take(x, indices, axis=axis)


def selective_scatter_add(
    target: mx.array, indices: mx.array, updates: mx.array, axis: int = 0, *, check_indices: bool = True
) -> mx.array:
    """``target`` with ``updates`` added at ``indices`` along ``axis``; repeated indices accumulate.

    The adjoint of :func:`selective_gather` (e.g. combining expert outputs back into token order).

    Args:
        target (array): ``(..., n, ...)`` with ``n`` along ``axis``.
        indices (array): integer indices in ``[0, n)``, any shape; repeats add up.
        updates (array): ``target.shape[:axis] + indices.shape + target.shape[axis+1:]``, target's dtype.
        axis (int): the scattered axis. Default: ``0``.
        check_indices (bool): check the index range on the host first (skipped where the indices are
            traced). Default: ``True``.

    Returns:
        a new array of target's shape and dtype.
    """
    axis = _check("target", target, indices, axis, check_indices)
    expected = tuple(target.shape[:axis]) + tuple(indices.shape) + tuple(target.shape[axis + 1:])
    check_array("updates", updates, f"target.shape[:axis] + indices.shape + target.shape[axis+1:] = {expected}",
                shape=expected, dtypes=(target.dtype,))
    # Put the scattered axis (and the index dims of updates) in front, where .at[] indexes.
    front = mx.moveaxis(target, axis, 0)
    index_dims = list(range(axis, axis + indices.ndim))
    moved = updates.transpose(index_dims + [d for d in range(updates.ndim) if d not in index_dims])
    flat = moved.reshape((indices.size,) + tuple(front.shape[1:]))
    return mx.moveaxis(front.at[indices.reshape(-1)].add(flat), 0, axis)
