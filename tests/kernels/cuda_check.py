"""The CUDA compile check: the source ``mx.fast.cuda_kernel`` hands NVRTC, compiled by nvcc for the H100.

MLX 0.32.4 (``mlx/backend/cuda/custom_kernel.cpp``, ``build_kernel``) generates, per launch::

    #include "mlx/backend/cuda/device/utils.cuh"      <- MLX's JIT header (cuda_stub/ holds a copy)
    #include <cooperative_groups.h>
    <header>
    namespace mlx::core::cu {
    namespace cg = cooperative_groups;
    __global__ void custom_kernel_<name>[_<template value>...](
        const <in dtype>* <in>,  [const __grid_constant__ Shape <in>_shape,]  [... Strides <in>_strides,]
        [const __grid_constant__ int <in>_ndim,]  ...  <out dtype>* <out>, ...) {
      constexpr int N = 3; constexpr bool B = true; using T = __half;   <- the template values
    <source>
    }
    } // namespace mlx::core::cu

where an input's ``_shape``/``_strides``/``_ndim`` parameter exists when its name appears in the source
and the input is not a scalar. It compiles that with NVRTC for the device (``--gpu-architecture=sm_90a``
on an H100, ``--device-as-default-execution-space``). No CPU build of MLX prints the source, so this
module rebuilds it (:func:`cuda_source`) and :func:`compile_plans` compiles all launches of a kernel as
one translation unit (the shared header once) with ``nvcc --cubin -arch=sm_90a -Xptxas -v``, which
also reports registers and spills per kernel. nvcc differs from NVRTC in two ways that matter here: it
includes the CUDA runtime header (a name only it declares would pass here and fail on the GPU), and
unannotated functions stay host functions (a helper without ``KFN`` fails here, not on the GPU).

``python -m tests.kernels.cuda_check --report [kernel ...]`` prints registers and spills per launch.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import mlx.core as mx

from mlx_primitives.kernels.launcher import Launch

# MLX's JIT headers that utils.cuh pulls in, from ml-explore/mlx mlx/backend/cuda/device/: byte for byte
# (but the copyright sign) the ones NVRTC gets embedded in the 0.32.4 CUDA wheel's libmlx.so.
STUB_DIR = Path(__file__).parent / "cuda_stub"
ARCH = "sm_90a"  # MLX targets sm_<major><minor>a from compute capability 9 on (jit_module.cpp)

_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
_NAMESPACE_OPEN = "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
_CUDA_TYPES = {
    mx.bool_: "bool", mx.int8: "int8_t", mx.int16: "int16_t", mx.int32: "int32_t", mx.int64: "int64_t",
    mx.uint8: "uint8_t", mx.uint16: "uint16_t", mx.uint32: "uint32_t", mx.uint64: "uint64_t",
    mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float", mx.float64: "double",
    mx.complex64: "mlx::core::cu::complex64_t",
}
_TYPE_NAMES = {
    mx.bool_: "bool_", mx.int8: "int8", mx.int16: "int16", mx.int32: "int32", mx.int64: "int64",
    mx.uint8: "uint8", mx.uint16: "uint16", mx.uint32: "uint32", mx.uint64: "uint64",
    mx.float16: "float16", mx.bfloat16: "bfloat16", mx.float32: "float32", mx.float64: "float64",
    mx.complex64: "complex64",
}


def nvcc() -> Optional[str]:
    """nvcc on PATH, else under $CUDA_HOME or /usr/local/cuda; None where CUDA is not installed."""
    found = shutil.which("nvcc")
    if found:
        return found
    root = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(root) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def kernel_name(plan: Launch) -> str:
    """``custom_kernel_<name>`` plus one ``_<value>`` per template value (MLX's template hash)."""
    parts = [f"custom_kernel_{plan.kernel.name}"]
    for _, value in plan.template:
        if isinstance(value, bool):
            parts.append("_t" if value else "_f")
        elif isinstance(value, int):
            parts.append(f"_{value}")
        else:
            parts.append(f"_{_TYPE_NAMES[value]}")
    return "".join(parts)


def _template_line(name: str, value) -> str:
    if isinstance(value, bool):
        return f"  constexpr bool {name} = {'true' if value else 'false'};\n"
    if isinstance(value, int):
        return f"  constexpr int {name} = {value};\n"
    return f"  using {name} = {_CUDA_TYPES[value]};\n"


def cuda_source(plan: Launch, source: Optional[str] = None, header: Optional[str] = None) -> str:
    """The whole source MLX hands NVRTC for ``plan`` (``build_kernel`` of custom_kernel.cpp), from the
    kernel's own source and header or the ``source``/``header`` given (the launcher's include stubs)."""
    kernel = plan.kernel
    source = kernel.source("cuda") if source is None else source
    header = kernel.header("cuda") if header is None else header
    params = []
    for name, array in zip(kernel.inputs, plan.inputs):
        params.append(f"    const {_CUDA_TYPES[array.dtype]}* {name},\n")
        if array.ndim > 0:
            if f"{name}_shape" in source:
                params.append(f"    const __grid_constant__ Shape {name}_shape,\n")
            if f"{name}_strides" in source:
                params.append(f"    const __grid_constant__ Strides {name}_strides,\n")
            if f"{name}_ndim" in source:
                params.append(f"    const __grid_constant__ int {name}_ndim,\n")
    outputs = [f"    {_CUDA_TYPES[dtype]}* {name}" for name, dtype in zip(kernel.outputs, plan.output_dtypes)]
    constants = "".join(_template_line(n, v) for n, v in plan.template)
    return (
        _DEFAULT_HEADER + header + _NAMESPACE_OPEN
        + f"__global__ void {kernel_name(plan)}(\n" + "".join(params) + ",\n".join(outputs) + ") {\n"
        + (constants + "\n" if constants else "")
        + source + "\n}\n\n} // namespace mlx::core::cu\n"
    )


def translation_unit(plans: Iterable[Launch]) -> str:
    """One file holding every distinct launch of one kernel: MLX's prefix and the header once."""
    prefix = None
    kernels: Dict[str, None] = {}
    for plan in plans:
        source = cuda_source(plan)
        plan_prefix = _DEFAULT_HEADER + plan.kernel.header("cuda")
        if prefix is None:
            prefix = plan_prefix
        elif plan_prefix != prefix:
            raise RuntimeError("translation_unit takes launches of one kernel (one header)")
        kernels[source[len(prefix):]] = None  # the same launch twice would be a redefinition
    return prefix + "".join(kernels)


@dataclass
class Usage:
    """What ptxas reports for one compiled kernel."""

    kernel: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int


@dataclass
class Result:
    returncode: int
    stderr: str
    usage: List[Usage]


_ENTRY = re.compile(r"Compiling entry function '_ZN3mlx4core2cu(\d+)(\w+)' for")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def _parse_usage(log: str) -> List[Usage]:
    usage: List[Usage] = []
    for block in re.split(r"(?=ptxas info\s+: Compiling entry function)", log):
        entry = _ENTRY.search(block)
        used = _USED.search(block)
        if not entry or not used:
            continue
        name = entry.group(2)[: int(entry.group(1))]
        frame = _FRAME.search(block)
        smem = _SMEM.search(block[used.start():])
        stack, stores, loads = (int(g) for g in frame.groups()) if frame else (0, 0, 0)
        usage.append(Usage(name, int(used.group(1)), stores, loads, stack, int(smem.group(1)) if smem else 0))
    return usage


def _nvcc_cubin(source: Path, cubin: Path, *extra: str) -> subprocess.CompletedProcess:
    """``nvcc --cubin -arch=sm_90a`` of the file ``source`` into ``cubin`` (MLX's stub headers on the path)."""
    command = [nvcc(), "-std=c++17", f"-arch={ARCH}", "--cubin", "-o", str(cubin), "-I", str(STUB_DIR),
               "-diag-suppress", "177", *extra, str(source)]
    return subprocess.run(command, capture_output=True, text=True, timeout=1800)


def check(source: str) -> Result:
    """``nvcc --cubin -arch=sm_90a -Xptxas -v`` on ``source``; returncode 0 = compiles, with ptxas usage."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernels.cu"
        path.write_text(source)
        done = _nvcc_cubin(path, Path(tmp) / "kernels.cubin", "-Xptxas", "-v")
    return Result(done.returncode, done.stderr, _parse_usage(done.stdout + done.stderr))


def cubins(sources: Sequence[str]) -> List[bytes]:
    """The cubin of each of ``sources``, compiled one after the other under one file name (a cubin
    records where its source was), so that equal bytes mean the same compiled kernels."""
    built = []
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.cubin"
        for source in sources:
            path.write_text(source)
            done = _nvcc_cubin(path, cubin)
            if done.returncode:
                raise RuntimeError(done.stderr[:4000])
            built.append(cubin.read_bytes())
    return built


def compile_plans(plans: Sequence[Launch], batch: int = 64) -> List[Result]:
    """Compile ``plans`` (launches of one kernel) in translation units of at most ``batch`` launches."""
    return [check(translation_unit(plans[i:i + batch])) for i in range(0, len(plans), batch)]


def representative(plans: Sequence[Launch]) -> List[Launch]:
    """The launches (in order) that first bring a new tunable config, template value or input dtypes:
    every config of the kernel once, every dtype, head dim and feature flag at least once."""
    chosen, seen = [], set()
    for plan in plans:
        tunables = {name for name, _ in plan.kernel.tunables}
        template = [(name, str(value)) for name, value in plan.template]
        keys = {("config",) + tuple(item for item in template if item[0] in tunables)}
        keys |= {("value",) + item for item in template}
        keys.add(("inputs",) + tuple(str(a.dtype) for a in plan.inputs))
        if not keys <= seen:
            chosen.append(plan)
            seen |= keys
    return chosen


def _plans_by_kernel() -> Dict[str, List[Launch]]:
    from .test_metal_compile import PLANS

    return PLANS


def default_plans() -> Dict[str, List[Launch]]:
    """Per kernel, the launches holding the catalog's default config (its first config where the
    catalog names none), one per input dtypes and head dim ``D``."""
    from mlx_primitives.kernels import catalog

    chosen = {}
    for name, plans in _plans_by_kernel().items():
        base = max((k for k in catalog.DEFAULTS if name == k or name.startswith(k + "_")), key=len, default=None)
        wanted = catalog.DEFAULTS.get(base) or plans[0].kernel.configs()[0]
        seen, chosen[name] = set(), []
        for plan in plans:
            template = dict(plan.template)
            key = (tuple(a.dtype for a in plan.inputs), template.get("D"))
            if all(template.get(k) == v for k, v in wanted.items() if k in template) and key not in seen:
                seen.add(key)
                chosen[name].append(plan)
    return chosen


def _label(plan: Launch) -> str:
    """The template values that read as sizes and switches (float bit patterns left out)."""
    values = [f"{n}={_TYPE_NAMES.get(v, v) if not isinstance(v, int) else v}" for n, v in plan.template
              if not (isinstance(v, int) and abs(v) > 1 << 16)]
    return " ".join(values)


def report(names: Sequence[str] = (), every: bool = False) -> str:
    """A markdown table of registers, spills, stack frame and static shared memory per launch, as ptxas
    reports them for sm_90a: the default config's launches, or ``every`` launch of the compile examples."""
    rows = ["kernel | template | registers | spill stores (B) | spill loads (B) | stack (B) | static smem (B)",
            "---|---|---|---|---|---|---"]
    groups = _plans_by_kernel() if every else default_plans()
    for name in sorted(groups):
        if names and not any(name.startswith(n) for n in names):
            continue
        labels = {kernel_name(p): _label(p) for p in groups[name]}
        for result in compile_plans(groups[name]):
            if result.returncode != 0:
                error = next((l for l in result.stderr.splitlines() if "error" in l), result.stderr[:200])
                rows.append(f"{name} | COMPILE ERROR: {error.strip()[:300]} | | | | |")
            for u in result.usage:
                rows.append(f"{name} | {labels.get(u.kernel, u.kernel)} | {u.registers} | {u.spill_stores} | "
                            f"{u.spill_loads} | {u.stack} | {u.shared}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--report", action="store_true", help="registers and spills of the default configs")
    parser.add_argument("--all", action="store_true", help="with --report: every launch of the compile examples")
    parser.add_argument("--source", metavar="KERNEL", help="print the generated translation unit of KERNEL")
    parser.add_argument("kernels", nargs="*", help="kernel name prefixes for --report (default: all)")
    args = parser.parse_args()
    if args.source:
        print(translation_unit(_plans_by_kernel()[args.source]))
    elif args.report:
        if nvcc() is None:
            raise SystemExit("nvcc not found (install the CUDA toolkit or set CUDA_HOME): no CUDA report")
        print(report(args.kernels, every=args.all))
    else:
        parser.print_help()


if __name__ == "__main__":
    main()
