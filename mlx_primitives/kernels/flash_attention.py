"""The prefill attention kernel (``src/flash_fwd.kern``): tiled forward with online softmax.

One launch computes ``out`` and the float32 ``lse`` of an attention call described by an
:class:`~mlx_primitives.attention.spec.AttentionSpec`, with the features
``mx.fast.scaled_dot_product_attention`` lacks computed in-kernel: bottom-right causal and
sliding windows (key tiles outside the window are skipped), softcap, ALiBi, GQA/MQA, sinks.
Gradients go through the reference path (:func:`~.launcher.with_reference_vjp`). The dispatcher
(``attention/dispatch.py``) decides when a call comes here; :func:`unsupported` says when it can't.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from ..attention.reference import reference_attention
from ..attention.spec import AttentionSpec
from ..hardware import device_profile
from . import tuning
from .catalog import FLASH_FWD
from .launcher import Launch, float_bits, launch, with_reference_vjp

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (mx.float16, mx.bfloat16)
# Static shared (threadgroup) memory one group may declare: 48 KiB on CUDA, 32 KiB on Apple GPUs.
SHARED_MEMORY_LIMITS = {"cuda": 48 * 1024, "metal": 32 * 1024}


def shared_memory_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """Bytes of the kernel's one shared buffer (see the comment block of ``flash_fwd.kern``)."""
    rows = max(2 * config["BK"], 16 * config["WARPS"])
    return rows * (head_dim + 8) * itemsize


def shared_memory_limit(backend: Optional[str] = None) -> int:
    """The static shared-memory budget of ``backend`` (default: the current one; CUDA's where unknown)."""
    return SHARED_MEMORY_LIMITS.get(backend or device_profile().backend, SHARED_MEMORY_LIMITS["cuda"])


def unsupported(spec: AttentionSpec) -> Optional[str]:
    """Why the kernel cannot compute ``spec``, or None when it can."""
    if spec.dtype not in DTYPES:
        return f"dtype {spec.dtype} is not float16 or bfloat16"
    if spec.head_dim not in HEAD_DIMS or spec.v_head_dim != spec.head_dim:
        return f"head dims ({spec.head_dim}, {spec.v_head_dim}) are not one of {HEAD_DIMS} for q, k and v"
    if shared_memory_bytes(spec.head_dim, tuning.SPACES[FLASH_FWD.name].default) > shared_memory_limit():
        return f"head_dim {spec.head_dim} needs more shared memory than this backend's {shared_memory_limit()} bytes"
    if spec.dropout_p > 0:
        return "dropout runs on the reference path"
    if spec.mask is not None:
        return "a mask array is given"
    if spec.q_len == 0:
        return "q_len is 0"
    return None


def tuning_problem(spec: AttentionSpec) -> Dict[str, int]:
    """The tuning cache's view of a call: head dim (exact) and key length (bucketed)."""
    return {"D": spec.head_dim, "L": spec.k_len}


