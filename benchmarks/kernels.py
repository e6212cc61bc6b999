"""Fused-kernel benchmarks: GB/s of each kernel beside ``mx.fast`` and naive MLX, against the device's bandwidth.

Tables:
1. norms -- RMSNorm / LayerNorm with and without the residual add (target: fused RMSNorm + residual
   (8, 2048, 4096) fp16 >= 2500 GB/s on the H100);
2. rope -- q and k in one launch vs two ``mx.fast.rope`` calls (target: >= 1.3x);
3. gated activations -- swiglu / geglu vs ``nn.silu(g) * u`` (target: swiglu >= 2500 GB/s);
4. sweeps of the tunable template values at the target shapes;
5. routing -- which path ``path="auto"`` takes, and the measurement behind it.

Effective GB/s count each tensor read once and written once; times are per call with 20 calls
queued per evaluation (what a model's graph sees).
"""

from __future__ import annotations

from typing import Callable, Dict, List

import mlx.core as mx
import mlx.nn as nn

from mlx_primitives.hardware import device_profile
from mlx_primitives.kernels import catalog, geglu, layer_norm, norms, rms_norm, rope, rotary, swiglu

from .common import Table, time_per_call_ms


def _gbs(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6


def _pct(gbs: float) -> str:
    peak = device_profile().bandwidth_gbs
    return f"{100 * gbs / peak:.0f}%" if peak else "n/a"


def _dtype():
    return mx.float16 if device_profile().is_gpu else mx.float32


def _time(fn: Callable[[], object]) -> float:
    return time_per_call_ms(fn, calls=20, repeats=5)


def _norm_paths(layer: bool, x, r, w, b) -> Dict[str, Callable[[], object]]:
    eps = 1e-5
    if layer:
        fused = lambda res, path: layer_norm(x, w, b, eps, residual=res, path=path)  # noqa: E731

        def naive(res):
            h = x if res is None else x + res
            mu = mx.mean(h, axis=-1, keepdims=True)
            return (h - mu) * mx.rsqrt(mx.var(h, axis=-1, keepdims=True) + eps) * w + b
    else:
        fused = lambda res, path: rms_norm(x, w, eps, residual=res, path=path)  # noqa: E731

        def naive(res):
            h = x if res is None else x + res
            return h * mx.rsqrt(mx.mean(h * h, axis=-1, keepdims=True) + eps) * w

    return {
        "kernel": lambda: fused(None, "kernel"),
        "fast": lambda: fused(None, "fast"),
        "naive": lambda: naive(None),
        "kernel+res": lambda: fused(r, "kernel"),
        "fast+res": lambda: fused(r, "fast"),
        "naive+res": lambda: naive(r),
    }


def norm_table(quick: bool, routing: Table) -> Table:
    table = Table(
        "Norms: fused kernel vs mx.fast vs naive MLX (GB/s effective)",
        ["op", "shape", "residual", "kernel GB/s", "mx.fast GB/s", "naive GB/s", "kernel/fast", "% of peak", "auto"],
        note="With a residual: mx.fast = `x + r` then mx.fast.*_norm (2 launches); bytes = x, r read + out, h written.",
    )
    dtype = _dtype()
    shapes = [(2, 128, 1024)] if quick else [(8, 2048, 4096), (1, 16, 4096), (4, 1024, 8192)]
    for layer in (False, True):
        for shape in shapes:
            x, r = mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype)
            w, b = mx.random.normal(shape[-1:]).astype(dtype), mx.random.normal(shape[-1:]).astype(dtype)
            mx.eval(x, r, w, b)
            paths = _norm_paths(layer, x, r, w, b)
            for res in (False, True):
                suffix = "+res" if res else ""
                nbytes = x.nbytes * (4 if res else 2)
                ms = {name: _time(paths[name + suffix]) for name in ("kernel", "fast", "naive")}
                gbs = {name: _gbs(nbytes, t) for name, t in ms.items()}
                op = "layer_norm" if layer else "rms_norm"
                auto = norms.auto_path(op, res, x.size)
                table.add(op, shape, res, gbs["kernel"], gbs["fast"], gbs["naive"], ms["fast"] / ms["kernel"],
                          _pct(gbs["kernel"]), auto)
                routing.add(f"{op}{' + residual' if res else ''}", shape, auto,
                            "kernel" if ms["kernel"] < ms["fast"] else "fast", ms["kernel"], ms["fast"])
    return table


