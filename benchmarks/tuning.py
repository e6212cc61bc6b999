"""Tuning benchmarks: what a cache hit costs a call, and what tuning won over the defaults."""

from __future__ import annotations

import os
import tempfile
import time
from typing import List

import mlx.core as mx

from mlx_primitives.hardware import tuning

from .common import Table

SPACE = tuning.TuningSpace(
    kernel="lookup_probe",
    candidates=[{"BLOCK": 64, "WARPS": 4}, {"BLOCK": 128, "WARPS": 8}],
    default={"BLOCK": 64, "WARPS": 4},
)


def lookup_table(quick: bool) -> Table:
    """Microseconds per ``choose_config`` call: cold (file read) and warm (in memory)."""
    table = Table("Tuning cache lookup", ["case", "us per lookup", "target us"],
                  note="A kernel launch calls choose_config once; the target is < 50 us per call.")
    calls = 2000 if quick else 20000
    previous = os.environ.get("MLX_PRIMITIVES_CACHE_DIR")
    with tempfile.TemporaryDirectory() as directory:
        os.environ["MLX_PRIMITIVES_CACHE_DIR"] = directory
        try:
            cache = tuning.tuning_cache()
            cache.store({
                tuning.cache_key(SPACE, mx.float16, f"L={1 << i}"): {"config": {"BLOCK": 128, "WARPS": 8}}
                for i in range(200)
            })
            tuning._CACHE = None  # the next lookup reads the file, as a fresh process would
            start = time.perf_counter()
            tuning.choose_config(SPACE, mx.float16, "L=4096")
            table.add("first lookup (reads the file)", (time.perf_counter() - start) * 1e6, "-")
            start = time.perf_counter()
            for _ in range(calls):
                config = tuning.choose_config(SPACE, mx.float16, "L=4096")
            table.add("cache hit", (time.perf_counter() - start) * 1e6 / calls, 50)
            assert config == {"BLOCK": 128, "WARPS": 8}
        finally:
            if previous is None:
                os.environ.pop("MLX_PRIMITIVES_CACHE_DIR", None)
            else:
                os.environ["MLX_PRIMITIVES_CACHE_DIR"] = previous
            tuning._CACHE = None
    return table


def tuned_table() -> Table:
    """What ``python -m mlx_primitives tune`` stored for this device: tuned vs default time."""
    table = Table("Tuned configurations in the cache (this device)",
                  ["kernel", "dtype", "shape", "config", "tuned ms", "default ms", "speedup"])
    for key, entry in sorted(tuning.tuning_cache().entries().items()):
        device, backend, version, kernel, dtype, bucket = key.split("|", 5)
        if version != f"mlx-{mx.__version__}" or "ms" not in entry:
            continue
        config = " ".join(f"{k}={v}" for k, v in entry["config"].items())
        table.add(kernel, dtype, bucket, config, entry["ms"], entry["default_ms"], entry["default_ms"] / entry["ms"])
    return table


def run(quick: bool = False) -> List[Table]:
    return [lookup_table(quick), tuned_table()]
