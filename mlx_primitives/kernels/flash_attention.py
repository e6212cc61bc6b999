"""The prefill attention kernel (``src/flash_fwd.kern``): tiled forward with online softmax.

Two variants of the one body: FLASH_FWD (16-row warp tiles on ``mma_*.inc``, every backend) and,
on sm_90 at head dims 64, 128 and 256, FLASH_FWD_WG (64-row warpgroup tiles on Hopper's
``wgmma``, ``wgmma_*.inc``); :func:`uses_warpgroup` picks, ``config={"WG": 0 | 1}`` overrides.

One launch computes ``out`` and the float32 ``lse`` of an attention call described by an
:class:`~mlx_primitives.attention.spec.AttentionSpec`, with the features
``mx.fast.scaled_dot_product_attention`` lacks computed in-kernel: bottom-right causal and
sliding windows (key tiles outside the window are skipped), softcap, ALiBi, GQA/MQA, sinks,
dropout (the counter-based keep mask of ``attention/dropout.py``). Gradients come from the backward
kernels (:mod:`.flash_backward`) through ``mx.custom_function``, or from the reference path where
no backward configuration fits shared memory. The dispatcher (``attention/dispatch.py``) decides
when a call comes here; :func:`unsupported` says when it can't.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

from ..attention.reference import reference_attention
from ..attention.spec import AttentionSpec
from ..hardware import device_profile, dynamic_shared_memory, static_shared_memory
from ..memo import CallMemo
from . import flash_backward, tuning
from .catalog import FLASH_FWD, FLASH_FWD_WG
from .launcher import BoundLaunch, Kernel, Launch

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (mx.float16, mx.bfloat16)
# Head dims of the warpgroup variant (FLASH_FWD_WG): whole 64-element column blocks of its tiles.
WG_HEAD_DIMS = (64, 128, 256)


def shared_memory_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """Bytes of the kernel's one shared buffer (see the comment block of ``flash_fwd.kern``)."""
    rows = max(2 * config["BK"], 16 * config["WARPS"])
    return rows * (head_dim + 8) * itemsize


def warpgroup_shared_memory_bytes(head_dim: int, config: Dict[str, int], itemsize: int = 2) -> int:
    """Dynamic shared memory of the warpgroup variant: the q block, two stages of (K tile, V tile) and
    1 KiB to align the tiles."""
    return (16 * config["WARPS"] + 4 * config["BK"]) * head_dim * itemsize + 1024


def warpgroup_available() -> bool:
    """Whether this device has the warpgroup matrix unit the WG kernel variants run on (CUDA sm_90)."""
    profile = device_profile()
    return profile.backend == "cuda" and profile.family == "sm_90"


def uses_warpgroup(spec: AttentionSpec, config: Optional[Dict[str, int]] = None,
                   head_dims: Tuple[int, ...] = WG_HEAD_DIMS) -> bool:
    """Whether a call runs the warpgroup variant of its kernel: on sm_90 (wgmma) at ``head_dims``, unless
    ``config`` says ``{"WG": 0}``; ``{"WG": 1}`` asks for it (ValueError where it can't run)."""
    eligible = warpgroup_available() and spec.head_dim in head_dims
    wanted = (config or {}).get("WG")
    if wanted is None:
        return eligible
    if wanted not in (0, 1):
        raise ValueError(f"config['WG'] must be 0 or 1; got {wanted!r}")
    if wanted and not eligible:
        raise ValueError(f"the warpgroup kernel needs sm_90 and head_dim in {head_dims}; this is "
                         f"{device_profile().family} with head_dim {spec.head_dim}")
    return bool(wanted)


def unsupported(spec: AttentionSpec) -> Optional[str]:
    """Why the kernel cannot compute ``spec``, or None when it can."""
    if spec.dtype not in DTYPES:
        return f"dtype {spec.dtype} is not float16 or bfloat16"
    if spec.head_dim not in HEAD_DIMS or spec.v_head_dim != spec.head_dim:
        return f"head dims ({spec.head_dim}, {spec.v_head_dim}) are not one of {HEAD_DIMS} for q, k and v"
    if not _fitting_configs(spec.head_dim):
        return f"head_dim {spec.head_dim} needs more shared memory than this backend's {static_shared_memory()} bytes"
    if spec.mask is not None:
        return "a mask array is given"
    if spec.q_len == 0:
        return "q_len is 0"
    return None


def tuning_problem(spec: AttentionSpec) -> Dict[str, int]:
    """The tuning cache's view of a call: head dim (exact) and key length (bucketed)."""
    return {"D": spec.head_dim, "L": spec.k_len}


