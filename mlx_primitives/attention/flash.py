"""flash-attention's interface on MLX arrays.

The functions mirror ``flash_attn.flash_attn_interface``: tensors are BSHD
``(batch, seqlen, nheads, headdim)``, varlen tensors are packed
``(total_tokens, nheads, headdim)``. Semantics follow DESIGN.md: bottom-right
causal alignment, ``window_size=(left, right)`` with ``-1`` unbounded, softcap
``c * tanh(s / c)`` after scaling, ALiBi ``-slope * |i + Sk - Sq - j|``, GQA/MQA by
head grouping, rows without visible keys output zeros with ``lse = -inf``.

Every call is validated once (:func:`describe_attention`) and routed by the
dispatcher (:mod:`.dispatch`); ``path=`` forces a path, :func:`explain` tells
which one a call would take.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx

from ..memo import CallMemo
from ..validation import check_array
from .dispatch import Route, choose_route, run_attention
from .dropout import draw_seed
from .reference import attention_probabilities
from .spec import AttentionSpec, describe_attention, to_bhsd

Output = Union[mx.array, Tuple[mx.array, mx.array, Optional[mx.array]]]


# Validated specs of array-free calls, keyed by everything they depend on: the hot path of a model
# repeats the same few shapes, and re-validating each call costs more than a small attention on a GPU.
_SPECS = CallMemo(512)


def _describe(q, k, v, layout, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks,
              mask=None, chunk_size=None) -> AttentionSpec:
    def validate() -> AttentionSpec:
        return describe_attention(
            q, k, v, layout=layout, scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
            alibi_slopes=alibi_slopes, sinks=sinks, mask=mask, dropout_p=dropout_p, chunk_size=chunk_size,
        )

    key = None  # arrays among the options (slopes, sinks, a mask) are validated unkeyed
    if alibi_slopes is None and sinks is None and not isinstance(mask, mx.array):
        try:
            # The options' types belong to the key: 3.0 == 3, 1 == True and np.int64(3) == 3 hash alike,
            # and validation accepts some of them and rejects others.
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, type(q), type(k), type(v), layout, mask,
                   window_size, type(window_size), *map(type, window_size), dropout_p, type(dropout_p),
                   softmax_scale, type(softmax_scale), causal, type(causal), softcap, type(softcap),
                   chunk_size, type(chunk_size))
            hash(key)
        except (AttributeError, TypeError):  # not arrays or an unhashable option: validated unkeyed
            key = None
    return _SPECS.get(key, validate)


def _attend(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    spec: AttentionSpec,
    layout: str,
    return_attn_probs: bool,
    dropout_key: Optional[mx.array],
    path: str,
) -> Output:
    """Run a described call on BSHD or BHSD tensors; return in the same layout."""
    seed = draw_seed(dropout_key) if spec.dropout_p > 0 else None
    qh, kh, vh = (q, k, v) if layout == "BHSD" else (to_bhsd(q, layout), to_bhsd(k, layout), to_bhsd(v, layout))
    out, lse = run_attention(qh, kh, vh, spec, need_lse=return_attn_probs, dropout_seed=seed, path=path)
    out = to_bhsd(out, layout)
    if not return_attn_probs:
        return out
    return out, lse, attention_probabilities(qh, kh, spec, seed)


def flash_attn_func(
    q: mx.array,
    k: mx.array,
    v: mx.array,
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
    """Scaled dot-product attention, flash-attention style.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``, float16, bfloat16 or float32.
        k: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads`` must be a multiple of ``nheads_k``.
        v: ``(batch, seqlen_k, nheads_k, headdim_v)``.
        dropout_p: probability of dropping each attention weight (kept ones are scaled by ``1/(1-p)``).
        softmax_scale: a Python or NumPy real number; default ``1 / sqrt(headdim)``.
        causal: bottom-right aligned causal mask (a bool).
        window_size: ``(left, right)`` keys visible around the aligned position; ``-1`` = unbounded.
        softcap: ``c`` of ``c * tanh(s / c)``; ``0`` disables.
        alibi_slopes: float32 ``(nheads,)`` or ``(batch, nheads)``.
        deterministic: accepted for compatibility; every path here is deterministic.
        return_attn_probs: also return ``softmax_lse`` and the attention matrix.
        sinks: ``(nheads,)`` learned logits joining each row's softmax denominator (gpt-oss).
        dropout_key: ``mx.random.key`` making dropout reproducible; default draws from MLX's generator.
        path: ``"auto"``, ``"sdpa"``, ``"kernel"`` or ``"reference"`` (``FLASH_ATTENTION_MLX_REF=1`` at import
            makes ``"auto"`` mean ``"reference"``).

    Returns:
        ``out`` ``(batch, seqlen_q, nheads, headdim_v)`` in q's dtype; with ``return_attn_probs``,
        ``(out, softmax_lse, attn_probs)`` where ``softmax_lse`` is float32 ``(batch, nheads, seqlen_q)``
        and ``attn_probs`` float32 ``(batch, nheads, seqlen_q, seqlen_k)`` (dropped weights negated).
    """
    del deterministic
    spec = _describe(q, k, v, "BSHD", dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, sinks)
    return _attend(q, k, v, spec, "BSHD", return_attn_probs, dropout_key, path)


def split_packed(packed: mx.array, name: str, count: int, shape_text: str, axis: int = 2) -> Tuple[mx.array, ...]:
    """Split a packed tensor holding ``count`` tensors along ``axis`` (``(batch, seqlen, count, heads, headdim)``
    with ``axis=2``, varlen's ``(total, count, heads, headdim)`` with ``axis=1``)."""
    check_array(name, packed, shape_text, ndim=axis + 3)
    if packed.shape[axis] != count:
        raise ValueError(f"{name} must have shape {shape_text}; got {tuple(packed.shape)}")
    return tuple(packed[(slice(None),) * axis + (i,)] for i in range(count))


def flash_attn_qkvpacked_func(
    qkv: mx.array,
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
    """:func:`flash_attn_func` on packed ``qkv`` of shape ``(batch, seqlen, 3, nheads, headdim)``."""
    q, k, v = split_packed(qkv, "qkv", 3, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
        alibi_slopes, deterministic, return_attn_probs, **options,
    )


def flash_attn_kvpacked_func(
    q: mx.array,
    kv: mx.array,
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
    """:func:`flash_attn_func` with packed ``kv`` of shape ``(batch, seqlen_k, 2, nheads_k, headdim)``."""
    k, v = split_packed(kv, "kv", 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs, **options,
    )


def flash_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    causal: bool = False,
    layout: str = "BSHD",
    scale: Optional[float] = None,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    sinks: Optional[mx.array] = None,
    mask: Union[None, str, mx.array] = None,
    dropout_p: float = 0.0,
    dropout_key: Optional[mx.array] = None,
    chunk_size: Optional[int] = None,
    path: str = "auto",
) -> mx.array:
    """Attention in either layout: the functional core of the attention layers.

    Args:
        q, k, v: ``(batch, seq, heads, dim)`` for ``layout="BSHD"`` or ``(batch, heads, seq, dim)``
            for ``"BHSD"`` (no transposes: what ``mx.fast.scaled_dot_product_attention`` takes).
        causal, scale, window_size, softcap, alibi_slopes, sinks, dropout_p, dropout_key, path:
            as in :func:`flash_attn_func`.
        mask: ``"causal"``, or a boolean (True = visible) or additive float array broadcastable to
            ``(batch, heads, seq_q, seq_k)``; integer arrays are rejected.
        chunk_size: bound the reference path's blocks (and force it where sdpa would materialize scores).

    Returns:
        ``out`` in ``layout``, q's dtype.
    """
    spec = _describe(q, k, v, layout, dropout_p, scale, causal, window_size, softcap, alibi_slopes, sinks,
                     mask, chunk_size)
    return _attend(q, k, v, spec, layout, False, dropout_key, path)


def explain(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    causal: bool = False,
    layout: str = "BSHD",
    scale: Optional[float] = None,
    *,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    sinks: Optional[mx.array] = None,
    mask: Union[None, str, mx.array] = None,
    dropout_p: float = 0.0,
    dropout_key: Optional[mx.array] = None,
    chunk_size: Optional[int] = None,
    path: str = "auto",
    return_lse: bool = False,
) -> Route:
    """Which path :func:`flash_attention` would take for the same arguments, and why.

    Takes :func:`flash_attention`'s arguments (``dropout_key`` does not change the route; for
    :func:`flash_attn_func`'s ``softmax_scale`` pass ``scale``), plus ``return_lse``: whether the
    caller needs the log-sum-exp, as ``flash_attn_func(..., return_attn_probs=True)`` does.
    """
    del dropout_key
    spec = _describe(q, k, v, layout, dropout_p, scale, causal, window_size, softcap, alibi_slopes, sinks, mask,
                     chunk_size)
    return choose_route(spec, need_lse=return_lse, path=path)
