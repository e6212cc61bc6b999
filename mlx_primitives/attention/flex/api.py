"""``flex_attention``: attention variants written as small Python functions, compiled into the kernel.

Routing: on a GPU backend, a float16/bfloat16 call whose head dims the prefill kernel takes, whose
mods trace (``trace.py``) and whose BlockMask blocks fit the kernel's tiles runs on the kernel
(``kernels/flex_attention.py``); everything else on the reference path (``reference.py``), with one
warning per mod that does not trace, saying why. :func:`flex_route` tells which path a call takes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import mlx.core as mx

from ...hardware import device_profile
from ...memo import CallMemo
from ...validation import check_bool, check_real
from ...kernels import flash_attention
from ..spec import AttentionSpec, describe_attention
from .block_mask import BlockMask
from .reference import flex_reference
from .trace import Untraceable, fingerprint, rebind, trace_mods

_warned: set = set()


class FlexRoute(NamedTuple):
    """Which path computes a flex call, and why."""

    path: str
    reason: str


def _describe(query, key, value, score_mod, block_mask, scale, enable_gqa) -> AttentionSpec:
    enable_gqa = check_bool("enable_gqa", enable_gqa)
    scale = None if scale is None else check_real("scale", scale)
    spec = describe_attention(query, key, value, layout="BHSD", scale=scale)
    if spec.num_heads != spec.num_kv_heads and not enable_gqa:
        raise ValueError(
            f"query has {spec.num_heads} heads and key/value {spec.num_kv_heads}; pass enable_gqa=True for "
            "grouped-query attention"
        )
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be a function score_mod(score, b, h, q_idx, kv_idx); got {score_mod!r}")
    if block_mask is not None:
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a BlockMask from create_block_mask; got {type(block_mask).__name__}")
        bm, hm, q_len, kv_len = block_mask.shape
        if (q_len, kv_len) != (spec.q_len, spec.k_len):
            raise ValueError(
                f"block_mask was made for (Q_LEN, KV_LEN) = {(q_len, kv_len)}; the call has "
                f"{(spec.q_len, spec.k_len)}"
            )
        if bm not in (1, spec.batch) or hm not in (1, spec.num_heads):
            raise ValueError(
                f"block_mask has (B, H) = {(bm, hm)}; expected 1 or the call's batch {spec.batch} and query "
                f"heads {spec.num_heads}"
            )
    return spec


def _kernel_plan(spec: AttentionSpec, score_mod, block_mask):
    """``(route, traced)``: the route and, for the kernel, ``(score code, mask code, captures, config)``."""
    if spec.q_len == 0:
        return FlexRoute("reference", "the call has no queries"), None
    if device_profile().backend not in ("metal", "cuda"):
        return FlexRoute("reference", f"MLX runs on the {device_profile().backend}"), None
    blocker = flash_attention.unsupported(spec)
    if blocker:
        return FlexRoute("reference", f"the kernel can't take the call: {blocker}"), None
    mask_mod = None if block_mask is None else block_mask.mask_mod
    try:
        score, mask, captures = trace_mods(score_mod, mask_mod)
    except Untraceable as error:
        return FlexRoute("reference", f"the mods do not trace: {error}"), None
    from ...kernels.flex_attention import block_config

    config, blocker = block_config(spec, None if block_mask is None else block_mask.block_size)
    if config is None:
        return FlexRoute("reference", blocker), None
    return FlexRoute("kernel", "the mods trace and the kernel takes the call"), (score, mask, captures, config)


class _Prepared(NamedTuple):
    """A validated call, its route and, on the kernel, its launch (``prepare_kernel``'s ``run``)."""

    spec: AttentionSpec
    route: FlexRoute
    run: Optional[Callable]
    captures: List[mx.array]


# Prepared calls, keyed by everything they depend on: array types, shapes and dtypes, scale, GQA, the
# backend, the BlockMask's sizes and the mods' fingerprints (trace.fingerprint: their code and the
# values they read, captured arrays by identity). A model repeats a few of them; preparing one
# (validation, tracing, tuning lookup, launch geometry) costs more than a small attention on a GPU.
_PREPARED = CallMemo(256)
_ARRAYS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def _call_key(query, key, value, score_mod, block_mask, scale, enable_gqa) -> Optional[tuple]:
    """The key of :data:`_PREPARED` for a call, or None where something in it can't be keyed."""
    if not (scale is None or type(scale) in (int, float)) or type(enable_gqa) is not bool:
        return None
    score = fingerprint(score_mod)
    blocks = None
    if block_mask is not None:
        if type(block_mask) is not BlockMask:
            return None
        blocks = (block_mask.block_size, block_mask.seq_lengths, fingerprint(block_mask.mask_mod),
                  *((getattr(block_mask, name).shape, getattr(block_mask, name).dtype) for name in _ARRAYS))
    if score is None or (blocks is not None and blocks[2] is None):
        return None
    try:
        call = (type(query), query.shape, query.dtype, type(key), key.shape, key.dtype, type(value), value.shape,
                value.dtype, scale, enable_gqa, device_profile().backend, score, blocks)
        hash(call)
    except (AttributeError, TypeError):  # not arrays: let validation say why
        return None
    return call


def _prepare(query, key, value, score_mod, block_mask, scale, enable_gqa) -> _Prepared:
    call = _call_key(query, key, value, score_mod, block_mask, scale, enable_gqa)
    return _PREPARED.get(call, lambda: _prepared(query, key, value, score_mod, block_mask, scale, enable_gqa))


def _prepared(query, key, value, score_mod, block_mask, scale, enable_gqa) -> _Prepared:
    """Validate, trace and route a call; on the kernel, build its launch."""
    spec = _describe(query, key, value, score_mod, block_mask, scale, enable_gqa)
    route, traced = _kernel_plan(spec, score_mod, block_mask)
    run, captures = None, []
    if route.path == "kernel":
        from ...kernels.flex_attention import flex_kernel, prepare_kernel

        score, mask, captures, config = traced
        kernel = flex_kernel(score, mask, len(captures), None if block_mask is None else block_mask.block_size)
        run = prepare_kernel(query, key, value, spec, kernel, config, block_mask, captures)
    return _Prepared(spec, route, run, captures)


def flex_route(query: mx.array, key: mx.array, value: mx.array, score_mod: Optional[Callable] = None,
               block_mask: Optional[BlockMask] = None, scale: Optional[float] = None,
               enable_gqa: bool = False) -> FlexRoute:
    """The path :func:`flex_attention` takes for these arguments, and why."""
    return _prepare(query, key, value, score_mod, block_mask, scale, enable_gqa).route


def _warn_untraceable(route: FlexRoute, score_mod, block_mask) -> None:
    if not route.reason.startswith("the mods do not trace"):
        return
    codes = tuple(getattr(m, "__code__", m) for m in (score_mod, getattr(block_mask, "mask_mod", None)))
    if codes in _warned:
        return
    _warned.add(codes)
    warnings.warn(f"mlx_primitives.flex_attention: {route.reason}; using the reference path", RuntimeWarning,
                  stacklevel=3)


def flex_attention(
    query: mx.array,
    key: mx.array,
    value: mx.array,
    score_mod: Optional[Callable] = None,
    block_mask: Optional[BlockMask] = None,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Attention with a user score mod and a block-sparse mask, as PyTorch's ``flex_attention``.

    ``out = softmax(where(mask_mod, score_mod(scale * q @ k^T), -inf)) @ v``, where ``mask_mod`` is
    ``block_mask.mask_mod`` and is evaluated only on the blocks the mask lists as partly visible.

    Args:
        query: ``(batch, num_heads, q_len, head_dim)`` (BHSD).
        key: ``(batch, num_kv_heads, kv_len, head_dim)``.
        value: ``(batch, num_kv_heads, kv_len, head_dim_v)``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` on scaled float32 scores
            (``h`` is the query head; indices are absolute positions), or None.
        block_mask: from :func:`create_block_mask` for ``(q_len, kv_len)``, or None (every key visible).
        scale: factor on ``q @ k^T``, default ``1 / sqrt(head_dim)``.
        enable_gqa: allow ``num_heads`` a multiple of ``num_kv_heads`` (query head ``h`` reads KV head
            ``h // (num_heads // num_kv_heads)``).
        return_lse: also return the log-sum-exp.

    Returns:
        ``out`` ``(batch, num_heads, q_len, head_dim_v)`` in query's dtype; with ``return_lse``,
        ``(out, lse)``, ``lse`` float32 ``(batch, num_heads, q_len)`` (natural log). A row that sees
        no key gives zeros and ``lse = -inf``.
    """
    return_lse = check_bool("return_lse", return_lse)
    prepared = _prepare(query, key, value, score_mod, block_mask, scale, enable_gqa)
    if prepared.route.path == "kernel":
        out, lse = _on_kernel(query, key, value, prepared, score_mod, block_mask)
    else:
        _warn_untraceable(prepared.route, score_mod, block_mask)
        out, lse = flex_reference(query, key, value, score_mod, block_mask, prepared.spec.scale)
    return (out, lse) if return_lse else out


def _on_kernel(query, key, value, prepared: _Prepared, score_mod, block_mask):
    spec, captures = prepared.spec, prepared.captures
    floating = [c for c in captures if mx.issubdtype(c.dtype, mx.floating)]

    def reference(q, k, v, *float_arrays) -> List[mx.array]:
        replaced = {id(old): new for old, new in zip(floating, float_arrays)}
        call_mask = block_mask
        if block_mask is not None and block_mask.mask_mod is not None and replaced:
            call_mask = dataclasses.replace(block_mask, mask_mod=rebind(block_mask.mask_mod, replaced))
        return list(flex_reference(q, k, v, rebind(score_mod, replaced), call_mask, spec.scale))

    return prepared.run(query, key, value, block_mask, captures, reference)
