"""The layer zoo: selective scan, the "ssm" associative scan and the sparse MoE layer.

Tables:
1. selective_scan (Mamba, with D, z, delta_bias and softplus) -- the two-level parallel-prefix kernel
   (sequence splits chosen from the shape, and one split) vs the sequential MLX reference
   (target on the H100: >= 5x at B=8, L=4096, D=2048, N=16). GB/s count x, delta, z read and y written
   once (B and C are small).
2. associative_scan "ssm" (h = a h + b along L) -- the kernel vs the doubling MLX reference and vs
   ``mx.cumsum`` of the same array (one read, one write: what a scan can cost).
3. SparseMoELayer, 8 experts, top-2 -- its three expert-matmul routes (mx.gather_mm; after a host read
   of the counts, dense matmuls per expert block or one padded batched matmul per projection), fp16 and
   4-bit, vs a per-expert Python loop (host-side token lists, one dense MLP per expert; target at 4096
   tokens: >= 2x).
Times are medians of synchronised calls.
"""

from __future__ import annotations

from typing import List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_primitives import SparseMoELayer, associative_scan, selective_scan
from mlx_primitives.hardware import device_profile
from mlx_primitives.scan import selective_scan_reference

from .common import Table, time_ms


def _pct(gbs: float) -> str:
    peak = device_profile().bandwidth_gbs
    return f"{100 * gbs / peak:.0f}%" if peak else "n/a"


def _dtype():
    return mx.float16 if device_profile().is_gpu else mx.float32


def selective_scan_table(quick: bool) -> Table:
    batch, length, dims, state = (2, 256, 256, 16) if quick else (8, 4096, 2048, 16)
    dtype = _dtype()
    table = Table(
        f"selective_scan: kernel vs sequential MLX reference (B={batch}, L={length}, D={dims}, N={state}, "
        f"{str(dtype).replace('mlx.core.', '')}, D + z + delta_bias + softplus)",
        ["path", "config", "ms", "GB/s", "% of peak", "reference / ours"],
    )
    x, delta, z = (mx.random.normal((batch, length, dims)).astype(dtype) for _ in range(3))
    A = -mx.random.uniform(0.2, 2.0, (dims, state))
    B, C = (mx.random.normal((batch, length, state)).astype(dtype) for _ in range(2))
    D, bias = mx.random.normal((dims,)), mx.random.uniform(-4.0, -2.0, (dims,))
    mx.eval(x, delta, z, A, B, C, D, bias)
    nbytes = 4 * batch * length * dims * dtype.size
    reference = time_ms(lambda: selective_scan_reference(x, delta, A, B, C, D, z, bias, True)[0],
                        warmup=1, repeats=2)
    rows = [("kernel", "default, splits from shape", {}, None), ("kernel", "default, 1 split", {}, 1),
            ("kernel", "WARPS 8, ITEMS 8", {"WARPS": 8, "ITEMS": 8}, None),
            ("kernel", "WARPS 4, ITEMS 16", {"WARPS": 4, "ITEMS": 16}, None)]
    for path, label, config, splits in rows:
        ms = time_ms(lambda: selective_scan(x, delta, A, B, C, D, z, delta_bias=bias, delta_softplus=True,
                                            path=path, config=config or None, splits=splits), repeats=10)
        gbs = nbytes / ms / 1e6
        table.add(path, label, ms, gbs, _pct(gbs), reference / ms)
    table.add("sequential reference", "-", reference, nbytes / reference / 1e6, _pct(nbytes / reference / 1e6), 1.0)
    return table


