"""SageAttention's kernels: the INT8 quantization pass (``src/sage_quant.kern``) and the attention
forward with INT8 QKᵀ on the matrix unit (``src/sage_attn.kern``).

On CUDA QKᵀ runs on ``mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32`` (twice the fp16 rate of
``mma.sync``), PV in fp16/bf16 with fp32 accumulation; on sm_90 at head dims 64 and 128 the warpgroup
variant (SAGE_ATTN_WG) runs both on ``wgmma`` instead (``config={"WG": 0}`` keeps the other).
Apple GPUs have no INT8 matrix unit: there the int8 tiles are dequantized (exactly) into half
``simdgroup_matrix`` tiles, so the INT8 storage only halves the bytes moved for q and k. The math is the reference path's
(:mod:`mlx_primitives.attention.sage_quant`, :mod:`mlx_primitives.attention.sage`), which these
fall back to where the kernel can't run.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from ..attention.spec import AttentionSpec
from ..hardware import static_shared_memory
from . import tuning
from .catalog import SAGE_ATTN, SAGE_ATTN_WG, SAGE_QUANT
from .flash_attention import checked_warpgroup_config, query_block_launch, tile_options, uses_warpgroup
from .launcher import Launch, float_bits, launch

# Head dims run on the H100 (tests/attention/test_sage_kernel.py); others take the reference path.
HEAD_DIMS = (64, 96, 128)
WG_HEAD_DIMS = (64, 128)  # the warpgroup variant's: whole 64-element column blocks of v
DTYPES = (mx.float16, mx.bfloat16)
QUANT_ROWS = 64  # rows per threadgroup of the quantization kernel
QUANT_THREADS = 128
QUANT_HEAD_DIMS = (32, 64, 128, 256)


def quantize_unsupported(x: mx.array) -> Optional[str]:
    """Why the quantization kernel can't take ``x`` ``(batch, heads, seq, dim)``, or None."""
    if x.dtype not in DTYPES + (mx.float32,):
        return f"dtype {x.dtype} is not a float type"
    if x.shape[3] not in QUANT_HEAD_DIMS:  # a lane holds head_dim / 32 elements: one vector access
        return f"head_dim {x.shape[3]} is not one of {QUANT_HEAD_DIMS}"
    if x.shape[2] == 0:
        return "the sequence is empty"
    return None


