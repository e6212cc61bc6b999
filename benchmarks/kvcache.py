"""KV caches: paged vs contiguous decode through our kernel, cache memory, int8 vs fp16 decode.

Rows: fp16, q_len 1, Hq=32, Hk=8, D=128. Paged pools hold the same keys as the contiguous cache
behind a shuffled block table; both go through ``decode_attention`` (split-KV kernel). Memory is
``mx.get_active_memory`` growth when the cache is allocated: a contiguous cache reserves the full
capacity per sequence, a paged pool the pages of the live tokens. The int8 and int4 rows quantize K/V
with ``mx.quantize`` (group 64) and attend through ``decode_attention``'s quantized route: the split-KV
kernel reads the packed words in place (on CUDA with fp16 queries on the matrix unit, each warp
dequantizing its staged rows into a half tile); cos-sim is against the fp16 output.
Targets (issue 6): paged within 10% of contiguous; paged memory 8x smaller at live 512 of 4096;
int8 >= 1.5x faster than fp16 at L = 32k with cos-sim >= 0.999.
"""

from __future__ import annotations

import gc
from typing import List

import mlx.core as mx

from mlx_primitives.cache import PagedKVCache
from mlx_primitives.kernels import decode_attention

from .common import Table, in_turn_ms, time_per_call_ms

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GROUP_SIZE = 64
BATCHES, LENGTHS = (1, 8, 32), (512, 4096, 32768)
QUICK_SHAPES = ((1, 4096), (8, 512), (8, 32768))
QUANTIZED_LENGTH = 32768
QUANTIZED_BATCHES = (1, 8)  # 20 queued dequantized B=32 calls would hold 80 GiB of fp16 copies


def _paged_copy(k: mx.array, v: mx.array, page_size: int):
    """Shuffled page pools and block table holding contiguous ``k``/``v`` (B, L, Hk, D)."""
    batch, length = k.shape[:2]
    pages = length // page_size
    order = mx.random.permutation(batch * pages)
    pools = []
    for x in (k, v):
        pool = mx.zeros((batch * pages, page_size) + x.shape[2:], x.dtype)
        pool[order] = x.reshape(batch * pages, page_size, *x.shape[2:])
        pools.append(pool)
    table = order.reshape(batch, pages).astype(mx.int32)
    mx.eval(*pools, table)
    return pools[0], pools[1], table


def _paged_vs_contiguous(quick: bool) -> Table:
    table = Table(
        title="Decode: paged (shuffled block table) vs contiguous, both through our split-KV kernel",
        columns=("B", "L", "page", "contiguous ms", "paged ms", "paged / contiguous"),
        note="Target: paged / contiguous <= 1.10. Each row's routes are timed in turn, 7 rounds, medians.",
    )
    shapes = QUICK_SHAPES if quick else [(b, n) for b in BATCHES for n in LENGTHS]
    page_sizes = (16, 256) if quick else (16, 64, 256)
    for batch, length in shapes:
        q = mx.random.normal((batch, 1, HEADS, HEAD_DIM)).astype(mx.float16)
        k, v = (mx.random.normal((batch, length, KV_HEADS, HEAD_DIM)).astype(mx.float16) for _ in range(2))
        seqlens = mx.full((batch,), length, mx.int32)
        mx.eval(q, k, v, seqlens)
        pools = [_paged_copy(k, v, page_size) for page_size in page_sizes]
        routes = [lambda: decode_attention(q, k, v, seqlens)] + [
            lambda pool=pool: decode_attention(q, pool[0], pool[1], seqlens, block_table=pool[2]) for pool in pools]
        contiguous, *paged = in_turn_ms(routes, lambda fn: time_per_call_ms(fn, repeats=3), rounds=7)
        for page_size, ms in zip(page_sizes, paged):
            table.add(batch, length, page_size, contiguous, ms, ms / contiguous)
        del q, k, v, pools, routes
    return table


def _allocated_mib(make) -> float:
    gc.collect()
    before = mx.get_active_memory()
    held = make()
    mx.eval(held)
    grown = (mx.get_active_memory() - before) / 2**20
    del held
    gc.collect()
    return grown


def _memory(quick: bool) -> Table:
    table = Table(
        title="Cache memory at live = 512 tokens of a 4096 capacity (fp16, Hk=8, D=128, one layer)",
        columns=("B", "page", "contiguous MiB", "paged MiB", "contiguous / paged"),
        note="mx.get_active_memory growth when the cache is allocated. The contiguous cache reserves the "
             "capacity for every sequence; the paged pool holds the pages the live tokens use.",
    )
    live, capacity = 512, 4096
    for batch in (8,) if quick else BATCHES:
        for page_size in (16, 256):
            contiguous = _allocated_mib(lambda: [mx.zeros((batch, capacity, KV_HEADS, HEAD_DIM), mx.float16)
                                                 for _ in range(2)])

            def paged_cache():
                cache = PagedKVCache(batch * live // page_size, page_size, KV_HEADS, HEAD_DIM)
                seqs = [cache.add_sequence() for _ in range(batch)]
                cache.reserve(seqs, live)
                return cache.k_pools + cache.v_pools

            paged = _allocated_mib(paged_cache)
            table.add(batch, page_size, contiguous, paged, contiguous / paged)
    return table


def _quantized(quick: bool) -> Table:
    table = Table(
        title=f"Decode at L = {QUANTIZED_LENGTH}: int8 and int4 KV (group {GROUP_SIZE}, read in place by the decode "
              "kernel) vs fp16 KV",
        columns=("B", "L", "fp16 ms", "int8 ms", "fp16 / int8", "int8 cos-sim", "int4 ms", "fp16 / int4",
                 "int4 cos-sim"),
        note="Targets: fp16 / int8 >= 1.5, cos-sim >= 0.999.",
    )
    length = QUANTIZED_LENGTH
    for batch in (8,) if quick else QUANTIZED_BATCHES:
        q = mx.random.normal((batch, 1, HEADS, HEAD_DIM)).astype(mx.float16)
        k, v = (mx.random.normal((batch, length, KV_HEADS, HEAD_DIM)).astype(mx.float16) for _ in range(2))
        seqlens = mx.full((batch,), length, mx.int32)
        mx.eval(q, k, v, seqlens)
        fp16 = time_per_call_ms(lambda: decode_attention(q, k, v, seqlens))
        exact = decode_attention(q, k, v, seqlens).astype(mx.float32).reshape(-1)
        row = [batch, length, fp16]
        for bits in (8, 4):
            kq, vq = (tuple(mx.quantize(x, group_size=GROUP_SIZE, bits=bits)) for x in (k, v))
            mx.eval(kq, vq)
            ms = time_per_call_ms(lambda: decode_attention(q, kq, vq, seqlens, quantization=(GROUP_SIZE, bits)))
            out = decode_attention(q, kq, vq, seqlens, quantization=(GROUP_SIZE, bits)).astype(mx.float32).reshape(-1)
            cos = (exact @ out / (mx.linalg.norm(exact) * mx.linalg.norm(out))).item()
            row += [ms, fp16 / ms, f"{cos:.5f}"]
            del kq, vq
        table.add(*row)
        del q, k, v
    return table


def run(quick: bool = False) -> List[Table]:
    return [_paged_vs_contiguous(quick), _memory(quick), _quantized(quick)]
