"""RMSNorm and LayerNorm over the last axis, optionally fused with the residual add of a pre-norm block.

``rms_norm(x, weight, eps, residual=r)`` returns ``(norm(x + r), x + r)``: the sum is written once
and normalised from registers, instead of one pass for the add and two for the norm. Without a
residual the op is ``mx.fast.rms_norm`` / ``mx.fast.layer_norm`` already; ``path="auto"`` routes to
whichever measured faster (benchmarks/kernels.py, table "Routing").
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import mlx.core as mx

from . import catalog
from .launcher import Kernel, Launch, div_vec, float_bits, launch, next_pow2, with_reference_vjp
from .tuning import config_for
from ..validation import check_array, check_positive_real, check_same_dtype

PATHS = ("auto", "kernel", "fast", "reference")

# The register cache of a row holds D / TPR floats per thread; beyond this the kernel is not used.
MAX_DIMS = 64 * 1024

# What path="auto" runs, by measurement on the H100 (benchmarks/results/h100/kernels.md, "Routing"):
# mx.fast.rms_norm is as fast as the kernel without a residual; the kernel wins for LayerNorm and for
# the residual variants once the tensor is large enough that the launcher's Python cost (~30 us
# more than a bare mx.fast call) is hidden behind the GPU time.
AUTO_KERNEL = {("rms_norm", False): False, ("rms_norm", True): True,
               ("layer_norm", False): True, ("layer_norm", True): True}
AUTO_MIN_ELEMENTS = 1 << 20


def auto_path(name: str, residual: bool, size: int) -> str:
    """The path ``path="auto"`` takes for op ``name`` over ``size`` elements."""
    return "kernel" if AUTO_KERNEL[(name, residual)] and size >= AUTO_MIN_ELEMENTS else "fast"


def default_threads_per_row(dims: int, vec: int) -> int:
    """One access of ``vec`` elements per thread where 1024 threads allow it (fastest on the H100)."""
    return min(1024, max(32, next_pow2(-(-dims // vec))))


def _kernel(layer_norm: bool, residual: bool) -> Kernel:
    if layer_norm:
        return catalog.LAYER_NORM_RESIDUAL if residual else catalog.LAYER_NORM
    return catalog.RMS_NORM_RESIDUAL if residual else catalog.RMS_NORM


def plan(inputs, eps: float, layer_norm: bool, config: Optional[dict] = None) -> Launch:
    """The launch of the norm kernel over ``inputs`` = (x, [residual], weight, [bias])."""
    x = inputs[0]
    residual = len(inputs) == (4 if layer_norm else 3)
    dims = x.shape[-1]
    rows = x.size // dims
    vec = div_vec(dims, x.dtype.size)
    kernel = _kernel(layer_norm, residual)
    config = {**config_for(kernel, x.dtype, {"rows": rows, "D": dims}, exact=("D",)), **(config or {})}
    tpr = config.get("TPR") or default_threads_per_row(dims, vec)
    return Launch(
        kernel=kernel,
        inputs=inputs,
        template=[("T", x.dtype), ("W", inputs[-1].dtype), ("D", dims), ("TPR", tpr), ("VEC", vec),
                  ("EPS_BITS", float_bits(eps))],
        grid=(rows * tpr, 1, 1),
        threadgroup=(tpr, 1, 1),
        output_shapes=[x.shape] * (2 if residual else 1),
        output_dtypes=[x.dtype] * (2 if residual else 1),
    )


def reference(x, residual, weight, bias, eps: float, layer_norm: bool, out_dtype: Optional[mx.Dtype] = None):
    """The norm in MLX ops, float32 statistics; returns ``out`` (dtype ``out_dtype``, default that of ``x``)
    or ``(out, x + residual)``."""
    h = x if residual is None else x + residual
    h32 = h.astype(mx.float32)
    if layer_norm:
        centred = h32 - mx.mean(h32, axis=-1, keepdims=True)
        y = centred * mx.rsqrt(mx.mean(centred * centred, axis=-1, keepdims=True) + eps)
    else:
        y = h32 * mx.rsqrt(mx.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    y = y * weight.astype(mx.float32)
    if bias is not None:
        y = y + bias.astype(mx.float32)
    out = y.astype(out_dtype or x.dtype)
    return out if residual is None else (out, h)


def _fast(x, residual, weight, bias, eps: float, layer_norm: bool):
    h = x if residual is None else x + residual
    if layer_norm:
        out = mx.fast.layer_norm(h, weight, bias, eps)
    else:
        out = mx.fast.rms_norm(h, weight, eps)
    return out if residual is None else (out, h)


@functools.lru_cache(maxsize=256)
def _function(eps: float, layer_norm: bool, residual: bool, config: Optional[tuple]):
    """The differentiable kernel call for one set of static arguments (arrays: x, [residual], weight, [bias])."""

    def unpack(arrays):
        x, rest = arrays[0], list(arrays[1:])
        r = rest.pop(0) if residual else None
        w = rest.pop(0)
        b = rest.pop(0) if layer_norm else None
        return x, r, w, b

    def ref(*arrays):
        return reference(*unpack(arrays), eps, layer_norm)

    def forward(*arrays):
        outputs = launch(plan(arrays, eps, layer_norm, dict(config or ())), lambda: _as_list(ref(*arrays)))
        return tuple(outputs) if residual else outputs[0]

    return with_reference_vjp(forward, ref)


def _as_list(result):
    return list(result) if isinstance(result, tuple) else [result]


def _cast_out(result, dtype: mx.Dtype):
    """``result`` (``out`` or ``(out, h)``) with ``out`` in ``dtype``; ``h`` keeps the dtype of ``x``."""
    if isinstance(result, tuple):
        return result[0].astype(dtype), result[1]
    return result.astype(dtype)


def _run(x, residual, weight, bias, eps, layer_norm, path, config):
    name = "layer_norm" if layer_norm else "rms_norm"
    check_array("x", x, "(..., dims)", min_ndim=1)
    dims = x.shape[-1]
    if dims == 0:
        raise ValueError(f"x must have a non-empty last axis (dims); got {tuple(x.shape)}")
    if weight is None:
        weight = mx.ones((dims,), x.dtype if bias is None else bias.dtype)
    check_array("weight", weight, f"(dims,) = ({dims},)", shape=(dims,))
    if bias is not None:
        check_array("bias", bias, f"(dims,) = ({dims},)", shape=(dims,))
        check_same_dtype(("weight", "bias"), (weight, bias))
    if residual is not None:
        check_array("residual", residual, f"x's shape {tuple(x.shape)}", shape=x.shape)
        check_same_dtype(("x", "residual"), (x, residual))
    eps = check_positive_real("eps", eps)
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    out_dtype = mx.result_type(*(a for a in (x, weight, bias) if a is not None))
    if layer_norm and bias is None:
        bias = mx.zeros((dims,), weight.dtype)

    if path == "auto":  # the kernel writes x's dtype: a wider weight goes to mx.fast, which writes out_dtype
        mixed = out_dtype != x.dtype
        path = "fast" if dims > MAX_DIMS or mixed else auto_path(name, residual is not None, x.size)
    if path == "reference" or x.size == 0:  # no rows: nothing to launch
        return reference(x, residual, weight, bias, eps, layer_norm, out_dtype)
    if path == "fast":
        return _cast_out(_fast(x, residual, weight, bias, eps, layer_norm), out_dtype)
    if dims > MAX_DIMS:
        raise ValueError(f"{name} kernel supports dims <= {MAX_DIMS}; got x of shape {tuple(x.shape)}")
    arrays = [a for a in (x, residual, weight, bias) if a is not None]
    key = tuple(sorted(config.items())) if config else None
    result = _function(eps, layer_norm, residual is not None, key)(*arrays)
    return result if out_dtype == x.dtype else _cast_out(result, out_dtype)


def rms_norm(
    x: mx.array,
    weight: Optional[mx.array],
    eps: float = 1e-5,
    *,
    residual: Optional[mx.array] = None,
    path: str = "auto",
    config: Optional[dict] = None,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Root-mean-square normalisation over the last axis: ``h * rsqrt(mean(h²) + eps) * weight``.

    Args:
        x (array): ``(..., dims)``, float16, bfloat16 or float32.
        weight (array or None): ``(dims,)``; ``None`` means ones.
        eps (float): added to the mean square. Default: ``1e-5``.
        residual (array, optional): same shape and dtype as ``x``; then ``h = x + residual``
            (rounded to the dtype of ``x``) and the result is ``(out, h)``.
        path (str): ``"auto"`` (fastest measured), ``"kernel"`` (the fused kernel), ``"fast"``
            (``mx.fast.rms_norm`` after a separate add) or ``"reference"`` (MLX ops).
        config (dict, optional): template values of the kernel, e.g. ``{"TPR": 256}``.

    Returns:
        ``out`` of the shape of ``x``, or ``(out, h)`` with a residual. Statistics in float32. ``out`` has
        the dtype MLX gives ``x`` with ``weight`` (``mx.result_type``, as ``mx.fast.rms_norm`` and
        ``nn.RMSNorm``: float16 ``x`` with a float32 weight gives float32); ``h`` has the dtype of ``x``.
    """
    return _run(x, residual, weight, None, eps, False, path, config)


