"""GPU time per kernel of the decode calls, from Nsight Compute: our split-KV kernel's configs, sdpa, an int8 cache.

Host time (Python building a call, MLX's launch) hides differences of a few microseconds between kernels in the
suites' per-call timings; ``ncu`` times each kernel alone (caches flushed, clocks locked at base). Two steps:

    ncu --csv --metrics gpu__time_duration.sum -k regex:'decode|sdpa|cudnn|lean' \\
        python3 -m benchmarks.gpu_time [--configs sweep|defaults] > LOG 2>&1
    python3 -m benchmarks.gpu_time --parse LOG

The first runs every case twice and prints ``CASE <name>`` after each; the second pairs ncu's durations with the
cases by kernel name (a decode call is one ``decode_attention`` kernel, perhaps a ``decode_attention_counters``
before it and a ``decode_attention_combine`` after it; sdpa's kernels, cuDNN's on CUDA, are everything else) and
prints the second run of each decode case and the mean of sdpa's two. Shapes: issue 5's decode grid (fp16, q_len 1, Hq 32, Hk 8, D 128, B in {1, 8, 32}, L in {4k, 32k});
the int8 cache (``mx.quantize``, group 64) at L = 32k for B = 1 and 8. Results: results/h100/decode.md.
"""

from __future__ import annotations

import argparse
import csv
import io
from typing import Callable, Iterator, List, Optional, Tuple

import mlx.core as mx

from mlx_primitives.kernels import decode_attention

from .decode import HEAD_DIM, cache, shapes

# Our kernel's configs per shape (None: the tuned or default one) and the int8 cache's.
CONFIGS = {
    "defaults": ([None], [None]),
    "sweep": ([None] + [{"THREADS": t, "SPLIT": s, "CHUNKS": c} for t in (64, 128) for s in (128, 256, 512)
                        for c in (1, 2)] + [{"THREADS": 64, "SPLIT": s, "CHUNKS": 2, "MMA": 1} for s in (128, 256)],
              [None] + [{"THREADS": t, "SPLIT": s, "CHUNKS": 2, "MMA": 1} for t in (32, 64) for s in (128, 256, 512)]),
}
RUNS = 2  # each case; the parse keeps the last


def cases(configs: str) -> Iterator[Tuple[str, Callable[[], mx.array]]]:
    """``(name, call)`` of every case, shape by shape of the decode suite's grid (each shape's arrays made when
    it comes)."""
    float_configs, int8_configs = CONFIGS[configs]
    for batch, length in shapes(quick=False):
        q, k, v, lengths = cache(batch, length)
        qh, kh, vh = q.swapaxes(1, 2), mx.contiguous(k.swapaxes(1, 2)), mx.contiguous(v.swapaxes(1, 2))
        mx.eval(qh, kh, vh)
        shape = f"B={batch} L={length}"
        yield f"{shape} sdpa", lambda: mx.fast.scaled_dot_product_attention(qh, kh, vh, scale=HEAD_DIM**-0.5)
        for config in float_configs:
            yield f"{shape} fp16 {config or 'default'}", lambda c=config: decode_attention(q, k, v, lengths, config=c)
        if length == 32768 and batch <= 8:
            k8, v8 = (tuple(mx.quantize(x, group_size=64, bits=8)) for x in (k, v))
            mx.eval(k8, v8)
            for config in int8_configs:
                yield (f"{shape} int8 {config or 'default'}",
                       lambda c=config: decode_attention(q, k8, v8, lengths, quantization=(64, 8), config=c))


def run(configs: str) -> None:
    for name, call in cases(configs):
        for _ in range(RUNS):
            mx.eval(call())
            mx.synchronize()
        print(f"CASE {name}", flush=True)


def parse(log: str) -> List[Tuple[str, int, float]]:
    """``(case, kernels, GPU us)`` per case of an ncu ``--csv`` log of :func:`run`."""
    lines = log.splitlines()
    names = [line[5:] for line in lines if line.startswith("CASE ")]
    rows = csv.DictReader(io.StringIO("\n".join(line for line in lines if line.startswith('"'))))
    groups: List[List] = []  # [kind, ns, kernels]: one decode call's kernels ("decode"), or a run of sdpa's
    for row in rows:
        if row["Metric Name"] != "gpu__time_duration.sum":
            continue
        name, ns = row["Kernel Name"], float(row["Metric Value"].replace(",", ""))
        kind = next((k for k in ("counters", "combine") if f"decode_attention_{k}" in name),
                    "decode" if "decode_attention" in name else "sdpa")
        last = groups[-1] if groups else None
        if last and (kind == "combine" or (kind, last[0]) in (("decode", "counters"), ("sdpa", "sdpa"))):
            last[0] = "decode" if kind == "decode" else last[0]  # a split pass completes its counters' call
            last[1] += ns
            last[2] += 1
        else:
            groups.append([kind, ns, 1])
    results, at = [], 0
    for name in names:
        if name.endswith("sdpa"):  # both runs' kernels, back to back, form one group
            _, ns, kernels = groups[at]
            results.append((name, kernels // RUNS, ns / RUNS / 1e3))
            at += 1
        else:
            _, ns, kernels = groups[at + RUNS - 1]
            results.append((name, kernels, ns / 1e3))
            at += RUNS
    return results


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="sweep", choices=sorted(CONFIGS))
    parser.add_argument("--parse", metavar="LOG", help="print the table of an ncu log of this module's run")
    args = parser.parse_args(argv)
    if args.parse is None:
        run(args.configs)
        return
    with open(args.parse) as f:
        results = parse(f.read())
    print("| case | kernels | GPU us |\n|---|---|---|")
    for name, kernels, us in results:
        print(f"| {name} | {kernels} | {us:.1f} |")


if __name__ == "__main__":
    main()
