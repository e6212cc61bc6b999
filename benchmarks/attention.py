"""Attention benchmarks: every path against ``mx.fast.scaled_dot_product_attention`` and naive MLX.

Tables:
1. dispatcher overhead -- ``flash_attention(layout="BHSD")`` routed to sdpa vs
   calling ``mx.fast.scaled_dot_product_attention`` directly (target: <= 3%);
2. features -- ms and TFLOP/s of our dispatcher for plain, causal, window, softcap
   and ALiBi attention, beside sdpa (with an additive mask where it needs one),
   naive attention and the reference path.
3. scaling -- causal attention time against sequence length for each implementation (sdpa, our
   dispatcher plain, with softcap and with a window, naive MLX, the reference path), plotted.
4. issue 5 targets, each in one table: softcap and ALiBi prefill L = 4k-16k against sdpa's plain
   TFLOP/s and the reference path; sliding window L = 16k, W = 1k against sdpa with the additive
   mask; decode against sdpa on contiguous K/V and on mlx-lm cache slices (bandwidth plotted against
   the device's); the backward pass with softcap through ``flash_attn_func``'s gradient against
   sdpa's own backward on plain attention.
"""

from __future__ import annotations

import math
from typing import Dict, List

import mlx.core as mx

from mlx_primitives.attention import describe_attention, explain, flash_attention, flash_attn_func
from mlx_primitives.hardware import device_profile, dynamic_shared_memory
from mlx_primitives.kernels import flash_backward

from . import decode
from .common import Table, time_in_turn_ms, time_ms, time_per_call_ms


def _inputs(batch, heads, kv_heads, length, dim, dtype):
    q = mx.random.normal((batch, heads, length, dim)).astype(dtype)
    k = mx.random.normal((batch, kv_heads, length, dim)).astype(dtype)
    v = mx.random.normal((batch, kv_heads, length, dim)).astype(dtype)
    mx.eval(q, k, v)
    return q, k, v


def naive_attention(q, k, v, scale, bias=None):
    """Materialized ``softmax(q kᵀ * scale + bias) v`` in plain MLX ops (GQA by repeating K/V)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = mx.repeat(k, groups, axis=1), mx.repeat(v, groups, axis=1)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if bias is not None:
        scores = scores + bias
    return mx.softmax(scores.astype(mx.float32), axis=-1).astype(q.dtype) @ v


def _bias(spec, dtype) -> mx.array:
    """Additive mask of the spec's window (0 visible, -inf hidden) for sdpa and naive."""
    rows = mx.arange(spec.q_len)[:, None] + spec.offset
    cols = mx.arange(spec.k_len)[None, :]
    left, right = spec.window
    visible = mx.ones((spec.q_len, spec.k_len), dtype=mx.bool_)
    if right >= 0:
        visible = visible & (cols <= rows + right)
    if left >= 0:
        visible = visible & (cols >= rows - left)
    return mx.where(visible, 0.0, -mx.inf).astype(dtype)


def overhead_table(quick: bool) -> Table:
    table = Table(
        "Dispatcher overhead: flash_attention(layout='BHSD') -> sdpa vs mx.fast.scaled_dot_product_attention",
        ["B", "H", "L", "D", "causal", "sdpa ms", "ours ms", "overhead %", "route"],
        note="Per-call time with 20 calls queued per evaluation (Python graph building included).",
    )
    gpu = device_profile().is_gpu
    dtype = mx.float16 if gpu else mx.float32
    heads, dim = (16, 128) if gpu else (4, 64)
    if gpu:
        lengths = [512, 2048] if quick else [1024, 4096, 8192]
    else:
        lengths = [128] if quick else [256, 1024]
    for length in lengths:
        for causal in (False, True):
            q, k, v = _inputs(1, heads, heads, length, dim, dtype)
            scale = 1.0 / math.sqrt(q.shape[-1])
            mask = "causal" if causal else None
            direct = time_per_call_ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))
            ours = time_per_call_ms(lambda: flash_attention(q, k, v, causal=causal, layout="BHSD"))
            route = explain(q, k, v, layout="BHSD", causal=causal).path
            table.add(1, heads, length, dim, causal, direct, ours, 100.0 * (ours / direct - 1.0), route)
    return table


FEATURES: Dict[str, dict] = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"causal": True, "window_size": (256, 0)},
    "softcap": {"causal": True, "softcap": 30.0},
    "alibi": {"causal": True, "alibi": True},
}