def layer_norm(
    x: mx.array,
    weight: Optional[mx.array],
    bias: Optional[mx.array],
    eps: float = 1e-5,
    *,
    residual: Optional[mx.array] = None,
    path: str = "auto",
    config: Optional[dict] = None,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Layer normalisation over the last axis: ``(h - mean) * rsqrt(var + eps) * weight + bias``.

    Args:
        x (array): ``(..., dims)``, float16, bfloat16 or float32.
        weight (array or None): ``(dims,)``; ``None`` means ones.
        bias (array or None): ``(dims,)``; ``None`` means zeros.
        eps (float): added to the variance. Default: ``1e-5``.
        residual (array, optional): same shape and dtype as ``x``; then ``h = x + residual`` and
            the result is ``(out, h)``.
        path (str): ``"auto"``, ``"kernel"``, ``"fast"`` (``mx.fast.layer_norm``) or ``"reference"``.
        config (dict, optional): template values of the kernel, e.g. ``{"TPR": 256}``.

    Returns:
        ``out`` of the shape of ``x`` and the dtype ``mx.result_type(x, weight, bias)`` of the arrays
        given (as ``nn.LayerNorm``), or ``(out, h)`` with a residual, ``h`` in the dtype of ``x``.
    """
    return _run(x, residual, weight, bias, eps, True, path, config)


def compile_examples():
    """Launches covering every dtype and tunable configuration (for the Metal compile check)."""
    for layer_norm in (False, True):
        for residual in (False, True):
            for dtype in (mx.float16, mx.bfloat16, mx.float32):
                for dims in (4096, 1000, 6):
                    x = mx.zeros((3, dims), dtype)
                    arrays = [x] + ([x] if residual else []) + [mx.zeros((dims,), mx.float32)] * (1 + layer_norm)
                    for config in catalog.RMS_NORM.configs():
                        yield plan(arrays, 1e-5, layer_norm, config)
