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

``pv_accum_dtype="fp16"`` is upstream's fully fp16 PV accumulation, simulated on the reference path
only (the kernel has no fp16 accumulator; on a GPU that option takes the reference path): V is cast
to fp16 (bf16 inputs too), P is rounded to fp16 against the running max, and the output accumulator
is an fp16 number: rounded after every step of :data:`FP16_STEP` keys (the k of one fp16
``mma.sync``, whose product is exact in fp32) and after every rescale by the running max's
correction. Large values of v overflow it (inf), which ``smooth_v`` (subtract v's mean over the
sequence before PV, add it back to the fp32 output) prevents.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..hardware import device_profile
from ..kernels import sage as sage_kernels
from ..validation import check_array, check_bool, check_choice, check_positive_int, check_real
from .reference import Accumulate, reference_attention
from .sage_quant import QuantizedQK, check_granularity, check_layout, dequantize, quantize_bhsd
from .spec import LAYOUTS, AttentionSpec, describe_attention, to_bhsd

# How PV is computed: P and V in the input dtype with "fp32" accumulation, P and V in fp16 with an fp16
# accumulator ("fp16"), or "full": float32 P and V (sageattn_mlx's pv_dtype="float32"; reference path only).
PV_ACCUM_DTYPES = ("fp32", "fp16")
PATHS = ("auto", "kernel", "reference")
FP16_STEP = 16  # keys per rounding of the fp16 accumulator


def _as_fp16(x: mx.array) -> mx.array:
    return x.astype(mx.float16).astype(mx.float32)


def _accumulate(pv_accum: str, dtype: mx.Dtype) -> Optional[Accumulate]:
    """The reference path's PV accumulation (:class:`~.reference.OnlineSoftmax`) of one ``pv_accum`` mode."""
    if pv_accum == "full":
        return None
    if pv_accum == "fp32":
        return lambda acc, correction, p, v_block: acc * correction + p.astype(dtype).astype(mx.float32) @ v_block

    def fp16(acc, correction, p, v_block):
        acc, p = _as_fp16(acc * correction), _as_fp16(p)
        for start in range(0, p.shape[-1], FP16_STEP):
            step = slice(start, start + FP16_STEP)
            acc = _as_fp16(acc + p[..., step] @ v_block[..., step, :])
        return acc

    return fp16


def quantized_reference(quant: QuantizedQK, v: mx.array, spec: AttentionSpec, pv_accum: str = "fp32",
                        out_dtype: Optional[mx.Dtype] = None):
    """``[out, lse]`` of attention over the quantized q and k, in MLX ops (the kernel's math).

    ``v`` is PV's operand (fp16 for ``pv_accum="fp16"``); ``out`` is in ``out_dtype`` (default v's).
    ``lse`` is that of the smoothed scores (no correction for the subtracted k mean).
    """
    q_deq = dequantize(quant.q, quant.q_scale, quant.q_block)
    k_deq = dequantize(quant.k, quant.k_scale, quant.k_block)
    out, lse = reference_attention(q_deq, k_deq, v, spec, accumulate=_accumulate(pv_accum, v.dtype))
    return [out.astype(out_dtype or v.dtype), lse]


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
    pv_dtype = mx.float16 if pv_accum == "fp16" else v.dtype
    v_pv = (v if v_mean is None else v.astype(mx.float32) - v_mean).astype(pv_dtype)

    if on_kernel:
        out, lse = sage_kernels.sage_attention(quant.q, quant.q_scale, quant.k, quant.k_scale, v_pv, spec,
                                               quant.q_block, quant.k_block,
                                               lambda: quantized_reference(quant, v_pv, spec, pv_accum))
    else:
        out, lse = quantized_reference(quant, v_pv, spec, pv_accum, out_dtype=mx.float32)
    if v_mean is not None:  # P's rows sum to 1: the mean comes back whole (rows without keys stay 0)
        restored = _grouped_heads(out.astype(mx.float32), spec) + v_mean[:, :, None]
        out = mx.where((lse == -mx.inf)[..., None], 0.0, restored.reshape(out.shape))
    if quant.k_mean is not None:
        lse = lse + lse_correction(q, quant.k_mean, spec)
    return out.astype(v.dtype), lse


