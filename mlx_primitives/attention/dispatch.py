"""The dispatcher: one place that decides which path computes an attention call.

Paths, in order of preference:

* ``"sdpa"`` -- ``mx.fast.scaled_dot_product_attention``, whenever the call's
  features map onto it (no window, softcap, ALiBi or dropout, no LSE requested,
  causal only with ``q_len <= k_len`` so that no row is fully masked).
* ``"decode"`` -- the split-KV decode kernel (:mod:`mlx_primitives.kernels.decode`) on a GPU
  backend for decode-sized calls (``q_len <= 16``) with features sdpa lacks (window, softcap,
  ALiBi, LSE); where :data:`DECODE_BEATS_SDPA` says so from measurements, also plain/causal ones.
* ``"kernel"`` -- the prefill flash kernel (:mod:`mlx_primitives.kernels.flash_attention`)
  on a GPU backend, for the features sdpa lacks (window, softcap, ALiBi, LSE, ...)
  and for calls at head dims past sdpa's fast path (causal ones; on sm_90, whose warpgroup kernel
  measured faster there, all), when the kernel supports the call.
* ``"reference"`` -- the blockwise pure-MLX path (:mod:`.reference`) for
  everything else, and wherever memory must stay O(N) on a backend whose
  ``scaled_dot_product_attention`` materializes the score matrix (the CPU).

The choice is observable: :func:`choose_route` returns it with its reason, and
every call logs it at DEBUG level on the ``mlx_primitives.dispatch`` logger.

The environment variable ``FLASH_ATTENTION_MLX_REF=1`` (the switch of flash-attention's MLX port)
sends every ``path="auto"`` call that this dispatcher routes (``flash_attention``, ``flash_attn_func``
and the attention layers; not ``decode_attention``, nor the decode-sized calls of
``flash_attn_with_kvcache``, which go to the decode kernel directly) to the reference path; an explicit
``path=`` still wins. It is read once, at import (set it before starting Python; within a program, pass
``path="reference"``).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

from ..hardware import device_profile
from ..kernels import decode, flash_attention
from .reference import reference_attention
from .spec import AttentionSpec

logger = logging.getLogger("mlx_primitives.dispatch")

PATHS = ("auto", "sdpa", "kernel", "reference")

REFERENCE_ENV = "FLASH_ATTENTION_MLX_REF"
# Read once: a per-call os.environ lookup costs 1-3 us when the variable is unset (a KeyError inside),
# as much as the whole memoized validation of a call.
FORCE_REFERENCE = os.environ.get(REFERENCE_ENV, "0") not in ("", "0")

# Past this head dim sdpa leaves its fast path (cuDNN on CUDA). H100, D=256, fp16, L 4k-16k
# (benchmarks/results/h100/flash_kernel.md): the warpgroup kernel is 3.5-6.7x sdpa causal and 1.5-1.6x
# plain; the other kernel is 2-3x faster causal, ~1.3x slower plain (so plain stays on sdpa without it).
SDPA_FAST_HEAD_DIM = 128


# Plain/causal decode calls the decode kernel measured faster than sdpa on, per backend:
# (least batch, least k_len) pairs; a call at or past both of one pair goes to the kernel. H100,
# MLX 0.32.4, fp16, Hq 32, Hk 8, D 128, B 1-32, L 4k-32k: the kernel is 0.66-0.96x sdpa on every shape
# (benchmarks/results/h100/decode.md, attention.md), so none.
DECODE_BEATS_SDPA = {"cuda": ()}


class Route(NamedTuple):
    """Which path runs a call, and why."""

    path: str
    reason: str


def _sdpa_blocker(spec: AttentionSpec, need_lse: bool) -> Optional[str]:
    """Why ``mx.fast.scaled_dot_product_attention`` cannot compute ``spec``, or None."""
    if need_lse:
        return "the log-sum-exp is requested"
    if spec.k_len == 0 or spec.q_len == 0:
        return "a sequence is empty"
    if spec.windowed:
        return "a sliding window is set"
    if spec.softcap > 0:
        return "softcap is set"
    if spec.alibi_slopes is not None:
        return "ALiBi slopes are set"
    if spec.dropout_p > 0:
        return "dropout is set"
    if spec.causal and spec.q_len > spec.k_len:
        return "causal with q_len > k_len leaves rows without keys"
    if spec.causal and spec.mask is not None:
        return "causal is combined with a mask array"
    return None


def _kernel_blocker(spec: AttentionSpec) -> Optional[str]:
    """Why the flash kernel cannot compute ``spec`` here, or None."""
    if not device_profile().is_gpu:
        return "kernels need a GPU backend"
    return flash_attention.unsupported(spec)


def _kernel_route(spec: AttentionSpec, reason: str) -> Route:
    """The flash kernel's route, naming its warpgroup variant where that one runs the call."""
    return Route("kernel", reason + (" (warpgroup variant)" if flash_attention.uses_warpgroup(spec) else ""))


def _decode_blocker(spec: AttentionSpec) -> Optional[str]:
    """Why the decode kernel cannot compute ``spec`` here, or None."""
    if not device_profile().is_gpu:
        return "kernels need a GPU backend"
    if spec.mask is not None or spec.dropout_p > 0 or spec.v_head_dim != spec.head_dim or spec.k_len == 0:
        return "a mask array, dropout, a value head dim of its own or an empty cache"
    return decode.unsupported(spec)


