"""How a sequence is split across the ranks of a context-parallel group.

``"contiguous"``: rank ``r`` of ``n`` holds tokens ``[r * L / n, (r + 1) * L / n)``.

``"zigzag"``: the sequence is cut into ``2n`` chunks of ``c = L / (2n)`` tokens and rank
``r`` holds chunks ``r`` and ``2n - 1 - r``, in that order. Under a causal mask those
chunks see ``r + 1/2`` and ``2n - 1/2 - r`` chunks of keys: ``2n c^2`` (query, key) pairs on
every rank, so no rank waits for the others (the load balancing of ring-flash-attention
and of Llama 3's context parallelism). A contiguous split would give rank ``n - 1``
``2n - 1`` times the work of rank 0.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx

from ..validation import check_choice, check_int
from .collectives import all_gather, check_axis, resolve_group

SPLITS = ("zigzag", "contiguous")


def check_split(split: str) -> None:
    check_choice("split", split, SPLITS)


def check_local_length(name: str, length: int, size: int, split: str) -> None:
    """Raise ValueError naming ``name`` unless a rank's part of ``length`` tokens fits ``split`` over ``size`` ranks."""
    if split == "zigzag" and size > 1 and length % 2:
        raise ValueError(f"split='zigzag' holds two chunks per rank: the local length must be even; "
                         f"got {name} = {length}")


def chunk_ranges(length: int, rank: int, size: int, split: str = "zigzag") -> List[Tuple[int, int]]:
    """Global token ranges ``[(start, stop), ...]`` that ``rank`` holds, in local order.

    Args:
        length: global sequence length; a multiple of ``size`` (``2 * size`` for ``"zigzag"``; any
            length on one rank, which holds the whole sequence).
        rank, size: position in and size of the group (``0 <= rank < size``).
        split: ``"zigzag"`` or ``"contiguous"``.
    """
    check_split(split)
    length, rank, size = check_int("length", length), check_int("rank", rank), check_int("size", size)
    if size < 1 or not 0 <= rank < size or length < 0:
        raise ValueError(f"need size >= 1, 0 <= rank < size and length >= 0; got length={length}, rank={rank}, "
                         f"size={size}")
    if size == 1:
        return [(0, length)]
    parts = 2 * size if split == "zigzag" else size
    if length % parts:
        raise ValueError(
            f"sequence length {length} must be a multiple of {parts} for split={split!r} over {size} ranks "
            f"(pad it at the end: under a causal mask no real token attends to the padding)"
        )
    chunk = length // parts
    chunks = (rank, parts - 1 - rank) if split == "zigzag" else (rank,)
    return [(i * chunk, (i + 1) * chunk) for i in chunks]


def shard_sequence(x: mx.array, group: Optional[mx.distributed.Group] = None, axis: int = 1,
                   split: str = "zigzag") -> mx.array:
    """This rank's part of a full sequence ``x`` (the same ``x`` on every rank).

    Args:
        x: any array with the sequence on ``axis`` (``1`` for BSHD ``(batch, seq, heads, dim)``).
        group: the context-parallel group; default the global group.
        axis: the sequence axis.
        split: ``"zigzag"`` (balanced under a causal mask) or ``"contiguous"``.

    Returns:
        ``x`` restricted to :func:`chunk_ranges` along ``axis`` (length ``L / size``).
    """
    group, axis = resolve_group(group), check_axis("x", x, axis)
    ranges = chunk_ranges(x.shape[axis], group.rank(), group.size(), split)
    index = [slice(None)] * x.ndim
    parts = []
    for start, stop in ranges:
        index[axis] = slice(start, stop)
        parts.append(x[tuple(index)])
    return mx.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]


def gather_sequence(x_local: mx.array, group: Optional[mx.distributed.Group] = None, axis: int = 1,
                    split: str = "zigzag") -> mx.array:
    """The full sequence from every rank's part: the inverse of :func:`shard_sequence`.

    Args:
        x_local: this rank's part, sequence on ``axis``.
        group, axis, split: as given to :func:`shard_sequence`.

    Returns:
        The full sequence (length ``size * x_local.shape[axis]``), the same on every rank.
        Differentiable: each rank's gradient sums the cotangents of its part over ranks, as for a total
        loss that sums every rank's loss; a loss that every rank computes on the whole gathered sequence
        then counts ``size`` times (divide it by ``size``).
    """
    group, axis = resolve_group(group), check_axis("x_local", x_local, axis)
    check_split(split)
    check_local_length(f"x_local.shape[{axis}]", x_local.shape[axis], group.size(), split)
    gathered = all_gather(x_local, group, axis)
    if split == "contiguous" or group.size() == 1:
        return gathered
    chunk = x_local.shape[axis] // 2
    index = [slice(None)] * gathered.ndim
    parts = []
    for slot in zigzag_chunk_slots(group.size()):
        index[axis] = slice(slot * chunk, (slot + 1) * chunk)
        parts.append(gathered[tuple(index)])
    return mx.concatenate(parts, axis=axis)


def zigzag_chunk_slots(size: int) -> List[int]:
    """For each chunk of the sequence in token order, its slot in the rank-ordered concatenation of parts.

    Rank ``r``'s part holds chunks ``r`` and ``2 size - 1 - r`` in slots ``2r`` and ``2r + 1``.
    """
    return [2 * i if i < size else 2 * (2 * size - 1 - i) + 1 for i in range(2 * size)]