def features_table(quick: bool) -> Table:
    gpu = device_profile().is_gpu
    dtype = mx.float16 if gpu else mx.float32
    length = (1024 if quick else 4096) if gpu else (256 if quick else 1024)
    heads, dim = (16, 128) if gpu else (4, 64)
    table = Table(
        f"Attention paths, B=1 H={heads} L={length} D={dim} {dtype}",
        ["feature", "route", "ours ms", "ours TFLOP/s", "sdpa(+mask) ms", "naive ms", "reference ms", "vs sdpa"],
        note="TFLOP/s counts visible (query, key) pairs only. 'vs sdpa' > 1 means ours is faster.",
    )
    q, k, v = _inputs(1, heads, heads, length, dim, dtype)
    scale = 1.0 / math.sqrt(dim)
    for name, feature in FEATURES.items():
        options = {key: val for key, val in feature.items() if key != "alibi"}
        if feature.get("alibi"):
            options["alibi_slopes"] = mx.array([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
        spec = describe_attention(q, k, v, **options)
        route = explain(q, k, v, layout="BHSD", **options).path
        ours = time_ms(lambda: flash_attention(q, k, v, layout="BHSD", **options))
        reference = time_ms(lambda: flash_attention(q, k, v, layout="BHSD", path="reference", **options),
                            warmup=1, repeats=3)
        exact_on_sdpa = spec.softcap == 0 and spec.alibi_slopes is None
        if exact_on_sdpa:
            mask = _bias(spec, dtype) if spec.windowed else ("causal" if spec.causal else None)
            sdpa = time_ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask))
        else:
            sdpa = "n/a"
        bias = _bias(spec, dtype) if spec.causal or spec.windowed else None
        naive = time_ms(lambda: naive_attention(q, k, v, scale, bias), warmup=1, repeats=3)
        ratio = sdpa / ours if isinstance(sdpa, float) else "n/a"
        table.add(name, route, ours, spec.flops() / (ours * 1e9), sdpa, naive, reference, ratio)
    return table


# Naive attention materializes (B, H, L, L) float32 scores; past this many bytes its column says n/a.
NAIVE_MAX_BYTES = 4 << 30


def scaling_table(quick: bool) -> Table:
    """Causal attention ms per implementation against L (one call evaluated at a time), plotted."""
    gpu = device_profile().is_gpu
    dtype = mx.float16 if gpu else mx.float32
    heads, dim, width = (16, 128, 1024) if gpu else (4, 64, 64)
    if gpu:
        lengths = (1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384)
    else:
        lengths = (64, 128, 256) if quick else (256, 512, 1024)
    implementations = ("sdpa ms", "ours ms", "ours softcap ms", f"ours window {width} ms", "naive ms",
                       "reference ms")
    table = Table(
        f"Causal attention time vs sequence length, B=1 H={heads} D={dim} {dtype}",
        ("L",) + implementations,
        note=f"ours: the dispatcher's route (sdpa for plain causal; softcap 30 and window ({width - 1}, 0) go to "
             "the flash kernel on a GPU, the reference path elsewhere); naive: materialized softmax(q kT) v, n/a "
             f"past {NAIVE_MAX_BYTES >> 30} GiB of scores.",
        x="L", series=implementations,
    )
    for length in lengths:
        q, k, v = _inputs(1, heads, heads, length, dim, dtype)
        spec = describe_attention(q, k, v, causal=True)

        def ours(**options):
            return time_ms(lambda: flash_attention(q, k, v, layout="BHSD", causal=True, **options))

        sdpa = time_ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.scale, mask="causal"))
        naive = "n/a"
        if 4 * heads * length * length <= NAIVE_MAX_BYTES:
            bias = _bias(spec, dtype)
            naive = time_ms(lambda: naive_attention(q, k, v, spec.scale, bias), warmup=1, repeats=3)
            del bias
        reference = time_ms(lambda: flash_attention(q, k, v, layout="BHSD", causal=True, path="reference"),
                            warmup=1, repeats=3)
        table.add(length, sdpa, ours(), ours(softcap=30.0), ours(window_size=(width - 1, 0)), naive, reference)
        del q, k, v
    return table


def _slopes(heads: int) -> mx.array:
    return mx.array([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])


def prefill_targets_table(quick: bool) -> Table:
    """Softcap and ALiBi prefill (non-causal, the shape of sdpa's plain call) vs sdpa plain and the reference."""
    gpu = device_profile().is_gpu
    dtype = mx.float16 if gpu else mx.float32
    heads, dim = (16, 128) if gpu else (4, 64)
    lengths = ((4096,) if quick else (4096, 8192, 16384)) if gpu else (256,)
    table = Table(
        f"Issue 5: softcap / ALiBi prefill vs sdpa plain, B=1 H={heads} D={dim} {dtype}",
        ["L", "feature", "route", "ours ms", "ours TFLOP/s", "sdpa plain ms", "sdpa plain TFLOP/s",
         "ours / sdpa plain", "reference ms", "vs reference"],
        note="Targets: >= 50% of sdpa's plain TFLOP/s at the same shape, >= 20x the reference path. sdpa plain, "
             "softcap and ALiBi timed in turn (5 rounds of 3 calls, each evaluated alone; medians).",
    )
    features = (("softcap", {"softcap": 30.0}), ("alibi", {"alibi_slopes": _slopes(heads)}))
    for length in lengths:
        q, k, v = _inputs(1, heads, heads, length, dim, dtype)
        plain = describe_attention(q, k, v)
        calls = [lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=plain.scale)]
        calls += [lambda options=options: flash_attention(q, k, v, layout="BHSD", **options) for _, options in features]
        sdpa, *ours_ms = time_in_turn_ms(calls)
        sdpa_tflops = plain.flops() / (sdpa * 1e9)
        for (name, options), ours in zip(features, ours_ms):
            route = explain(q, k, v, layout="BHSD", **options).path
            reference = time_ms(lambda: flash_attention(q, k, v, layout="BHSD", path="reference", **options),
                                warmup=1, repeats=3)
            tflops = plain.flops() / (ours * 1e9)
            table.add(length, name, route, ours, tflops, sdpa, sdpa_tflops, tflops / sdpa_tflops, reference,
                      reference / ours)
        del q, k, v
    return table


