"""Split-KV decode attention against ``mx.fast.scaled_dot_product_attention``, contiguous and paged.

Rows: fp16, q_len 1, Hq=32, Hk=8, D=128, B in {1, 8, 32}, L in {4k, 32k}. sdpa runs on contiguous
BHSD K/V and on mlx-lm-style cache slices (a (B, Hk, capacity, D) buffer, capacity a multiple of 256,
sliced to L: the layout that sends sdpa to cuDNN on CUDA), in the same run. Effective bandwidth
counts the K and V bytes of the L keys once. Times are per call with 20 calls queued in one graph
(``time_per_call_ms``), as in a model's decode step, ours and sdpa's timed in turn (3 rounds,
medians); a lone synchronised call adds the eval round trip. The time table splits a queued call
into its Python graph build and its evaluation (launch cost and GPU time, graphs built beforehand).
Targets (issue 5/6): >= 2.0 TB/s, never slower than sdpa, paged within 10% of contiguous.
"""

from __future__ import annotations

from typing import List, Tuple

import mlx.core as mx

from mlx_primitives.hardware import device_profile
from mlx_primitives.attention import describe_attention
from mlx_primitives.kernels import decode_attention

from mlx_primitives.kernels import catalog
from mlx_primitives.kernels.decode_launch import MMA_CONFIG, geometry, num_splits, plan

from .common import Table, build_us, eval_us, in_turn_ms, time_ms, time_per_call_ms

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PAGE_SIZES = (16, 64, 256)
PEAK_GBS = 3350.0  # H100 SXM, where the device profile does not know the chip


