"""The float64 oracle of the attention tests, the naive low-precision baseline and the tolerance rule.

* :func:`attention64` -- dense softmax attention in float64 NumPy with every feature of DESIGN.md
  (scale, bottom-right causal, windows, softcap, ALiBi, GQA, sinks, boolean/additive masks, dropout
  through an explicit keep mask), its log-sum-exp, its probabilities and, given an output cotangent,
  the analytic gradients with respect to q, k and v.
* :func:`naive_attention` -- the same computation in plain MLX ops in the input dtype
  (``softmax(q @ k.T * scale + bias) @ v``): the error yardstick of flash-attention's tests.
* :func:`assert_within_rule` -- flash-attention's rule: our error against float64 may be at most
  twice the naive error plus a small floor.

Every array here is BHSD: ``q (B, Hq, Sq, D)``, ``k (B, Hk, Sk, D)``, ``v (B, Hk, Sk, Dv)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

FLOOR = {mx.float32: 1e-5, mx.float16: 1e-3, mx.bfloat16: 1e-3}
DTYPES = {"fp16": mx.float16, "bf16": mx.bfloat16, "fp32": mx.float32}


def f64(x) -> np.ndarray:
    """An MLX array (any float dtype) or array-like as float64 NumPy."""
    if isinstance(x, mx.array):
        x = x.astype(mx.float32)
    return np.array(x, dtype=np.float64)


def random_qkv(batch, q_len, k_len, heads, kv_heads, head_dim, dtype=mx.float32, v_dim=None, layout="BSHD"):
    """Fresh normal q, k, v in ``layout``, cast to ``dtype``."""
    v_dim = v_dim or head_dim

    def draw(seq, h, d):
        shape = (batch, seq, h, d) if layout == "BSHD" else (batch, h, seq, d)
        return mx.random.normal(shape).astype(dtype)

    return draw(q_len, heads, head_dim), draw(k_len, kv_heads, head_dim), draw(k_len, kv_heads, v_dim)


def bshd_to_bhsd64(*arrays):
    return [f64(a).swapaxes(1, 2) for a in arrays]


@dataclass
class Features:
    """The options of one attention call, in the oracle's terms."""

    scale: Optional[float] = None
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi_slopes: Optional[np.ndarray] = None  # (H,) or (B, H)
    sinks: Optional[np.ndarray] = None  # (H,)
    mask: Optional[np.ndarray] = None  # bool (True = visible) or additive, broadcastable to (B, H, Sq, Sk)
    keep: Optional[np.ndarray] = None  # bool (B, H, Sq, Sk) dropout keep mask
    dropout_p: float = 0.0


def visibility(q_len: int, k_len: int, causal: bool, window: Tuple[int, int]) -> np.ndarray:
    """(Sq, Sk) bool: query i sees key j, bottom-right aligned (DESIGN.md)."""
    pos = np.arange(q_len)[:, None] + (k_len - q_len)
    key = np.arange(k_len)[None, :]
    left, right = window
    visible = np.ones((q_len, k_len), bool)
    if causal:
        visible &= key <= pos
    if right >= 0:
        visible &= key <= pos + right
    if left >= 0:
        visible &= key >= pos - left
    return visible


def _scores(q, k, f: Features):
    """Float64 final scores (B, H, Sq, Sk) with -inf where hidden, and the softcap's tanh (for the VJP)."""
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    scale = f.scale if f.scale is not None else 1.0 / math.sqrt(dim)
    s = q @ k.swapaxes(-1, -2) * scale
    tanh = None
    if f.softcap > 0:
        tanh = np.tanh(s / f.softcap)
        s = f.softcap * tanh
    if f.alibi_slopes is not None:
        slopes = np.asarray(f.alibi_slopes, np.float64).reshape(-1, heads)[:, :, None, None]
        dist = np.abs(np.arange(q_len)[:, None] + (k_len - q_len) - np.arange(k_len)[None, :])
        s = s - slopes * dist
    visible = np.broadcast_to(visibility(q_len, k_len, f.causal, f.window), s.shape)
    if f.mask is not None:
        mask = np.asarray(f.mask)
        if mask.dtype == bool:
            visible = visible & np.broadcast_to(mask, s.shape)
        else:
            s = s + mask.astype(np.float64)
    s = np.where(visible, s, -np.inf)
    return s, tanh, scale


