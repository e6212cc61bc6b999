"""The prefill attention kernel's backward (``src/flash_bwd_dq.kern``, ``src/flash_bwd_dkdv.kern``).

FA2's recipe, deterministic (no atomics): ``delta = rowsum(dout * out)`` in MLX ops, then one
kernel per query block for dq (walking the key tiles it sees) and one per key block for dk and dv
(walking the query tiles that see it, over every query head of its KV head), both recomputing
the probabilities from q, k and the forward's lse, with every feature of the forward in-kernel:
bottom-right causal and windows (tiles outside skipped), softcap, ALiBi, GQA/MQA, dropout (the
forward's counter-based keep mask). The ALiBi slopes' gradient comes from per-block sums of the dq
kernel; the sinks' (which join only the denominator) from lse and delta.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..attention.dropout import keep_threshold
from ..attention.spec import AttentionSpec
from ..hardware import LARGEST_DYNAMIC_SHARED_MEMORY, device_profile
from . import tuning
from .catalog import FLASH_BWD_DKDV, FLASH_BWD_DKDV_WG, FLASH_BWD_DQ, FLASH_BWD_DQ_WG
from .launcher import Kernel, Launch, float_bits, launch

Configs = Tuple[Dict[str, int], Dict[str, int]]


def dq_buffer_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """The dq kernel's tile buffer: q and dout blocks, then per stage a k and a v tile."""
    return (32 * config["WARPS"] + 2 * config["STAGES"] * config["BK"]) * (head_dim + 8) * itemsize


def dkdv_buffer_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """The dk/dv kernel's tile buffer: k and v blocks, then per stage a q and a dout tile."""
    return (32 * config["WARPS"] + 2 * config["STAGES"] * config["BQ"]) * (head_dim + 8) * itemsize


def dq_shared_memory_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """Shared memory of the dq kernel: its tile buffer and per-warp partials."""
    return dq_buffer_bytes(head_dim, config, itemsize) + 4 * config["WARPS"]


def dkdv_shared_memory_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """Shared memory of the dk/dv kernel: its tile buffer and the stages' lse and delta."""
    return dkdv_buffer_bytes(head_dim, config, itemsize) + 8 * config["STAGES"] * config["BQ"]


def dq_wg_buffer_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """The warpgroup dq kernel's dynamic shared memory: its tiles (rows unpadded) and 1 KiB to align them."""
    return (32 * config["WARPS"] + 2 * config["STAGES"] * config["BK"]) * head_dim * itemsize + 1024


def dq_wg_shared_memory_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """Shared memory of the warpgroup dq kernel: its tiles and per-warp partials."""
    return dq_wg_buffer_bytes(head_dim, config, itemsize) + 4 * config["WARPS"]


def dkdv_wg_buffer_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """The warpgroup dk/dv kernel's dynamic shared memory: its tiles (rows unpadded) and 1 KiB to align them."""
    return (32 * config["WARPS"] + 2 * config["STAGES"] * config["BQ"]) * head_dim * itemsize + 1024


def dkdv_wg_shared_memory_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """Shared memory of the warpgroup dk/dv kernel: its tiles and the stages' lse and delta."""
    return dkdv_wg_buffer_bytes(head_dim, config, itemsize) + 8 * config["STAGES"] * config["BQ"]


SHARED_MEMORY = {FLASH_BWD_DQ.name: dq_shared_memory_bytes, FLASH_BWD_DKDV.name: dkdv_shared_memory_bytes,
                 FLASH_BWD_DQ_WG.name: dq_wg_shared_memory_bytes, FLASH_BWD_DKDV_WG.name: dkdv_wg_shared_memory_bytes}


def _dynamic_bytes(buffer_bytes: int) -> int:
    """``Launch.shared_memory`` of a tile buffer: dynamic on CUDA, a static array elsewhere."""
    return buffer_bytes if device_profile().backend == "cuda" else 0


def column_chunk(head_dim: int) -> int:
    """Head-dim columns of dk/dv one group accumulates: all of them up to 128, else 128 per group."""
    return min(head_dim, 128)


def _fitting(kernel: Kernel, spec: AttentionSpec, limit: int, config: Optional[Dict[str, int]]):
    from .flash_attention import tile_options

    needed = SHARED_MEMORY[kernel.name]
    tuned = tuning.config_for(kernel, spec.dtype, {"D": spec.head_dim, "L": spec.k_len}, exact=("D",))
    config = tile_options(config)
    chosen = {**tuned, **config}
    if needed(spec.head_dim, chosen) <= limit:
        return chosen
    if config:
        raise ValueError(
            f"{kernel.name} config {chosen} needs {needed(spec.head_dim, chosen)} bytes of shared memory at "
            f"head_dim {spec.head_dim}; the limit is {limit}"
        )
    fitting = [c for c in kernel.configs() if needed(spec.head_dim, c) <= limit]
    return max(fitting, key=lambda c: needed(spec.head_dim, c)) if fitting else None