def _gbs(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


ROUNDS = 3  # ours and sdpa timed in turn, medians
SWEEP_CONFIGS = [catalog.DEFAULTS["decode_attention"], {"THREADS": 128, "SPLIT": 256, "CHUNKS": 2},
                 {"THREADS": 64, "SPLIT": 128, "CHUNKS": 1}, MMA_CONFIG]


def _per_call_in_turn(fns) -> List[float]:
    """Milliseconds per queued call of each of ``fns``, timed in turn over ``ROUNDS`` rounds (medians)."""
    return in_turn_ms(fns, lambda fn: time_per_call_ms(fn, repeats=1), ROUNDS)


def _split_launch(q, k, seqlens, spec, config):
    """The split pass's launch for ``config``: how many splits, keys per step and stages it runs."""
    config = {**catalog.DEFAULTS["decode_attention"], **config}
    shape = geometry(spec, config, device_profile().backend)
    splits = num_splits(spec, k.shape[1], config["SPLIT"], shape["THREADS"], shape["REGISTERS"])
    return plan(q, k, k, seqlens, None, q[:1, 0, 0, :1], spec, splits, config)


def vs_sdpa_table() -> Table:
    peak = device_profile().bandwidth_gbs or PEAK_GBS
    return Table(
        title=f"Decode: split-KV kernel vs sdpa (fp16, q_len 1, Hq={HEADS}, Hk={KV_HEADS}, D={HEAD_DIM})",
        columns=("B", "L", "splits", "launches", "ours ms", "ours GB/s", "% peak", "sdpa ms", "sdpa GB/s",
                 "sdpa cache-slice ms", "sdpa cache-slice GB/s", "best sdpa / ours"),
        note=f"GB/s = K and V bytes of the L keys / time; % peak of {peak:.0f} GB/s. 'launches': kernels per "
             "call (the split pass merging its splits itself: 1, or 2 with the one zeroing its arrival counters).",
        x=("B", "L"), series=("ours GB/s", "sdpa GB/s", "sdpa cache-slice GB/s"), ylabel="GB/s", limit=peak,
    )


def time_table() -> Table:
    return Table(
        title="Decode: where a queued call's time goes (us per call; fp16, q_len 1, Hq=32, Hk=8, D=128)",
        columns=("B", "L", "ours build", "ours eval", "ours queued", "ours lone call", "sdpa build", "sdpa eval",
                 "sdpa queued", "sdpa lone call"),
        note="build: Python time building a call's graph (validation memoized); eval: evaluating 20 queued calls "
             "whose graphs were built beforehand, per call (MLX launch cost, or GPU time where that is longer); "
             "queued: both, as the first table times them; lone call: one call built and evaluated alone.",
    )


def cache(batch: int, length: int, dtype=mx.float16):
    """q (B, 1, Hq, D) and a full BSHD cache (B, L, Hk, D) with its lengths, evaluated."""
    q = mx.random.normal((batch, 1, HEADS, HEAD_DIM)).astype(dtype)
    k = mx.random.normal((batch, length, KV_HEADS, HEAD_DIM)).astype(dtype)
    v = mx.random.normal((batch, length, KV_HEADS, HEAD_DIM)).astype(dtype)
    seqlens = mx.full((batch,), length, dtype=mx.int32)
    mx.eval(q, k, v, seqlens)
    return q, k, v, seqlens


def add_vs_sdpa(table: Table, times: Table, q, k, v, seqlens) -> float:
    """One row of :func:`vs_sdpa_table` (our kernel, sdpa on contiguous BHSD K/V and on mlx-lm-style
    cache slices, timed in turn) and of :func:`time_table`; returns our ms."""
    batch, length = k.shape[:2]
    nbytes = 2 * k.size * k.dtype.size
    peak = device_profile().bandwidth_gbs or PEAK_GBS
    qh = q.swapaxes(1, 2)
    kh, vh = (mx.contiguous(x.swapaxes(1, 2)) for x in (k, v))
    capacity = length + 256
    k_buf, v_buf = (mx.random.normal((batch, KV_HEADS, capacity, HEAD_DIM)).astype(k.dtype) for _ in range(2))
    mx.eval(qh, kh, vh, k_buf, v_buf)

    def ours_call():
        return decode_attention(q, k, v, seqlens)

    def sdpa_call():
        return mx.fast.scaled_dot_product_attention(qh, kh, vh, scale=HEAD_DIM**-0.5)

    def sliced_call():
        return mx.fast.scaled_dot_product_attention(qh, k_buf[:, :, :length], v_buf[:, :, :length],
                                                    scale=HEAD_DIM**-0.5)

    ours, sdpa, sliced = _per_call_in_turn([ours_call, sdpa_call, sliced_call])
    launch = _split_launch(q, k, seqlens, describe_attention(q, k, v, layout="BSHD", causal=True), {})
    splits = launch.grid[0] // launch.threadgroup[0]
    launches = (1 + (splits > 1)) if dict(launch.template)["FUSE"] else 2
    table.add(batch, length, splits, launches, ours, _gbs(nbytes, ours), f"{100 * _gbs(nbytes, ours) / peak:.0f}%",
              sdpa, _gbs(nbytes, sdpa), sliced, _gbs(nbytes, sliced), min(sdpa, sliced) / ours)
    usage = []
    for fn in (ours_call, sdpa_call):
        usage += [build_us(fn), eval_us(fn), None, time_ms(fn) * 1e3]
        usage[-2] = usage[-4] + usage[-3]
    times.add(batch, length, *usage)
    del kh, vh, k_buf, v_buf
    return ours


def shapes(quick: bool) -> List[Tuple[int, int]]:
    """The (batch, length) pairs the decode tables time (issue 5's grid on a GPU)."""
    if not device_profile().is_gpu:  # a CPU run only shows that the suite works
        return [(1, 512), (2, 512)]
    return [(b, n) for b in ((1, 8) if quick else (1, 8, 32)) for n in ((4096,) if quick else (4096, 32768))]


def run(quick: bool = False) -> List[Table]:
    main, times = vs_sdpa_table(), time_table()
    paged = Table(
        title="Decode: paged KV (shuffled page table) vs contiguous, through our kernel",
        columns=("B", "L", "page", "paged ms", "paged GB/s", "contiguous ms", "paged / contiguous"),
    )
    sweep = Table(
        title="Decode: split-KV configs (SPLIT = fewest keys per split; CHUNKS = 16-byte chunks per lane and row; "
              "MMA = matrix-unit path)",
        columns=("B", "L", "THREADS", "SPLIT", "CHUNKS", "MMA", "lanes per key", "splits", "KB", "STAGES", "ms",
                 "GB/s"),
    )
    for batch, length in shapes(quick):
        q, k, v, seqlens = cache(batch, length)
        nbytes = 2 * k.size * k.dtype.size
        ours = add_vs_sdpa(main, times, q, k, v, seqlens)
        for page_size in PAGE_SIZES:
            pages = length // page_size
            order = mx.random.permutation(batch * pages)
            table = order.reshape(batch, pages).astype(mx.int32)
            pool_k = mx.zeros((batch * pages, page_size, KV_HEADS, HEAD_DIM), k.dtype)
            pool_k[order] = k.reshape(batch * pages, page_size, KV_HEADS, HEAD_DIM)
            pool_v = mx.zeros_like(pool_k)
            pool_v[order] = v.reshape(batch * pages, page_size, KV_HEADS, HEAD_DIM)
            mx.eval(pool_k, pool_v, table)
            ms = time_per_call_ms(lambda: decode_attention(q, pool_k, pool_v, seqlens, block_table=table))
            paged.add(batch, length, page_size, ms, _gbs(nbytes, ms), ours, ms / ours)
            del pool_k, pool_v

        if not quick and device_profile().is_gpu:
            spec = describe_attention(q, k, v, layout="BSHD", causal=True)
            calls = [lambda config=config: decode_attention(q, k, v, seqlens, path="kernel", config=config)
                     for config in SWEEP_CONFIGS]
            for config, ms in zip(SWEEP_CONFIGS, _per_call_in_turn(calls)):
                launch = _split_launch(q, k, seqlens, spec, config)
                template = dict(launch.template)
                sweep.add(batch, length, config["THREADS"], config["SPLIT"], config["CHUNKS"], template["MMA"],
                          template["TPK"], launch.grid[0] // template["THREADS"], template["KB"],
                          template["STAGES"], ms, _gbs(nbytes, ms))
        del q, k, v
    return [main, times, paged] + ([sweep] if sweep.rows else [])