def check_sage_options(qk_quant_gran: str = "per_block", pv_accum_dtype: str = "fp32", smooth_k: bool = True,
                       smooth_v: bool = False, path: str = "auto") -> Dict[str, Any]:
    """:func:`sageattn`'s keyword options, checked (an error naming the bad one); returns them as a dict."""
    check_granularity(qk_quant_gran)
    return {
        "qk_quant_gran": qk_quant_gran,
        "pv_accum_dtype": check_choice("pv_accum_dtype", pv_accum_dtype, PV_ACCUM_DTYPES),
        "smooth_k": check_bool("smooth_k", smooth_k),
        "smooth_v": check_bool("smooth_v", smooth_v),
        "path": check_choice("path", path, PATHS),
    }


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
        is_causal: bottom-right aligned causal mask (query i sees keys ``j <= i + k_len - q_len``); a bool.
        sm_scale: softmax scale (a Python or NumPy real number), default ``1 / sqrt(head_dim)``.
        return_lse: also return the natural log-sum-exp of the scores ``(batch, num_heads, q_len)``
            float32, corrected for the smoothing (that of the unsmoothed scores), ``-inf`` for rows
            without keys.
        qk_quant_gran: ``"per_block"`` (one scale per 64 queries and per 64 keys), ``"per_warp"``
            (16 queries, 64 keys) or ``"per_thread"`` (one scale per token: per query and per key,
            finer than upstream's per-thread groups, so its scale shapes differ from upstream's).
        pv_accum_dtype: ``"fp32"`` (P and V in the input dtype, fp32 accumulation: the kernel) or
            ``"fp16"`` (upstream's fully fp16 accumulation: V cast to fp16, bf16 inputs too; the
            accumulator rounded to fp16 every 16 keys and at every rescale, see the module docstring;
            the output keeps the input dtype). ``"fp16"`` is simulated on the reference path, also
            on a GPU (the kernel has no fp16 accumulator): it is slower, never faster.
        smooth_k: subtract the mean of k over the sequence before quantizing (no effect on the
            softmax; removes per-channel offsets that ruin INT8).
        smooth_v: subtract the mean of v over the sequence before PV and add it back to the output.
            It matters with ``pv_accum_dtype="fp16"``, where a large offset in v overflows the fp16
            accumulator (inf) or costs its precision; with fp32 accumulation it changes next to
            nothing (one more rounding of v) and costs a pass over v.
        path: ``"auto"``, ``"kernel"`` (ValueError where it can't run) or ``"reference"``.

    Returns:
        ``out`` in q's layout and dtype, or ``(out, lse)`` with ``return_lse``.
    """
    options = check_sage_options(qk_quant_gran, pv_accum_dtype, smooth_k, smooth_v, path)
    return _sageattn(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, **options)


def _sageattn(q, k, v, tensor_layout, is_causal, sm_scale, return_lse, qk_quant_gran, pv_accum_dtype, smooth_k,
              smooth_v, path):
    """:func:`sageattn` after its options were checked (``pv_accum_dtype`` may also be ``"full"``)."""
    layout = check_layout(tensor_layout)
    scale = None if sm_scale is None else check_real("sm_scale", sm_scale)
    return_lse = check_bool("return_lse", return_lse)
    spec = describe_attention(q, k, v, layout=layout, scale=scale, causal=check_bool("is_causal", is_causal))
    out, lse = _sage(to_bhsd(q, layout), to_bhsd(k, layout), to_bhsd(v, layout), spec,
                     qk_quant_gran, pv_accum_dtype, smooth_k, smooth_v, path)
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


SEED_SHAPES = "(..., seq_len, head_dim): (seq, dim), (heads, seq, dim), (batch, heads, seq, dim) or more batch dims"


def _flatten_batch(q: mx.array, k: mx.array, v: mx.array):
    """q, k, v of shape ``(..., seq, dim)`` as BHSD: leading dims before ``(heads, seq, dim)`` flattened
    into one batch axis, missing ones added."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_array(name, x, SEED_SHAPES, min_ndim=2)
        if x.ndim != q.ndim or x.shape[:-3] != q.shape[:-3]:
            raise ValueError(f"{name} must have q's leading dims {q.shape[:-3]} and {q.ndim} dims in all, "
                             f"shape {SEED_SHAPES}; got {x.shape}")
    if q.ndim <= 4:
        return [x.reshape((1,) * (4 - x.ndim) + x.shape) for x in (q, k, v)]
    return [x.reshape((math.prod(x.shape[:-3]),) + x.shape[-3:]) for x in (q, k, v)]


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
    """The ``sageattention_mlx`` port's call on :func:`sageattn` (HND layout).

    q and k really are INT8 here (the port's "max diff about 1e-6" does not hold): expect a relative
    L1 of about 0.01 against exact attention.

    Args:
        q: ``(..., heads, q_len, head_dim)``: ``(q_len, head_dim)``, ``(heads, q_len, head_dim)``,
            ``(batch, heads, q_len, head_dim)`` or more leading batch dims.
        k, v: ``(..., kv_heads, k_len, head_dim)`` with q's leading dims.
        is_causal, sm_scale, return_lse, qk_quant_gran, smooth_k: as in :func:`sageattn`.
        pv_dtype: ``"float16"`` (P and V in the input dtype, fp32 accumulation: the kernel) or
            ``"float32"`` (float32 P and V, on the reference path).

    Returns:
        ``out`` shaped like q, or ``(out, lse)`` with lse ``q.shape[:-1]``.
    """
    pv_accum = {"float16": "fp32", "float32": "full"}.get(check_choice("pv_dtype", pv_dtype, ("float16", "float32")))
    options = {**check_sage_options(qk_quant_gran, smooth_k=smooth_k), "pv_accum_dtype": pv_accum}
    flat = _flatten_batch(q, k, v)
    shape = q.shape
    result = _sageattn(*flat, "HND", is_causal, sm_scale, return_lse, **options)
    if return_lse:
        return result[0].reshape(shape), result[1].reshape(shape[:-1])
    return result.reshape(shape)


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

    The options are those of :func:`sageattn`, checked here. Call with ``q``, ``k``, ``v`` in
    ``layout`` (k and v may have fewer heads) and an optional ``mask``: ``"causal"`` or None
    (SageAttention takes no mask arrays).
    """

    def __init__(self, num_heads: int, head_dim: int, causal: bool = False, layout: str = "BSHD",
                 scale: Optional[float] = None, qk_quant_gran: str = "per_block", pv_accum_dtype: str = "fp32",
                 smooth_k: bool = True, smooth_v: bool = False):
        super().__init__()
        check_positive_int("num_heads", num_heads)
        check_positive_int("head_dim", head_dim)
        self.layout = check_choice("layout", layout, LAYOUTS)
        self.num_heads, self.head_dim, self.causal = num_heads, head_dim, check_bool("causal", causal)
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else check_real("scale", scale)
        # A mapping proxy, not a dict: nn.Module would take a dict for a tree of parameters.
        self.options = MappingProxyType(check_sage_options(qk_quant_gran, pv_accum_dtype, smooth_k, smooth_v))

    def _extra_repr(self) -> str:
        options = ", ".join(f"{name}={value!r}" for name, value in self.options.items())
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, causal={self.causal}, "
                f"layout={self.layout!r}, {options}")

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, mask: Optional[str] = None, **options: Any) -> mx.array:
        if mask is not None and not (isinstance(mask, str) and mask == "causal"):
            raise ValueError(f"mask must be 'causal' or None for SageAttention; got {type(mask).__name__}")
        if q.ndim == 4:
            heads, dim = (q.shape[2], q.shape[3]) if self.layout == "BSHD" else (q.shape[1], q.shape[3])
            if (heads, dim) != (self.num_heads, self.head_dim):
                raise ValueError(f"q must have {self.num_heads} heads of dim {self.head_dim} in layout "
                                 f"{self.layout}; got shape {q.shape}")
        layout, causal = "NHD" if self.layout == "BSHD" else "HND", self.causal or mask == "causal"
        if options:  # call-time options over the layer's: checked again
            return sageattn(q, k, v, layout, causal, self.scale, **{**self.options, **options})
        return _sageattn(q, k, v, layout, causal, self.scale, False, **self.options)  # checked at construction
