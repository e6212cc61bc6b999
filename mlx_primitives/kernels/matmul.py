"""A tiled matrix multiply on the matrix-unit primitive of the dialect (``mma_*.inc``).

It exists to prove the primitive on both backends (every tile position, odd sizes, fp16 and bf16)
before the attention kernels build on it; ``a @ b`` (MLX's GEMM) is faster.
"""

from __future__ import annotations

import functools
from typing import Optional

import mlx.core as mx

from . import catalog
from .launcher import Launch, launch, with_reference_vjp
from .tuning import config_for
from ..validation import check_array, check_same_dtype


def plan(a, b, config=None) -> Launch:
    problem = {"M": a.shape[0], "N": b.shape[1], "K": a.shape[1]}
    config = {**config_for(catalog.MATMUL, a.dtype, problem), **(config or {})}
    m, n = a.shape[0], b.shape[1]
    threads = config["WM"] * config["WN"] * 32
    return Launch(
        kernel=catalog.MATMUL,
        inputs=[a, b],
        template=[("T", a.dtype)] + [(name, config[name]) for name in ("BM", "BN", "WM", "WN")],
        grid=(-(-n // config["BN"]) * threads, -(-m // config["BM"]), 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(m, n)],
        output_dtypes=[a.dtype],
    )


def reference(a, b):
    return (a.astype(mx.float32) @ b.astype(mx.float32)).astype(a.dtype)


@functools.lru_cache(maxsize=32)
def _function(config: Optional[tuple]):
    def forward(a, b):
        return launch(plan(a, b, dict(config or ())), lambda: [reference(a, b)])[0]

    return with_reference_vjp(forward, reference)


def tiled_matmul(a: mx.array, b: mx.array, *, config: Optional[dict] = None) -> mx.array:
    """``a @ b`` computed on the dialect's matrix unit, fp32 accumulation.

    Args:
        a (array): ``(M, K)``, float16 or bfloat16.
        b (array): ``(K, N)``, same dtype.
        config (dict, optional): block and warp tiling ``{"BM", "BN", "WM", "WN"}`` (catalog.MATMUL).

    Returns:
        ``(M, N)`` array of the dtype of ``a``.
    """
    dtypes = (mx.float16, mx.bfloat16)
    check_array("a", a, "(M, K)", ndim=2, dtypes=dtypes)
    check_array("b", b, f"(K, N) = ({a.shape[1]}, N)", ndim=2, dtypes=dtypes)
    if b.shape[0] != a.shape[1]:
        raise ValueError(f"b must have shape (K, N) = ({a.shape[1]}, N); got {tuple(b.shape)}")
    check_same_dtype(("a", "b"), (a, b))
    if a.size == 0 or b.size == 0:
        return reference(a, b)
    key = tuple(sorted(config.items())) if config else None
    return _function(key)(a, b)


def compile_examples():
    """Launches covering both dtypes and every tunable configuration (for the Metal compile check)."""
    for dtype in (mx.float16, mx.bfloat16):
        a = mx.zeros((37, 53), dtype)
        b = mx.zeros((53, 29), dtype)
        for config in catalog.MATMUL.configs():
            yield plan(a, b, config)
