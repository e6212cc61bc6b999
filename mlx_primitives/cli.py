"""Command line: ``python -m mlx_primitives info|demo|tune|bench``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from typing import List, Sequence

import mlx.core as mx

from . import __version__
from .attention import (
    explain,
    flash_attention,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
)
from .hardware import device_profile
from .kernels.catalog import KERNELS


def info_lines() -> List[str]:
    """The self-diagnosis a user pastes into a bug report."""
    p = device_profile()
    gib = p.memory_bytes / 2**30
    names = ", ".join(k.name for k in KERNELS)
    if p.is_gpu:
        custom = f"yes, mx.fast.{p.backend}_kernel: {names}"
    else:
        custom = f"no (CPU backend: {names} run as MLX reference ops)"
    lines = [
        f"mlx_primitives {__version__}",
        f"MLX            {mx.__version__}",
        f"Python         {platform.python_version()} ({platform.system()} {platform.machine()})",
        f"backend        {p.backend}",
        f"device         {p.name}",
        f"family         {p.family}" + (f", {p.gpu_cores} GPU cores" if p.gpu_cores else ""),
        f"memory         {gib:.1f} GiB" if p.memory_bytes else "memory         unknown",
        f"peak           {p.bandwidth_gbs or '?'} GB/s, {p.matmul_tflops or '?'} TFLOP/s fp16 (table of known chips)",
        "paths:",
        "  sdpa         yes (mx.fast.scaled_dot_product_attention)",
        f"  kernels      {custom}",
        "  reference    yes (blockwise MLX ops, any backend)",
        _tuning_line(),
    ]
    return lines


def _tuning_line() -> str:
    from .hardware.tuning import autotune_enabled, tuning_cache

    cache = tuning_cache()
    state = "on" if autotune_enabled() else "off (MLX_PRIMITIVES_AUTOTUNE)"
    return f"tuning         {len(cache.entries())} cached configs in {cache.path}; tuned configs {state}"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cells[0]), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in cells[1:]])


def _timed(fn) -> tuple:
    mx.eval(fn())
    start = time.perf_counter()
    out = fn()
    mx.eval(out)
    return out, (time.perf_counter() - start) * 1e3


def _max_error(out, reference) -> float:
    first = out[0] if isinstance(out, tuple) else out
    ref = reference[0] if isinstance(reference, tuple) else reference
    return mx.abs(first.astype(mx.float32) - ref.astype(mx.float32)).max().item()


def _packed(x: mx.array) -> mx.array:
    return x.reshape(-1, *x.shape[2:])


def demo_rows(batch: int = 2, length: int = 256, heads: int = 8, kv_heads: int = 2, dim: int = 64):
    """(function, route, ms, max error vs the float32 reference path) of each function on float16 inputs."""
    dtype = mx.float16
    q, k, v = (mx.random.normal((batch, length, h, dim)) for h in (heads, kv_heads, kv_heads))
    slopes = mx.array([2.0 ** (-(h + 1)) for h in range(heads)])
    cu = mx.array([0, length // 3, length * batch], dtype=mx.int32)
    total = length * batch
    cases = [
        ("flash_attn_func", {}, flash_attn_func),
        ("flash_attn_func causal", {"causal": True}, flash_attn_func),
        ("flash_attn_func window (64, 0)", {"causal": True, "window_size": (64, 0)}, flash_attn_func),
        ("flash_attn_func softcap 20", {"causal": True, "softcap": 20.0}, flash_attn_func),
        ("flash_attn_func alibi", {"causal": True, "alibi_slopes": slopes}, flash_attn_func),
        ("flash_attn_kvpacked_func", {"causal": True},
         lambda x, y, z, **o: flash_attn_kvpacked_func(x, mx.stack([y, z], axis=2), **o)),
        ("flash_attn_qkvpacked_func", {"causal": True},
         lambda x, y, z, **o: flash_attn_qkvpacked_func(mx.stack([x, x, x], axis=2), **o)),
        ("flash_attn_varlen_func", {"causal": True},
         lambda x, y, z, **o: flash_attn_varlen_func(_packed(x), _packed(y), _packed(z), cu, cu, total, total, **o)),
        ("flash_attention BHSD", {"causal": True},
         lambda x, y, z, **o: flash_attention(x.swapaxes(1, 2), y.swapaxes(1, 2), z.swapaxes(1, 2),
                                              layout="BHSD", **o)),
    ]
    rows = []
    for name, options, call in cases:
        fast_inputs = [x.astype(dtype) for x in (q, k, v)]
        out, ms = _timed(lambda: call(*fast_inputs, **options))
        reference = call(q, k, v, path="reference", **options)
        route = explain(*fast_inputs, **options).path
        rows.append((name, route, ms, _max_error(out, reference)))
    return rows


def demo(plot_path: str) -> None:
    print("\n".join(info_lines()))
    print()
    print("Attention functions, float16 (B=2, L=256, Hq=8, Hk=2, D=64): error vs the float32 reference path")
    print(_table(["function", "route", "ms", "max |err|"], demo_rows()))
    print()
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        print("mlx-lm is not installed (pip install 'mlx-primitives[lm]'): the model demo is skipped")
        return
    from . import demo as model_demo

    print("Random-weight Llama (4 layers, d=256, 8/2 heads), prompt 256 + 32 teacher-forced decode steps: "
          "mlx-lm's attention vs ours (medians of 3 runs each, in turn)")
    rows, paths = model_demo.model_rows()
    print(_table(["attention", "prefill ms", "decode tokens/s", "max |logit diff|"], rows))
    print("paths that ran (attention calls per run):")
    for variant, path in paths.items():
        print(f"  {variant:<13} {path}")
    if set(model_demo.route_names(paths["flash"])) == {"flash->sdpa"}:
        print("  ('flash' sent every call to mx.fast.scaled_dot_product_attention, as mlx-lm does: its times "
              "differ from mlx-lm's by noise)")
    print("\n".join(model_demo.dispatcher_paths()))
    print(model_demo.batch_generation_line())
    written = model_demo.plot_rows(rows, plot_path)
    print(f"plot: {written}" if written else "plot: skipped (matplotlib is not installed)")


def _progress(done: int, total: int, task) -> None:
    width = 30
    filled = width * done // max(total, 1)
    label = f"{task.space.kernel} {task.bucket} {task.dtype}"
    end = "\n" if done == total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<48}", end=end, file=sys.stderr,
          flush=True)


def tune(kernels: Sequence[str], quick: bool) -> None:
    """Tune the kernels on the local device and print the chosen configurations."""
    if not device_profile().is_gpu:
        print(f"nothing to tune: MLX runs on the {device_profile().backend}, where kernels use the reference ops")
        return
    from .hardware.tuning import run_tasks, tuning_cache
    from .kernels.tuning import tuning_tasks

    tasks = tuning_tasks(quick=quick, kernels=kernels or None)
    results = run_tasks(tasks, repeats=5 if quick else 9, progress=_progress)
    rows = [(r.kernel, r.dtype, r.bucket, " ".join(f"{k}={v}" for k, v in r.config.items()), r.ms, r.default_ms,
             r.speedup) for r in results]
    print(_table(["kernel", "dtype", "shape", "config", "ms", "default ms", "speedup"], rows))
    untuned = sorted(set(kernels) - {task.space.kernel for task in tasks})
    if untuned:
        print(f"no tuning task for {', '.join(untuned)}: they run their default configuration")
    print(f"cache: {tuning_cache().path}")


def show_tuning() -> None:
    from .hardware.tuning import tuning_cache

    entries = tuning_cache().entries()
    rows = []
    for key, entry in sorted(entries.items()):
        parts = key.split("|", 5)  # device|backend|mlx version|kernel|dtype|bucket, as cache_key writes it
        device, _, version, kernel, dtype, bucket = parts if len(parts) == 6 else [key, "", "?", "?", "?", "?"]
        config = " ".join(f"{k}={v}" for k, v in entry["config"].items())
        speedup = entry.get("default_ms", float("nan")) / entry["ms"] if entry.get("ms") else float("nan")
        rows.append((device, version, kernel, dtype, bucket, config, speedup))
    print(f"cache: {tuning_cache().path} ({len(rows)} entries)")
    if rows:
        print(_table(["device", "mlx", "kernel", "dtype", "shape", "config", "speedup"], rows))


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_primitives", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="MLX version, backend, device and available paths")
    demo_cmd = sub.add_parser("demo", help="info, the attention functions' accuracy/speed, then a model with "
                                            "mlx-lm's attention and ours")
    demo_cmd.add_argument("--plot", default=os.path.join(tempfile.gettempdir(), "mlx_primitives_demo.png"),
                          help="where to write the PNG plot")
    tune_cmd = sub.add_parser("tune", help="auto-tune the kernels for the local device and cache the result")
    tune_cmd.add_argument("--kernels", nargs="*", default=[], help="kernel names (default: all)")
    tune_cmd.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    tune_cmd.add_argument("--show", action="store_true", help="print the tuning cache")
    tune_cmd.add_argument("--clear", action="store_true", help="remove the tuning cache")
    # bench's options (--suite, --quick, --out, --help) belong to benchmarks.run: passed on as they are
    sub.add_parser("bench", help="run the benchmark suites (from a source checkout; bench --help lists them)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "tune":
        from .kernels.tuning import check_kernel_names

        try:
            check_kernel_names(args.kernels)
        except ValueError as error:
            parser.error(str(error))
    if args.command == "info":
        print("\n".join(info_lines()))
    elif args.command == "demo":
        demo(args.plot)
    elif args.command == "tune":
        if args.clear:
            from .hardware.tuning import tuning_cache

            path = tuning_cache().path
            try:
                print(f"removed {path}" if tuning_cache().clear() else f"no tuning cache at {path}")
            except OSError as error:
                print(f"could not remove the tuning cache: {error}", file=sys.stderr)
                return 1
        elif args.show:
            show_tuning()
        else:
            tune(args.kernels, args.quick)
    elif args.command == "bench":
        try:
            from benchmarks.run import main as bench_main
        except ImportError:
            print("benchmarks/ is not importable: run from a source checkout of mlx_primitives", file=sys.stderr)
            return 1
        bench_main(rest)
    return 0
