"""Differentiable collectives for context parallelism, built on ``mx.distributed``.

MLX's own collectives are made for replicated losses: the VJP of ``all_gather`` keeps only
the local slice of the cotangent and ``send``/``recv`` have no VJP. Under context
parallelism every rank computes a different part of the loss, so the gradient of a
gathered tensor is the *sum* of every rank's cotangent slice, and the gradient of a
ring shift is the reverse shift. The two functions here carry exactly those VJPs.

Transports (what each backend offers in MLX 0.32):

* ``"ring"`` -- ``send``/``recv`` to ring neighbours: MLX's ring (TCP), MPI and JACCL backends.
* ``"gather"`` -- ``all_gather``: every backend; the only choice on NCCL, which has no
  ``send``/``recv``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Optional, Tuple

import mlx.core as mx

from ..validation import check_array, check_int

TRANSPORTS = ("auto", "ring", "gather")
ANY_DTYPE = tuple(d for d in vars(mx).values() if isinstance(d, mx.Dtype))


def default_transport() -> str:
    """``"gather"`` where MLX runs on CUDA (its NCCL backend has no send/recv), else ``"ring"``."""
    return "gather" if mx.cuda.is_available() else "ring"


def resolve_group(group: Optional[mx.distributed.Group]) -> mx.distributed.Group:
    """``group``, or ``mx.distributed.init()`` (size 1 without a launcher) for ``None``.

    Raises TypeError naming ``group`` for anything that is not an ``mx.distributed.Group``.
    """
    if group is None:
        return mx.distributed.init()
    if not isinstance(group, mx.distributed.Group):
        raise TypeError(
            f"group must be an mx.distributed.Group (or None for mx.distributed.init()); got {type(group).__name__}"
        )
    return group


def check_axis(name: str, x, axis) -> int:
    """``axis`` of the array ``x`` (any dtype) as a non-negative int; TypeError/ValueError naming ``name``/``axis``."""
    check_array(name, x, "(..., seq, ...) with the sequence on axis", min_ndim=1, dtypes=ANY_DTYPE)
    axis = check_int("axis", axis)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must lie in [-{x.ndim}, {x.ndim}) for {name} of shape {tuple(x.shape)}; got {axis}")
    return axis % x.ndim


@lru_cache
def _transfer_streams() -> Tuple[mx.Stream, mx.Stream]:
    """CPU streams of their own for sends and receives.

    A send blocks until the neighbour reads it: with every rank sending first on one
    stream, payloads larger than the socket buffers would deadlock. On streams of their
    own, each rank's receive runs beside its send, and both beside the attention of the
    block already received.
    """
    return mx.new_stream(mx.cpu), mx.new_stream(mx.cpu)


def _shift(x: mx.array, group: mx.distributed.Group, step: int) -> mx.array:
    rank, size = group.rank(), group.size()
    send_stream, receive_stream = _transfer_streams()
    sent = mx.distributed.send(x, (rank + step) % size, group=group, stream=send_stream)
    received = mx.distributed.recv_like(x, (rank - step) % size, group=group, stream=receive_stream)
    return mx.depends(received, sent)


@lru_cache
def _ring_shift_fn(group: mx.distributed.Group) -> Callable[[mx.array], mx.array]:
    @mx.custom_function
    def ring_shift_fn(x):
        return _shift(x, group, 1)

    @ring_shift_fn.vjp
    def ring_shift_fn(x, cotangent, _):
        return _shift(cotangent, group, -1)

    return ring_shift_fn


def ring_shift(x: mx.array, group: Optional[mx.distributed.Group] = None) -> mx.array:
    """Send ``x`` to rank ``r + 1`` and return what rank ``r - 1`` sent (ranks mod group size).

    Every rank of ``group`` (default ``mx.distributed.init()``) must call it with an array of the same
    shape and dtype. Differentiable: the cotangent travels the ring the other way.
    """
    group = resolve_group(group)
    if group.size() == 1:
        return x
    return _ring_shift_fn(group)(x)


def _sum_scatter(x: mx.array, group: mx.distributed.Group) -> mx.array:
    """Sum over ranks of ``x`` ``(size * n, ...)``, rank ``r`` keeping rows ``[r * n, (r + 1) * n)``.

    An ``all_sum`` and a slice: ``mx.distributed.sum_scatter`` moves half the bytes but exists on NCCL only.
    """
    rows = x.shape[0] // group.size()
    return mx.distributed.all_sum(x, group=group)[group.rank() * rows:(group.rank() + 1) * rows]


@lru_cache
def _all_gather_fn(group: mx.distributed.Group) -> Callable[[mx.array], mx.array]:
    @mx.custom_function
    def all_gather_fn(x):
        return mx.distributed.all_gather(x, group=group)

    @all_gather_fn.vjp
    def all_gather_fn(x, cotangent, _):
        return _sum_scatter(cotangent, group)

    return all_gather_fn


def all_gather(x: mx.array, group: Optional[mx.distributed.Group] = None, axis: int = 0) -> mx.array:
    """Concatenate every rank's ``x`` along ``axis`` (rank order); same shape on every rank.

    ``group`` defaults to ``mx.distributed.init()``. Differentiable when each rank differentiates its
    own loss: the gradient of rank ``r``'s ``x`` sums every rank's cotangent of slice ``r`` (a reduce-scatter).
    """
    group, axis = resolve_group(group), check_axis("x", x, axis)
    if group.size() == 1:
        return x
    moved = mx.moveaxis(x, axis, 0) if axis != 0 else x
    gathered = _all_gather_fn(group)(mx.contiguous(moved))
    return mx.moveaxis(gathered, 0, axis) if axis != 0 else gathered
