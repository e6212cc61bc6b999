"""Variable-length (packed) attention: many sequences in one tensor, none attending across another."""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx

from ..validation import check_array, check_int, host_values
from .dispatch import run_attention
from .dropout import draw_seed
from .flash import Output, split_packed
from .spec import describe_attention

CU_SEQLENS_DTYPES = (mx.int32, mx.int64)


def _check_cu_seqlens(name: str, cu_seqlens, total: int, max_seqlen, max_name: str) -> List[int]:
    """The offsets of ``cu_seqlens`` as Python ints, checked against ``total`` tokens and ``max_seqlen``."""
    check_array(name, cu_seqlens, "(batch + 1,)", ndim=1, dtypes=CU_SEQLENS_DTYPES)
    if cu_seqlens.size < 2:
        raise ValueError(f"{name} must have shape (batch + 1,) with batch >= 1; got {tuple(cu_seqlens.shape)}")
    max_seqlen = check_int(max_name, max_seqlen)
    bounds = host_values(cu_seqlens)
    if bounds is None:
        raise ValueError(
            f"{name} is read on the host (it splits the packed sequences): inside mx.compile or mx.vmap pass it "
            "as a constant captured by the function, not as an argument of the transformed function"
        )
    if bounds[0] != 0:
        raise ValueError(f"{name}[0] must be 0; got {bounds[0]}")
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b < a:
            raise ValueError(f"{name} must be non-decreasing; got {name}[{i}] = {a} > {name}[{i + 1}] = {b}")
    if bounds[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens ({total}); got {bounds[-1]}")
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    if max_seqlen < longest:
        raise ValueError(f"{max_name} must be >= the longest sequence ({longest}); got {max_seqlen}")
    return bounds


def _check_packed(q, k, v) -> None:
    """``q``, ``k``, ``v`` packed ``(total, heads, dim)`` with ``k``/``v`` agreeing on tokens and heads and
    ``q``/``k`` on the head dimension."""
    check_array("q", q, "(total_q, nheads, headdim)", ndim=3)
    check_array("k", k, "(total_k, nheads_k, headdim)", ndim=3)
    check_array("v", v, "(total_k, nheads_k, headdim_v)", ndim=3)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k must have shape (total_k, nheads_k, headdim={q.shape[2]}) as q; got {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"v must have shape (total_k={k.shape[0]}, nheads_k={k.shape[1]}, headdim_v) as k; got {tuple(v.shape)}"
        )


def flash_attn_varlen_func(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    cu_seqlens_q: mx.array,
    cu_seqlens_k: mx.array,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    sinks: Optional[mx.array] = None,
    dropout_key: Optional[mx.array] = None,
    path: str = "auto",
) -> Output:
    """Attention over packed sequences of different lengths.

    Args:
        q: ``(total_q, nheads, headdim)``: the queries of all sequences, one after another.
        k: ``(total_k, nheads_k, headdim)``.
        v: ``(total_k, nheads_k, headdim_v)``.
        cu_seqlens_q: int32 (or int64) ``(batch + 1,)`` offsets of each sequence in ``q`` (0 first,
            non-decreasing, ``total_q`` last).
        cu_seqlens_k: int32 (or int64) ``(batch + 1,)`` offsets in ``k`` and ``v``.
        max_seqlen_q, max_seqlen_k: upper bounds on the sequence lengths (Python or NumPy ints).
        The other arguments are those of :func:`flash_attn_func`; causal and window
        alignment is bottom-right within each sequence, and ``alibi_slopes`` may be ``(batch, nheads)``.

    Returns:
        ``out`` ``(total_q, nheads, headdim_v)``; with ``return_attn_probs``,
        ``(out, softmax_lse, None)`` with ``softmax_lse`` float32 ``(nheads, total_q)``
        (the dense matrix of packed sequences is not formed).
    """
    del deterministic
    _check_packed(q, k, v)
    q_bounds = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    k_bounds = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    if len(q_bounds) != len(k_bounds):
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; "
            f"got {len(q_bounds) - 1} and {len(k_bounds) - 1}"
        )
    num_seqs = len(q_bounds) - 1
    per_seq_slopes = isinstance(alibi_slopes, mx.array) and alibi_slopes.ndim == 2  # others: describe_attention
    if per_seq_slopes and alibi_slopes.shape[0] != num_seqs:
        raise ValueError(f"alibi_slopes must have shape (nheads,) or ({num_seqs}, nheads); got {alibi_slopes.shape}")

    seed = draw_seed(dropout_key) if dropout_p > 0 else None
    outs, lses = [], []
    for b in range(num_seqs):
        qs, ks = slice(q_bounds[b], q_bounds[b + 1]), slice(k_bounds[b], k_bounds[b + 1])
        slopes = alibi_slopes[b] if per_seq_slopes else alibi_slopes
        qb, kb, vb = (x[None].swapaxes(1, 2) for x in (q[qs], k[ks], v[ks]))
        spec = describe_attention(
            qb, kb, vb, scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
            alibi_slopes=slopes, sinks=sinks, dropout_p=dropout_p,
        )
        if spec.q_len == 0:
            continue
        out, lse = run_attention(qb, kb, vb, spec, return_attn_probs, seed, path, batch_offset=b)
        outs.append(out[0].swapaxes(0, 1))
        lses.append(lse[0] if lse is not None else None)

    out = mx.concatenate(outs, axis=0) if outs else mx.zeros((0,) + q.shape[1:2] + v.shape[2:], dtype=q.dtype)
    if not return_attn_probs:
        return out
    lse = mx.concatenate(lses, axis=1) if lses else mx.zeros((q.shape[1], 0), dtype=mx.float32)
    return out, lse, None


def flash_attn_varlen_qkvpacked_func(
    qkv: mx.array,
    cu_seqlens: mx.array,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **options,
) -> Output:
    """:func:`flash_attn_varlen_func` on packed ``qkv`` of shape ``(total, 3, nheads, headdim)``;
    ``cu_seqlens`` and ``max_seqlen`` serve queries and keys alike."""
    q, k, v = split_packed(qkv, "qkv", 3, "(total, 3, nheads, headdim)", axis=1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs, **options,
    )


def flash_attn_varlen_kvpacked_func(
    q: mx.array,
    kv: mx.array,
    cu_seqlens_q: mx.array,
    cu_seqlens_k: mx.array,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    **options,
) -> Output:
    """:func:`flash_attn_varlen_func` with packed ``kv`` of shape ``(total_k, 2, nheads_k, headdim)``."""
    k, v = split_packed(kv, "kv", 2, "(total_k, 2, nheads_k, headdim)", axis=1)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs, **options,
    )
