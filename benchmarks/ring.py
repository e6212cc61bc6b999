"""Context-parallel (ring) attention: causal forward throughput on n devices against one.

``python -m benchmarks.run --suite ring`` times single-device causal attention in this
process, then starts ``n`` ranks of this module (:func:`mlx_primitives.distributed.launch_local`:
NCCL with one GPU per rank where MLX runs on CUDA, else the ring backend over loopback) that
time :func:`~mlx_primitives.distributed.ring_attention` on their zigzag parts of the same
sequence (and, for comparison, on contiguous parts: the imbalance zigzag removes). Tokens/s =
L / time of the slowest rank. Rows: bf16, B=1, Hq=32, Hk=8, D=128,
L in {64k, 128k, 256k} (``--quick``: fp32, Hq=4, Hk=2, D=64, L in {1k, 2k} for a CPU smoke run).
Target (issue 12): 2 GPUs at L = 128k >= 1.7x single-GPU tokens/s.

By hand: ``python -m benchmarks.ring --ranks 2 --lengths 65536,131072,262144 --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import List, Sequence

import mlx.core as mx

from mlx_primitives.attention import flash_attention
from mlx_primitives.distributed import default_transport, launch_local, ring_attention, shard_sequence
from mlx_primitives.hardware import device_profile

from .common import Table, header, time_ms, write_results

FULL = dict(lengths=(65536, 131072, 262144), heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", transport="auto")
QUICK = dict(lengths=(1024, 2048), heads=4, kv_heads=2, head_dim=64, dtype="float32", transport="auto")
TARGET_LENGTH, TARGET_SPEEDUP = 131072, 1.7
SPLITS = ("zigzag", "contiguous")  # balanced, and the plain split it balances
LAUNCH_TIMEOUT_S = 420  # a hung rank (NCCL set-up) fails the suite inside the device's 600 s per command


def _inputs(length: int, heads: int, kv_heads: int, head_dim: int, dtype: str):
    """Random BSHD q, k, v of the full sequence (the same on every rank: fixed seed)."""
    mx.random.seed(0)
    return tuple(mx.random.normal((1, length, h, head_dim)).astype(getattr(mx, dtype))
                 for h in (heads, kv_heads, kv_heads))


def _causal_tflop(length: int, heads: int, head_dim: int) -> float:
    return 4 * heads * head_dim * length * (length + 1) / 2 / 1e12


def _repeats(length: int) -> dict:
    return dict(warmup=1, repeats=3) if length >= 65536 else dict(warmup=2, repeats=5)


def worker(lengths: Sequence[int], heads: int, kv_heads: int, head_dim: int, dtype: str, transport: str,
           result: str) -> None:
    """One rank: time ring_attention on its part of each length; rank 0 writes every rank's times."""
    backend = "nccl" if mx.cuda.is_available() else "ring"
    group = mx.distributed.init(strict=True, backend=backend)
    rows = []
    for length in lengths:
        row = {"length": length}
        for split in SPLITS:
            q, k, v = (shard_sequence(x, group, axis=1, split=split)
                       for x in _inputs(length, heads, kv_heads, head_dim, dtype))
            mx.eval(q, k, v)
            ms = time_ms(lambda: ring_attention(q, k, v, group, causal=True, split=split, transport=transport),
                         **_repeats(length))
            row[split] = mx.distributed.all_gather(mx.array([ms]), group=group).tolist()
            if group.rank() == 0:
                print(f"{group.size()} ranks, {split}, L={length}: {max(row[split]):.1f} ms", flush=True)
            del q, k, v
            mx.clear_cache()
        rows.append(row)
    if group.rank() == 0:
        with open(result, "w") as f:
            json.dump({"backend": backend, "rows": rows}, f)


def _launch(ranks: int, config: dict) -> dict:
    backend = "nccl" if mx.cuda.is_available() else "ring"
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "ring.json")
        args = ["-m", "benchmarks.ring", "--worker", "--ranks", str(ranks), "--result", result,
                "--lengths", ",".join(map(str, config["lengths"])), "--heads", str(config["heads"]),
                "--kv-heads", str(config["kv_heads"]), "--head-dim", str(config["head_dim"]),
                "--dtype", config["dtype"], "--transport", config["transport"]]
        ranks_done = launch_local(ranks, args, backend=backend, timeout=LAUNCH_TIMEOUT_S)
        failed = [r for r, p in enumerate(ranks_done) if p.returncode != 0]
        if failed:
            raise RuntimeError(f"ranks {failed} of the {backend} run failed (their output is above)")
        with open(result) as f:
            return json.load(f)


