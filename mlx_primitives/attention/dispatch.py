"""The dispatcher: one place that decides which path computes an attention call.

Paths, in order of preference:

* ``"sdpa"`` -- ``mx.fast.scaled_dot_product_attention``, whenever the call's
  features map onto it (no window, softcap, ALiBi or dropout, no LSE requested,
  causal only with ``q_len <= k_len`` so that no row is fully masked).
* ``"kernel"`` -- the prefill flash kernel (:mod:`mlx_primitives.kernels.flash_attention`)
  on a GPU backend, for the features sdpa lacks (window, softcap, ALiBi, LSE, ...)
  and for causal calls at head dims past sdpa's fast path, when the kernel supports the call.
* ``"reference"`` -- the blockwise pure-MLX path (:mod:`.reference`) for
  everything else, and wherever memory must stay O(N) on a backend whose
  ``scaled_dot_product_attention`` materializes the score matrix (the CPU).

The choice is observable: :func:`choose_route` returns it with its reason, and
every call logs it at DEBUG level on the ``mlx_primitives.dispatch`` logger.
"""

from __future__ import annotations

import logging
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

from ..hardware import device_profile
from ..kernels import flash_attention
from .reference import reference_attention
from .spec import AttentionSpec

logger = logging.getLogger("mlx_primitives.dispatch")

PATHS = ("auto", "sdpa", "kernel", "reference")

# Past this head dim sdpa leaves its fast path (cuDNN on CUDA): on the H100 the kernel is 2-3x faster
# there for causal calls, sdpa still ~1.3x faster without a mask (benchmarks/results/h100/flash_kernel.md).
SDPA_FAST_HEAD_DIM = 128


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


def choose_route(spec: AttentionSpec, need_lse: bool = False, path: str = "auto") -> Route:
    """Pick the path for ``spec``.

    Args:
        spec: the validated call.
        need_lse: whether the caller needs the log-sum-exp.
        path: ``"auto"``, or a path to force (``"sdpa"`` and ``"kernel"`` fail with
            ``ValueError`` when they cannot run the call).
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    blocker = _sdpa_blocker(spec, need_lse)
    if path == "reference":
        return Route("reference", "forced by the caller")
    if path == "sdpa":
        if blocker:
            raise ValueError(f"path='sdpa' cannot run this call: {blocker}")
        return Route("sdpa", "forced by the caller")
    if path == "kernel":
        kernel_blocker = _kernel_blocker(spec)
        if kernel_blocker:
            raise ValueError(f"path='kernel' cannot run this call: {kernel_blocker}")
        return Route("kernel", "forced by the caller")
    past_fast_path = spec.causal and spec.head_dim > SDPA_FAST_HEAD_DIM
    if (blocker or past_fast_path) and _kernel_blocker(spec) is None:
        if blocker:
            return Route("kernel", f"{blocker}: the flash kernel computes it")
        return Route("kernel", f"causal at head_dim {spec.head_dim} is past sdpa's fast path")
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
        return flash_attention.flash_attention(q, k, v, spec)
    return reference_attention(q, k, v, spec, dropout_seed, batch_offset)


def _shape_text(spec: AttentionSpec) -> str:
    return (
        f"B={spec.batch} Hq={spec.num_heads} Hk={spec.num_kv_heads} Sq={spec.q_len} "
        f"Sk={spec.k_len} D={spec.head_dim} {spec.dtype}"
    )