# Untuned tiles of sliding-window calls (a left window): each query block walks only about
# (window + rows) / BK key tiles, and 64-row blocks measured faster than the 128-row default there
# (H100, fp16, D=128, L=16k, W=1k, causal: 1.39-1.41 against 1.42-1.87 ms for B=2, 0.74-0.75 against
# 0.84-0.88 ms for B=1, 8 calls queued).
SLIDING_WINDOW_TILES = {"BK": 64, "WARPS": 4}


def _fitting_configs(head_dim: int) -> List[Dict[str, int]]:
    return [c for c in FLASH_FWD.configs() if shared_memory_bytes(head_dim, c) <= static_shared_memory()]


def tile_options(config: Optional[Dict[str, int]]) -> Dict[str, int]:
    """``config`` without its kernel choice ``"WG"``: the tile sizes it overrides."""
    return {name: value for name, value in (config or {}).items() if name != "WG"}


def check_warpgroup_tiles(kernel: Kernel, chosen: Dict[str, int]) -> None:
    """Raise ValueError unless ``chosen`` is one of the configurations of ``kernel``, a warpgroup variant (its
    tiles are instruction widths)."""
    if chosen not in kernel.configs():
        raise ValueError(f"the warpgroup kernel takes {dict(kernel.tunables)} ({kernel.name}); got {chosen} "
                         "(config['WG'] = 0 picks the other kernel)")


def checked_warpgroup_config(kernel: Kernel, tuned: Dict[str, int], config: Optional[Dict[str, int]],
                             needed: Callable[[Dict[str, int]], int]) -> Dict[str, int]:
    """``tuned`` overridden by ``config``'s tiles, checked against the configurations of ``kernel``
    (:func:`check_warpgroup_tiles`) and, through ``needed(config) -> bytes``, dynamic shared memory."""
    chosen = {**tuned, **tile_options(config)}
    check_warpgroup_tiles(kernel, chosen)
    limit = dynamic_shared_memory(device_profile())
    if needed(chosen) > limit:
        raise ValueError(f"config {chosen} needs {needed(chosen)} bytes of shared memory; the limit is {limit}")
    return chosen


def warpgroup_registers_short(head_dim: int, config: Dict[str, int]) -> Optional[str]:
    """Why ``config`` leaves the warpgroup forward too few registers at ``head_dim``, or None (nvcc, sm_90a:
    128 keys' scores beside a 64 x 256 output block spill)."""
    if head_dim > 128 and config["BK"] > 64:
        return "a 64 x 256 output block leaves no registers for 128 keys' scores"
    return None