def measure(ranks: int, config: dict) -> List[Table]:
    peak = device_profile().matmul_tflops
    shape = f"B=1, Hq={config['heads']}, Hk={config['kv_heads']}, D={config['head_dim']}, {config['dtype']}"
    single = {}
    for length in config["lengths"]:
        q, k, v = _inputs(length, config["heads"], config["kv_heads"], config["head_dim"], config["dtype"])
        mx.eval(q, k, v)
        single[length] = time_ms(lambda: flash_attention(q, k, v, causal=True), **_repeats(length))
        print(f"1 device, L={length}: {single[length]:.1f} ms", flush=True)
        del q, k, v
        mx.clear_cache()
    run = _launch(ranks, config)
    transport = default_transport() if config["transport"] == "auto" else config["transport"]
    table = Table(
        title=f"Ring attention, causal forward: {ranks} ranks vs 1 device ({shape})",
        columns=("L", "1 dev ms", "1 dev tok/s", f"{ranks} ranks ms", f"{ranks} ranks tok/s", "speedup",
                 "rank ms min", "contiguous ms", "contiguous speedup", "TFLOP/s per dev (1 / n)",
                 "% peak (1 / n)"),
        note=(f"{ranks} ranks on the {run['backend']} backend, transport {transport!r}, zigzag split; "
              f"'{ranks} ranks ms' is the slowest rank (median of its calls), 'rank ms min' the fastest "
              f"(load balance); 'contiguous': the same with the unbalanced contiguous split. 1 device: "
              f"flash_attention(causal=True) on the whole sequence. "
              f"Target: >= {TARGET_SPEEDUP}x at L={TARGET_LENGTH} on 2 GPUs."),
        x="L", series=("1 dev tok/s", f"{ranks} ranks tok/s"), ylabel="tokens/s",
    )
    for row in run["rows"]:
        length, zigzag = row["length"], row["zigzag"]
        slowest, one, contiguous = max(zigzag), single[length], max(row["contiguous"])
        tflop = _causal_tflop(length, config["heads"], config["head_dim"])
        rates = (tflop / one * 1e3, tflop / ranks / slowest * 1e3)
        pct = " / ".join(f"{100 * r / peak:.0f}" for r in rates) if peak else "-"
        table.add(length, one, length / one * 1e3, slowest, length / slowest * 1e3, one / slowest, min(zigzag),
                  contiguous, one / contiguous, " / ".join(f"{r:.3g}" for r in rates), pct)
    return [table]


def run(quick: bool = False) -> List[Table]:
    ranks = 2
    if mx.cuda.is_available() and mx.device_count(mx.gpu) < ranks:
        return [Table(title="Ring attention: skipped", columns=("L",),
                      note=f"needs {ranks} GPUs (one per NCCL rank); this machine has {mx.device_count(mx.gpu)}.")]
    return measure(ranks, QUICK if quick else FULL)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--lengths", default=",".join(map(str, FULL["lengths"])))
    parser.add_argument("--heads", type=int, default=FULL["heads"])
    parser.add_argument("--kv-heads", type=int, default=FULL["kv_heads"])
    parser.add_argument("--head-dim", type=int, default=FULL["head_dim"])
    parser.add_argument("--dtype", default=FULL["dtype"], choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--transport", default="auto", choices=("auto", "ring", "gather"))
    parser.add_argument("--out", default=None, help="directory for ring.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = dict(lengths=tuple(int(n) for n in args.lengths.split(",")), heads=args.heads,
                  kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=args.dtype, transport=args.transport)
    if args.worker:
        worker(result=args.result, **config)
        return
    print(header())
    tables = measure(args.ranks, config)
    for table in tables:
        print(table.markdown())
    if args.out:
        print(f"wrote {write_results('ring', tables, args.out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