def ssm_scan_table(quick: bool) -> Table:
    shape = (2, 256, 256) if quick else (8, 4096, 2048)
    dtype = _dtype()
    table = Table(f"associative_scan 'ssm' along L: kernel vs doubling reference (shape {shape}, "
                  f"{str(dtype).replace('mlx.core.', '')})", ["path", "ms", "GB/s", "% of peak"],
                  note="GB/s: a and b read, h written once; mx.cumsum reads one array and writes one.")
    a = mx.random.uniform(0.9, 1.0, shape).astype(dtype)
    b = mx.random.normal(shape).astype(dtype)
    mx.eval(a, b)
    size = a.size * dtype.size
    for label, fn, nbytes in [
        ("kernel", lambda: associative_scan((a, b), "ssm", axis=1, path="kernel"), 3 * size),
        ("doubling reference", lambda: associative_scan((a, b), "ssm", axis=1, path="reference"), 3 * size),
        ("mx.cumsum (add)", lambda: associative_scan(b, "add", axis=1), 2 * size),
    ]:
        ms = time_ms(fn, repeats=10)
        table.add(label, ms, nbytes / ms / 1e6, _pct(nbytes / ms / 1e6))
    return table


def loop_moe(layer: SparseMoELayer, x: mx.array) -> mx.array:
    """The baseline: token lists per expert on the host, then one dense SwiGLU MLP per expert."""
    experts, weights, _ = layer.route(x)
    chosen = np.array(experts)
    y = mx.zeros_like(x)
    for e in range(layer.num_experts):
        tokens, slots = np.nonzero(chosen == e)
        if not len(tokens):
            continue
        t = mx.array(tokens)
        rows = x[t]
        hidden = nn.silu(rows @ layer.gate_proj.weight[e].T) * (rows @ layer.up_proj.weight[e].T)
        out = (hidden @ layer.down_proj.weight[e].T) * weights[t, mx.array(slots)][:, None].astype(x.dtype)
        y = y.at[t].add(out)
    return y


def moe_table(quick: bool) -> Table:
    dtype = _dtype()
    table = Table(f"SparseMoELayer, 8 experts, top-2: expert-matmul routes vs per-expert loop "
                  f"({str(dtype).replace('mlx.core.', '')})",
                  ["tokens", "dims", "hidden", "gather ms", "per-expert ms", "batched ms", "auto takes", "loop ms",
                   "loop / ours", "TFLOP/s ours", "4-bit gather ms", "4-bit per-expert ms"],
                  note="ours: the route matmuls='auto' takes (gather: mx.gather_mm, unsorted on CUDA; per-expert: "
                       "expert counts read on the host, one gather into per-expert blocks, dense matmuls per "
                       "block; batched: the same blocks padded to the largest, one batched matmul per "
                       "projection). Gather routes (fp16 and 4-bit): 1 warm-up and 3 timed calls; 4-bit: "
                       "group 64 (its batched route takes the per-expert blocks).")
    sizes = [(256, 256, 512)] if quick else [(512, 1024, 2816), (2048, 1024, 2816), (4096, 1024, 2816),
                                               (4096, 4096, 14336)]
    for tokens, dims, hidden in sizes:
        layer = SparseMoELayer(dims, hidden, num_experts=8, top_k=2)
        layer.set_dtype(dtype)
        x = mx.random.normal((tokens, dims)).astype(dtype)
        mx.eval(layer.parameters(), x)
        auto = layer.matmul_route(tokens)

        def timed(route: str) -> float:
            layer.matmuls = route
            repeats = {"warmup": 1, "repeats": 3} if route == "gather" else {"repeats": 10}
            return time_ms(lambda: layer(x), **repeats)

        routes = {route: timed(route) for route in ("gather", "per_expert", "batched")}
        loop = time_ms(lambda: loop_moe(layer, x), repeats=10)
        nn.quantize(layer, group_size=64, bits=4, class_predicate=lambda _, m: hasattr(m, "to_quantized")
                    and not isinstance(m, nn.Linear))
        mx.eval(layer.parameters())
        quantized = {route: timed(route) for route in ("gather", "per_expert")}
        ours = routes[auto]
        flops = 2 * tokens * 2 * 3 * dims * hidden
        table.add(tokens, dims, hidden, routes["gather"], routes["per_expert"], routes["batched"], auto, loop,
                  loop / ours, flops / ours / 1e9, quantized["gather"], quantized["per_expert"])
    return table


def run(quick: bool = False) -> List[Table]:
    return [selective_scan_table(quick), ssm_scan_table(quick), moe_table(quick)]
