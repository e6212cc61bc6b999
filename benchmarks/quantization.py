"""Quantization: W8A8 linear vs fp16 ``@``, INT4 weight-only GEMV vs ``mx.quantized_matmul``, accuracy.

* W8A8 at M tokens x 4096 -> 4096: our s8 kernel from pre-quantized activations, and end to end
  (per-token quantization of fp16 x included), against MLX's fp16 ``x @ w.T``. Target (issue 9):
  >= 1.3x fp16 at M >= 1024.
* INT4 weight-only GEMV (M = 1, affine, group 64): ``mx.quantized_matmul``, ``Int4Linear`` (MLX's
  kernel, or dequantize + ``@`` where it fails) and fp16 GEMV. Target: within 10% of MLX's.
* Which ``mx.quantized_matmul`` calls MLX can run here (its CUDA JIT needs ``crt/mma.h``).
* Accuracy: per-layer relative error and logits of ``SmallTransformer`` against float32.
"""

from __future__ import annotations

from typing import List

import mlx.core as mx

from mlx_primitives.kernels import Int4Linear, quantize_int8, quantize_model, w8a8_linear, w8a8_matmul
from mlx_primitives.kernels.quantization_report import SmallTransformer, accuracy_report
from mlx_primitives.kernels.w8a8 import quantize_per_token

from .common import Table, time_ms, time_per_call_ms

DIMS = 4096
# (BM, BN, WM, WN) timed at M = 4096: the default first, then the neighbours of catalog.W8A8's space.
SWEEP = ((128, 128, 2, 4), (128, 128, 4, 2), (128, 128, 2, 2), (128, 128, 4, 4), (128, 64, 2, 2), (64, 128, 2, 2))


def _w8a8(quick: bool) -> List[Table]:
    table = Table(
        title=f"W8A8 linear vs fp16 @ (M x {DIMS} -> {DIMS})",
        columns=("M", "fp16 @ ms", "fp16 TFLOP/s", "w8a8 kernel ms", "w8a8 TOPS", "kernel / fp16",
                 "w8a8 + act. quant ms", "end-to-end / fp16"),
        note="kernel: from int8 activations and scales; end to end: fp16 x quantized per token in the same "
             "call. Ratios are fp16 time / ours (> 1: we are faster). Target >= 1.3 at M >= 1024.",
        x="M", series=("fp16 @ ms", "w8a8 kernel ms", "w8a8 + act. quant ms"),
    )
    sweep = Table(title=f"W8A8 tile configs (M = 4096, {DIMS} x {DIMS})",
                  columns=("BM", "BN", "WM", "WN", "ms", "TOPS", "same output as default"))
    w = (mx.random.normal((DIMS, DIMS)) / 64).astype(mx.float16)
    wq = quantize_int8(w)
    mx.eval(w, wq.values, wq.scales)
    for m in (1024, 4096) if quick else (1024, 2048, 4096, 8192):
        x = mx.random.normal((m, DIMS)).astype(mx.float16)
        x_q, x_s = quantize_per_token(x)
        mx.eval(x, x_q, x_s)
        ops = 2 * m * DIMS * DIMS
        fp16 = time_ms(lambda: x @ w.T)
        kernel = time_ms(lambda: w8a8_matmul(x_q, x_s, wq.values, wq.scales))
        full = time_ms(lambda: w8a8_linear(x, wq.values, wq.scales))
        table.add(m, fp16, ops / fp16 / 1e9, kernel, ops / kernel / 1e9, fp16 / kernel, full, fp16 / full)
        if m == 4096:
            default = w8a8_matmul(x_q, x_s, wq.values, wq.scales)
            for values in SWEEP[:2] if quick else SWEEP:
                config = dict(zip(("BM", "BN", "WM", "WN"), values))
                ms = time_ms(lambda: w8a8_matmul(x_q, x_s, wq.values, wq.scales, config=config))
                same = mx.array_equal(w8a8_matmul(x_q, x_s, wq.values, wq.scales, config=config), default).item()
                sweep.add(*values, ms, ops / ms / 1e9, same)
    return [table, sweep]


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
        columns=("out x in", "mx.quantized_matmul ms", "Int4Linear ms", "dequantize + @ ms", "fp16 GEMV ms",
                 "Int4Linear / MLX"),
        note="Per call, 20 calls queued in one graph. 'n/a' where MLX's kernel fails to build here.",
    )
    for out_dims, in_dims in ((DIMS, DIMS), (11008, DIMS), (DIMS, 11008)):
        w = (mx.random.normal((out_dims, in_dims)) / 64).astype(mx.float16)
        layer = Int4Linear(in_dims, out_dims, bias=False)
        layer.weight, layer.scales, layer.biases = mx.quantize(w, 64, 4)
        x = mx.random.normal((1, in_dims)).astype(mx.float16)
        mx.eval(w, layer.parameters(), x)
        args = (layer.weight, layer.scales, layer.biases)
        try:
            mlx = time_per_call_ms(lambda: mx.quantized_matmul(x, *args, group_size=64, bits=4))
        except RuntimeError:
            mlx = None
        ours = time_per_call_ms(lambda: layer(x))
        dequant = time_per_call_ms(lambda: x @ mx.dequantize(*args, group_size=64, bits=4).T)
        fp16 = time_per_call_ms(lambda: x @ w.T)
        table.add(f"{out_dims} x {in_dims}", mlx if mlx is not None else "n/a", ours, dequant, fp16,
                  ours / mlx if mlx is not None else "n/a")
    return table


def _accuracy(quick: bool) -> List[Table]:
    sizes = dict(vocab_size=8192, dims=1024, heads=8, hidden_dims=2816, layers=2)
    reference = SmallTransformer(**sizes)
    mx.eval(reference.parameters())
    tokens = mx.random.randint(0, sizes["vocab_size"], (2, 128 if quick else 512))
    variants = {"fp16": None, "int8 w8a8": dict(bits=8, mode="w8a8"),
                "int8 weight-only g64": dict(bits=8, mode="weight_only"), "int4 g64": dict(bits=4)}
    reports = {}
    for name, quantization in variants.items():
        model = SmallTransformer(**sizes)
        model.update(reference.parameters())
        model.set_dtype(mx.float16)
        if quantization:
            quantize_model(model, group_size=64, **quantization)
        reports[name] = accuracy_report(reference, model, tokens, dtype=mx.float16)
    summary = Table(
        title="Accuracy of SmallTransformer (2 blocks, dims 1024, SwiGLU 2816, vocab 8192) against float32",
        columns=("model", "logits rel. error", "logits max |diff|", "top-1 agreement", "max layer rel. error",
                 "mean layer rel. error"),
        note="Layer error: ||Q(x) - F(x)|| / ||F(x)|| of each quantized layer against its float32 layer on "
             "standard-normal x (64 rows); logits on random tokens. Weights are random (untrained).",
    )
    for name, report in reports.items():
        errors = list(report.layer_errors.values())
        summary.add(name, report.logit_rel_error, report.logit_max_abs, report.top1_agreement,
                    max(errors) if errors else "-", sum(errors) / len(errors) if errors else "-")
    quantized = [name for name in variants if variants[name]]
    layers = Table(title="Per-layer relative error", columns=("layer",) + tuple(quantized))
    for path in reports[quantized[0]].layer_errors:
        layers.add(path, *(reports[name].layer_errors[path] for name in quantized))
    return [summary, layers]


def run(quick: bool = False) -> List[Table]:
    return _w8a8(quick) + [_mlx_support(), _int4_gemv()] + _accuracy(quick)