def config_for(spec: AttentionSpec, config: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Tile sizes of a launch: the tuned (or default) ones for the call's bucket, overridden by ``config``;
    checked against shared memory."""
    tuned = tuning.config_for(FLASH_FWD, spec.dtype, tuning_problem(spec), exact=("D",))
    chosen = {**tuned, **(config or {})}
    if chosen["BK"] % 16 or chosen["WARPS"] < 1:
        raise ValueError(f"BK must be a multiple of 16 and WARPS positive; got {chosen}")
    if shared_memory_bytes(spec.head_dim, chosen) > shared_memory_limit():
        raise ValueError(
            f"config {chosen} needs {shared_memory_bytes(spec.head_dim, chosen)} bytes of shared memory "
            f"at head_dim {spec.head_dim}; the limit is {shared_memory_limit()}"
        )
    return chosen


def plan(q, k, v, window, slopes, sinks, spec: AttentionSpec, config: Dict[str, int]) -> Launch:
    threads = 32 * config["WARPS"]
    query_blocks = -(-spec.q_len // (16 * config["WARPS"]))
    alibi = 0 if spec.alibi_slopes is None else spec.alibi_slopes.ndim
    template = [
        ("T", q.dtype),
        ("D", spec.head_dim),
        ("BK", config["BK"]),
        ("WARPS", config["WARPS"]),
        ("SCALE", float_bits(spec.scale)),
        ("SOFTCAP", float_bits(spec.softcap) if spec.softcap > 0 else 0),
        ("ALIBI", alibi),
        ("SINKS", int(spec.sinks is not None)),
    ]
    return Launch(
        kernel=FLASH_FWD,
        inputs=[q, k, v, window, slopes, sinks],
        template=template,
        grid=(query_blocks * threads, spec.num_heads, spec.batch),
        threadgroup=(threads, 1, 1),
        output_shapes=[
            (spec.batch, spec.num_heads, spec.q_len, spec.head_dim),
            (spec.batch, spec.num_heads, spec.q_len),
        ],
        output_dtypes=[q.dtype, mx.float32],
    )


def _placeholder() -> mx.array:
    return mx.zeros((1,), mx.float32)


def flash_attention(
    q: mx.array, k: mx.array, v: mx.array, spec: AttentionSpec, config: Optional[Dict[str, int]] = None
) -> Tuple[mx.array, mx.array]:
    """Attention of ``spec`` on the kernel, differentiable through the reference path.

    Args:
        q: ``(batch, num_heads, q_len, head_dim)``, float16 or bfloat16 (BHSD).
        k: ``(batch, num_kv_heads, k_len, head_dim)``.
        v: ``(batch, num_kv_heads, k_len, head_dim)``.
        spec: the call's description; :func:`unsupported` must be None for it.
        config: tile sizes ``{"BK", "WARPS"}`` overriding the head dim's default.

    Returns:
        ``(out, lse)``: ``out`` like ``q``; ``lse`` float32 ``(batch, num_heads, q_len)``,
        ``-inf`` for rows that see no key.
    """
    chosen = config_for(spec, config)
    window = mx.array(spec.window, dtype=mx.int32)
    # ALiBi slopes and sinks are primals, so the reference's gradient reaches them too.
    extras = [x.astype(mx.float32).reshape(-1) for x in (spec.alibi_slopes, spec.sinks) if x is not None]

    def with_extras(extra_arrays) -> Tuple[AttentionSpec, mx.array, mx.array]:
        it = iter(extra_arrays)
        slopes = None if spec.alibi_slopes is None else next(it).reshape(spec.alibi_slopes.shape)
        sinks = None if spec.sinks is None else next(it)
        return dataclasses.replace(spec, alibi_slopes=slopes, sinks=sinks), slopes, sinks

    def reference(q, k, v, *extra_arrays) -> List[mx.array]:
        return list(reference_attention(q, k, v, with_extras(extra_arrays)[0]))

    def forward(q, k, v, *extra_arrays) -> List[mx.array]:
        call_spec, slopes, sinks = with_extras(extra_arrays)
        slopes = _placeholder() if slopes is None else slopes.reshape(-1)
        sinks = _placeholder() if sinks is None else sinks
        launch_plan = plan(q, k, v, window, slopes, sinks, call_spec, chosen)
        return launch(launch_plan, lambda: reference(q, k, v, *extra_arrays))

    out, lse = with_reference_vjp(forward, reference)(q, k, v, *extras)
    return out, lse


def compile_examples():
    """Launches covering both dtypes, every head dim, feature flag and fitting tile config (Metal compile check)."""
    from ..attention.spec import describe_attention

    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            q = mx.zeros((1, 4, 37, head_dim), dtype)
            kv = mx.zeros((1, 2, 41, head_dim), dtype)
            features = [
                {},
                {"softcap": 30.0, "alibi_slopes": mx.zeros((4,)), "sinks": mx.zeros((4,)), "causal": True},
                {"alibi_slopes": mx.zeros((1, 4))},
            ]
            for options in features:
                spec = describe_attention(q, kv, kv, **options)
                for config in FLASH_FWD.configs():
                    if shared_memory_bytes(head_dim, config) > shared_memory_limit("metal"):
                        continue
                    yield plan(q, kv, kv, mx.array(spec.window, dtype=mx.int32), _placeholder(), _placeholder(),
                               spec, config)
