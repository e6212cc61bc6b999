"""Quantization: W8A8 linear vs fp16 ``@``, INT4 weight-only GEMV vs ``mx.quantized_matmul``, accuracy.

* W8A8 at M tokens x 4096 -> 4096: our s8 kernels from pre-quantized activations (the route "auto"
  takes, and each of the mma.sync and sm_90 warpgroup kernels), and end to end (per-token
  quantization of fp16 x included), against MLX's fp16 ``x @ w.T``. Target (issue 9): >= 1.3x fp16
  at M >= 1024. The warpgroup kernel's tile configs at M = 4096, and both kernels at fewer rows
  (where "auto" switches).
* INT4 weight-only GEMV (M = 1, affine, group 64): ``mx.quantized_matmul``, ``Int4Linear`` (MLX's
  kernel, or dequantize + ``@`` where it fails) and fp16 GEMV. Target: within 10% of MLX's.
* Which ``mx.quantized_matmul`` calls MLX can run here (its CUDA JIT needs ``crt/mma.h``).
* Accuracy: per-layer relative error and logits of ``SmallTransformer`` against float32, within
  ``quantization_report.BOUNDS`` or not; ``accuracy(ACCURACY_SIZES["quick"], 64)`` runs on a CPU in about a minute.
"""

from __future__ import annotations

from typing import List

import mlx.core as mx

from mlx_primitives.kernels import Int4Linear, quantize_int8, quantize_model, w8a8_linear, w8a8_matmul
from mlx_primitives.kernels.quantization_report import BOUNDS, SmallTransformer, accuracy_report
from mlx_primitives.kernels import catalog, w8a8
from mlx_primitives.kernels.w8a8 import quantize_per_token

from .common import Table, build_us, eval_us, in_turn_ms, time_per_call_ms

DIMS = 4096
ROUTE_ROWS = (1, 16, 128, 256, 512)  # M of the route table (both kernels)


def _w8a8(quick: bool) -> List[Table]:
    table = Table(
        title=f"W8A8 linear vs fp16 @ (M x {DIMS} -> {DIMS})",
        columns=("M", "fp16 @ us", "fp16 TFLOP/s", "mma.sync us", "warpgroup us", "w8a8 kernel us", "w8a8 TOPS",
                 "kernel / fp16", "w8a8 + act. quant us", "end-to-end / fp16", "kernel build us",
                 "end-to-end build us", "fp16 build us"),
        note="Device time per call: 10 calls whose graphs were built beforehand, evaluated together (GPU time and "
             "MLX's launch cost), every implementation timed in turn (medians of 5 rounds); build: the Python time "
             "that makes one call's graph, apart. mma.sync / warpgroup: each kernel forced; w8a8 kernel: the route "
             "'auto' takes, from int8 activations and scales; end to end: w8a8_linear, fp16 x quantized per token "
             "(quantize_rows.kern) then the kernel. Ratios are fp16 time / ours (> 1: we are faster). Target >= 1.3 "
             "at M >= 1024.",
        x="M", series=("fp16 @ us", "w8a8 kernel us", "w8a8 + act. quant us"), ylabel="us",
    )
    sweep = Table(title=f"W8A8 warpgroup tile configs (M = 4096, {DIMS} x {DIMS})",
                  columns=("BN", "STAGES", "PW", "us", "TOPS", "same output as default"),
                  note="Device time per call as above, configs timed in turn.")
    routes = Table(title=f"W8A8 kernels at fewer rows (M x {DIMS} -> {DIMS})",
                   columns=("M", "fp16 @ us", "mma.sync us", "warpgroup us", "route 'auto' takes"),
                   note="Device time per call as above.")
    w = (mx.random.normal((DIMS, DIMS)) / 64).astype(mx.float16)
    wq = quantize_int8(w)
    mx.eval(w, wq.values, wq.scales)

    def operands(m):
        x = mx.random.normal((m, DIMS)).astype(mx.float16)
        x_q, x_s = quantize_per_token(x)
        mx.eval(x, x_q, x_s)
        return x, x_q, x_s

    def kernel(x_q, x_s, path="auto", config=None):
        return w8a8_matmul(x_q, x_s, wq.values, wq.scales, path=path, config=config)

    def device_us(fns):
        return in_turn_ms(fns, lambda f: eval_us(f, calls=10, rounds=3), rounds=5)

    for m in (1024, 4096) if quick else (1024, 2048, 4096, 8192):
        x, x_q, x_s = operands(m)
        ops = 2 * m * DIMS * DIMS
        fns = [lambda: x @ w.T] + [lambda p=p: kernel(x_q, x_s, p) for p in ("kernel", "warpgroup", "auto")]
        fns.append(lambda: w8a8_linear(x, wq.values, wq.scales))
        fp16, mma, warpgroup, auto, full = device_us(fns)
        builds = [build_us(f) for f in (fns[3], fns[4], fns[0])]
        table.add(m, fp16, ops / fp16 / 1e6, mma, warpgroup, auto, ops / auto / 1e6, fp16 / auto, full, fp16 / full,
                  *builds)
        if m == 4096:
            default = kernel(x_q, x_s, "warpgroup")
            configs = catalog.W8A8_WG.configs()
            times = device_us([lambda c=c: kernel(x_q, x_s, "warpgroup", c) for c in configs])
            for config, us in zip(configs, times):
                same = mx.array_equal(kernel(x_q, x_s, "warpgroup", config), default).item()
                sweep.add(config["BN"], config["STAGES"], config["PW"], us, ops / us / 1e6, same)
    for m in ROUTE_ROWS:
        x, x_q, x_s = operands(m)
        fp16, mma, warpgroup = device_us([lambda: x @ w.T, lambda: kernel(x_q, x_s, "kernel"),
                                          lambda: kernel(x_q, x_s, "warpgroup")])
        routes.add(m, fp16, mma, warpgroup, w8a8._route("auto"))
    return [table, sweep, routes]