def quantize_plan(x: mx.array, block: int, mean: Optional[mx.array]) -> Launch:
    batch, heads, seq, dim = x.shape
    mean_input = mx.zeros((1,), mx.float32) if mean is None else mean.reshape(batch, heads, dim)
    return Launch(
        kernel=SAGE_QUANT,
        inputs=[x, mean_input],
        template=[("T", x.dtype), ("D", dim), ("G", block), ("MEAN", int(mean is not None))],
        grid=(-(-seq // QUANT_ROWS) * QUANT_THREADS, heads, batch),
        threadgroup=(QUANT_THREADS, 1, 1),
        output_shapes=[x.shape, (batch, heads, -(-seq // block))],
        output_dtypes=[mx.int8, mx.float32],
    )


def quantize(x: mx.array, block: int, mean: Optional[mx.array] = None) -> Tuple[mx.array, mx.array]:
    """INT8 values and float32 scales of ``x - mean`` per ``block`` tokens, in one kernel pass.

    Same contract as :func:`mlx_primitives.attention.sage_quant.quantize_reference` (the fallback).
    """
    from ..attention.sage_quant import quantize_reference

    if QUANT_ROWS % block:
        raise ValueError(f"block must divide {QUANT_ROWS}; got {block}")
    values, scales = launch(quantize_plan(x, block, mean), lambda: list(quantize_reference(x, block, mean)))
    return values, scales


def shared_memory_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """Bytes of the kernel's shared buffers (see the comment block of ``sage_attn.kern``)."""
    rows = max(16 * config["WARPS"], config["BK"])
    return rows * (head_dim + 16) + config["BK"] * (head_dim + 8) * itemsize


def warpgroup_shared_memory_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """Dynamic shared memory of the warpgroup variant: the int8 q block (128-byte rows), two stages of
    (int8 K tile, V tile) and 1 KiB to align them."""
    return 16 * config["WARPS"] * 128 + 2 * config["BK"] * (128 + head_dim * itemsize) + 1024


def warpgroup_config_for(spec: AttentionSpec, config: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Tile sizes of a warpgroup launch: tuned (or default), overridden by ``config`` (its ``WG`` aside)."""
    tuned = tuning.config_for(SAGE_ATTN_WG, spec.dtype, {"D": spec.head_dim, "L": spec.k_len}, exact=("D",))
    return checked_warpgroup_config(SAGE_ATTN_WG, tuned, config,
                                    lambda c: warpgroup_shared_memory_bytes(spec.head_dim, c))


def unsupported(spec: AttentionSpec, pv_accum_dtype: str = "fp32") -> Optional[str]:
    """Why the attention kernel can't compute ``spec``, or None when it can."""
    if spec.dtype not in DTYPES:
        return f"dtype {spec.dtype} is not float16 or bfloat16"
    if spec.head_dim not in HEAD_DIMS or spec.v_head_dim != spec.head_dim:
        return f"head dims ({spec.head_dim}, {spec.v_head_dim}) are not one of {HEAD_DIMS} for q, k and v"
    if shared_memory_bytes(spec.head_dim, tuning.SPACES[SAGE_ATTN.name].default) > static_shared_memory():
        return f"head_dim {spec.head_dim} needs more shared memory than this backend's {static_shared_memory()} bytes"
    if pv_accum_dtype != "fp32":
        return f"pv_accum_dtype {pv_accum_dtype!r} runs on the reference path"
    if spec.q_len == 0 or spec.k_len == 0:
        return "a sequence is empty"
    return None


def config_for(spec: AttentionSpec, config: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Tile sizes of a launch: tuned (or default) for the call's bucket, overridden by ``config``."""
    tuned = tuning.config_for(SAGE_ATTN, spec.dtype, {"D": spec.head_dim, "L": spec.k_len}, exact=("D",))
    chosen = {**tuned, **tile_options(config)}
    if chosen["BK"] % 16 or chosen["WARPS"] < 1:
        raise ValueError(f"BK must be a multiple of 16 and WARPS positive; got {chosen}")
    if shared_memory_bytes(spec.head_dim, chosen) > static_shared_memory():
        raise ValueError(f"config {chosen} needs {shared_memory_bytes(spec.head_dim, chosen)} bytes of shared "
                         f"memory at head_dim {spec.head_dim}; the limit is {static_shared_memory()}")
    return chosen


def attention_plan(q8, q_scale, k8, k_scale, v, spec: AttentionSpec, q_block: int, k_block: int,
                   config: Dict[str, int], warpgroup: bool = False) -> Launch:
    """The attention launch; ``warpgroup`` picks SAGE_ATTN_WG (``config`` from :func:`warpgroup_config_for`)."""
    template = [
        ("T", v.dtype),
        ("D", spec.head_dim),
        ("BK", config["BK"]),
        ("WARPS", config["WARPS"]),
        ("SCALE", float_bits(spec.scale)),
        ("QB", q_block),
        ("KB", k_block),
        ("CAUSAL", int(spec.causal)),
    ]
    return query_block_launch(SAGE_ATTN_WG if warpgroup else SAGE_ATTN,
                              [q8.view(mx.uint32), q_scale, k8.view(mx.uint32), k_scale, v], template, spec, config,
                              v.dtype, warpgroup_shared_memory_bytes(spec.head_dim, config) if warpgroup else 0)


def sage_attention(q8, q_scale, k8, k_scale, v, spec: AttentionSpec, q_block: int, k_block: int, reference,
                   config: Optional[Dict[str, int]] = None) -> List[mx.array]:
    """``[out, lse]`` of quantized attention on the kernel (``reference()`` where it can't run).

    Args:
        q8, k8: int8 BHSD q and smoothed k; q_scale, k_scale: their float32 scales per
            ``q_block`` / ``k_block`` tokens (:class:`~mlx_primitives.attention.sage_quant.QuantizedQK`).
        v: ``(batch, num_kv_heads, k_len, head_dim)`` float16 or bfloat16.
        spec: the call (causal or not, scale); :func:`unsupported` must be None for it.
        reference: computes the same ``[out, lse]`` in MLX ops.
        config: tile sizes ``{"BK", "WARPS"}`` overriding the default; ``"WG"`` 0 or 1 picks the kernel
            (default: the warpgroup variant on sm_90 at head dims :data:`WG_HEAD_DIMS`).

    Returns:
        ``[out, lse]``: out like v with q's heads and length; lse float32 natural log of the
        smoothed scores (without the smoothing's correction), ``-inf`` for rows without keys.
    """
    warpgroup = uses_warpgroup(spec, config, WG_HEAD_DIMS)
    chosen = warpgroup_config_for(spec, config) if warpgroup else config_for(spec, config)
    plan = attention_plan(q8, q_scale, k8, k_scale, v, spec, q_block, k_block, chosen, warpgroup)
    return launch(plan, reference)


def compile_examples():
    """Launches covering both dtypes, every head dim, granularity, causal flag and fitting config."""
    from ..attention.sage_quant import GRANULARITIES
    from ..attention.spec import describe_attention

    for dtype in DTYPES + (mx.float32,):
        for head_dim in QUANT_HEAD_DIMS:
            x = mx.zeros((1, 2, 37, head_dim), dtype)
            for q_block, k_block in GRANULARITIES.values():
                for mean in (None, mx.zeros((1, 2, 1, head_dim), mx.float32)):
                    yield quantize_plan(x, q_block, mean)
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            q8 = mx.zeros((1, 4, 37, head_dim), mx.int8)
            k8 = mx.zeros((1, 2, 41, head_dim), mx.int8)
            v = mx.zeros((1, 2, 41, head_dim), dtype)
            for causal in (False, True):
                spec = describe_attention(mx.zeros((1, 4, 37, head_dim), dtype), v, v, causal=causal)
                for q_block, k_block in GRANULARITIES.values():
                    q_scale = mx.zeros((1, 4, -(-37 // q_block)), mx.float32)
                    k_scale = mx.zeros((1, 2, -(-41 // k_block)), mx.float32)
                    for config in SAGE_ATTN.configs():
                        if shared_memory_bytes(head_dim, config) > static_shared_memory("metal"):
                            continue
                        yield attention_plan(q8, q_scale, k8, k_scale, v, spec, q_block, k_block, config)
                    if head_dim in WG_HEAD_DIMS:
                        for config in SAGE_ATTN_WG.configs():
                            yield attention_plan(q8, q_scale, k8, k_scale, v, spec, q_block, k_block, config,
                                                 warpgroup=True)
