"""Context-parallel attention: one sequence split across the ranks of a group.

Each rank holds ``L / n`` tokens of q, k and v (split as in :mod:`.sequence`) and
computes the attention output of its own queries against every key. Two transports
bring it the other ranks' keys and values:

* ``"ring"`` (ring attention): K and V travel around the ring in ``n`` steps; at each
  step a rank attends its queries to the block it holds (with its log-sum-exp) and folds
  the partial output into its running output by the LSE rule
  ``lse = logaddexp(lse_a, lse_b)``, ``out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse)``.
  Under the zigzag split every step costs the same on every rank: the own block is one
  causal call, a block from an earlier rank is all queries against its first chunk, a block
  from a later rank is the second query chunk against all of it.
* ``"gather"``: one ``all_gather`` of K and V, then each local query chunk attends to
  the keys before it with a bottom-right aligned causal mask (Llama 3's context
  parallelism). The only transport on NCCL, which has no ``send``/``recv``.

Both are exact: the result equals single-device attention on the gathered sequence up
to floating-point summation order. Gradients flow through MLX's autodiff and the
collectives of :mod:`.collectives` (reverse ring shift, reduce-scatter). The ring's backward
pass keeps every received K/V block (O(L) per rank, like the gathered K/V) and in exchange
sends only dK/dV back around the ring, not K/V a second time.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx

from ..attention.dispatch import run_attention
from ..attention.spec import check_layout, describe_attention, to_bhsd
from ..validation import check_bool, check_choice
from .collectives import TRANSPORTS, default_transport, resolve_group, ring_shift
from .sequence import check_local_length, check_split, chunk_ranges, gather_sequence

Output = Union[mx.array, Tuple[mx.array, mx.array]]


class _Block:
    """Attention of local queries to one K/V block, with the options of the call."""

    def __init__(self, scale: float, softcap: float, path: str):
        self.scale, self.softcap, self.path = scale, softcap, path

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, causal: bool,
                 need_lse: bool = True) -> Tuple[mx.array, Optional[mx.array]]:
        spec = describe_attention(q, k, v, layout="BHSD", scale=self.scale, causal=causal, softcap=self.softcap)
        return run_attention(q, k, v, spec, need_lse=need_lse, path=self.path)


@mx.custom_function
def _after(x: mx.array, dependency: mx.array) -> mx.array:
    """``x``, computed after ``dependency`` in the forward pass and its cotangent after it in the backward pass.

    For a received block this rank does not attend: the sends that carry it on to the next rank must run
    whatever this rank differentiates (``mx.grad`` only evaluates what this rank's gradient reads, and a
    plain ``mx.depends`` is not read by the backward pass).
    """
    return mx.depends(x, dependency)


@_after.vjp
def _after(primals, cotangent, _):
    _, dependency = primals
    return mx.depends(cotangent, dependency), mx.zeros_like(dependency)


def _merge(out: mx.array, lse: mx.array, block_out: mx.array, block_lse: mx.array) -> Tuple[mx.array, mx.array]:
    """Fold a partial result into the running one (float32 ``out``; every ``lse`` finite)."""
    new_lse = mx.logaddexp(lse, block_lse)
    out = out * mx.exp(lse - new_lse)[..., None] + block_out.astype(mx.float32) * mx.exp(block_lse - new_lse)[..., None]
    return out, new_lse


def _ring(q: mx.array, k: mx.array, v: mx.array, group: mx.distributed.Group, causal: bool, split: str,
          block: _Block) -> Tuple[mx.array, mx.array]:
    rank, size = group.rank(), group.size()
    half = q.shape[2] // 2
    head_dim = k.shape[-1]
    # K and V travel as one message: one chain of sends, the same order on every rank.
    kv = mx.concatenate([k, v], axis=-1)
    out, lse = block(q, k, v, causal)  # own block first: every row sees at least one key
    out = out.astype(mx.float32)
    for step in range(1, size):
        kv = ring_shift(kv, group)
        source = (rank - step) % size
        k_blk, v_blk = kv[..., :head_dim], kv[..., head_dim:]
        if not causal:
            out, lse = _merge(out, lse, *block(q, k_blk, v_blk, False))
        elif source < rank:  # every local query is after the block's first chunk
            keys = half if split == "zigzag" else k.shape[2]
            out, lse = _merge(out, lse, *block(q, k_blk[:, :, :keys], v_blk[:, :, :keys], False))
        elif split == "zigzag":  # only the second query chunk is after the (whole) block
            tail_out, tail_lse = _merge(out[:, :, half:], lse[:, :, half:],
                                        *block(q[:, :, half:], k_blk, v_blk, False))
            out = mx.concatenate([out[:, :, :half], tail_out], axis=2)
            lse = mx.concatenate([lse[:, :, :half], tail_lse], axis=2)
        else:
            # Nothing to attend (contiguous split, later rank), but the shift must still run here, in the
            # forward and the backward pass, and its reverse too: the block joins with a zero cotangent.
            out, lse = _after(out, kv), _after(lse, kv)
    return out, lse


def _gathered(q: mx.array, k: mx.array, v: mx.array, group: mx.distributed.Group, causal: bool, split: str,
              block: _Block, need_lse: bool) -> Tuple[mx.array, Optional[mx.array]]:
    head_dim = k.shape[-1]
    kv = gather_sequence(mx.concatenate([k, v], axis=-1), group, axis=2, split=split)
    k_all, v_all = kv[..., :head_dim], kv[..., head_dim:]
    if not causal:
        return block(q, k_all, v_all, False, need_lse)
    outs, lses, row = [], [], 0
    for start, stop in chunk_ranges(k_all.shape[2], group.rank(), group.size(), split):
        out, lse = block(q[:, :, row:row + stop - start], k_all[:, :, :stop], v_all[:, :, :stop], True, need_lse)
        outs.append(out)
        lses.append(lse)
        row += stop - start
    if len(outs) == 1:
        return outs[0], lses[0]
    return mx.concatenate(outs, axis=2), (mx.concatenate(lses, axis=2) if need_lse else None)


def ring_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    group: Optional[mx.distributed.Group] = None,
    causal: bool = False,
    *,
    softmax_scale: Optional[float] = None,
    softcap: float = 0.0,
    layout: str = "BSHD",
    split: str = "zigzag",
    transport: str = "auto",
    return_lse: bool = False,
    path: str = "auto",
) -> Output:
    """Self-attention over a sequence split across ``group``: this rank's queries against all keys.

    Args:
        q: this rank's queries ``(batch, seqlen_local, nheads, headdim)`` (``layout="BSHD"``)
            or ``(batch, nheads, seqlen_local, headdim)`` (``"BHSD"``); ``seqlen_local = L / n``. Every
            rank passes the same shapes (not checked: that would cost a collective per call).
        k: this rank's keys, same layout, ``nheads_k`` heads (GQA/MQA: ``nheads % nheads_k == 0``).
        v: this rank's values, ``headdim_v`` may differ from ``headdim``.
        group: the context-parallel group; default ``mx.distributed.init()``. Size 1 is plain attention.
        causal: causal mask over global positions.
        softmax_scale: default ``1 / sqrt(headdim)``.
        softcap: ``c`` of ``c * tanh(s / c)``; ``0`` disables.
        layout: ``"BSHD"`` or ``"BHSD"``.
        split: how the sequence was split (:func:`~.sequence.shard_sequence`): ``"zigzag"``
            (balanced under ``causal``) or ``"contiguous"``.
        transport: ``"ring"`` (send/recv, ring, MPI, JACCL backends), ``"gather"`` (all_gather, every
            backend) or ``"auto"`` (``"gather"`` on CUDA, whose NCCL backend has no send/recv).
        return_lse: also return the float32 log-sum-exp ``(batch, nheads, seqlen_local)``.
        path: attention path of each block, as in :func:`~mlx_primitives.attention.flash_attn_func`.

    Returns:
        ``out`` in ``layout`` and q's dtype, this rank's rows; with ``return_lse``, ``(out, lse)``.
    """
    check_layout(layout)
    check_split(split)
    check_choice("transport", transport, TRANSPORTS)
    return_lse = check_bool("return_lse", return_lse)
    spec = describe_attention(q, k, v, layout=layout, scale=softmax_scale, causal=causal, softcap=softcap)
    if spec.q_len != spec.k_len:
        raise ValueError(
            f"ring_attention attends a split sequence to itself: q and k must hold the same local length; "
            f"got {spec.q_len} and {spec.k_len}"
        )
    group = resolve_group(group)
    size = group.size()
    check_local_length("q's sequence length", spec.q_len, size, split)
    transport = default_transport() if transport == "auto" else transport
    block = _Block(spec.scale, softcap, path)
    qh, kh, vh = (to_bhsd(x, layout) for x in (q, k, v))
    if size == 1:
        out, lse = block(qh, kh, vh, causal, return_lse)
    elif transport == "gather":
        out, lse = _gathered(qh, kh, vh, group, causal, split, block, return_lse)
    else:
        out, lse = _ring(qh, kh, vh, group, causal, split, block)
    out = to_bhsd(out.astype(q.dtype), layout)
    return (out, lse) if return_lse else out