def _mlx_support() -> Table:
    """Whether each size of ``mx.quantized_matmul`` call evaluates on this device (4-bit, fp16: one JIT
    build per row count, the other dtypes and bit widths would each add builds of their own)."""
    table = Table(title="mx.quantized_matmul on this device (affine, 4 bits, group 64, fp16, 512 x 512)",
                  columns=("M", "result"))
    weight, scales, biases = mx.quantize(mx.random.normal((512, 512)).astype(mx.float16), 64, 4)
    for m in (1, 8, 64, 512, 4096):
        x = mx.random.normal((m, 512)).astype(mx.float16)
        try:
            mx.eval(mx.quantized_matmul(x, weight, scales, biases, group_size=64, bits=4))
            result = "ok"
        except (RuntimeError, ValueError) as error:
            result = "fails: " + str(error).replace("\n", " ").replace("|", "/")[:160]
        table.add(m, result)
    return table


def _int4_gemv() -> Table:
    table = Table(
        title="INT4 weight-only GEMV (M = 1, affine, group 64, fp16)",
        columns=("out x in", "mx.quantized_matmul us", "Int4Linear us", "dequantize + @ us", "fp16 GEMV us",
                 "Int4Linear / MLX", "mx.quantized_matmul build us", "Int4Linear build us"),
        note="Device time per call: 20 calls whose graphs were built beforehand, evaluated together, the four timed "
             "in turn (medians of 5 rounds); build: the Python time that makes one call's graph, apart. Int4Linear "
             "is an nn.QuantizedLinear that calls mx.quantized_matmul itself once MLX's kernel has run for its kind "
             "of call: the same kernel, so its device-time ratio is 1 but for noise. 'n/a' where MLX's kernel fails "
             "to build here.",
    )
    for out_dims, in_dims in ((DIMS, DIMS), (11008, DIMS), (DIMS, 11008)):
        w = (mx.random.normal((out_dims, in_dims)) / 64).astype(mx.float16)
        layer = Int4Linear(in_dims, out_dims, bias=False)
        layer.weight, layer.scales, layer.biases = mx.quantize(w, 64, 4)
        x = mx.random.normal((1, in_dims)).astype(mx.float16)
        mx.eval(w, layer.parameters(), x)
        args = (layer.weight, layer.scales, layer.biases)
        fns = [lambda: layer(x), lambda: x @ mx.dequantize(*args, group_size=64, bits=4).T, lambda: x @ w.T]
        try:
            mx.eval(mx.quantized_matmul(x, *args, group_size=64, bits=4))
            fns.append(lambda: mx.quantized_matmul(x, *args, group_size=64, bits=4))
        except RuntimeError:
            pass
        ours, dequant, fp16, *mlx = in_turn_ms(fns, lambda f: eval_us(f, rounds=3))
        builds = [build_us(f) for f in fns[3:] + fns[:1]]
        table.add(f"{out_dims} x {in_dims}", mlx[0] if mlx else "n/a", ours, dequant, fp16,
                  ours / mlx[0] if mlx else "n/a", *(builds if mlx else ["n/a", *builds]))
    return table


