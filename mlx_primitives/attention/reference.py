"""The reference path: attention in pure MLX ops, blockwise with online softmax.

It runs on every backend, is differentiable through MLX's autodiff, and keeps
memory at O(q_len * head_dim + chunk^2) per head: queries and keys are visited in
``chunk x chunk`` blocks and only the running max, denominator and output
accumulator of each query block are kept. Key blocks that the causal mask or the
window hides entirely are never computed. It is the oracle for the kernels and
their fallback.

Layout is BHSD. GQA is computed with queries viewed as
``(batch, num_kv_heads, groups, q_len, head_dim)`` against keys broadcast over the
group axis, so repeated K/V are never materialized.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import mlx.core as mx

from .dropout import keep_mask
from .spec import AttentionSpec

DEFAULT_CHUNK = 256

# (acc, correction, p, v_block) -> the new output accumulator of a query block (OnlineSoftmax.fold).
Accumulate = Callable[[mx.array, mx.array, mx.array, mx.array], mx.array]


def _grouped(x: mx.array, spec: AttentionSpec) -> mx.array:
    """(B, Hq, ...) -> (B, Hk, G, ...)."""
    return x.reshape(x.shape[0], spec.num_kv_heads, spec.groups, *x.shape[2:])


def _per_head(values: mx.array, spec: AttentionSpec) -> mx.array:
    """(H,) or (B, H) per-head values -> broadcastable (B|1, Hk, G, 1, 1) float32."""
    values = values.astype(mx.float32)
    if values.ndim == 1:
        values = values[None]
    return values.reshape(values.shape[0], spec.num_kv_heads, spec.groups, 1, 1)


def _after(x: mx.array, earlier: mx.array) -> mx.array:
    """``x``, computed only once ``earlier`` is: ``mx.depends`` without breaking ``mx.vmap``.

    Both branches of the ``where`` are ``x``, so the value (NaN included) and gradient are ``x``'s.
    """
    return mx.where(earlier.sum() >= 0, x, x)


class _Block:
    """Index helpers of one (query rows, key columns) block, shared by the paths below."""

    def __init__(self, spec: AttentionSpec, i0: int, i1: int, j0: int, j1: int):
        self.spec, self.i0, self.i1, self.j0, self.j1 = spec, i0, i1, j0, j1
        self.rows = mx.arange(i0, i1, dtype=mx.int32)[:, None]
        self.cols = mx.arange(j0, j1, dtype=mx.int32)[None, :]

    def scores(
        self, q_blk: mx.array, k_blk: mx.array, slopes: Optional[mx.array], mask: Optional[mx.array]
    ) -> mx.array:
        """Scaled, capped, biased and masked scores ``(B, Hk, G, rows, cols)``, -inf where hidden."""
        spec = self.spec
        s = q_blk @ k_blk.swapaxes(-1, -2)
        if spec.softcap > 0:
            s = spec.softcap * mx.tanh(s / spec.softcap)
        if slopes is not None:
            s = s - slopes * mx.abs(self.rows + spec.offset - self.cols).astype(mx.float32)
        if mask is not None:
            block = self._mask_block(mask)
            s = mx.where(block, s, -mx.inf) if block.dtype == mx.bool_ else s + block.astype(mx.float32)
        if not spec.fully_visible(self.i0, self.i1, self.j0, self.j1):
            s = mx.where(self._visible(), s, -mx.inf)
        return s

    def _visible(self) -> mx.array:
        left, right = self.spec.window
        pos = self.rows + self.spec.offset
        visible = mx.ones((self.i1 - self.i0, self.j1 - self.j0), dtype=mx.bool_)
        if right >= 0:
            visible = visible & (self.cols <= pos + right)
        if left >= 0:
            visible = visible & (self.cols >= pos - left)
        return visible

    def _mask_block(self, mask: mx.array) -> mx.array:
        spec = self.spec
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        rows = slice(self.i0, self.i1) if mask.shape[2] > 1 else slice(None)
        cols = slice(self.j0, self.j1) if mask.shape[3] > 1 else slice(None)
        block = mx.broadcast_to(
            mask[:, :, rows, cols], (spec.batch, spec.num_heads, self.i1 - self.i0, self.j1 - self.j0)
        )
        return _grouped(block, spec)

    def keep(self, seed: mx.array, batch_offset: int) -> mx.array:
        spec = self.spec
        heads = mx.arange(spec.num_heads, dtype=mx.uint32).reshape(spec.num_kv_heads, spec.groups)
        batches = mx.arange(batch_offset, batch_offset + spec.batch, dtype=mx.uint32)
        batch_head = (batches[:, None, None] * spec.num_heads + heads)[..., None, None]
        return keep_mask(seed, batch_head, self.rows.astype(mx.uint32), self.cols.astype(mx.uint32), spec.dropout_p)


class OnlineSoftmax:
    """One query block's running softmax (float32): fold score blocks in one after another, then read
    out the normalized output and the log-sum-exp.

    Scores are ``(..., rows, keys)``, value blocks ``(..., keys, v_dim)``; ``sinks`` (broadcastable to
    ``(..., rows, 1)``) join the denominator as logits without a value.
    """

    def __init__(self, rows_shape: Tuple[int, ...], v_dim: int, sinks: Optional[mx.array] = None):
        shape = tuple(rows_shape) + (1,)
        if sinks is None:
            self.running_max = mx.full(shape, -mx.inf, dtype=mx.float32)
            self.denom = mx.zeros(shape, dtype=mx.float32)
        else:
            self.running_max = mx.broadcast_to(sinks, shape)
            self.denom = mx.ones(shape, dtype=mx.float32)
        self.acc = mx.zeros(tuple(rows_shape) + (v_dim,), dtype=mx.float32)

    def fold(
        self,
        s: mx.array,
        v_block: mx.array,
        keep: Optional[mx.array] = None,
        keep_scale: float = 1.0,
        accumulate: Optional[Accumulate] = None,
    ) -> None:
        """Fold in the scores ``s`` of one key block. Dropout: only weights where ``keep`` is true reach
        ``v_block``, scaled by ``keep_scale``; ``accumulate(acc, correction, p, v_block)`` replaces the
        float32 ``acc * correction + p @ v_block``."""
        # The softmax does not depend on the shift, so the running max carries no gradient.
        new_max = mx.stop_gradient(mx.maximum(self.running_max, s.max(axis=-1, keepdims=True)))
        safe_max = mx.where(new_max == -mx.inf, 0.0, new_max)
        correction = mx.exp(self.running_max - safe_max)
        p = mx.exp(s - safe_max)
        self.denom = self.denom * correction + p.sum(axis=-1, keepdims=True)
        if keep is not None:
            p = mx.where(keep, p * keep_scale, 0.0)
        if accumulate is None:
            self.acc = self.acc * correction + p @ v_block
        else:
            self.acc = accumulate(self.acc, correction, p, v_block)
        self.running_max = new_max

    def result(self) -> Tuple[mx.array, mx.array]:
        """``(out, lse)``: ``out`` ``(..., rows, v_dim)``, ``lse`` ``(..., rows, 1)``; rows that saw no key
        give zeros and ``-inf``."""
        seen = self.denom > 0
        safe_denom = mx.where(seen, self.denom, 1.0)
        safe_max = mx.where(self.running_max == -mx.inf, 0.0, self.running_max)
        return self.acc / safe_denom, mx.where(seen, safe_max + mx.log(safe_denom), -mx.inf)


def reference_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    spec: AttentionSpec,
    dropout_seed: Optional[mx.array] = None,
    batch_offset: int = 0,
    accumulate: Optional[Accumulate] = None,
) -> Tuple[mx.array, mx.array]:
    """Blockwise attention with online softmax.

    Args:
        q: ``(batch, num_heads, q_len, head_dim)``.
        k: ``(batch, num_kv_heads, k_len, head_dim)``.
        v: ``(batch, num_kv_heads, k_len, v_head_dim)``.
        spec: the call's description (:func:`describe_attention`).
        dropout_seed: uint32 scalar, required when ``spec.dropout_p > 0``.
        batch_offset: index of batch row 0 in the dropout counter (varlen sequences).
        accumulate: ``(acc, correction, p, v_block) -> acc * correction + p @ v_block`` for each
            key block, to simulate a lower precision PV product or accumulator (SageAttention);
            default in float32.

    Returns:
        ``(out, lse)``: ``out`` ``(batch, num_heads, q_len, v_head_dim)`` in q's dtype;
        ``lse`` ``(batch, num_heads, q_len)`` float32, ``-inf`` for rows that see no key.
    """
    if spec.q_len == 0:
        return (
            mx.zeros((spec.batch, spec.num_heads, 0, spec.v_head_dim), dtype=q.dtype),
            mx.zeros((spec.batch, spec.num_heads, 0), dtype=mx.float32),
        )
    chunk = spec.chunk_size or DEFAULT_CHUNK
    q_scaled = _grouped(q.astype(mx.float32) * spec.scale, spec)
    k32 = k.astype(mx.float32)[:, :, None]
    v32 = v.astype(mx.float32)[:, :, None]
    slopes = None if spec.alibi_slopes is None else _per_head(spec.alibi_slopes, spec)
    sinks = None if spec.sinks is None else _per_head(spec.sinks, spec)

    outs, lses = [], []
    for i0 in range(0, spec.q_len, chunk):
        i1 = min(spec.q_len, i0 + chunk)
        q_blk = q_scaled[..., i0:i1, :]
        if outs:  # evaluate query blocks one after another
            q_blk = _after(q_blk, outs[-1])
        state = OnlineSoftmax(q_blk.shape[:-1], spec.v_head_dim, sinks)
        key_start, key_stop = spec.visible_keys(i0, i1)
        for j0 in range(key_start, key_stop, chunk):
            j1 = min(key_stop, j0 + chunk)
            block = _Block(spec, i0, i1, j0, j1)
            k_blk = k32[..., j0:j1, :]
            if j0 > key_start:
                # Without this edge MLX may compute every score block before folding any in: O(N^2) memory.
                k_blk = _after(k_blk, state.denom)
            s = block.scores(q_blk, k_blk, slopes, spec.mask)
            keep = block.keep(dropout_seed, batch_offset) if spec.dropout_p > 0 else None
            state.fold(s, v32[..., j0:j1, :], keep, 1.0 / (1.0 - spec.dropout_p), accumulate)
        out, lse = state.result()
        outs.append(out)
        lses.append(lse)

    out = mx.concatenate(outs, axis=-2) if len(outs) > 1 else outs[0]
    lse = mx.concatenate(lses, axis=-2) if len(lses) > 1 else lses[0]
    b = spec.batch
    return (
        out.reshape(b, spec.num_heads, spec.q_len, spec.v_head_dim).astype(q.dtype),
        lse.reshape(b, spec.num_heads, spec.q_len),
    )


def attention_probabilities(
    q: mx.array,
    k: mx.array,
    spec: AttentionSpec,
    dropout_seed: Optional[mx.array] = None,
    batch_offset: int = 0,
) -> mx.array:
    """The full attention matrix ``(batch, num_heads, q_len, k_len)`` in float32.

    O(q_len * k_len) memory: only for ``return_attn_probs=True``. As in
    flash-attention, weights removed by dropout are returned negated.
    """
    if spec.q_len == 0 or spec.k_len == 0:
        return mx.zeros((spec.batch, spec.num_heads, spec.q_len, spec.k_len), dtype=mx.float32)
    q_scaled = _grouped(q.astype(mx.float32) * spec.scale, spec)
    slopes = None if spec.alibi_slopes is None else _per_head(spec.alibi_slopes, spec)
    block = _Block(spec, 0, spec.q_len, 0, spec.k_len)
    s = block.scores(q_scaled, k.astype(mx.float32)[:, :, None], slopes, spec.mask)
    row_max = s.max(axis=-1, keepdims=True)
    if spec.sinks is not None:
        row_max = mx.maximum(row_max, _per_head(spec.sinks, spec))
    row_max = mx.where(row_max == -mx.inf, 0.0, row_max)
    p = mx.exp(s - row_max)
    denom = p.sum(axis=-1, keepdims=True)
    if spec.sinks is not None:
        denom = denom + mx.exp(_per_head(spec.sinks, spec) - row_max)
    p = p / mx.where(denom > 0, denom, 1.0)
    if spec.dropout_p > 0:
        p = mx.where(block.keep(dropout_seed, batch_offset), p, -p)
    return p.reshape(spec.batch, spec.num_heads, spec.q_len, spec.k_len)
