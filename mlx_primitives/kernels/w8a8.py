"""W8A8 linear: per-token INT8 activations times per-channel INT8 weights, exact int32 products.

``w8a8_linear(x, w_q, w_scale)`` quantizes each row (token) of ``x`` symmetrically to int8 with its
own scale, multiplies by the int8 weight on the s8 matrix unit (``src/w8a8.kern``: CUDA
``mma.sync.m16n8k32.s8``; Metal through half tiles, still exact), and applies the scales, an
optional bias and activation in fp32 before writing the input dtype.

On Hopper (sm_90) the product runs on the warpgroup unit instead, whatever the row count
(``src/w8a8_wg.kern``: ``wgmma.mma_async.m64nNk32.s8`` from operand tiles in the 128-byte swizzle,
warp-specialized: producer warps copy K stages with cp.async while two consumer warpgroups multiply,
handing buffers back and forth through pipe barriers). Its body is written once: the warpgroup tile
primitive and the pipe barriers live in the dialect headers (``wgmma_cuda.inc`` / ``pipe_cuda.inc``:
wgmma and mbarriers; ``wgmma_metal.inc`` / ``pipe_metal.inc``: the same contracts on Metal's simdgroup
matrices and threadgroup atomics, compiled by the Metal check but not routed to, as one stage exceeds
Apple threadgroup memory). Activations are quantized per token in one pass on the GPU
(``src/quantize_rows.kern``). The reference path (CPU, or a kernel that cannot run) computes the same
integer product exactly: float32 matrix products over K-slices of 1024 (every partial sum an integer
below 2^24) summed in int32.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import mlx.core as mx

from . import catalog
from .launcher import BoundLaunch, Launch, div_vec
from .norms import MAX_DIMS, default_threads_per_row
from .quantization import quantize_int8
from .tuning import config_for
from ..hardware import LARGEST_DYNAMIC_SHARED_MEMORY, device_profile, dynamic_shared_memory
from ..memo import CallMemo
from ..validation import FLOAT_DTYPES, check_array

# The ACT template value of w8a8.kern per activation.
ACTIVATIONS = {None: 0, "relu": 1, "silu": 2, "gelu": 3}
PATHS = ("auto", "kernel", "warpgroup", "reference")
K_ALIGN = 16  # the kernel reads rows in 16-byte chunks
EXACT_SLICE = 1024  # 1024 * 128 * 128 = 2^24: float32 sums of int8 products stay exact
# Threads per row of quantize_rows.kern at most: H100, 4096 fp16 columns, GPU time at M = 1024 / 4096 / 8192:
# 15.7 / 38.7 / 60.0 us with 256 against 18.6 / 41.5 / 67.0 with the norms' 512 (128: 16.6 / 37.4 / 61.9); a
# second run 58.8 against 62.4 at M = 8192. A few percent of w8a8_linear; the row's division stays (exact bytes).
QUANTIZE_THREADS = 256
# Prepared launches by everything a call's meaning depends on besides array values (sizes, dtypes, options):
# a model repeats a few shapes, and the tuning lookup and launch set-up cost ~20 us of Python per call.
_CALLS = CallMemo(256)


def plan_quantize(x: mx.array) -> Launch:
    """The launch of quantize_rows.kern over the rows of ``x`` ``(M, K)``."""
    rows, dims = x.shape
    vec = div_vec(dims, x.dtype.size)
    threads = min(QUANTIZE_THREADS, default_threads_per_row(dims, vec))
    return Launch(
        kernel=catalog.QUANTIZE_ROWS,
        inputs=[x],
        template=[("T", x.dtype), ("D", dims), ("TPR", threads), ("VEC", vec)],
        grid=(rows * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(rows, dims), (rows,)],
        output_dtypes=[mx.int8, mx.float32],
    )


def quantize_per_token(x: mx.array) -> Tuple[mx.array, mx.array]:
    """Symmetric int8 rows of ``x`` ``(M, K)``: ``(x_q (M, K) int8, x_scale (M,) float32)``.

    :func:`~.quantization.quantize_int8` per channel, in one pass on the GPU (``src/quantize_rows.kern``,
    the same bytes).
    """

    def reference():
        q = quantize_int8(x, granularity="channel")
        return [q.values, q.scales]

    if x.size == 0 or x.shape[1] > MAX_DIMS:
        return tuple(reference())
    key = ("quantize", x.shape, x.dtype, device_profile().backend)
    bound = _CALLS.get(key, lambda: BoundLaunch(plan_quantize(x)))
    values, scales = bound([x], reference)
    return values, scales


def _int8_product(x_q: mx.array, w_q: mx.array) -> mx.array:
    """``x_q @ w_q^T`` exactly, int32 ``(M, N)``."""
    parts = [
        (x_q[:, k0:k0 + EXACT_SLICE].astype(mx.float32) @ w_q[:, k0:k0 + EXACT_SLICE].astype(mx.float32).T)
        .astype(mx.int32)
        for k0 in range(0, x_q.shape[1], EXACT_SLICE)
    ]
    return functools.reduce(mx.add, parts)


def epilogue(acc: mx.array, x_scale, w_scale, bias, activation: Optional[str], dtype) -> mx.array:
    """The kernel's fp32 epilogue on the int32 product, in the same order of operations."""
    v = acc.astype(mx.float32) * x_scale[:, None] * w_scale[None, :]
    if bias is not None:
        v = v + bias.astype(mx.float32)
    if activation == "relu":
        v = mx.maximum(v, 0.0)
    elif activation == "silu":
        v = v * mx.sigmoid(v)
    elif activation == "gelu":
        v = 0.5 * v * (1.0 + mx.erf(v / math.sqrt(2.0)))
    return v.astype(dtype)