def window_target_table(quick: bool) -> Table:
    gpu = device_profile().is_gpu
    dtype = mx.float16 if gpu else mx.float32
    heads, dim = (16, 128) if gpu else (4, 64)
    length, width = ((8192 if quick else 16384), 1024) if gpu else (512, 64)
    table = Table(
        f"Issue 5: sliding window, causal, B=1 H={heads} L={length} W={width} D={dim} {dtype}",
        ["route", "ours ms", "ours queued ms", "sdpa + additive mask ms", "sdpa + mask queued ms", "speedup",
         "speedup queued", "sdpa causal (full) ms"],
        note=("Target: >= 10x faster than sdpa with the equivalent additive mask. 'ms': one call evaluated at a "
              "time (its host and launch time included); 'queued': per call with 20 calls in one graph, as in a "
              "model."),
    )
    q, k, v = _inputs(1, heads, heads, length, dim, dtype)
    options = {"causal": True, "window_size": (width - 1, 0)}
    spec = describe_attention(q, k, v, **options)
    route = explain(q, k, v, layout="BHSD", **options).path

    def ours():
        return flash_attention(q, k, v, layout="BHSD", **options)

    bias = _bias(spec, dtype)
    mx.eval(bias)

    def masked():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.scale, mask=bias)

    times = (time_ms(ours), time_per_call_ms(ours), time_ms(masked, repeats=5), time_per_call_ms(masked, repeats=3))
    del bias
    causal = time_ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.scale, mask="causal"))
    table.add(route, *times, times[2] / times[0], times[3] / times[1], causal)
    return table


def decode_target_tables(quick: bool) -> List[Table]:
    """Decode bandwidth against sdpa's and the device's (plotted), and where a call's time goes."""
    table, times = decode.vs_sdpa_table(), decode.time_table()
    table.title = "Issue 5: " + table.title
    table.note += " Targets: >= 2.0 TB/s, never slower than either sdpa column."
    for batch, length in decode.shapes(quick):
        q, k, v, seqlens = decode.cache(batch, length)
        decode.add_vs_sdpa(table, times, q, k, v, seqlens)
        del q, k, v
    return [table, times]


def backward_target_table(quick: bool) -> Table:
    gpu = device_profile().is_gpu
    dtype = mx.float16 if gpu else mx.float32
    heads, length, dim = (16, 2048 if quick else 4096, 128) if gpu else (4, 256, 64)
    q, k, v = (x.swapaxes(1, 2) for x in _inputs(1, heads, heads, length, dim, dtype))  # BSHD views
    qh, kh, vh = _inputs(1, heads, heads, length, dim, dtype)
    spec = describe_attention(qh, kh, vh)
    flops = 2.5 * spec.flops()
    softcapped = describe_attention(qh, kh, vh, softcap=30.0)
    tiles = flash_backward.configs_for(softcapped, dynamic_shared_memory())
    table = Table(
        f"Issue 5: backward with softcap (flash_attn_func gradient) vs sdpa's backward, B=1 H={heads} L={length} "
        f"D={dim} {dtype}, non-causal",
        ["path", "forward ms", "forward + backward ms", "backward ms", "backward TFLOP/s", "vs sdpa backward"],
        note="Backward = (forward + backward) - forward; its FLOPs are 2.5x the forward's. "
             "Target: softcap >= 40% of sdpa's plain backward TFLOP/s. The four calls timed in turn (5 rounds of 3, "
             f"medians). Backward tiles (dq, dk/dv): {tiles}.",
    )

    def sdpa(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.scale)

    def ours(q, k, v):
        return flash_attn_func(q, k, v, softcap=30.0)

    paths = (("sdpa plain", sdpa, (qh, kh, vh)), ("flash_attn_func softcap", ours, (q, k, v)))
    calls = []
    for _, fn, args in paths:
        grad = mx.grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(mx.float32).sum(), argnums=(0, 1, 2))
        calls += [lambda fn=fn, args=args: fn(*args), lambda grad=grad, args=args: grad(*args)]
    times = time_in_turn_ms(calls)
    rows = [(name, times[2 * i], times[2 * i + 1], max(times[2 * i + 1] - times[2 * i], 1e-6))
            for i, (name, _, _) in enumerate(paths)]
    sdpa_backward = rows[0][3]
    for name, forward, both, backward in rows:
        table.add(name, forward, both, backward, flops / (backward * 1e9), sdpa_backward / backward)
    return table


def run(quick: bool = False) -> List[Table]:
    return [overhead_table(quick), features_table(quick), scaling_table(quick), prefill_targets_table(quick),
            window_target_table(quick), *decode_target_tables(quick), backward_target_table(quick)]
