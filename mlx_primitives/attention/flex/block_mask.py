"""Block-sparse masks: which (query block, key block) tiles a ``mask_mod`` hides, cuts or leaves whole.

:func:`create_block_mask` evaluates ``mask_mod(b, h, q_idx, kv_idx)`` on the full index grid with
vectorized MLX ops, a few query blocks at a time (bounded memory), and reduces each
``(Q_BLOCK, KV_BLOCK)`` tile to one of three states: hidden (skipped), partly visible (the mask is
evaluated per element) or fully visible (no mask evaluation). For every query block a
:class:`BlockMask` lists the partly visible KV blocks, then separately the fully visible ones, as
PyTorch's FlexAttention does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from ...validation import check_array, is_traced_error

HIDDEN, PARTIAL, FULL = 0, 1, 2
# Elements of the boolean grid one evaluation step may hold (128 Mi: 128 MB of bools).
CHUNK_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class BlockMask:
    """Per query block, the KV blocks to visit.

    ``Bm`` is ``B`` or 1 (broadcast over the batch), ``Hm`` is ``H`` or 1 (broadcast over heads),
    ``NQ = ceil(Q_LEN / Q_BLOCK)``, ``NK = ceil(KV_LEN / KV_BLOCK)``.

    Attributes:
        kv_num_blocks: ``(Bm, Hm, NQ)`` int32, number of partly visible KV blocks per query block.
        kv_indices: ``(Bm, Hm, NQ, NK)`` int32, their block indices first (ascending), then the rest.
        full_kv_num_blocks: ``(Bm, Hm, NQ)`` int32, number of fully visible KV blocks.
        full_kv_indices: ``(Bm, Hm, NQ, NK)`` int32, their indices first (ascending).
        block_size: ``(Q_BLOCK, KV_BLOCK)`` (an int given means both).
        seq_lengths: ``(Q_LEN, KV_LEN)``.
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` evaluated on partly visible blocks (None:
            every listed block is visible as a whole).
    """

    kv_num_blocks: mx.array
    kv_indices: mx.array
    full_kv_num_blocks: mx.array
    full_kv_indices: mx.array
    block_size: Tuple[int, int]
    seq_lengths: Tuple[int, int]
    mask_mod: Optional[Callable] = None

    def __post_init__(self):
        """Check that the lists agree with each other and with the sizes (the kernel indexes them by
        those sizes): a BlockMask built by hand, as PyTorch's ``from_kv_blocks`` users do, is checked too."""
        qb, kb = block_sizes(self.block_size)
        if not isinstance(self.seq_lengths, (tuple, list)) or len(self.seq_lengths) != 2:
            raise ValueError(f"seq_lengths must be a pair (Q_LEN, KV_LEN); got {self.seq_lengths!r}")
        q_len, kv_len = (_positive_int(f"seq_lengths[{i}]", n) for i, n in enumerate(self.seq_lengths))
        object.__setattr__(self, "block_size", (qb, kb))  # an int as PyTorch's BLOCK_SIZE, stored as a pair
        object.__setattr__(self, "seq_lengths", (q_len, kv_len))
        nq, nk = -(-q_len // qb), -(-kv_len // kb)
        check_array("kv_num_blocks", self.kv_num_blocks, f"(Bm, Hm, NQ={nq})", ndim=3, dtypes=(mx.int32,))
        bm, hm = self.kv_num_blocks.shape[:2]
        counts, lists = f"({bm}, {hm}, NQ={nq})", f"({bm}, {hm}, NQ={nq}, NK={nk})"
        for name in ("kv_num_blocks", "full_kv_num_blocks", "kv_indices", "full_kv_indices"):
            expected = (bm, hm, nq) if name.endswith("num_blocks") else (bm, hm, nq, nk)
            check_array(name, getattr(self, name), counts if len(expected) == 3 else lists, shape=expected,
                        dtypes=(mx.int32,))
        _check_mask_mod(self.mask_mod)

    @property
    def BLOCK_SIZE(self) -> Tuple[int, int]:  # noqa: N802 (PyTorch's name)
        """``(Q_BLOCK, KV_BLOCK)``, as PyTorch's ``BlockMask.BLOCK_SIZE``."""
        return self.block_size

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(Bm, Hm, Q_LEN, KV_LEN)``."""
        return tuple(self.kv_num_blocks.shape[:2]) + tuple(self.seq_lengths)

    def to_dense(self) -> mx.array:
        """``(Bm, Hm, NQ, NK)`` int32 block states: 0 hidden, 1 partly visible, 2 fully visible."""
        nk = self.kv_indices.shape[-1]
        slots = mx.arange(nk, dtype=mx.int32)
        states = mx.zeros(self.kv_indices.shape, dtype=mx.int32)
        for count, indices, state in (
            (self.kv_num_blocks, self.kv_indices, PARTIAL),
            (self.full_kv_num_blocks, self.full_kv_indices, FULL),
        ):
            listed = slots < count[..., None]
            onehot = (indices[..., :, None] == slots) & listed[..., :, None]
            states = states + state * onehot.any(axis=-2).astype(mx.int32)
        return states

    def sparsity(self) -> float:
        """Percentage (0 to 100, as PyTorch's ``BlockMask.sparsity``) of blocks skipped entirely."""
        dense = self.to_dense()
        return 100.0 * float((dense == HIDDEN).astype(mx.float32).mean())

    def __repr__(self) -> str:
        bm, hm, q_len, kv_len = self.shape
        return (
            f"BlockMask(shape=({bm}, {hm}, {q_len}, {kv_len}), block_size={self.block_size}, "
            f"sparsity={self.sparsity():.1f}%, mask_mod={getattr(self.mask_mod, '__name__', None)})"
        )


def mod_output(name: str, value, shape: Tuple[int, ...]) -> mx.array:
    """What a mod returned, as an ``mx.array`` broadcast to its index grids' ``shape``.

    A mod may return a Python or NumPy scalar (``noop_mask``'s ``True``) or an ``mx.array`` that
    broadcasts with the grids it received; anything else is a TypeError, a shape that does not
    broadcast a ValueError, both naming ``name``.
    """
    if isinstance(value, (bool, int, float, np.generic)):
        value = mx.array(value)
    if not isinstance(value, mx.array):
        raise TypeError(f"{name} must return an mx.array or a Python scalar; got {type(value).__name__}")
    try:
        return mx.broadcast_to(value, shape)
    except ValueError:
        raise ValueError(
            f"{name} returned shape {tuple(value.shape)}, which does not broadcast to the shape {tuple(shape)} "
            "of its index grids (b, h, q_idx, kv_idx)"
        ) from None


def mask_output(value, shape: Tuple[int, ...]) -> mx.array:
    """What ``mask_mod`` returned (:func:`mod_output`) as a boolean visibility of ``shape`` (nonzero: visible)."""
    visible = mod_output("mask_mod", value, shape)
    return visible if visible.dtype == mx.bool_ else visible != 0


def _check_mask_mod(mask_mod) -> None:
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(
            f"mask_mod must be a function mask_mod(b, h, q_idx, kv_idx) or None; got {type(mask_mod).__name__}"
        )


def _positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


def block_sizes(BLOCK_SIZE: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    """``(Q_BLOCK, KV_BLOCK)`` from an int or a pair."""
    if isinstance(BLOCK_SIZE, str):
        raise TypeError(
            f"BLOCK_SIZE must be an int or a pair (Q_BLOCK, KV_BLOCK); got {BLOCK_SIZE!r} (the sixth argument is "
            "BLOCK_SIZE here: pass PyTorch's device by keyword, device=...)"
        )
    if isinstance(BLOCK_SIZE, (tuple, list)):
        if len(BLOCK_SIZE) != 2:
            raise ValueError(f"BLOCK_SIZE must be an int or a pair (Q_BLOCK, KV_BLOCK); got {BLOCK_SIZE!r}")
        return _positive_int("BLOCK_SIZE[0]", BLOCK_SIZE[0]), _positive_int("BLOCK_SIZE[1]", BLOCK_SIZE[1])
    size = _positive_int("BLOCK_SIZE", BLOCK_SIZE)
    return size, size


def _evaluate(state: mx.array) -> None:
    try:
        mx.eval(state)
    except ValueError as error:
        if not is_traced_error(error):
            raise
        raise ValueError(
            "create_block_mask builds its block lists on the host: inside mx.compile or mx.vmap, mask_mod may "
            "only read arrays the function captures (constants), not its traced arguments; or build the "
            "BlockMask outside the transformation and pass it in"
        ) from None


def _block_states(mask_mod: Callable, b: int, h: int, q_len: int, kv_len: int, qb: int, kb: int) -> mx.array:
    """``(b, h, NQ, NK)`` int32 states, evaluating ``mask_mod`` a few query blocks at a time."""
    nq, nk = -(-q_len // qb), -(-kv_len // kb)
    batch = mx.arange(b, dtype=mx.int32).reshape(b, 1, 1, 1, 1, 1)
    heads = mx.arange(h, dtype=mx.int32).reshape(1, h, 1, 1, 1, 1)
    keys = mx.arange(nk * kb, dtype=mx.int32)
    key_valid = None if kv_len % kb == 0 else (keys < kv_len).reshape(1, 1, 1, 1, nk, kb)
    keys = mx.minimum(keys, kv_len - 1).reshape(1, 1, 1, 1, nk, kb)
    step = max(1, CHUNK_ELEMENTS // (b * h * qb * nk * kb))
    states = []
    for first in range(0, nq, step):
        n = min(step, nq - first)
        rows = mx.arange(first * qb, (first + n) * qb, dtype=mx.int32)
        row_valid = None if (first + n) * qb <= q_len else (rows < q_len).reshape(1, 1, n, qb, 1, 1)
        rows = mx.minimum(rows, q_len - 1).reshape(1, 1, n, qb, 1, 1)
        visible = mask_output(mask_mod(batch, heads, rows, keys), (b, h, n, qb, nk, kb))
        valid = row_valid if key_valid is None else (key_valid if row_valid is None else row_valid & key_valid)
        if valid is not None:  # padding rows and keys past the end count neither way
            visible, everywhere = visible & valid, visible | mx.logical_not(valid)
        else:
            everywhere = visible
        # Contiguous axis first: (n, QB, NK, KB) -> (n, QB, NK) -> (n, NK).
        any_visible = visible.any(axis=-1).any(axis=-2)
        all_visible = everywhere.all(axis=-1).all(axis=-2)
        state = any_visible.astype(mx.int32) + all_visible.astype(mx.int32)
        state = mx.broadcast_to(state, (b, h, n, nk))
        _evaluate(state)  # one chunk's grid at a time
        states.append(state)
    return mx.concatenate(states, axis=2) if len(states) > 1 else states[0]


def _lists(selected: mx.array) -> Tuple[mx.array, mx.array]:
    """Counts and indices (selected blocks first, ascending) of a ``(..., NK)`` boolean."""
    nk = selected.shape[-1]
    columns = mx.arange(nk, dtype=mx.int32)
    order = mx.argsort(mx.where(selected, columns, nk + columns), axis=-1).astype(mx.int32)
    return selected.sum(axis=-1).astype(mx.int32), order


def block_mask_from_states(states: mx.array, block_size: Tuple[int, int], seq_lengths: Tuple[int, int],
                           mask_mod: Optional[Callable]) -> BlockMask:
    """A :class:`BlockMask` from ``(Bm, Hm, NQ, NK)`` states (0 hidden, 1 partly, 2 fully visible)."""
    kv_num, kv_indices = _lists(states == PARTIAL)
    full_num, full_indices = _lists(states == FULL)
    mx.eval(kv_num, kv_indices, full_num, full_indices)
    return BlockMask(kv_num, kv_indices, full_num, full_indices, block_size, seq_lengths, mask_mod)


def _grid_sizes(mask_mod, B, H, Q_LEN, KV_LEN) -> Tuple[int, int, int, int]:
    """Validated ``(b, h, q_len, kv_len)`` of a mask: ``B``/``H`` None count 1."""
    _check_mask_mod(mask_mod)
    b = 1 if B is None else _positive_int("B", B)
    h = 1 if H is None else _positive_int("H", H)
    return b, h, _positive_int("Q_LEN", Q_LEN), _positive_int("KV_LEN", KV_LEN)


def create_mask(mask_mod: Optional[Callable], B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int, *,
                device=None) -> mx.array:
    """The dense boolean mask of ``mask_mod`` (True = visible), as PyTorch's ``create_mask``: e.g. the
    ``mask`` of ``mx.fast.scaled_dot_product_attention`` equivalent to a :class:`BlockMask`.

    Args:
        mask_mod, B, H, Q_LEN, KV_LEN, device: as in :func:`create_block_mask`.

    Returns:
        ``(B, H, Q_LEN, KV_LEN)`` bool (a size-1 axis where ``B``/``H`` is None); memory ``O(B H Q_LEN KV_LEN)``.
    """
    del device
    b, h, q_len, kv_len = _grid_sizes(mask_mod, B, H, Q_LEN, KV_LEN)
    shape = (b, h, q_len, kv_len)
    if mask_mod is None:
        return mx.ones(shape, dtype=mx.bool_)
    grids = [mx.arange(n, dtype=mx.int32).reshape([n if axis == i else 1 for axis in range(4)])
             for i, n in enumerate(shape)]
    return mask_output(mask_mod(*grids), shape)


def create_block_mask(
    mask_mod: Optional[Callable],
    B: Optional[int],
    H: Optional[int],
    Q_LEN: int,
    KV_LEN: int,
    BLOCK_SIZE: Union[int, Tuple[int, int]] = 128,
    *,
    device=None,
) -> BlockMask:
    """The :class:`BlockMask` of ``mask_mod`` for queries ``0..Q_LEN-1`` and keys ``0..KV_LEN-1``.

    Args:
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = the query sees the key), written
            with MLX ops that broadcast (it receives int32 index grids); None: every key is visible.
        B: batch size, or None when the mask is the same for every batch row (evaluated at ``b = 0``).
        H: number of query heads, or None when the mask is the same for every head (``h = 0``).
        Q_LEN: query length.
        KV_LEN: key length.
        BLOCK_SIZE: tile size, an int or ``(Q_BLOCK, KV_BLOCK)``. The kernel needs ``Q_BLOCK`` a
            multiple of 64 and ``KV_BLOCK`` of 32 (the default 128 fits); others run on the reference.
        device: accepted for PyTorch compatibility (``device="cuda"``) and ignored: MLX arrays live in
            unified memory and run on the default device.

    Returns:
        A :class:`BlockMask` with batch and head axes of size ``B``/``H`` (1 where None).
    """
    del device
    b, h, q_len, kv_len = _grid_sizes(mask_mod, B, H, Q_LEN, KV_LEN)
    qb, kb = block_sizes(BLOCK_SIZE)
    if mask_mod is None:
        states = mx.full((b, h, -(-q_len // qb), -(-kv_len // kb)), FULL, dtype=mx.int32)
    else:
        states = _block_states(mask_mod, b, h, q_len, kv_len, qb, kb)
    return block_mask_from_states(states, (qb, kb), (q_len, kv_len), mask_mod)