def reference(x_q, x_scale, w_q, w_scale, bias, activation, dtype) -> mx.array:
    """The W8A8 product in MLX ops, exact in its integer part."""
    return epilogue(_int8_product(x_q, w_q), x_scale, w_scale, bias, activation, dtype)


def _pad_k(q: mx.array) -> mx.array:
    extra = -q.shape[1] % K_ALIGN
    return mx.pad(q, [(0, 0), (0, extra)]) if extra else q


def plan(x_q, x_scale, w_q, w_scale, bias, activation, dtype, config=None) -> Launch:
    """The launch of w8a8.kern; ``x_q`` (M, K) and ``w_q`` (N, K) int8, K a multiple of 16."""
    (m, k), n = x_q.shape, w_q.shape[0]
    config = {**config_for(catalog.W8A8, dtype, {"M": m, "N": n, "K": k}), **(config or {})}
    threads = config["WM"] * config["WN"] * 32
    has_bias = bias is not None
    return Launch(
        kernel=catalog.W8A8,
        inputs=[x_q.view(mx.uint32), w_q.view(mx.uint32), x_scale, w_scale,
                bias if has_bias else mx.zeros((1,), dtype)],
        template=[("T", dtype)] + [(name, config[name]) for name in ("BM", "BN", "WM", "WN")]
        + [("BIAS", int(has_bias)), ("ACT", ACTIVATIONS[activation])],
        grid=(-(-n // config["BN"]) * threads, -(-m // config["BM"]), 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[dtype],
    )


# GROUPS of a launch where the SM count is unknown: more than any tile count, so each threadgroup takes one tile.
ONE_TILE_EACH = 1 << 24


def warpgroup_shared_memory(config: dict, dtype: mx.Dtype) -> int:
    """Bytes of shared memory of a w8a8_wg.kern launch: the stage buffers, both warpgroups' staging of 32
    output rows (padded by 16 bytes), 1024 to align them, and 16 per pipe barrier (2 per stage, 2 more)."""
    staging = 2 * 32 * (config["BN"] * dtype.size + 16)
    return config["STAGES"] * (128 + config["BN"]) * 128 + staging + 1024 + (2 * config["STAGES"] + 2) * 16


def plan_warpgroup(x_q, x_scale, w_q, w_scale, bias, activation, dtype, config=None) -> Launch:
    """The launch of w8a8_wg.kern (sm_90 warpgroup unit); operands as in :func:`plan`. Where the stages of the
    config leave too little shared memory for a float32 output's staging, it takes fewer stages."""
    (m, k), n = x_q.shape, w_q.shape[0]
    config = {**config_for(catalog.W8A8_WG, dtype, {"M": m, "N": n, "K": k}), **(config or {})}
    limit = dynamic_shared_memory() if device_profile().backend == "cuda" else LARGEST_DYNAMIC_SHARED_MEMORY
    while config["STAGES"] > 2 and warpgroup_shared_memory(config, dtype) > limit:
        config = {**config, "STAGES": config["STAGES"] - 1}
    has_bias = bias is not None
    threads = 256 + 32 * config["PW"]  # two consumer warpgroups, then the producer warps
    tiles = -(-n // config["BN"]) * -(-m // 128)
    groups = device_profile().gpu_cores or ONE_TILE_EACH
    return Launch(
        kernel=catalog.W8A8_WG,
        inputs=[x_q.view(mx.uint32), w_q.view(mx.uint32), x_scale, w_scale,
                bias if has_bias else mx.zeros((1,), dtype)],
        template=[("T", dtype), ("BN", config["BN"]), ("STAGES", config["STAGES"]), ("PW", config["PW"]),
                  ("GROUPS", groups), ("BIAS", int(has_bias)), ("ACT", ACTIVATIONS[activation])],
        grid=(min(tiles, groups) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[dtype],
        shared_memory=warpgroup_shared_memory(config, dtype),
    )


def _route(path: str) -> str:
    """``"kernel"`` or ``"warpgroup"`` for a GPU call. "auto" takes the warpgroup kernel on sm_90, measured
    faster than mma.sync and than MLX's fp16 ``@`` at every row count timed (H100, 4096 x 4096, M = 1-8192:
    results/h100/quantization.md)."""
    if path != "auto":
        return path
    return "warpgroup" if device_profile().family == "sm_90" else "kernel"


def _check_weights(w_q, w_scale, bias, dims: int) -> int:
    check_array("w_q", w_q, f"(out_features, {dims})", ndim=2, dtypes=(mx.int8,))
    if w_q.shape[1] != dims:
        raise ValueError(f"w_q must have shape (out_features, {dims}); got {tuple(w_q.shape)}")
    n = w_q.shape[0]
    check_array("w_scale", w_scale, f"({n},)", shape=(n,), dtypes=(mx.float32,))
    if bias is not None:
        check_array("bias", bias, f"({n},)", shape=(n,))
    return n


def w8a8_matmul(
    x_q: mx.array,
    x_scale: mx.array,
    w_q: mx.array,
    w_scale: mx.array,
    bias: Optional[mx.array] = None,
    *,
    activation: Optional[str] = None,
    dtype: mx.Dtype = mx.float16,
    path: str = "auto",
    config: Optional[dict] = None,
) -> mx.array:
    """``act((x_q @ w_q^T) * x_scale[:, None] * w_scale + bias)`` from int8 operands.

    Args:
        x_q (array): ``(M, K)`` int8 activations.
        x_scale (array): ``(M,)`` float32 per-row (per-token) scales.
        w_q (array): ``(N, K)`` int8 weights (a Linear's ``(out, in)`` layout).
        w_scale (array): ``(N,)`` float32 per-output-channel scales.
        bias (array, optional): ``(N,)``, added in fp32.
        activation (str, optional): ``None``, ``"relu"``, ``"silu"`` or ``"gelu"`` (erf), fused.
        dtype: output dtype (float16, bfloat16 or float32). Default: ``float16``.
        path (str): ``"auto"`` (the fastest kernel for the device and rows), ``"kernel"`` (mma.sync),
            ``"warpgroup"`` (sm_90 wgmma) or ``"reference"``.
        config (dict, optional): tiling, ``{"BM", "BN", "WM", "WN"}`` (catalog.W8A8) for the mma.sync
            kernel, ``{"BN", "STAGES", "PW"}`` (catalog.W8A8_WG) for the warpgroup one.

    Returns:
        ``(M, N)`` array of ``dtype``.
    """
    check_array("x_q", x_q, "(M, K)", ndim=2, dtypes=(mx.int8,))
    m, k = x_q.shape
    check_array("x_scale", x_scale, f"({m},)", shape=(m,), dtypes=(mx.float32,))
    _check_weights(w_q, w_scale, bias, k)
    _check_options(activation, dtype, path)
    return _product(x_q, x_scale, w_q, w_scale, bias, activation, dtype, path, config)


def _check_options(activation, dtype, path: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32; got {dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}; got {activation!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")


def _product(x_q, x_scale, w_q, w_scale, bias, activation, dtype, path: str, config) -> mx.array:
    """:func:`w8a8_matmul` of checked arguments."""
    if bias is not None:
        bias = bias.astype(dtype)

    def ref():
        return [reference(x_q, x_scale, w_q, w_scale, bias, activation, dtype)]

    if path == "reference" or x_q.size == 0 or w_q.shape[0] == 0:
        return ref()[0]
    x_padded, w_padded = _pad_k(x_q), _pad_k(w_q)
    key = ("matmul", x_padded.shape, w_padded.shape, dtype, bias is not None, activation, path,
           tuple(sorted(config.items())) if config else None, device_profile().backend)

    def prepare():
        make_plan = plan_warpgroup if _route(path) == "warpgroup" else plan
        launch_plan = make_plan(x_padded, x_scale, w_padded, w_scale, bias, activation, dtype, config)
        return BoundLaunch(launch_plan), launch_plan.inputs[-1]

    bound, bias_input = _CALLS.get(key, prepare)
    inputs = [x_padded.view(mx.uint32), w_padded.view(mx.uint32), x_scale, w_scale,
              bias_input if bias is None else bias]
    return bound(inputs, ref)[0]


def w8a8_linear(
    x: mx.array,
    w_q: mx.array,
    w_scale: mx.array,
    bias: Optional[mx.array] = None,
    *,
    activation: Optional[str] = None,
    path: str = "auto",
    config: Optional[dict] = None,
) -> mx.array:
    """A Linear layer in W8A8: ``x`` quantized per token, then :func:`w8a8_matmul`.

    Args:
        x (array): ``(..., K)`` float activations.
        w_q (array): ``(N, K)`` int8 weights, e.g. ``quantize_int8(weight).values``.
        w_scale (array): ``(N,)`` float32 per-output-channel scales.
        bias, activation, path, config: as in :func:`w8a8_matmul`.

    Returns:
        ``(..., N)`` array of ``x``'s dtype.
    """
    check_array("w_q", w_q, "(out_features, in_features)", ndim=2, dtypes=(mx.int8,))
    dims = w_q.shape[1]
    check_array("x", x, f"(..., {dims})", min_ndim=1)
    if x.shape[-1] != dims:
        raise ValueError(f"x must have shape (..., {dims}) (w_q's in_features); got {tuple(x.shape)}")
    _check_weights(w_q, w_scale, bias, dims)
    _check_options(activation, x.dtype, path)
    x_q, x_scale = quantize_per_token(x.reshape(-1, dims))
    out = _product(x_q, x_scale, w_q, w_scale, bias, activation, x.dtype, path, config)
    return out.reshape(*x.shape[:-1], w_q.shape[0])


def compile_examples():
    """Launches covering every tunable configuration, both half dtypes, bias and each activation, and the
    row quantization of each float dtype."""
    for dtype in FLOAT_DTYPES:
        yield plan_quantize(mx.zeros((3, 4096), dtype))
        yield plan_quantize(mx.zeros((3, 40), dtype))
    x_q, w_q = mx.zeros((37, 48), mx.int8), mx.zeros((29, 48), mx.int8)
    x_scale, w_scale = mx.ones((37,)), mx.ones((29,))
    for config in catalog.W8A8.configs():
        yield plan(x_q, x_scale, w_q, w_scale, None, None, mx.float16, config)
    for activation in ACTIVATIONS:
        yield plan(x_q, x_scale, w_q, w_scale, mx.zeros((29,), mx.bfloat16), activation, mx.bfloat16)
    for config in catalog.W8A8_WG.configs():
        yield plan_warpgroup(x_q, x_scale, w_q, w_scale, None, None, mx.float16, config)
    for activation in ACTIVATIONS:
        yield plan_warpgroup(x_q, x_scale, w_q, w_scale, mx.zeros((29,), mx.bfloat16), activation, mx.bfloat16)
