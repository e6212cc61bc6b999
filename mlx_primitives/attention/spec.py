"""One validated description of an attention call.

Every attention entry point turns its arguments into an :class:`AttentionSpec`
through :func:`describe_attention`. Validation happens here, once, before any
compute, with errors that name the argument and the expected shape. The paths
(``mx.fast.scaled_dot_product_attention``, kernels, the reference) read the spec
and never re-check it.

Conventions (see DESIGN.md): tensors are BHSD internally; masks align
bottom-right, so query ``i`` sits at key position ``i + k_len - q_len``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from ..validation import (FLOAT_DTYPES, check_array, check_bool, check_int, check_positive_int, check_real,
                          check_same_dtype)

LAYOUTS = ("BSHD", "BHSD")

Mask = Union[None, str, mx.array]


@dataclass(frozen=True)
class AttentionSpec:
    """Everything a path needs to know about one attention call.

    Shapes are those of the BHSD tensors: q ``(batch, num_heads, q_len, head_dim)``,
    k ``(batch, num_kv_heads, k_len, head_dim)``, v ``(batch, num_kv_heads, k_len, v_head_dim)``.

    ``window`` is ``(left, right)`` in keys around the aligned position
    ``i + k_len - q_len``; ``-1`` means unbounded. ``causal`` is folded into
    ``window[1] == 0``; ``causal`` is kept to route to fast paths.
    """

    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    v_head_dim: int
    dtype: mx.Dtype
    scale: float
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: Optional[mx.array] = None
    sinks: Optional[mx.array] = None
    mask: Optional[mx.array] = None
    dropout_p: float = 0.0
    chunk_size: Optional[int] = None

    @property
    def groups(self) -> int:
        """Query heads per KV head (1 for MHA, ``num_heads`` for MQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def offset(self) -> int:
        """Key position of query 0 under bottom-right alignment."""
        return self.k_len - self.q_len

    @property
    def windowed(self) -> bool:
        """True when a window (beyond plain causality) limits the visible keys."""
        left, right = self.window
        return left >= 0 or (right >= 0 and not self.causal)

    def visible_keys(self, row_start: int, row_stop: int) -> Tuple[int, int]:
        """Half-open key range ``[start, stop)`` any of rows ``[row_start, row_stop)`` can see."""
        left, right = self.window
        start = 0 if left < 0 else max(0, row_start + self.offset - left)
        stop = self.k_len if right < 0 else min(self.k_len, row_stop - 1 + self.offset + right + 1)
        return start, max(start, stop)

    def fully_visible(self, row_start: int, row_stop: int, key_start: int, key_stop: int) -> bool:
        """True when every key of the block is visible to every row of the block."""
        left, right = self.window
        if right >= 0 and key_stop - 1 > row_start + self.offset + right:
            return False
        if left >= 0 and key_start < row_stop - 1 + self.offset - left:
            return False
        return True

    def visible_pairs(self) -> int:
        """Number of (query, key) pairs the mask lets through, summed over rows."""
        rows = np.arange(self.q_len, dtype=np.int64) + self.offset
        left, right = self.window
        start = np.zeros_like(rows) if left < 0 else np.clip(rows - left, 0, self.k_len)
        stop = np.full_like(rows, self.k_len) if right < 0 else np.clip(rows + right + 1, 0, self.k_len)
        return int(np.maximum(stop - start, 0).sum())

    def flops(self) -> float:
        """Matrix FLOPs of the forward pass, counting only visible (query, key) pairs."""
        return 2.0 * self.batch * self.num_heads * self.visible_pairs() * (self.head_dim + self.v_head_dim)


def _shape_error(name: str, expected: str, got: Sequence[int]) -> ValueError:
    return ValueError(f"{name} must have shape {expected}; got shape {tuple(got)}")


def to_bhsd(x: mx.array, layout: str) -> mx.array:
    """View ``x`` in BHSD order from ``layout``."""
    return x if layout == "BHSD" else x.swapaxes(1, 2)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")


def normalize_window(window_size, causal: bool) -> Tuple[int, int]:
    """Validate ``window_size`` (a pair of Python or NumPy ints) and fold ``causal`` into its right edge."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"window_size must be a pair of ints (left, right); got {window_size!r}")
    left, right = (check_int(f"window_size[{i}]", w) for i, w in enumerate(window_size))
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded); got {window_size!r}")
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def check_options(
    scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    dropout_p: float = 0.0,
) -> Tuple[Optional[float], bool, Tuple[int, int], float, float]:
    """Validate the scalar options of an attention call (:func:`describe_attention`'s, and the layers'
    at construction): ``(scale, causal, window, softcap, dropout_p)`` as float/bool/int values, ``window``
    with ``causal`` folded into its right edge, ``scale`` None where it was."""
    scale = None if scale is None else check_real("softmax_scale", scale)
    causal = check_bool("causal", causal)
    window = normalize_window(window_size, causal)
    softcap, dropout_p = check_real("softcap", softcap), check_real("dropout_p", dropout_p)
    if softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0 disables); got {softcap!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
    return scale, causal, window, softcap, dropout_p


def describe_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    *,
    layout: str = "BHSD",
    scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    sinks: Optional[mx.array] = None,
    mask: Mask = None,
    dropout_p: float = 0.0,
    chunk_size: Optional[int] = None,
) -> AttentionSpec:
    """Validate an attention call and describe it.

    Args:
        q: queries, ``(batch, q_len, num_heads, head_dim)`` for ``layout="BSHD"`` or
            ``(batch, num_heads, q_len, head_dim)`` for ``"BHSD"``.
        k: keys, same layout with ``num_kv_heads`` heads and ``k_len`` positions.
        v: values, shaped like ``k`` (its last dimension may differ).
        layout: ``"BSHD"`` or ``"BHSD"``.
        scale: softmax scale (a Python or NumPy real number), default ``1 / sqrt(head_dim)``.
        causal: bottom-right aligned causal mask (a bool).
        window_size: ``(left, right)`` visible keys around the aligned position, ``-1`` unbounded.
        softcap: ``c`` in ``c * tanh(s / c)`` applied to scaled scores; ``0`` disables.
        alibi_slopes: ``(num_heads,)`` or ``(batch, num_heads)`` slopes; adds ``-slope * |i + Sk - Sq - j|``.
        sinks: ``(num_heads,)`` logits joining every row's softmax denominator.
        mask: ``"causal"``, or a boolean (True = visible) or additive float array broadcastable to
            ``(batch, num_heads, q_len, k_len)``.
        dropout_p: probability of dropping an attention weight, in ``[0, 1)``.
        chunk_size: key (and query) block size of the reference path.

    Raises:
        TypeError, ValueError: naming the argument and the expected shape or range.
    """
    check_layout(layout)
    names = ("q", "k", "v")
    if layout == "BSHD":
        expected = ("(batch, seqlen_q, num_heads, head_dim)", "(batch, seqlen_k, num_kv_heads, head_dim)",
                    "(batch, seqlen_k, num_kv_heads, head_dim_v)")
    else:
        expected = ("(batch, num_heads, seqlen_q, head_dim)", "(batch, num_kv_heads, seqlen_k, head_dim)",
                    "(batch, num_kv_heads, seqlen_k, head_dim_v)")
    for name, x, exp in zip(names, (q, k, v), expected):
        check_array(name, x, exp, ndim=4)
    check_same_dtype(names, (q, k, v))

    seq_axis, head_axis = (1, 2) if layout == "BSHD" else (2, 1)
    batch, num_heads, q_len, head_dim = q.shape[0], q.shape[head_axis], q.shape[seq_axis], q.shape[3]
    num_kv_heads, k_len = k.shape[head_axis], k.shape[seq_axis]
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise _shape_error("k", f"(batch={batch}, ..., head_dim={head_dim}) [{layout}]", k.shape)
    v_expected = list(k.shape[:3])
    if list(v.shape[:3]) != v_expected:
        raise _shape_error("v", f"{tuple(v_expected) + ('head_dim_v',)} matching k [{layout}]", v.shape)
    if min(batch, num_heads, num_kv_heads, head_dim, v.shape[3]) == 0:
        raise ValueError(f"q, k, v must have non-empty batch, heads and head_dim; got {q.shape}, {k.shape}, {v.shape}")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads of q ({num_heads}) must be a multiple of num_kv_heads of k and v ({num_kv_heads})"
        )

    scale, causal, window, softcap, dropout_p = check_options(scale, causal, window_size, softcap, dropout_p)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"mask must be 'causal', an mx.array or None; got {mask!r}")
        causal, window, mask = True, normalize_window(window, True), None
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)

    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, mx.array) or alibi_slopes.shape not in ((num_heads,), (batch, num_heads)):
            got = alibi_slopes.shape if isinstance(alibi_slopes, mx.array) else type(alibi_slopes).__name__
            raise ValueError(
                f"alibi_slopes must be an mx.array of shape ({num_heads},) or ({batch}, {num_heads}); got {got}"
            )
        alibi_slopes = alibi_slopes.astype(mx.float32)
    if sinks is not None:
        if not isinstance(sinks, mx.array) or sinks.shape != (num_heads,):
            got = sinks.shape if isinstance(sinks, mx.array) else type(sinks).__name__
            raise ValueError(f"sinks must be an mx.array of shape ({num_heads},); got {got}")
    if mask is not None:
        if not isinstance(mask, mx.array):
            raise TypeError(f"mask must be 'causal', an mx.array or None; got {type(mask).__name__}")
        # Masks are boolean (True = visible) or additive; 0/1 integers would silently add to the scores.
        full = (batch, num_heads, q_len, k_len)
        check_array("mask", mask, f"broadcastable to {full}", dtypes=(mx.bool_,) + FLOAT_DTYPES)
        try:
            mx.broadcast_shapes(mask.shape, full)
            ok = mask.ndim <= 4 and mx.broadcast_shapes(mask.shape, full) == full
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"mask must broadcast to (batch, num_heads, seqlen_q, seqlen_k) = {full}; got {mask.shape}")

    return AttentionSpec(
        batch=batch,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        q_len=q_len,
        k_len=k_len,
        head_dim=head_dim,
        v_head_dim=v.shape[3],
        dtype=q.dtype,
        scale=scale,
        causal=causal,
        window=window,
        softcap=softcap,
        alibi_slopes=alibi_slopes,
        sinks=sinks,
        mask=mask,
        dropout_p=dropout_p,
        chunk_size=None if chunk_size is None else int(chunk_size),
    )