def configs_for(spec: AttentionSpec, limit: int, dq: Optional[Dict[str, int]] = None,
                dkdv: Optional[Dict[str, int]] = None) -> Optional[Configs]:
    """Tile sizes of both kernels (tuned or default, else the largest that fits ``limit`` bytes of
    shared memory), overridden by ``dq`` / ``dkdv``; None when no configuration fits. Each config names
    its variant (``"WG"``: 1 for the warpgroup kernel, on sm_90 at its head dims unless the override
    says ``{"WG": 0}``)."""
    from .flash_attention import check_warpgroup_tiles, uses_warpgroup

    chosen = []
    for config, kernels in ((dq, (FLASH_BWD_DQ, FLASH_BWD_DQ_WG)), (dkdv, (FLASH_BWD_DKDV, FLASH_BWD_DKDV_WG))):
        warpgroup = uses_warpgroup(spec, config)
        kernel = kernels[warpgroup]
        fitting = _fitting(kernel, spec, limit, config)
        if fitting is None:
            return None
        if warpgroup:
            check_warpgroup_tiles(kernel, fitting)
        chosen.append({**fitting, "WG": int(warpgroup)})
    return chosen[0], chosen[1]


def dropout_rng(spec: AttentionSpec, seed: Optional[mx.array], batch_offset: int) -> mx.array:
    """The kernels' ``rng`` input: uint32 ``(seed, keep threshold, batch offset)``."""
    if spec.dropout_p == 0:
        return mx.zeros((3,), mx.uint32)
    if seed is None:
        raise ValueError("dropout_seed (a uint32 scalar) is required when dropout_p > 0")
    rest = mx.array([keep_threshold(spec.dropout_p), batch_offset], dtype=mx.uint32)
    return mx.concatenate([seed.astype(mx.uint32).reshape(1), rest])


def feature_template(spec: AttentionSpec) -> List[Tuple[str, object]]:
    """Template values of the score mods and dropout, shared by the forward and both backward kernels."""
    return [
        ("SCALE", float_bits(spec.scale)),
        ("SOFTCAP", float_bits(spec.softcap) if spec.softcap > 0 else 0),
        ("ALIBI", 0 if spec.alibi_slopes is None else spec.alibi_slopes.ndim),
        ("DROPOUT", int(spec.dropout_p > 0)),
        ("RDROP", float_bits(1.0 / (1.0 - spec.dropout_p))),
    ]


