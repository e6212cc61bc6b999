"""Scan kernels: Mamba's selective scan and the first-order linear recurrence (the ``"ssm"`` scan).

Both bodies are two-level parallel prefixes over one chunk of the sequence per step (lanes run along
channels, warps along time; see ``src/selective_scan.kern`` and ``src/linear_scan.kern``). A sequence
longer than a threadgroup's chunk goes chunk by chunk with the state carried in registers. When the
(batch, channel-group) threadgroups are too few to fill the GPU, the selective scan also cuts the
sequence into splits run by separate threadgroups: a first pass gets each split's end state from a
zero start, the linear-scan kernel chains those end states across splits (decay ``exp(A * sum dt)``),
and a second pass writes ``y`` from each split's true start state.

The functions here take validated arrays (see ``mlx_primitives.scan``) and raise
:class:`KernelUnavailable` where the launcher falls back, so the caller runs the reference instead.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import mlx.core as mx

from ..hardware import static_shared_memory
from . import catalog
from .launcher import Launch, launch
from .tuning import config_for

WARP = 32
# Split the sequence while fewer threadgroups than this would run. H100 (132 SMs), B=8, L=4096, D=2048:
# 512 groups in one split ran 3.07 ms, two splits 3.55 ms (benchmarks/results/h100/zoo.md).
SPLIT_TARGET_GROUPS = 512


class KernelUnavailable(RuntimeError):
    """The launcher fell back (CPU backend or a failed compilation); the caller runs the reference."""


def _unavailable() -> List[mx.array]:
    raise KernelUnavailable()


def shared_memory_bytes(config: Dict[str, int], state_size: int) -> int:
    """Bytes of shared memory of ``selective_scan.kern`` (see its comment block)."""
    chunk = config["WARPS"] * config["ITEMS"]
    return 4 * (2 * chunk * state_size + 4 * config["WARPS"] * WARP)


def selective_scan_config(dtype: mx.Dtype, length: int, dims: int, state_size: int,
                          config: Optional[dict] = None) -> Optional[Dict[str, int]]:
    """Template values for the selective scan, or None when its shared memory exceeds the backend's."""
    chosen = {**config_for(catalog.SELECTIVE_SCAN, dtype, {"L": length, "D": dims, "N": state_size}, ("N",)),
              **(config or {})}
    return chosen if shared_memory_bytes(chosen, state_size) <= static_shared_memory() else None