def _decode_beats_sdpa(spec: AttentionSpec) -> bool:
    pairs = DECODE_BEATS_SDPA.get(device_profile().backend, ())
    return any(spec.batch >= batch and spec.k_len >= k_len for batch, k_len in pairs)


def choose_route(spec: AttentionSpec, need_lse: bool = False, path: str = "auto") -> Route:
    """Pick the path for ``spec``.

    Args:
        spec: the validated call.
        need_lse: whether the caller needs the log-sum-exp.
        path: ``"auto"`` (``"reference"`` where ``FLASH_ATTENTION_MLX_REF`` was set to anything
            but ``0`` at import), or a path to force (``"sdpa"`` and ``"kernel"`` fail with ``ValueError``
            when they cannot run the call).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    if path == "reference":
        return Route("reference", "forced by the caller")
    if path == "auto" and FORCE_REFERENCE:
        return Route("reference", f"{REFERENCE_ENV} is set")
    blocker = _sdpa_blocker(spec, need_lse)
    if path == "sdpa":
        if blocker:
            raise ValueError(f"path='sdpa' cannot run this call: {blocker}")
        return Route("sdpa", "forced by the caller")
    if path == "kernel":
        kernel_blocker = _kernel_blocker(spec)
        if kernel_blocker:
            raise ValueError(f"path='kernel' cannot run this call: {kernel_blocker}")
        return _kernel_route(spec, "forced by the caller")
    if spec.q_len <= decode.MAX_Q_LEN and (blocker or _decode_beats_sdpa(spec)) and _decode_blocker(spec) is None:
        why = blocker or "measured faster than sdpa at this shape"
        return Route("decode", f"{why}: the split-KV decode kernel computes it")
    past_fast_path = spec.head_dim > SDPA_FAST_HEAD_DIM and (spec.causal or flash_attention.uses_warpgroup(spec))
    if (blocker or past_fast_path) and _kernel_blocker(spec) is None:
        if blocker:
            return _kernel_route(spec, f"{blocker}: the flash kernel computes it")
        causal = "causal " if spec.causal else ""
        return _kernel_route(spec, f"{causal}head_dim {spec.head_dim} is past sdpa's fast path")
    if blocker:
        return Route("reference", blocker)
    if spec.chunk_size is not None and not device_profile().is_gpu:
        return Route("reference", "bounded memory requested and the CPU's sdpa materializes scores")
    return Route("sdpa", "features map onto mx.fast.scaled_dot_product_attention")


def _sdpa(q: mx.array, k: mx.array, v: mx.array, spec: AttentionSpec) -> mx.array:
    sinks = None if spec.sinks is None else spec.sinks.astype(q.dtype)
    mask = spec.mask
    if spec.causal or mask is None:
        mask = "causal" if spec.causal else None
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.scale, mask=mask, sinks=sinks)
    # sdpa leaves rows whose mask hides every key undefined (a uniform average, or NaN in the output and
    # its gradient): they see every key there, and their output is replaced by zeros.
    if mask.dtype == mx.bool_:
        has_key = mask.any(axis=-1, keepdims=True)
        mask = mask | ~has_key
    else:
        mask = mask.astype(q.dtype)  # sdpa wants an additive mask of the output type
        has_key = (mask > -mx.inf).any(axis=-1, keepdims=True)
        mask = mx.where(has_key, mask, mx.zeros((), dtype=mask.dtype))
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.scale, mask=mask, sinks=sinks)
    return mx.where(has_key, out, mx.zeros((), dtype=out.dtype))


@functools.lru_cache(maxsize=64)
def _full_lengths(batch: int, k_len: int) -> mx.array:
    return mx.full((batch,), k_len, dtype=mx.int32)


def _decode(q: mx.array, k: mx.array, v: mx.array, spec: AttentionSpec) -> Tuple[mx.array, mx.array]:
    """The decode kernel on BHSD tensors: every sequence holds all k_len keys (BSHD views for the
    kernel, free where the caller's arrays are BSHD, as flash_attn_func's are)."""
    out, lse = decode.decode_attention(
        q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), _full_lengths(spec.batch, spec.k_len),
        softmax_scale=spec.scale, causal=spec.causal, window_size=spec.window, softcap=spec.softcap,
        alibi_slopes=spec.alibi_slopes, sinks=spec.sinks, return_lse=True,
    )
    return out.swapaxes(1, 2), lse


def run_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    spec: AttentionSpec,
    need_lse: bool = False,
    dropout_seed: Optional[mx.array] = None,
    path: str = "auto",
    batch_offset: int = 0,
) -> Tuple[mx.array, Optional[mx.array]]:
    """Compute attention over BHSD tensors on the chosen path.

    Returns ``(out, lse)``; ``lse`` is None on paths that do not produce it
    (only when ``need_lse`` is False).
    """
    route = choose_route(spec, need_lse, path)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("attention %s -> %s (%s)", _shape_text(spec), route.path, route.reason)
    if route.path == "sdpa":
        return _sdpa(q, k, v, spec), None
    if route.path == "kernel":
        return flash_attention.flash_attention(q, k, v, spec, dropout_seed=dropout_seed, batch_offset=batch_offset)
    if route.path == "decode":
        return _decode(q, k, v, spec)
    return reference_attention(q, k, v, spec, dropout_seed, batch_offset)


def _shape_text(spec: AttentionSpec) -> str:
    return (
        f"B={spec.batch} Hq={spec.num_heads} Hk={spec.num_kv_heads} Sq={spec.q_len} "
        f"Sk={spec.k_len} D={spec.head_dim} {spec.dtype}"
    )