def plan_dq(inputs: Sequence[mx.array], spec: AttentionSpec, config: Dict[str, int]) -> Launch:
    """``inputs`` in ``FLASH_BWD_DQ.inputs`` order; outputs dq and the per-block slope sums.
    ``config["WG"]`` 1 picks the warpgroup variant."""
    warpgroup = bool(config.get("WG", 0))
    threads = 32 * config["WARPS"]
    blocks = -(-spec.q_len // (16 * config["WARPS"]))
    slope_sums = (spec.batch, spec.num_heads, blocks) if spec.alibi_slopes is not None else (1,)
    return Launch(
        kernel=FLASH_BWD_DQ_WG if warpgroup else FLASH_BWD_DQ,
        inputs=list(inputs),
        template=[("T", inputs[0].dtype), ("D", spec.head_dim), ("BK", config["BK"]), ("WARPS", config["WARPS"]),
                  ("STAGES", config["STAGES"])] + feature_template(spec),
        grid=(blocks * threads, spec.num_heads, spec.batch),
        threadgroup=(threads, 1, 1),
        output_shapes=[(spec.batch, spec.num_heads, spec.q_len, spec.head_dim), slope_sums],
        output_dtypes=[inputs[0].dtype, mx.float32],
        shared_memory=(dq_wg_buffer_bytes(spec.head_dim, config) if warpgroup
                       else _dynamic_bytes(dq_buffer_bytes(spec.head_dim, config, inputs[0].dtype.size))),
    )


def plan_dkdv(inputs: Sequence[mx.array], spec: AttentionSpec, config: Dict[str, int]) -> Launch:
    """``inputs`` in ``FLASH_BWD_DKDV.inputs`` order; outputs dk and dv. ``config["WG"]`` 1 picks the
    warpgroup variant."""
    warpgroup = bool(config.get("WG", 0))
    threads = 32 * config["WARPS"]
    chunk = column_chunk(spec.head_dim)
    blocks = -(-spec.k_len // (16 * config["WARPS"])) * (spec.head_dim // chunk)
    kv_shape = (spec.batch, spec.num_kv_heads, spec.k_len, spec.head_dim)
    return Launch(
        kernel=FLASH_BWD_DKDV_WG if warpgroup else FLASH_BWD_DKDV,
        inputs=list(inputs),
        template=[("T", inputs[0].dtype), ("D", spec.head_dim), ("DC", chunk), ("BQ", config["BQ"]),
                  ("WARPS", config["WARPS"]), ("STAGES", config["STAGES"])] + feature_template(spec),
        grid=(blocks * threads, spec.num_kv_heads, spec.batch),
        threadgroup=(threads, 1, 1),
        output_shapes=[kv_shape, kv_shape],
        output_dtypes=[inputs[0].dtype, inputs[0].dtype],
        shared_memory=(dkdv_wg_buffer_bytes(spec.head_dim, config) if warpgroup
                       else _dynamic_bytes(dkdv_buffer_bytes(spec.head_dim, config, inputs[0].dtype.size))),
    )


def flash_backward(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    out: mx.array,
    lse: mx.array,
    dout: mx.array,
    dlse: Optional[mx.array],
    spec: AttentionSpec,
    configs: Configs,
    window: mx.array,
    slopes: mx.array,
    rng: mx.array,
    reference_grads: Callable[[], List[mx.array]],
) -> List[mx.array]:
    """Gradients of the forward's ``(out, lse)`` given their cotangents ``(dout, dlse)``.

    Args:
        q, k, v, out, lse: the forward's inputs and outputs (BHSD; lse float32 ``(B, H, Sq)``).
        dout: like ``out``; ``dlse``: like ``lse`` or None.
        spec: the call; its ``alibi_slopes`` and ``sinks`` are the ones differentiated.
        configs: ``(dq config, dk/dv config)`` from :func:`configs_for`.
        window, slopes, rng: the forward's extra kernel inputs (``slopes`` flat float32).
        reference_grads: the reference path's gradients, in the order returned here, for the
            launcher's fallback.

    Returns:
        ``[dq, dk, dv]``, then the gradient of ``alibi_slopes`` and of ``sinks`` where the spec has them.
    """
    delta = (dout.astype(mx.float32) * out.astype(mx.float32)).sum(axis=-1)
    if dlse is not None:
        delta = delta - dlse  # d lse / d s = P: the lse's cotangent joins every row like -delta
    dout = dout.astype(q.dtype)
    inputs = [q, k, v, dout, lse, delta, window, slopes, rng]
    slopes_given = spec.alibi_slopes

    def dq_fallback() -> List[mx.array]:
        grads = reference_grads()
        if slopes_given is None:
            return [grads[0], mx.zeros((1,), mx.float32)]
        slope_grad = grads[3].reshape(slopes_given.shape)
        if slope_grad.ndim == 1:  # per head: put it in batch row 0
            slope_grad = mx.concatenate([slope_grad[None], mx.zeros((spec.batch - 1, spec.num_heads))])
        return [grads[0], slope_grad[..., None]]

    dq, slope_sums = launch(plan_dq(inputs, spec, configs[0]), dq_fallback)
    dk, dv = launch(plan_dkdv(inputs, spec, configs[1]), lambda: reference_grads()[1:3])
    grads = [dq, dk, dv]
    if slopes_given is not None:
        slope_grad = slope_sums.sum(axis=-1)
        grads.append(slope_grad.sum(axis=0) if slopes_given.ndim == 1 else slope_grad)
    if spec.sinks is not None:
        # d out_i / d sink = -p_sink(i) out_i, p_sink(i) = exp(sink - lse_i).
        p_sink = mx.exp(spec.sinks.astype(mx.float32)[None, :, None] - lse)
        grads.append(-(p_sink * delta).sum(axis=(0, 2)))
    return grads


def compile_examples():
    """Launches of both kernels for both dtypes, every head dim, feature flag and config that fits the
    largest shared memory of a supported GPU (the Metal and CUDA compile checks; a launch on a given
    device only takes configs that fit its own limit)."""
    from ..attention.spec import describe_attention
    from .flash_attention import DTYPES, HEAD_DIMS, WG_HEAD_DIMS

    limit = LARGEST_DYNAMIC_SHARED_MEMORY
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            q = mx.zeros((1, 4, 37, head_dim), dtype)
            kv = mx.zeros((1, 2, 41, head_dim), dtype)
            features = [
                {},
                {"softcap": 30.0, "alibi_slopes": mx.zeros((4,)), "causal": True, "dropout_p": 0.1},
                {"alibi_slopes": mx.zeros((1, 4)), "window_size": (5, 3)},
            ]
            lse = mx.zeros((1, 4, 37), mx.float32)
            extras = [mx.zeros((2,), mx.int32), mx.zeros((1,), mx.float32), mx.zeros((3,), mx.uint32)]
            inputs = [q, kv, kv, q, lse, lse] + extras
            for options in features:
                spec = describe_attention(q, kv, kv, **options)
                for kernel, make in ((FLASH_BWD_DQ, plan_dq), (FLASH_BWD_DKDV, plan_dkdv)):
                    for config in kernel.configs():
                        if SHARED_MEMORY[kernel.name](head_dim, config) <= limit:
                            yield make(inputs, spec, config)
                if head_dim in WG_HEAD_DIMS:
                    for kernel, make in ((FLASH_BWD_DQ_WG, plan_dq), (FLASH_BWD_DKDV_WG, plan_dkdv)):
                        for config in kernel.configs():
                            if SHARED_MEMORY[kernel.name](head_dim, config) <= limit:
                                yield make(inputs, spec, {**config, "WG": 1})