def warpgroup_config_for(spec: AttentionSpec, config: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Tile sizes of a warpgroup launch: tuned (or default) for the call's bucket, overridden by ``config``;
    where the tiles would run short of registers (:func:`warpgroup_registers_short`: head dim 256) 64 keys per
    tile unless ``config`` names BK."""
    tuned = dict(tuning.config_for(FLASH_FWD_WG, spec.dtype, tuning_problem(spec), exact=("D",)))
    if "BK" not in (config or {}) and warpgroup_registers_short(spec.head_dim, tuned):
        tuned["BK"] = 64
    return checked_warpgroup_config(FLASH_FWD_WG, tuned, config,
                                    lambda c: warpgroup_shared_memory_bytes(spec.head_dim, c))


def config_for(spec: AttentionSpec, config: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Tile sizes of a launch: the tuned (or default) ones for the call's bucket, overridden by ``config``;
    checked against shared memory. Sliding-window calls take :data:`SLIDING_WINDOW_TILES` in place of
    the default. Where the tuned or default tiles don't fit this head dim and no ``config`` is given,
    the largest tiles that fit."""
    config = tile_options(config)
    tuned = tuning.config_for(FLASH_FWD, spec.dtype, tuning_problem(spec), exact=("D",))
    if spec.window[0] >= 0 and tuned == tuning.SPACES[FLASH_FWD.name].default_for(device_profile()):
        tuned = SLIDING_WINDOW_TILES
    fitting = _fitting_configs(spec.head_dim)
    if not config and tuned not in fitting and fitting:
        tuned = max(fitting, key=lambda c: c["BK"] * c["WARPS"])
    chosen = {**tuned, **config}
    if chosen["BK"] % 16 or chosen["WARPS"] < 1:
        raise ValueError(f"BK must be a multiple of 16 and WARPS positive; got {chosen}")
    if shared_memory_bytes(spec.head_dim, chosen) > static_shared_memory():
        raise ValueError(
            f"config {chosen} needs {shared_memory_bytes(spec.head_dim, chosen)} bytes of shared memory "
            f"at head_dim {spec.head_dim}; the limit is {static_shared_memory()}"
        )
    return chosen


def query_block_launch(kernel: Kernel, inputs: List[mx.array], template: List[Tuple[str, object]],
                       spec: AttentionSpec, config: Dict[str, int], out_dtype: mx.Dtype,
                       shared_memory: int = 0) -> Launch:
    """A launch of a prefill attention body (flash, sage): one group of ``config["WARPS"]`` warps per
    (query block of 16 rows a warp, head, batch); outputs ``out`` (BHSD, ``out_dtype``) and float32 ``lse``."""
    threads = 32 * config["WARPS"]
    query_blocks = -(-spec.q_len // (16 * config["WARPS"]))
    return Launch(
        kernel=kernel,
        inputs=inputs,
        template=template,
        grid=(query_blocks * threads, spec.num_heads, spec.batch),
        threadgroup=(threads, 1, 1),
        output_shapes=[
            (spec.batch, spec.num_heads, spec.q_len, spec.head_dim),
            (spec.batch, spec.num_heads, spec.q_len),
        ],
        output_dtypes=[out_dtype, mx.float32],
        shared_memory=shared_memory,
    )


def plan(q, k, v, window, slopes, sinks, rng, spec: AttentionSpec, config: Dict[str, int],
         warpgroup: bool = False) -> Launch:
    """The forward's launch; ``warpgroup`` picks FLASH_FWD_WG (``config`` from :func:`warpgroup_config_for`)."""
    template = [("T", q.dtype), ("D", spec.head_dim), ("BK", config["BK"]), ("WARPS", config["WARPS"])]
    template += flash_backward.feature_template(spec) + [("SINKS", int(spec.sinks is not None))]
    return query_block_launch(FLASH_FWD_WG if warpgroup else FLASH_FWD, [q, k, v, window, slopes, sinks, rng],
                              template, spec, config, q.dtype,
                              warpgroup_shared_memory_bytes(spec.head_dim, config) if warpgroup else 0)


def _placeholder() -> mx.array:
    return mx.zeros((1,), mx.float32)


# Prepared calls (tiles, constant inputs, the differentiable kernel function) by everything a call's
# meaning depends on besides array values: a model repeats a few call shapes, and preparing one costs
# about 100 us of Python, as much as the kernel of a short prefill.
_CALLS = CallMemo(256)


def _frozen(config: Optional[Dict[str, int]]):
    return None if config is None else tuple(sorted(config.items()))


def _call_key(spec: AttentionSpec, config, dropout_seed, batch_offset: int, backward_configs) -> Optional[tuple]:
    """The memo key of a call, or None where it can't be keyed (dropout: its seed is an array)."""
    if spec.dropout_p > 0 or spec.mask is not None or dropout_seed is not None:
        return None
    try:
        extras = tuple(None if x is None else (x.shape, x.dtype) for x in (spec.alibi_slopes, spec.sinks))
        key = (spec.batch, spec.num_heads, spec.num_kv_heads, spec.q_len, spec.k_len, spec.head_dim,
               spec.v_head_dim, spec.dtype, spec.scale, spec.causal, spec.window, spec.softcap, extras,
               _frozen(config), backward_configs and tuple(_frozen(c) for c in backward_configs), batch_offset,
               device_profile().backend)
        hash(key)
    except (AttributeError, TypeError):  # unhashable options: prepare every time
        return None
    return key


def flash_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    spec: AttentionSpec,
    config: Optional[Dict[str, int]] = None,
    dropout_seed: Optional[mx.array] = None,
    batch_offset: int = 0,
    backward_configs: Optional[Tuple[Optional[Dict[str, int]], Optional[Dict[str, int]]]] = None,
) -> Tuple[mx.array, mx.array]:
    """Attention of ``spec`` on the kernel, differentiable through the backward kernels.

    Args:
        q: ``(batch, num_heads, q_len, head_dim)``, float16 or bfloat16 (BHSD).
        k: ``(batch, num_kv_heads, k_len, head_dim)``.
        v: ``(batch, num_kv_heads, k_len, head_dim)``.
        spec: the call's description; :func:`unsupported` must be None for it.
        config: tile sizes ``{"BK", "WARPS"}`` overriding the head dim's default; ``"WG"`` 0 or 1 picks
            the kernel (default: the warpgroup variant where :func:`uses_warpgroup`).
        dropout_seed: uint32 scalar, required when ``spec.dropout_p > 0`` (the reference path's
            keep mask for the same seed).
        batch_offset: index of batch row 0 in the dropout counter (varlen sequences).
        backward_configs: ``(dq, dk/dv)`` tile sizes overriding the backward kernels' defaults.

    Returns:
        ``(out, lse)``: ``out`` like ``q``; ``lse`` float32 ``(batch, num_heads, q_len)``,
        ``-inf`` for rows that see no key.
    """
    function = _CALLS.get(_call_key(spec, config, dropout_seed, batch_offset, backward_configs),
                          lambda: _prepare(spec, config, dropout_seed, batch_offset, backward_configs))
    # ALiBi slopes and sinks are primals, so gradients reach them too.
    extras = [x.astype(mx.float32).reshape(-1) for x in (spec.alibi_slopes, spec.sinks) if x is not None]
    out, lse = function(q, k, v, *extras)
    return out, lse


def _prepare(spec: AttentionSpec, config, dropout_seed, batch_offset: int, backward_configs):
    """The differentiable kernel function of a call: ``function(q, k, v, *extras) -> [out, lse]`` where
    ``extras`` are the flat float32 ALiBi slopes and sinks the spec has (their values may change
    between calls of one prepared function; their shapes may not)."""
    warpgroup = uses_warpgroup(spec, config)
    chosen = warpgroup_config_for(spec, config) if warpgroup else config_for(spec, config)
    # The backward's tiles are looked up when a gradient is taken (explicit ones are checked now).
    grad_configs = _memo(lambda: flash_backward.configs_for(spec, dynamic_shared_memory(),
                                                            *(backward_configs or (None, None))))
    if backward_configs is not None:
        grad_configs()
    window = mx.array(spec.window, dtype=mx.int32)
    rng = flash_backward.dropout_rng(spec, dropout_seed, batch_offset)
    absent = _placeholder()  # the slopes or sinks input of a call without them
    bound = []  # the forward's BoundLaunch, made at the first call

    def with_extras(extra_arrays) -> Tuple[AttentionSpec, mx.array, mx.array]:
        it = iter(extra_arrays)
        slopes = None if spec.alibi_slopes is None else next(it).reshape(spec.alibi_slopes.shape)
        sinks = None if spec.sinks is None else next(it)
        return dataclasses.replace(spec, alibi_slopes=slopes, sinks=sinks), slopes, sinks

    def reference(q, k, v, *extra_arrays) -> List[mx.array]:
        return list(reference_attention(q, k, v, with_extras(extra_arrays)[0], dropout_seed, batch_offset))

    def kernel_inputs(extra_arrays) -> Tuple[AttentionSpec, mx.array, mx.array]:
        call_spec, slopes, sinks = with_extras(extra_arrays)
        return call_spec, absent if slopes is None else slopes.reshape(-1), absent if sinks is None else sinks

    def forward(q, k, v, *extra_arrays) -> List[mx.array]:
        call_spec, slopes, sinks = kernel_inputs(extra_arrays)
        inputs = [q, k, v, window, slopes, sinks, rng]
        if not bound:
            bound.append(BoundLaunch(plan(*inputs, call_spec, chosen, warpgroup)))
        return bound[0](inputs, lambda: reference(q, k, v, *extra_arrays))

    function = mx.custom_function(forward)

    @function.vjp
    def backward(primals, cotangents, outputs):
        primals, cotangents = list(primals), list(cotangents)
        reference_grads = _memo(lambda: mx.vjp(reference, primals, cotangents)[1])
        if grad_configs() is None:
            return tuple(reference_grads())
        q, k, v, *extra_arrays = primals
        call_spec, slopes, _ = kernel_inputs(extra_arrays)
        out, lse = outputs
        return tuple(flash_backward.flash_backward(
            q, k, v, out, lse, cotangents[0], cotangents[1], call_spec, grad_configs(), window, slopes, rng,
            reference_grads,
        ))

    return function


def _memo(compute):
    """``compute``, run on the first call only."""
    cache = []

    def once():
        if not cache:
            cache.append(compute())
        return cache[0]

    return once


def compile_examples():
    """Launches covering both dtypes, every head dim, feature flag and fitting tile config, and the warpgroup
    variant's at its head dims (the Metal and CUDA compile checks)."""
    from ..attention.spec import describe_attention

    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            q = mx.zeros((1, 4, 37, head_dim), dtype)
            kv = mx.zeros((1, 2, 41, head_dim), dtype)
            features = [
                {},
                {"softcap": 30.0, "alibi_slopes": mx.zeros((4,)), "sinks": mx.zeros((4,)), "causal": True,
                 "dropout_p": 0.1},
                {"alibi_slopes": mx.zeros((1, 4))},
            ]
            for options in features:
                spec = describe_attention(q, kv, kv, **options)
                for config in FLASH_FWD.configs():
                    if shared_memory_bytes(head_dim, config) > static_shared_memory("metal"):
                        continue
                    yield plan(q, kv, kv, mx.array(spec.window, dtype=mx.int32), _placeholder(), _placeholder(),
                               mx.zeros((3,), mx.uint32), spec, config)
                if head_dim in WG_HEAD_DIMS:
                    for config in FLASH_FWD_WG.configs():
                        yield plan(q, kv, kv, mx.array(spec.window, dtype=mx.int32), _placeholder(), _placeholder(),
                                   mx.zeros((3,), mx.uint32), spec, config, warpgroup=True)
