"""Host (Python) time per call of the kernel paths, measured on any machine with the GPU route forced.

Where a kernel takes a few microseconds, the Python that validates a call and builds its launches
decides how fast a decode step or a small flex call runs: the GPU idles while it runs. This suite
times that host work alone. :func:`simulated_gpu` makes every module see a CUDA device (the H100's
profile) and replaces the compiled ``mx.fast`` kernel objects with stand-ins that return placeholder
outputs of the launch's shapes, so the whole Python path of a GPU call runs here, up to the one
C++ call per launch that is left out (MLX builds the kernel's source and its hash there on every
call: not counted). Calls are built without evaluation (:func:`~.common.build_us`).

Rows: fp16, B=1, Hq=32, Hk=8, D=128, L=4096: ``decode_attention`` on a contiguous and a paged
(page 64) cache, ``flash_attn_with_kvcache`` appending one token to a contiguous and a paged
cache (with and without content validation), ``flash_attn_func`` at q_len 1 with softcap (the
dispatcher's decode route), and ``flex_attention`` with a causal ``create_block_mask`` at L=4096.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, List

import mlx.core as mx

from mlx_primitives.attention import flash_attn_func, flash_attn_with_kvcache
from mlx_primitives.attention.flex import create_block_mask, flex_attention, flex_route, mods
from mlx_primitives.hardware import profile, profile_from_info
from mlx_primitives.kernels import decode_attention, launcher

from .common import Table, build_us

HEADS, KV_HEADS, HEAD_DIM, LENGTH, PAGE_SIZE = 32, 8, 128, 4096, 64
DEVICE = {"device_name": "NVIDIA H100 80GB HBM3"}


def _placeholder_kernel(**launch) -> List[mx.array]:
    """Outputs of a launch's shapes and dtypes, broadcast from a scalar (nothing large to evaluate)."""
    return [mx.broadcast_to(mx.zeros((), dtype), tuple(shape))
            for shape, dtype in zip(launch["output_shapes"], launch["output_dtypes"])]


@contextlib.contextmanager
def simulated_gpu() -> Iterator[None]:
    """Every ``mlx_primitives`` module sees a CUDA H100 profile, and kernels return placeholders."""
    real = profile.device_profile
    gpu = profile_from_info("cuda", DEVICE)
    holders = [m for name, m in list(sys.modules.items())
               if name.startswith("mlx_primitives") and getattr(m, "device_profile", None) is real]
    real_compiled = launcher.compiled
    try:
        for module in holders:
            module.device_profile = lambda: gpu
        launcher.compiled = lambda *args: _placeholder_kernel
        yield
    finally:
        for module in holders:
            module.device_profile = real
        launcher.compiled = real_compiled


def _random(*shape) -> mx.array:
    x = mx.random.normal(shape).astype(mx.float16)
    mx.eval(x)
    return x


def cases() -> List[tuple]:
    """``(name, build one call)`` pairs of every row."""
    q = _random(1, 1, HEADS, HEAD_DIM)
    k, v = _random(1, LENGTH, KV_HEADS, HEAD_DIM), _random(1, LENGTH, KV_HEADS, HEAD_DIM)
    seqlens = mx.array([LENGTH], mx.int32)
    pages = LENGTH // PAGE_SIZE
    pool_k, pool_v = (x.reshape(pages, PAGE_SIZE, KV_HEADS, HEAD_DIM) for x in (k, v))
    table = mx.arange(pages, dtype=mx.int32).reshape(1, pages)
    # flash_attn_with_kvcache appends one token after LENGTH - 1 cached ones (its writes are in place).
    cached = mx.array([LENGTH - 1], mx.int32)
    new_k, new_v = _random(1, 1, KV_HEADS, HEAD_DIM), _random(1, 1, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = mx.array(k), mx.array(v)
    page_k, page_v = mx.array(pool_k), mx.array(pool_v)
    mx.eval(table, k_cache, v_cache, page_k, page_v)
    fq, fk, fv = (_random(1, HEADS, LENGTH, HEAD_DIM) for _ in range(3))
    causal_mask = create_block_mask(mods.causal(), None, None, LENGTH, LENGTH)

    def kvcache(k_cache, v_cache, block_table=None, **options) -> Callable[[], mx.array]:
        return lambda: flash_attn_with_kvcache(q, k_cache, v_cache, new_k, new_v, cache_seqlens=cached,
                                               block_table=block_table, causal=True, **options)

    return [
        ("decode_attention, contiguous", lambda: decode_attention(q, k, v, seqlens)),
        (f"decode_attention, paged (page {PAGE_SIZE})",
         lambda: decode_attention(q, pool_k, pool_v, seqlens, block_table=table)),
        ("flash_attn_with_kvcache, contiguous, append 1", kvcache(k_cache, v_cache)),
        ("flash_attn_with_kvcache, paged, append 1", kvcache(page_k, page_v, table)),
        ("flash_attn_func, q_len 1, softcap (decode route)",
         lambda: flash_attn_func(q, k, v, causal=True, softcap=30.0)),
        ("flex_attention, causal BlockMask", lambda: flex_attention(fq, fk, fv, block_mask=causal_mask)),
        ("flex route check (flex_route)", lambda: flex_route(fq, fk, fv, block_mask=causal_mask)),
    ]


def run(quick: bool = False) -> List[Table]:
    table = Table(
        title=f"Host time per call of the GPU paths (fp16, B=1, Hq={HEADS}, Hk={KV_HEADS}, D={HEAD_DIM}, "
              f"L={LENGTH}), H100 route simulated",
        columns=("call", "host us"),
        note="Python time per call building the graph with a CUDA profile forced and placeholder kernels "
             "(MLX's per-launch C++ work is not included); a repeated call of one shape.",
    )
    calls = 20 if quick else 200
    with simulated_gpu():
        for name, call in cases():
            table.add(name, build_us(call, calls))
    return [table]