def selective_scan_plan(x, delta, A, B, C, D, z, delta_bias, h_init, split_len: int, softplus: bool,
                        write_y: bool, config: Dict[str, int]) -> Launch:
    """One pass of ``selective_scan.kern``; absent optional arrays travel as one-element placeholders."""
    batch, length, dims = x.shape
    state_size = A.shape[1]
    splits = h_init.shape[1]
    placeholder = mx.zeros((1,), mx.float32)
    threads = config["WARPS"] * WARP
    return Launch(
        kernel=catalog.SELECTIVE_SCAN,
        inputs=[x, delta, A.astype(mx.float32), B, C,
                placeholder if D is None else D.astype(mx.float32),
                x[:1, :1, :1] if z is None else z,
                placeholder if delta_bias is None else delta_bias.astype(mx.float32),
                h_init, mx.array([split_len], mx.int32)],
        template=[("T", x.dtype), ("NS", state_size), ("WARPS", config["WARPS"]), ("ITEMS", config["ITEMS"]),
                  ("HAS_D", int(D is not None)), ("HAS_Z", int(z is not None)),
                  ("HAS_BIAS", int(delta_bias is not None)), ("SOFTPLUS", int(softplus)), ("WRITE_Y", int(write_y))],
        grid=(-(-dims // WARP) * threads, splits, batch),
        threadgroup=(threads, 1, 1),
        output_shapes=[(batch, length, dims) if write_y else (1,), (batch, splits, dims, state_size),
                       (batch, splits, dims)],
        output_dtypes=[x.dtype, mx.float32, mx.float32],
    )


def split_length(length: int, batch: int, dims: int, chunk: int, splits: Optional[int] = None) -> int:
    """Time steps per split: the whole sequence unless too few threadgroups would run (a multiple of ``chunk``)."""
    chunks = -(-length // chunk)
    if splits is None:
        groups = batch * -(-dims // WARP)
        splits = -(-SPLIT_TARGET_GROUPS // groups)
    splits = max(1, min(splits, chunks))
    return -(-chunks // splits) * chunk


def selective_scan(x, delta, A, B, C, D=None, z=None, delta_bias=None, softplus: bool = False,
                   config: Optional[Dict[str, int]] = None, splits: Optional[int] = None) -> Tuple[mx.array, mx.array]:
    """Mamba's selective scan on the GPU; arguments as :func:`mlx_primitives.selective_scan`.

    Args:
        config: template values (``WARPS``, ``ITEMS``); :func:`selective_scan_config` checks them.
        splits: sequence splits across threadgroups (default: enough to run ``SPLIT_TARGET_GROUPS`` groups).

    Returns:
        ``(y, last_state)``: ``y`` ``(batch, L, D)`` in x's dtype, ``last_state`` float32 ``(batch, D, N)``.

    Raises:
        KernelUnavailable: where the launcher fell back to the reference.
    """
    batch, length, dims = x.shape
    state_size = A.shape[1]
    chunk = config["WARPS"] * config["ITEMS"]
    split_len = split_length(length, batch, dims, chunk, splits)
    count = -(-length // split_len)
    h_init = mx.zeros((batch, count, dims, state_size), mx.float32)
    if count > 1:
        _, h_end, dt_sum = launch(selective_scan_plan(x, delta, A, B, C, D, z, delta_bias, h_init, split_len,
                                                      softplus, False, config), _unavailable)
        decay = mx.exp(A.astype(mx.float32) * dt_sum[..., None])  # each split's decay from start to end
        chained = linear_scan(decay.reshape(batch, count, -1), h_end.reshape(batch, count, -1))
        h_init = mx.concatenate([h_init[:, :1], chained[:, :-1].reshape(batch, count - 1, dims, state_size)], 1)
    y, h_last, _ = launch(selective_scan_plan(x, delta, A, B, C, D, z, delta_bias, h_init, split_len,
                                              softplus, True, config), _unavailable)
    return y, h_last[:, -1]


def linear_scan_plan(a: mx.array, b: mx.array, config: Dict[str, int]) -> Launch:
    """``linear_scan.kern`` over ``a, b`` of shape ``(outer, L, inner)``."""
    outer, _, inner = a.shape
    threads = config["WARPS"] * WARP
    return Launch(
        kernel=catalog.LINEAR_SCAN,
        inputs=[a, b],
        template=[("T", a.dtype), ("WARPS", config["WARPS"]), ("ITEMS", config["ITEMS"])],
        grid=(-(-inner // WARP) * threads, outer, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[a.shape],
        output_dtypes=[a.dtype],
    )


def linear_scan(a: mx.array, b: mx.array, config: Optional[Dict[str, int]] = None) -> mx.array:
    """``h_t = a_t h_{t-1} + b_t`` along axis 1 of ``a, b (outer, L, inner)`` (same dtype) on the GPU.

    Raises:
        KernelUnavailable: where the launcher fell back to the reference.
    """
    outer, length, inner = a.shape
    config = {**config_for(catalog.LINEAR_SCAN, a.dtype, {"L": length, "inner": inner}), **(config or {})}
    return launch(linear_scan_plan(a, b, config), _unavailable)[0]


def compile_examples():
    """Launches covering every dtype, option and tunable configuration (for the Metal compile check)."""
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        for config in catalog.LINEAR_SCAN.configs():
            a = mx.zeros((2, 100, 40), dtype)
            yield linear_scan_plan(a, a, config)
        x = mx.zeros((2, 100, 40), dtype)
        bc = mx.zeros((2, 100, 16), dtype)
        A = mx.zeros((40, 16), mx.float32)
        vec = mx.zeros((40,), mx.float32)
        h_init = mx.zeros((2, 1, 40, 16), mx.float32)
        for config in catalog.SELECTIVE_SCAN.configs():
            yield selective_scan_plan(x, x, A, bc, bc, None, None, None, h_init, 128, False, True, config)
        for write_y in (False, True):
            yield selective_scan_plan(x, x, A, bc, bc, vec, x, vec, h_init, 64, True, write_y,
                                      catalog.DEFAULTS["selective_scan"])