def rope_table(quick: bool, routing: Table) -> Table:
    table = Table(
        "RoPE of q and k: one fused launch vs two mx.fast.rope calls",
        ["shape q / k", "offset", "fused ms", "2x mx.fast ms", "reference ms", "speedup", "fused GB/s", "% of peak"],
        note="bytes = q and k read once and written once. Target: speedup >= 1.3.",
    )
    dtype = _dtype()
    cases = [((1, 8, 128, 64), 2, 0)] if quick else [
        ((8, 32, 2048, 128), 32, 0), ((8, 32, 2048, 128), 8, 0), ((32, 32, 1, 128), 8, "per-batch"),
    ]
    for shape, hk, offset in cases:
        q = mx.random.normal(shape).astype(dtype)
        k = mx.random.normal((shape[0], hk) + shape[2:]).astype(dtype)
        off = mx.arange(shape[0]) * 37 if offset == "per-batch" else offset
        mx.eval(q, k)
        ms = {p: _time(lambda p=p: rope(q, k, shape[-1], offset=off, path=p)) for p in ("kernel", "fast", "reference")}
        gbs = _gbs(2 * (q.nbytes + k.nbytes), ms["kernel"])
        table.add(f"{shape} / {k.shape}", offset, ms["kernel"], ms["fast"], ms["reference"],
                  ms["fast"] / ms["kernel"], gbs, _pct(gbs))
        auto = "kernel" if q.size + k.size >= rotary.AUTO_MIN_ELEMENTS else "fast"
        routing.add("rope q+k", shape, auto, "kernel" if ms["kernel"] < ms["fast"] else "fast",
                    ms["kernel"], ms["fast"])
    return table


def glu_table(quick: bool) -> Table:
    table = Table(
        "Gated activations: fused kernel vs naive MLX (GB/s effective)",
        ["op", "shape", "kernel GB/s", "naive GB/s", "speedup", "% of peak"],
        note="bytes = gate, up read + out written. naive = `nn.silu(g) * u` / `nn.gelu(g) * u` in the input dtype.",
    )
    dtype = _dtype()
    shapes = [(2, 64, 1024)] if quick else [(8, 2048, 14336), (1, 32, 14336)]
    ops = {
        "swiglu": (lambda g, u: swiglu(g, u), lambda g, u: nn.silu(g) * u),
        "geglu": (lambda g, u: geglu(g, u), lambda g, u: nn.gelu(g) * u),
        "geglu tanh": (lambda g, u: geglu(g, u, approximate="tanh"), lambda g, u: nn.gelu_approx(g) * u),
    }
    for shape in shapes:
        g, u = mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype)
        mx.eval(g, u)
        for name, (fused, naive) in ops.items():
            ours, base = _time(lambda: fused(g, u)), _time(lambda: naive(g, u))
            gbs = _gbs(3 * g.nbytes, ours)
            table.add(name, shape, gbs, _gbs(3 * g.nbytes, base), base / ours, _pct(gbs))
    return table


def sweep_table(quick: bool) -> Table:
    table = Table(
        "Tunable template values at the target shapes (GB/s; default marked *)",
        ["kernel", "config", "GB/s", "% of peak"],
    )
    dtype = _dtype()
    shape = (2, 128, 1024) if quick else (8, 2048, 4096)
    x, r, w = mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype), mx.ones(shape[-1:], dtype)
    mx.eval(x, r, w)
    vec = 16 // x.dtype.size
    default = norms.default_threads_per_row(shape[-1], vec)
    for config in catalog.RMS_NORM_RESIDUAL.configs():
        gbs = _gbs(4 * x.nbytes, _time(lambda: rms_norm(x, w, residual=r, path="kernel", config=config)))
        table.add("rms_norm_residual", f"{config}{' *' if config['TPR'] == default else ''}", gbs, _pct(gbs))
    q_shape = (1, 8, 128, 64) if quick else (8, 32, 2048, 128)
    q = mx.random.normal(q_shape).astype(dtype)
    k = mx.random.normal(q_shape).astype(dtype)
    mx.eval(q, k)
    for config in catalog.ROPE.configs():
        gbs = _gbs(2 * (q.nbytes + k.nbytes), _time(lambda: rope(q, k, q_shape[-1], path="kernel", config=config)))
        mark = " *" if config == catalog.DEFAULTS["rope"] else ""
        table.add("rope", f"{config}{mark}", gbs, _pct(gbs))
    g_shape = (2, 64, 1024) if quick else (8, 2048, 14336)
    g, u = mx.random.normal(g_shape).astype(dtype), mx.random.normal(g_shape).astype(dtype)
    mx.eval(g, u)
    for config in catalog.GLU.configs():
        gbs = _gbs(3 * g.nbytes, _time(lambda: swiglu(g, u, config=config)))
        mark = " *" if config == catalog.DEFAULTS["glu"] else ""
        table.add("glu (swiglu)", f"{config}{mark}", gbs, _pct(gbs))
    return table


def run(quick: bool) -> List[Table]:
    routing = Table(
        "Routing: what path='auto' runs, and which path measured faster here",
        ["op", "shape", "auto runs", "faster here", "kernel ms", "alternative ms"],
        note="alternative = mx.fast (norms: after a separate add; rope: two calls).",
    )
    tables = [norm_table(quick, routing), rope_table(quick, routing), glu_table(quick), sweep_table(quick)]
    return tables + [routing]