def attention64(q, k, v, f: Features = None, grad_out=None):
    """Float64 attention on BHSD NumPy arrays.

    Returns a dict with ``out`` (B, H, Sq, Dv), ``lse`` (B, H, Sq) (``-inf`` for rows with no
    visible key and no sink), ``probs`` (B, H, Sq, Sk) before dropout and, with ``grad_out``,
    ``dq``, ``dk``, ``dv`` (and ``dsinks`` with sinks) of ``sum(grad_out * out)``.
    """
    f = f or Features()
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    heads, kv_heads = q.shape[1], k.shape[1]
    groups = heads // kv_heads
    ke, ve = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    s, tanh, scale = _scores(q, ke, f)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    sink = None
    if f.sinks is not None:
        sink = np.asarray(f.sinks, np.float64)[None, :, None, None]
        m = np.maximum(m, sink)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(s - m)
    denom = e.sum(axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + np.exp(sink - m)
    seen = denom > 0
    p = e / np.where(seen, denom, 1.0)
    with np.errstate(divide="ignore"):
        lse = np.where(seen, m + np.log(np.where(seen, denom, 1.0)), -np.inf)[..., 0]
    weights = p
    if f.keep is not None:
        weights = np.where(f.keep, p / (1.0 - f.dropout_p), 0.0)
    out = weights @ ve
    result = {"out": out, "lse": lse, "probs": p}
    if grad_out is not None:
        g = np.asarray(grad_out, np.float64)
        dve = weights.swapaxes(-1, -2) @ g
        dw = g @ ve.swapaxes(-1, -2)
        dp = dw if f.keep is None else np.where(f.keep, dw / (1.0 - f.dropout_p), 0.0)
        # Softmax VJP; a sink has no value, so it adds nothing to the row sum.
        ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
        if tanh is not None:
            ds = ds * (1.0 - tanh**2)
        ds = ds * scale
        dke = ds.swapaxes(-1, -2) @ q
        shape = (q.shape[0], kv_heads, groups) + dke.shape[2:]
        result["dq"] = ds @ ke
        result["dk"] = dke.reshape(shape).sum(axis=2)
        result["dv"] = dve.reshape((q.shape[0], kv_heads, groups) + dve.shape[2:]).sum(axis=2)
        if sink is not None:  # every weight scales by the same factor: d out / d sink = -p_sink * out
            p_sink = np.exp(sink - m) / np.where(seen, denom, 1.0)
            result["dsinks"] = -(p_sink[..., 0] * (g * out).sum(axis=-1)).sum(axis=(0, 2))
    return result


def naive_attention(q, k, v, f: Features = None):
    """Plain MLX ops in the input dtype (BHSD): ``softmax(q @ k.T * scale + bias) @ v``.

    Differentiable; rows with no visible key give zeros (not NaN) so its gradients are usable too.
    Returns ``(out, lse, probs)`` (probs before dropout).
    """
    f = f or Features()
    dtype = q.dtype
    heads, kv_heads = q.shape[1], k.shape[1]
    groups = heads // kv_heads
    if groups > 1:
        k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
    q_len, k_len, dim = q.shape[2], k.shape[2], q.shape[3]
    scale = f.scale if f.scale is not None else 1.0 / math.sqrt(dim)
    s = (q @ k.swapaxes(-1, -2)) * mx.array(scale, dtype)
    if f.softcap > 0:
        c = mx.array(f.softcap, dtype)
        s = c * mx.tanh(s / c)
    if f.alibi_slopes is not None:
        slopes = mx.array(np.asarray(f.alibi_slopes).reshape(-1, heads)[:, :, None, None], dtype)
        dist = np.abs(np.arange(q_len)[:, None] + (k_len - q_len) - np.arange(k_len)[None, :])
        s = s - slopes * mx.array(dist, dtype)
    visible = mx.array(visibility(q_len, k_len, f.causal, f.window))
    if f.mask is not None:
        mask = np.asarray(f.mask)
        if mask.dtype == bool:
            visible = visible & mx.array(mask)
        else:
            s = s + mx.array(mask, dtype)
    visible = mx.broadcast_to(visible, s.shape)
    s = mx.where(visible, s, mx.array(-np.inf, dtype))
    if f.mask is not None and np.asarray(f.mask).dtype != bool:
        visible = visible & (s > -np.inf)
    has_key = visible.any(axis=-1, keepdims=True)
    s = mx.where(has_key, s, mx.array(0, dtype))
    if f.sinks is not None:
        sink = mx.broadcast_to(mx.array(np.asarray(f.sinks)[None, :, None, None], dtype), s.shape[:-1] + (1,))
        s = mx.concatenate([s, sink], axis=-1)
    lse = mx.logsumexp(s, axis=-1)
    p = mx.softmax(s, axis=-1)
    if f.sinks is not None:
        p = p[..., :-1]
        keyless = mx.where(has_key, mx.array(0, dtype), mx.array(-np.inf, dtype))[..., 0]
        lse = mx.logaddexp(lse + keyless, mx.array(np.asarray(f.sinks)[None, :, None], dtype))
    else:
        lse = mx.where(has_key[..., 0], lse, mx.array(-np.inf, dtype))
    p = mx.where(has_key, p, mx.array(0, dtype))
    w = p
    if f.keep is not None:
        w = mx.where(mx.array(f.keep), p * mx.array(1.0 / (1.0 - f.dropout_p), dtype), mx.array(0, dtype))
    return w @ v, lse, p


def max_error(x, ref) -> float:
    """Max |x - ref| over entries; infinities must coincide (same sign), NaN counts as infinite error."""
    x, ref = f64(x), np.asarray(ref, np.float64)
    assert x.shape == ref.shape, f"shape {x.shape} != reference shape {ref.shape}"
    inf = np.isinf(ref)
    if inf.any():
        assert np.array_equal(x[inf], ref[inf]), "infinite entries (rows without keys) differ from the reference"
    if np.isnan(x).any():
        return math.inf
    finite = ~inf
    return float(np.abs(x[finite] - ref[finite]).max()) if finite.any() else 0.0


def assert_within_rule(ours, ref, naive, dtype, what: str = "out") -> None:
    """flash-attention's tolerance rule: err(ours) <= 2 * err(naive in ``dtype``) + floor.

    The floor is ``FLOOR[dtype]`` in units of the reference's magnitude (at least 1): gradients
    reach magnitudes where a few float32 roundings exceed an absolute 1e-5.
    """
    err, naive_err = max_error(ours, ref), max_error(naive, ref)
    ref = np.asarray(ref, np.float64)
    finite = ref[np.isfinite(ref)]
    floor = FLOOR[dtype] * max(1.0, float(np.abs(finite).max()) if finite.size else 1.0)
    bound = 2 * naive_err + floor
    assert err <= bound, f"{what}: max error {err:.3g} > 2 * naive error {naive_err:.3g} + {floor:.3g} [{dtype}]"


# Named feature sets used across the tests: each maps to flash_attn_func options and oracle Features.
FEATURE_SETS = {
    "plain": {},
    "scale": {"scale": 0.37},
    "causal": {"causal": True},
    "window": {"window": (3, 2)},
    "window_left": {"window": (4, -1)},
    "window_right": {"window": (-1, 1)},
    "causal_window": {"causal": True, "window": (5, -1)},
    "softcap": {"softcap": 1.5, "scale": 0.6},
    "alibi": {"alibi": "H"},
    "alibi_batch": {"alibi": "BH"},
    "sinks": {"sinks": True},
    "causal_sinks": {"causal": True, "sinks": True},
    "softcap_alibi_window": {"softcap": 2.0, "alibi": "H", "window": (4, 1)},
    "everything": {"causal": True, "window": (6, -1), "softcap": 3.0, "alibi": "BH", "sinks": True, "scale": 0.3},
}


def draw_features(spec: dict, batch: int, heads: int):
    """Random ALiBi slopes / sinks for a feature set: ``(flash_attn_func kwargs, Features)``."""
    kwargs, f = {}, Features()
    if "scale" in spec:
        kwargs["softmax_scale"] = f.scale = spec["scale"]
    if spec.get("causal"):
        kwargs["causal"] = f.causal = True
    if "window" in spec:
        kwargs["window_size"] = f.window = spec["window"]
    if spec.get("softcap"):
        kwargs["softcap"] = f.softcap = spec["softcap"]
    if spec.get("alibi"):
        shape = (heads,) if spec["alibi"] == "H" else (batch, heads)
        slopes = mx.random.uniform(0.05, 1.0, shape)
        kwargs["alibi_slopes"], f.alibi_slopes = slopes, f64(slopes)
    if spec.get("sinks"):
        sinks = mx.random.normal((heads,))
        kwargs["sinks"], f.sinks = sinks, f64(sinks)
    return kwargs, f


def as_flash_attention_kwargs(kwargs: dict) -> dict:
    """flash_attn_func option names -> flash_attention's (``softmax_scale`` is ``scale`` there)."""
    kwargs = dict(kwargs)
    if "softmax_scale" in kwargs:
        kwargs["scale"] = kwargs.pop("softmax_scale")
    return kwargs


def check_against_reference(out, q, k, v, f: Features, lse=None, probs=None, layout="BSHD"):
    """Check ``out`` (and ``lse``, ``probs`` if given) of MLX ``q, k, v`` (in ``layout``) under the rule."""
    dtype = q.dtype
    if layout == "BSHD":
        q, k, v, out = (x.swapaxes(1, 2) for x in (q, k, v, out))
    ref = attention64(f64(q), f64(k), f64(v), f)
    naive_out, naive_lse, naive_probs = naive_attention(q, k, v, f)
    assert out.dtype == dtype, f"out dtype {out.dtype} != input dtype {dtype}"
    assert_within_rule(out, ref["out"], naive_out, dtype, "out")
    if lse is not None:
        assert lse.dtype == mx.float32, f"lse dtype {lse.dtype} is not float32"
        assert_within_rule(lse, ref["lse"], naive_lse, dtype, "lse")
    if probs is not None:
        assert probs.dtype == mx.float32, f"probs dtype {probs.dtype} is not float32"
        assert_within_rule(mx.abs(probs), ref["probs"], naive_probs, dtype, "probs")
    return ref
