"""Flex attention in pure MLX ops: the mods evaluated on index grids, blockwise online softmax.

Exact (float32 scores, the mods as written), differentiable through MLX's autodiff (gradients
also reach arrays the mods capture), O(N) memory: query rows are visited a few blocks at a time
and, for each, only the KV blocks the :class:`~.block_mask.BlockMask` lists for some batch row or
head of those query blocks; the mask is evaluated only where some listed block is partly visible.
It is the oracle of the flex kernel and the path of mods the tracer cannot compile.

Layout is BHSD; GQA views queries as ``(B, Hk, G, Sq, D)`` so K/V are never repeated, and the
mods see the query head ``h = hk * G + g``.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..reference import OnlineSoftmax, _after
from .block_mask import FULL, HIDDEN, BlockMask, mask_output, mod_output

CHUNK = 256


def _runs(columns: np.ndarray, limit: int) -> List[Tuple[int, int]]:
    """Consecutive runs of sorted block ``columns``, split into runs of at most ``limit`` blocks."""
    runs: List[Tuple[int, int]] = []
    for c in columns.tolist():
        if runs and runs[-1][1] == c and runs[-1][1] - runs[-1][0] < limit:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def _key_plan(states: Optional[np.ndarray], q_blocks: slice, k_len: int, kb: int):
    """``[(key_start, key_stop, needs_mask)]`` for the query blocks ``q_blocks``."""
    if states is None:
        return [(j0, min(k_len, j0 + CHUNK), False) for j0 in range(0, k_len, CHUNK)]
    rows = states[:, :, q_blocks]
    visible = np.nonzero((rows != HIDDEN).any(axis=(0, 1, 2)))[0]
    full = (rows == FULL).all(axis=(0, 1, 2))
    plan = []
    for first, stop in _runs(visible, max(1, CHUNK // kb)):
        plan.append((first * kb, min(k_len, stop * kb), not bool(full[first:stop].all())))
    return plan


def flex_reference(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    score_mod: Optional[Callable],
    block_mask: Optional[BlockMask],
    scale: float,
) -> Tuple[mx.array, mx.array]:
    """Flex attention on the reference path.

    Args:
        q: ``(B, H, Sq, D)``; k: ``(B, Hk, Sk, D)``; v: ``(B, Hk, Sk, Dv)``; ``H`` a multiple of ``Hk``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx)`` on float32 scaled scores, or None.
        block_mask: which blocks to visit and the ``mask_mod`` of partly visible ones, or None.
        scale: factor on ``q @ k^T`` before ``score_mod``.

    Returns:
        ``(out, lse)``: ``out`` ``(B, H, Sq, Dv)`` in q's dtype, ``lse`` float32 ``(B, H, Sq)``
        (natural log, ``-inf`` and zero output for rows that see no key).
    """
    batch, heads, q_len, _ = q.shape
    kv_heads, k_len, v_dim = k.shape[1], k.shape[2], v.shape[3]
    if q_len == 0:
        return mx.zeros((batch, heads, 0, v_dim), q.dtype), mx.zeros((batch, heads, 0), mx.float32)
    groups = heads // kv_heads
    q32 = (q.astype(mx.float32) * scale).reshape(batch, kv_heads, groups, q_len, -1)
    k32, v32 = k.astype(mx.float32)[:, :, None], v.astype(mx.float32)[:, :, None]
    b_grid = mx.arange(batch, dtype=mx.int32).reshape(batch, 1, 1, 1, 1)
    h_grid = mx.arange(heads, dtype=mx.int32).reshape(1, kv_heads, groups, 1, 1)

    if block_mask is None:
        states, qb, kb, mask_mod = None, CHUNK, CHUNK, None
    else:
        states = np.array(block_mask.to_dense())
        (qb, kb), mask_mod = block_mask.block_size, block_mask.mask_mod
    q_step = qb * max(1, CHUNK // qb)

    outs, lses = [], []
    for i0 in range(0, q_len, q_step):
        i1 = min(q_len, i0 + q_step)
        q_blk = q32[..., i0:i1, :]
        if outs:  # evaluate query blocks one after another
            q_blk = _after(q_blk, outs[-1])
        state = OnlineSoftmax(q_blk.shape[:-1], v_dim)
        q_grid = mx.arange(i0, i1, dtype=mx.int32).reshape(1, 1, 1, -1, 1)
        for step, (j0, j1, needs_mask) in enumerate(_key_plan(states, slice(i0 // qb, -(-i1 // qb)), k_len, kb)):
            k_blk = k32[..., j0:j1, :]
            if step:  # without this edge MLX may compute every score block before folding any in
                k_blk = _after(k_blk, state.denom)
            s = q_blk @ k_blk.swapaxes(-1, -2)
            kv_grid = mx.arange(j0, j1, dtype=mx.int32).reshape(1, 1, 1, 1, -1)
            if score_mod is not None:
                s = mod_output("score_mod", score_mod(s, b_grid, h_grid, q_grid, kv_grid), s.shape).astype(mx.float32)
            if needs_mask and mask_mod is not None:
                s = mx.where(mask_output(mask_mod(b_grid, h_grid, q_grid, kv_grid), s.shape), s, -mx.inf)
            state.fold(s, v32[..., j0:j1, :])
        out, lse = state.result()
        outs.append(out)
        lses.append(lse)

    out = mx.concatenate(outs, axis=-2) if len(outs) > 1 else outs[0]
    lse = mx.concatenate(lses, axis=-2) if len(lses) > 1 else lses[0]
    return out.reshape(batch, heads, q_len, v_dim).astype(q.dtype), lse.reshape(batch, heads, q_len)
