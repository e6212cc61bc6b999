"""The Metal compile check: the exact source ``mx.fast.metal_kernel`` builds, compiled by clang++.

MLX generates a kernel's signature from the inputs' dtypes and sizes and the template values, and
prints the whole source with ``verbose=True``; without Metal it still does so while a call is traced
by ``mx.export_function``. We capture that (at the file-descriptor level: MLX writes to C++ stdout),
put the stub of the Metal standard library in front (``metal_stub/``, standing in for
``metal_stdlib`` and MLX's own utilities), and run ``clang++ -fsyntax-only`` on all launches of a
kernel at once: one translation unit per kernel, the shared header once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterable, List, Optional

import mlx.core as mx

from mlx_primitives.kernels.launcher import Launch

STUB_DIR = Path(__file__).parent / "metal_stub"
_SOURCE = re.compile(r"Generated source code for `[^`]*`:\n```\n(.*?)\n```\n", re.S)
# Attribute lists on an explicit instantiation are Metal syntax that C++ rejects; they carry no types.
_INSTANTIATION_ATTRIBUTES = re.compile(r"^template \[\[host_name\(\"[^\"]*\"\)\]\] \[\[kernel\]\]", re.M)


def clang() -> Optional[str]:
    return shutil.which("clang++")


def metal_source(plan: Launch) -> str:
    """The source MLX would hand the Metal compiler for ``plan`` (without MLX's utilities prefix)."""
    kernel = plan.kernel
    compiled = mx.fast.metal_kernel(
        name=kernel.name,
        input_names=list(kernel.inputs),
        output_names=list(kernel.outputs),
        source=kernel.source("metal"),
        header=kernel.header("metal"),
    )
    arrays = [mx.zeros(a.shape, a.dtype) for a in plan.inputs]

    def traced(*inputs):
        return Launch(plan.kernel, inputs, plan.template, plan.grid, plan.threadgroup,
                      plan.output_shapes, plan.output_dtypes).call(compiled, verbose=True)

    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryFile(mode="w+b") as capture:
        saved = os.dup(1)
        os.dup2(capture.fileno(), 1)
        try:
            mx.export_function(os.path.join(tmp, "k.mlxfn"), traced, *arrays)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        text = capture.read().decode()
    found = _SOURCE.findall(text)
    if not found:
        raise RuntimeError(f"MLX printed no source for kernel {kernel.name}")
    return found[-1]


def translation_unit(plans: Iterable[Launch]) -> str:
    """One C++ file holding every launch of the same kernel: stub include, header once, then each kernel."""
    parts: List[str] = ["#include <metal_mlx_utils>\n"]
    header = None
    for plan in plans:
        source = metal_source(plan)
        plan_header = plan.kernel.header("metal")
        if not source.startswith(plan_header):
            raise RuntimeError(f"MLX source of {plan.kernel.name} does not start with its header")
        if header is None:
            header = plan_header
            parts.append(header)
        elif plan_header != header:
            raise RuntimeError("translation_unit takes launches of one kernel (one header)")
        parts.append(_INSTANTIATION_ATTRIBUTES.sub("template", source[len(plan_header):]))
    return "\n".join(parts)


def check(source: str) -> subprocess.CompletedProcess:
    """``clang++ -std=c++17 -fsyntax-only`` on ``source`` with the Metal stub; returncode 0 = compiles."""
    command = [
        clang(), "-std=c++17", "-fsyntax-only", "-x", "c++", "-isystem", str(STUB_DIR),
        "-Wno-unknown-attributes", "-ferror-limit=20", "-",
    ]
    return subprocess.run(command, input=source, capture_output=True, text=True, timeout=300)
