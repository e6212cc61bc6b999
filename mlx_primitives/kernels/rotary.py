"""Rotary position embedding of queries and keys in one launch.

``rope(q, k, dims)`` rotates both with the angles of one position table: a thread computes the
sines and cosines of its pairs once and applies them to several heads of q and of k, where two
``mx.fast.rope`` calls compute them per tensor and launch twice. Offsets may differ per batch
entry (decode with ragged caches).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple, Union

import mlx.core as mx

from . import catalog
from .launcher import Launch, float_bits, launch, with_reference_vjp
from .tuning import config_for
from ..validation import (check_array, check_bool, check_choice, check_int, check_positive_real, check_real,
                          check_same_dtype, is_int)

PATHS = ("auto", "kernel", "fast", "reference")

# path="auto" runs the kernel from this many elements of q and k together; below it (decode) the two
# mx.fast.rope calls win on the H100 because the launcher's Python cost is not hidden by GPU time.
AUTO_MIN_ELEMENTS = 1 << 20


def _pairs_per_thread(dims: int, dim: int, itemsize: int) -> int:
    """Widest VP (pairs per thread, access of at most 16 bytes) dividing dims / 2 and dim - dims."""
    vp = 8 if itemsize == 2 else 4
    while vp > 1 and ((dims // 2) % vp or (dim - dims) % vp):
        vp //= 2
    return vp


def plan(q, k, offsets, dims: int, traditional: bool, base: float, scale: float, config=None) -> Launch:
    """The launch of rope.kern over q (B, Hq, L, D), k (B, Hk, L, D), offsets (B,) int32."""
    batch, hq, length, dim = q.shape
    hk = k.shape[1]
    problem = {"L": length, "H": hq + hk, "D": dim}
    config = {**config_for(catalog.ROPE, q.dtype, problem, exact=("H", "D")), **(config or {})}
    vp = _pairs_per_thread(dims, dim, q.dtype.size)
    if traditional:  # a thread's pairs are 2 * VP contiguous elements: keep that within 16 bytes
        vp = max(1, min(vp, 8 // q.dtype.size))
    units = dims // 2 // vp + (dim - dims) // vp
    groups = -(-(hq + hk) // config["HPT"])
    threads = config["THREADS"]
    total = batch * groups * length * units
    return Launch(
        kernel=catalog.ROPE,
        inputs=[q, k, offsets],
        template=[("T", q.dtype), ("D", dim), ("DIMS", dims), ("VP", vp), ("HPT", config["HPT"]),
                  ("HQ", hq), ("HK", hk), ("THREADS", threads), ("TRADITIONAL", traditional),
                  ("LOG2_BASE_BITS", float_bits(math.log2(base))), ("SCALE_BITS", float_bits(scale))],
        grid=(-(-total // threads) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[q.shape, k.shape],
        output_dtypes=[q.dtype, k.dtype],
    )


def reference(x, offsets, dims: int, traditional: bool, base: Optional[float], scale: float,
              freqs: Optional[mx.array] = None):
    """RoPE of x (B, H, L, D) in MLX ops (float32 angles), offsets (B,); pair j's wavelength is
    ``freqs[j]`` where given (``mx.fast.rope``'s ``freqs``), else ``base ** (2j / dims)``."""
    half = dims // 2
    positions = (offsets.astype(mx.float32)[:, None] + mx.arange(x.shape[2], dtype=mx.float32)[None]) * scale
    if freqs is None:
        inv_freq = mx.power(base, -mx.arange(half, dtype=mx.float32) / half)
    else:
        inv_freq = 1.0 / freqs.astype(mx.float32)
    theta = positions[:, None, :, None] * inv_freq  # (B, 1, L, half)
    cos, sin = mx.cos(theta), mx.sin(theta)
    x32 = x.astype(mx.float32)
    if traditional:
        x1, x2 = x32[..., 0:dims:2], x32[..., 1:dims:2]
        rotated = mx.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(*x.shape[:-1], dims)
    else:
        x1, x2 = x32[..., :half], x32[..., half:dims]
        rotated = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return mx.concatenate([rotated.astype(x.dtype), x[..., dims:]], axis=-1)


@functools.lru_cache(maxsize=256)
def _function(dims: int, traditional: bool, base: float, scale: float, config: Optional[tuple]):
    def ref(q, k, offsets):
        return (reference(q, offsets, dims, traditional, base, scale),
                reference(k, offsets, dims, traditional, base, scale))

    def forward(q, k, offsets):
        launch_plan = plan(q, k, offsets, dims, traditional, base, scale, dict(config or ()))
        return tuple(launch(launch_plan, lambda: list(ref(q, k, offsets))))

    return with_reference_vjp(forward, ref)


def rope(
    q: mx.array,
    k: mx.array,
    dims: int,
    *,
    traditional: bool = False,
    base: float = 10000.0,
    scale: float = 1.0,
    offset: Union[int, mx.array] = 0,
    freqs: Optional[mx.array] = None,
    path: str = "auto",
    config: Optional[dict] = None,
) -> Tuple[mx.array, mx.array]:
    """Rotary position embedding of queries and keys (as ``mx.fast.rope`` on each), in one launch.

    Row ``l`` of batch entry ``b`` sits at position ``offset[b] + l``; pair ``j`` rotates by
    ``scale * position * base ** (-2j / dims)``. Features beyond ``dims`` pass through.

    Args:
        q (array): queries ``(batch, q_heads, seq_len, head_dim)``, float16, bfloat16 or float32.
        k (array): keys ``(batch, kv_heads, seq_len, head_dim)``, same dtype.
        dims (int): rotated features, even, ``<= head_dim``.
        traditional (bool): rotate pairs ``(2j, 2j+1)`` instead of ``(j, j + dims/2)``. Default: ``False``.
        base (float): base of the angular frequencies. Default: ``10000``.
        scale (float): multiplies the positions. Default: ``1``.
        offset (int or array): first position: an int, or an int array ``(batch,)`` (one per batch
            entry, as mlx-lm's batched caches hold it), ``(1,)`` or ``()``.
        freqs (array, optional): ``(dims // 2,)`` wavelengths replacing ``base ** (2j / dims)``, as
            ``mx.fast.rope``'s ``freqs`` (mlx-lm's Llama 3, YaRN and LongRoPE scalings); ``base`` is then
            unused. The kernel computes its angles from ``base``: with ``freqs``, ``"auto"`` runs ``"fast"``.
        path (str): ``"auto"`` (the kernel for large q and k, two ``mx.fast.rope`` calls for decode
            sizes), ``"kernel"``, ``"fast"`` or ``"reference"`` (MLX ops).
        config (dict, optional): template values, e.g. ``{"HPT": 4, "THREADS": 256}``.

    Returns:
        ``(q_rotated, k_rotated)`` with the shapes and dtype of ``q`` and ``k``.
    """
    check_array("q", q, "(batch, q_heads, seq_len, head_dim)", ndim=4)
    batch, _, length, dim = q.shape
    check_array("k", k, f"(batch, kv_heads, seq_len, head_dim) = ({batch}, kv_heads, {length}, {dim})", ndim=4)
    if k.shape[0] != batch or k.shape[2] != length or k.shape[3] != dim:
        raise ValueError(f"k must have shape ({batch}, kv_heads, {length}, {dim}) to match q; got {tuple(k.shape)}")
    check_same_dtype(("q", "k"), (q, k))
    dims = check_int("dims", dims)
    if dims <= 0 or dims % 2 or dims > dim:
        raise ValueError(f"dims must be an even int in [2, head_dim={dim}]; got {dims!r}")
    traditional = check_bool("traditional", traditional)
    scale = check_real("scale", scale)
    check_choice("path", path, PATHS)
    if freqs is None:
        base = check_positive_real("base", base)
    else:
        check_array("freqs", freqs, f"(dims // 2,) = ({dims // 2},)", shape=(dims // 2,))
        if path == "kernel":
            raise ValueError("path='kernel' computes its angles from base; with freqs use path 'auto', 'fast' "
                             "or 'reference'")
        base = None
    offset, offsets = _offsets(offset, batch)

    if path == "auto":
        path = "kernel" if freqs is None and q.size + k.size >= AUTO_MIN_ELEMENTS else "fast"
    if path == "fast":
        return tuple(mx.fast.rope(t, dims, traditional=traditional, base=base, scale=scale, offset=offset,
                                  freqs=freqs) for t in (q, k))
    if path == "reference" or q.size == 0 or k.size == 0:
        return (reference(q, offsets, dims, traditional, base, scale, freqs),
                reference(k, offsets, dims, traditional, base, scale, freqs))
    key = tuple(sorted(config.items())) if config else None
    return _function(dims, traditional, base, scale, key)(q, k, offsets)


def _offsets(offset, batch: int) -> Tuple[Union[int, mx.array], mx.array]:
    """``offset`` as ``mx.fast.rope`` takes it (an int, or an int32 array) and as int32 offsets ``(batch,)``."""
    expected = f"(batch,) = ({batch},), (1,) or ()"
    if isinstance(offset, mx.array):
        check_array("offset", offset, expected, dtypes=(mx.int32, mx.int64, mx.uint32))
        if offset.shape not in ((), (1,), (batch,)):
            raise ValueError(f"offset must have shape {expected}; got {tuple(offset.shape)}")
        offset = offset.astype(mx.int32)
        return offset, mx.broadcast_to(offset, (batch,))
    if not is_int(offset):
        raise TypeError(f"offset must be an int or an int array of shape {expected}; got {type(offset).__name__}")
    return int(offset), mx.full((batch,), int(offset), mx.int32)


def compile_examples():
    """Launches covering every dtype and tunable configuration (for the Metal compile check)."""
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        for traditional in (False, True):
            for shape, dims in (((2, 4, 5, 64), 64), ((1, 3, 2, 80), 32)):
                q = mx.zeros(shape, dtype)
                k = mx.zeros((shape[0], 2) + shape[2:], dtype)
                for config in catalog.ROPE.configs():
                    yield plan(q, k, mx.zeros((shape[0],), mx.int32), dims, traditional, 10000.0, 1.0, config)