# SmallTransformer sizes of the accuracy tables: "full" on the GPU; "quick" also runs on a CPU (about a minute).
ACCURACY_SIZES = {
    "full": dict(vocab_size=8192, dims=1024, heads=8, hidden_dims=2816, layers=2),
    "quick": dict(vocab_size=1024, dims=256, heads=4, hidden_dims=768, layers=2),
}
VARIANTS = {"fp16": None, "int8 w8a8": dict(bits=8, mode="w8a8"),
            "int8 weight-only g64": dict(bits=8, mode="weight_only"), "int4 g64": dict(bits=4, mode="weight_only")}


def accuracy(sizes: dict, seq: int = 128) -> List[Table]:
    """The accuracy tables of ``SmallTransformer(**sizes)`` (fp16 activations) against float32, each
    quantized variant checked against ``quantization_report.BOUNDS``; ``seq`` tokens, batch 2."""
    reference = SmallTransformer(**sizes)
    mx.eval(reference.parameters())
    tokens = mx.random.randint(0, sizes["vocab_size"], (2, seq))
    reports = {}
    for name, quantization in VARIANTS.items():
        model = SmallTransformer(**sizes)
        model.update(reference.parameters())
        model.set_dtype(mx.float16)
        if quantization:
            quantize_model(model, group_size=64, **quantization)
        reports[name] = accuracy_report(reference, model, tokens, dtype=mx.float16)
    shape = (f"{sizes['layers']} blocks, dims {sizes['dims']}, SwiGLU {sizes['hidden_dims']}, "
             f"vocab {sizes['vocab_size']}")
    summary = Table(
        title=f"Accuracy of SmallTransformer ({shape}) against float32",
        columns=("model", "logits rel. error", "logits max |diff|", "top-1 agreement", "max layer rel. error",
                 "mean layer rel. error", "bounds (layer, logits)", "within bounds"),
        note="Layer error: ||Q(x) - F(x)|| / ||F(x)|| of each quantized layer against its float32 layer on "
             "standard-normal x (64 rows; the embedding through as_linear); logits on random tokens. Weights are "
             "random (untrained). Bounds: quantization_report.BOUNDS, also checked by the tests.",
    )
    for name, report in reports.items():
        errors = list(report.layer_errors.values())
        setting = VARIANTS[name]
        key = setting and (setting["bits"], setting["mode"])
        summary.add(name, report.logit_rel_error, report.logit_max_abs, report.top1_agreement,
                    max(errors) if errors else "-", sum(errors) / len(errors) if errors else "-",
                    str(BOUNDS[key]) if key else "-", report.within(*key) if key else "-")
    quantized = [name for name in VARIANTS if VARIANTS[name]]
    layers = Table(title="Per-layer relative error", columns=("layer",) + tuple(quantized))
    for path in reports[quantized[0]].layer_errors:
        layers.add(path, *(reports[name].layer_errors[path] for name in quantized))
    return [summary, layers]


def run(quick: bool = False) -> List[Table]:
    sizes, seq = (ACCURACY_SIZES["quick"], 128) if quick else (ACCURACY_SIZES["full"], 512)
    return _w8a8(quick) + [_mlx_support(), _int4_gemv()] + accuracy(sizes, seq)
