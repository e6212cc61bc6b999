"""SageAttention: attention with INT8 q and k (SageAttention's interface on MLX arrays).

q and k are quantized to INT8 per block of tokens after subtracting the mean of k over the
sequence (:mod:`.sage_quant`), QKᵀ runs on the INT8 matrix unit (CUDA ``mma.sync`` m16n8k32) and
each score is dequantized by its query's and key's scales; the probabilities P are rounded to the
input dtype (fp16/bf16) and PV accumulates in fp32. Apple GPUs have no INT8 matrix unit: there the
kernel dequantizes the int8 tiles into half ``simdgroup_matrix`` tiles (exact), so INT8 only halves
the bytes of q and k.

On the CPU (or where the kernel can't run) the reference path computes the same quantized math in
MLX ops: the quantization's rounding exactly, the scores from the dequantized q and k in float32,
P rounded to the input dtype before PV, blockwise with online softmax (O(N) memory). Gradients pass
straight through the quantization: they are those of exact attention (the reference path's).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..hardware import device_profile
from ..kernels import sage as sage_kernels
from .reference import reference_attention
from .sage_quant import QuantizedQK, check_granularity, check_layout, dequantize, quantize_bhsd
from .spec import AttentionSpec, describe_attention, to_bhsd

# How PV is computed: P and V in the input dtype with "fp32" or "fp16" accumulation, or "full":
# float32 P and V (sageattn_mlx's pv_dtype="float32"; reference path only).
PV_ACCUM_DTYPES = ("fp32", "fp16")
PATHS = ("auto", "kernel", "reference")


def _pv_product(pv_accum: str, dtype: mx.Dtype):
    if pv_accum == "full":
        return None

    def product(p: mx.array, v_block: mx.array) -> mx.array:
        pv = p.astype(dtype).astype(mx.float32) @ v_block
        # fp16 accumulation: each block's partial product is rounded to fp16 before joining the output.
        return pv.astype(mx.float16).astype(mx.float32) if pv_accum == "fp16" else pv

    return product


def quantized_reference(quant: QuantizedQK, v: mx.array, spec: AttentionSpec, pv_accum: str = "fp32"):
    """``[out, lse]`` of attention over the quantized q and k, in MLX ops (the kernel's math).

    ``lse`` is that of the smoothed scores (no correction for the subtracted k mean).
    """
    q_deq = dequantize(quant.q, quant.q_scale, quant.q_block)
    k_deq = dequantize(quant.k, quant.k_scale, quant.k_block)
    out, lse = reference_attention(q_deq, k_deq, v, spec, pv_product=_pv_product(pv_accum, v.dtype))
    return [out.astype(v.dtype), lse]


def _grouped_heads(x: mx.array, spec: AttentionSpec) -> mx.array:
    return x.reshape(spec.batch, spec.num_kv_heads, spec.groups, *x.shape[2:])


def lse_correction(q: mx.array, k_mean: mx.array, spec: AttentionSpec) -> mx.array:
    """``scale * q . mean(k)`` per query ``(batch, num_heads, q_len)``: what smoothing took off each row's scores."""
    shift = _grouped_heads(q.astype(mx.float32), spec) @ k_mean[:, :, None].swapaxes(-1, -2)
    return spec.scale * shift.reshape(spec.batch, spec.num_heads, spec.q_len)


def kernel_blocker(spec: AttentionSpec, pv_accum: str) -> Optional[str]:
    """Why the attention kernel can't run ``spec`` here, or None."""
    if not device_profile().is_gpu:
        return "kernels need a GPU backend"
    return sage_kernels.unsupported(spec, pv_accum)


def sage_bhsd(q: mx.array, k: mx.array, v: mx.array, spec: AttentionSpec, gran: str = "per_block",
              pv_accum: str = "fp32", smooth_k: bool = True, smooth_v: bool = False,
              path: str = "auto") -> Tuple[mx.array, mx.array]:
    """Quantized attention over validated BHSD tensors: ``(out, lse)``, lse corrected for smoothing."""
    blocker = kernel_blocker(spec, pv_accum)
    if path == "kernel" and blocker:
        raise ValueError(f"path='kernel' cannot run this call: {blocker}")
    on_kernel = path != "reference" and blocker is None
    quant = quantize_bhsd(q, k, gran, smooth_k, "kernel" if on_kernel else "reference")
    v_mean = v.astype(mx.float32).mean(axis=2, keepdims=True) if smooth_v else None
    v_in = v if v_mean is None else (v.astype(mx.float32) - v_mean).astype(v.dtype)

    def reference():
        return quantized_reference(quant, v_in, spec, pv_accum)

    if on_kernel:
        out, lse = sage_kernels.sage_attention(quant.q, quant.q_scale, quant.k, quant.k_scale, v_in, spec,
                                               quant.q_block, quant.k_block, reference)
    else:
        out, lse = reference()
    if v_mean is not None:  # P's rows sum to 1: the mean comes back whole (rows without keys stay 0)
        restored = _grouped_heads(out.astype(mx.float32), spec) + v_mean[:, :, None]
        restored = restored.reshape(out.shape)
        out = mx.where((lse == -mx.inf)[..., None], 0.0, restored).astype(v.dtype)
    if quant.k_mean is not None:
        lse = lse + lse_correction(q, quant.k_mean, spec)
    return out, lse


def sageattn(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    tensor_layout: str = "HND",
    is_causal: bool = False,
    sm_scale: Optional[float] = None,
    return_lse: bool = False,
    *,
    qk_quant_gran: str = "per_block",
    pv_accum_dtype: str = "fp32",
    smooth_k: bool = True,
    smooth_v: bool = False,
    path: str = "auto",
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """SageAttention: ``softmax(sm_scale * q kᵀ) v`` with INT8 q and k.

    Args:
        q: ``(batch, num_heads, q_len, head_dim)`` for ``tensor_layout="HND"``,
            ``(batch, q_len, num_heads, head_dim)`` for ``"NHD"``; float16, bfloat16 (float32 runs
            on the reference path).
        k: ``(batch, num_kv_heads, k_len, head_dim)`` (``"HND"``); ``num_heads`` a multiple of
            ``num_kv_heads`` (GQA/MQA).
        v: like k.
        tensor_layout: ``"HND"`` or ``"NHD"``.
        is_causal: bottom-right aligned causal mask (query i sees keys ``j <= i + k_len - q_len``).
        sm_scale: softmax scale, default ``1 / sqrt(head_dim)``.
        return_lse: also return the natural log-sum-exp of the scores ``(batch, num_heads, q_len)``
            float32, corrected for the smoothing (that of the unsmoothed scores), ``-inf`` for rows
            without keys.
        qk_quant_gran: ``"per_block"`` (64 tokens per scale), ``"per_warp"`` (16 queries, 64 keys) or
            ``"per_thread"`` (one scale per token).
        pv_accum_dtype: ``"fp32"`` (fp32 accumulation of PV) or ``"fp16"`` (each key block's PV
            rounded to fp16 before joining the fp32 output; float16 inputs only; reference path).
        smooth_k: subtract the mean of k over the sequence before quantizing (no effect on the
            softmax; removes per-channel offsets that ruin INT8).
        smooth_v: subtract the mean of v before PV and add it back after.
        path: ``"auto"``, ``"kernel"`` (ValueError where it can't run) or ``"reference"``.

    Returns:
        ``out`` in q's layout and dtype, or ``(out, lse)`` with ``return_lse``.
    """
    layout = check_layout(tensor_layout)
    gran = qk_quant_gran
    check_granularity(gran)
    if pv_accum_dtype not in PV_ACCUM_DTYPES:
        raise ValueError(f"pv_accum_dtype must be one of {PV_ACCUM_DTYPES}; got {pv_accum_dtype!r}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    if sm_scale is not None and (not isinstance(sm_scale, (int, float)) or not math.isfinite(sm_scale)):
        raise TypeError(f"sm_scale must be a finite float or None; got {sm_scale!r}")
    spec = describe_attention(q, k, v, layout=layout, scale=sm_scale, causal=bool(is_causal))
    if pv_accum_dtype == "fp16" and spec.dtype != mx.float16:
        raise ValueError(f"pv_accum_dtype='fp16' needs float16 inputs; got {spec.dtype}")
    out, lse = _sage(to_bhsd(q, layout), to_bhsd(k, layout), to_bhsd(v, layout), spec,
                     gran, pv_accum_dtype, smooth_k, smooth_v, path)
    out = to_bhsd(out, layout)
    return (out, lse) if return_lse else out


def _sage(q, k, v, spec, gran, pv_accum, smooth_k, smooth_v, path):
    """:func:`sage_bhsd` with straight-through gradients: those of exact attention."""

    def forward(q, k, v):
        return list(sage_bhsd(q, k, v, spec, gran, pv_accum, smooth_k, smooth_v, path))

    def exact(q, k, v):
        return list(reference_attention(q, k, v, spec))

    function = mx.custom_function(forward)

    @function.vjp
    def _vjp(primals, cotangents, outputs):
        _, grads = mx.vjp(exact, list(primals), list(cotangents))
        return tuple(grads)

    out, lse = function(q, k, v)
    return out, lse


def sageattn_mlx(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    is_causal: bool = False,
    sm_scale: Optional[float] = None,
    return_lse: bool = False,
    qk_quant_gran: str = "per_block",
    pv_dtype: str = "float16",
    smooth_k: bool = True,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """The ``sageattention_mlx`` port's call on :func:`sageattn`.

    Args:
        q: ``(batch, heads, q_len, head_dim)`` or ``(heads, q_len, head_dim)``.
        k, v: ``(batch, kv_heads, k_len, head_dim)`` or ``(kv_heads, k_len, head_dim)``.
        is_causal, sm_scale, return_lse, qk_quant_gran, smooth_k: as in :func:`sageattn`.
        pv_dtype: ``"float16"`` (P and V in the input dtype, fp32 accumulation: the kernel) or
            ``"float32"`` (float32 P and V, on the reference path).
    """
    if pv_dtype not in ("float16", "float32"):
        raise ValueError(f"pv_dtype must be 'float16' or 'float32'; got {pv_dtype!r}")
    unbatched = isinstance(q, mx.array) and q.ndim == 3
    if unbatched:
        q, k, v = (x[None] if isinstance(x, mx.array) else x for x in (q, k, v))
    if pv_dtype == "float16":
        result = sageattn(q, k, v, "HND", is_causal, sm_scale, return_lse, qk_quant_gran=qk_quant_gran,
                          smooth_k=smooth_k)
    else:
        check_granularity(qk_quant_gran)
        spec = describe_attention(q, k, v, scale=sm_scale, causal=bool(is_causal))
        result = _sage(q, k, v, spec, qk_quant_gran, "full", smooth_k, False, "reference")
        result = result if return_lse else result[0]
    if not unbatched:
        return result
    return (result[0][0], result[1][0]) if return_lse else result[0]


class SageAttention(nn.Module):
    """Attention with INT8 q and k (:func:`sageattn`), same call shape as :class:`FlashAttention`.

    Args:
        num_heads (int): query heads.
        head_dim (int): size of each head.
        causal (bool): bottom-right aligned causal mask. Default: ``False``.
        layout (str): ``"BSHD"`` ``(batch, seq, heads, dim)`` or ``"BHSD"``. Default: ``"BSHD"``.
        scale (float, optional): softmax scale. Default: ``1 / sqrt(head_dim)``.
        qk_quant_gran (str): Default: ``"per_block"``.
        pv_accum_dtype (str): Default: ``"fp32"``.
        smooth_k (bool): Default: ``True``.
        smooth_v (bool): Default: ``False``.

    Call with ``q``, ``k``, ``v`` in ``layout`` (k and v may have fewer heads) and an optional
    ``mask``: ``"causal"`` or None (SageAttention takes no mask arrays).
    """

    def __init__(self, num_heads: int, head_dim: int, causal: bool = False, layout: str = "BSHD",
                 scale: Optional[float] = None, qk_quant_gran: str = "per_block", pv_accum_dtype: str = "fp32",
                 smooth_k: bool = True, smooth_v: bool = False):
        super().__init__()
        if layout not in ("BSHD", "BHSD"):
            raise ValueError(f"layout must be one of ('BSHD', 'BHSD'); got {layout!r}")
        check_granularity(qk_quant_gran)
        self.num_heads, self.head_dim, self.causal, self.layout = num_heads, head_dim, causal, layout
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        self.options = {"qk_quant_gran": qk_quant_gran, "pv_accum_dtype": pv_accum_dtype,
                        "smooth_k": smooth_k, "smooth_v": smooth_v}

    def _extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, causal={self.causal}, "
                f"layout={self.layout!r}, qk_quant_gran={self.options['qk_quant_gran']!r}")

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, mask: Optional[str] = None, **options: Any) -> mx.array:
        if mask is not None and not (isinstance(mask, str) and mask == "causal"):
            raise ValueError(f"mask must be 'causal' or None for SageAttention; got {type(mask).__name__}")
        if q.ndim == 4:
            heads, dim = (q.shape[2], q.shape[3]) if self.layout == "BSHD" else (q.shape[1], q.shape[3])
            if (heads, dim) != (self.num_heads, self.head_dim):
                raise ValueError(f"q must have {self.num_heads} heads of dim {self.head_dim} in layout "
                                 f"{self.layout}; got shape {q.shape}")
        return sageattn(q, k, v, "NHD" if self.layout == "BSHD" else "HND", self.causal or mask == "causal",
                        self.scale, **{**self.options, **options})
