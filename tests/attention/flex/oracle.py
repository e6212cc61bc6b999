"""The float64 oracle of the flex tests and the library's mods written again in NumPy.

:func:`flex64` is dense softmax attention in float64 with a score function and a visibility
array given on the full ``(B, H, Sq, Sk)`` index grid, its LSE and, given an output cotangent,
the analytic gradients (and d loss / d score-mod output, for gradients of captured tables).
:func:`naive_flex` is the same in the input dtype with MLX ops: the error yardstick of the rule.
``CASES`` pairs each mod of ``mods`` with an independent NumPy formula.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import mlx.core as mx
import numpy as np

from mlx_primitives.attention.flex import mods
from tests.reference import f64


def grids(batch: int, heads: int, q_len: int, k_len: int):
    """Broadcastable int64 ``b, h, q_idx, kv_idx`` grids of shape ``(B, H, Sq, Sk)``."""
    return (np.arange(batch).reshape(-1, 1, 1, 1), np.arange(heads).reshape(1, -1, 1, 1),
            np.arange(q_len).reshape(1, 1, -1, 1), np.arange(k_len).reshape(1, 1, 1, -1))


def _expand(q, k, v):
    groups = q.shape[1] // k.shape[1]
    return np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1), groups


def flex64(q, k, v, scale: float, score_fn: Optional[Callable] = None, visible: Optional[np.ndarray] = None,
           score_grad: Optional[Callable] = None, grad_out=None) -> Dict[str, np.ndarray]:
    """Dense float64 flex attention; BHSD inputs (MLX arrays). ``score_fn(s, b, h, q, kv)`` and its
    derivative ``score_grad`` (default 1) act on NumPy float64; ``visible`` broadcasts to (B, H, Sq, Sk)."""
    q, k, v = f64(q), f64(k), f64(v)
    k, v, groups = _expand(q, k, v)
    b, h, qi, ki = grids(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    raw = scale * q @ k.swapaxes(-1, -2)
    s = raw if score_fn is None else np.broadcast_to(score_fn(raw, b, h, qi, ki), raw.shape)
    vis = np.ones(s.shape, bool) if visible is None else np.broadcast_to(visible, s.shape)
    s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(vis, np.exp(s - m), 0.0)
    denom = e.sum(axis=-1, keepdims=True)
    seen = denom > 0
    p = e / np.where(seen, denom, 1.0)
    result = {"out": p @ v, "lse": np.where(seen[..., 0], (m + np.log(np.where(seen, denom, 1.0)))[..., 0], -np.inf)}
    if grad_out is not None:
        g = f64(grad_out)
        dp = g @ v.swapaxes(-1, -2)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
        result["dscore"] = ds
        if score_grad is not None:
            ds = ds * np.broadcast_to(score_grad(raw, b, h, qi, ki), ds.shape)
        dq = scale * ds @ k
        dk = scale * ds.swapaxes(-1, -2) @ q
        dv = p.swapaxes(-1, -2) @ g
        shape = (q.shape[0], q.shape[1] // groups, groups) + dk.shape[2:]
        result.update(dq=dq, dk=dk.reshape(shape).sum(axis=2), dv=dv.reshape(shape[:3] + dv.shape[2:]).sum(axis=2))
    return result


def naive_flex(q, k, v, scale: float, score_fn: Optional[Callable] = None, visible: Optional[np.ndarray] = None):
    """Dense attention in the input dtype: scores rounded to it, the NumPy mods applied, softmax and PV in it."""
    dtype = q.dtype
    groups = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
    s = (q @ k.swapaxes(-1, -2)) * mx.array(scale, dtype)
    if score_fn is not None:
        b, h, qi, ki = grids(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        s = mx.array(np.broadcast_to(score_fn(f64(s), b, h, qi, ki), s.shape).astype(np.float32)).astype(dtype)
    if visible is not None:
        s = mx.where(mx.array(np.broadcast_to(visible, s.shape)), s, mx.array(-np.inf, dtype))
    m = mx.max(s, axis=-1, keepdims=True)
    m = mx.where(mx.isinf(m), mx.array(0.0, dtype), m)
    e = mx.exp(s - m)
    denom = e.sum(axis=-1, keepdims=True)
    p = e / mx.where(denom > 0, denom, mx.array(1.0, dtype))
    return p @ v


def case(name: str, batch: int, heads: int, seq_len: int):
    """``(score_mod, mask_mod, score_fn, score_grad, visible_fn)`` of a named library case; random
    parameters (document ids, slopes, tables) drawn fresh."""
    rng = np.random.default_rng(int(mx.random.randint(0, 2**30, ()).item()))
    if name == "causal":
        return None, mods.causal(), None, None, lambda b, h, q, k: q >= k
    if name == "sliding_window":
        return None, mods.sliding_window(9), None, None, lambda b, h, q, k: (q >= k) & (q - k <= 9)
    if name == "prefix_lm":
        return None, mods.prefix_lm(37), None, None, lambda b, h, q, k: (k < 37) | (q >= k)
    if name == "prefix_lm_per_sequence":
        prefix = rng.integers(0, seq_len, batch)
        return (None, mods.prefix_lm(mx.array(prefix, mx.int32)), None, None,
                lambda b, h, q, k: (k < prefix.reshape(-1, 1, 1, 1)) | (q >= k))
    if name in ("document", "document_causal"):
        ids = np.sort(rng.integers(0, 5, seq_len))
        causal = name == "document_causal"

        def visible(b, h, q, k):
            same = ids[q] == ids[k]
            return same & (q >= k) if causal else same

        return None, mods.document(mx.array(ids, mx.int32), causal=causal), None, None, visible
    if name == "alibi":
        slopes = rng.uniform(0.01, 0.3, heads)
        return (mods.alibi(mx.array(slopes, mx.float32)), None,
                lambda s, b, h, q, k: s - slopes.astype(np.float32)[h] * np.abs(q - k), None, None)
    if name == "softcap":
        return (mods.softcap(2.0), None, lambda s, b, h, q, k: 2.0 * np.tanh(s / 2.0),
                lambda s, b, h, q, k: 1.0 - np.tanh(s / 2.0) ** 2, None)
    if name == "relative_position_bias":
        table = rng.normal(size=(heads, 2 * 5 + 1)).astype(np.float32)
        return (mods.relative_position_bias(mx.array(table), 5), None,
                lambda s, b, h, q, k: s + table[h, np.clip(k - q, -5, 5) + 5], None, None)
    if name == "gemma2":
        score_mod, mask_mod = mods.gemma2(cap=1.5)
        return (score_mod, mask_mod, lambda s, b, h, q, k: 1.5 * np.tanh(s / 1.5),
                lambda s, b, h, q, k: 1.0 - np.tanh(s / 1.5) ** 2, lambda b, h, q, k: q >= k)
    raise KeyError(name)


# A filterwarnings mark: the launcher's warning (a kernel failed to compile, the reference ran) fails the test.
KERNEL_FALLBACK_IS_AN_ERROR = "error:mlx_primitives. kernel:RuntimeWarning"

CASE_NAMES = ("causal", "sliding_window", "prefix_lm", "prefix_lm_per_sequence", "document", "document_causal",
              "alibi", "softcap", "relative_position_bias", "gemma2")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
