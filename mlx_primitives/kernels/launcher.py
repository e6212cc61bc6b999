"""The one launcher of every custom kernel.

A :class:`Kernel` is a body in the portable dialect (``src/<body>.kern``), the names of its inputs
and outputs, extra helper sources and macros for its header, and the template values a tuner may
pick. :func:`launch` compiles it with ``mx.fast.metal_kernel`` or ``mx.fast.cuda_kernel`` (the
same call shape), keeps the compiled object per (backend, kernel) and the outcome of the first
launch per (backend, kernel, template, dtypes), and falls back to the reference op, with one
warning per kernel, where the backend is the CPU or the kernel does not compile.
"""

from __future__ import annotations

import functools
import itertools
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from mlx_primitives.hardware import device_profile
from mlx_primitives.validation import is_traced_error

from . import source_files

SRC = Path(__file__).parent / "src"

# Header files in front of every kernel, per backend: prelude and shared helpers. MLX rebuilds and
# hashes the whole source on every call, so the matrix unit (MMA) comes only with kernels that ask.
PRELUDES = {
    "metal": ("prelude_metal.h", "common.inc"),
    "cuda": ("prelude_cuda.h", "common.inc"),
}
MMA = {"metal": "mma_metal.inc", "cuda": "mma_cuda.inc"}

# The entry snippet names the indices for the body. Metal adds a thread attribute to the kernel
# signature only when its name appears in the body, so this goes in front of the body, not the header.
ENTRY = {
    "metal": (
        "  const uint tid = thread_position_in_threadgroup.x;\n"
        "  const uint lane = thread_index_in_simdgroup;\n"
        "  const uint warp = simdgroup_index_in_threadgroup;\n"
        "  const uint group_x = threadgroup_position_in_grid.x;\n"
        "  const uint group_y = threadgroup_position_in_grid.y;\n"
        "  const uint group_z = threadgroup_position_in_grid.z;\n"
    ),
    "cuda": (
        "  const uint tid = threadIdx.x;\n"
        "  const uint lane = threadIdx.x % 32;\n"
        "  const uint warp = threadIdx.x / 32;\n"
        "  const uint group_x = blockIdx.x;\n"
        "  const uint group_y = blockIdx.y;\n"
        "  const uint group_z = blockIdx.z;\n"
    ),
}


@dataclass(frozen=True)
class Kernel:
    """A kernel body and what the launcher needs to compile it.

    Attributes:
        name: unique kernel name (MLX appends the template values).
        body: file name of the body under ``src_dir``.
        inputs, outputs: argument names, in order, as the body uses them.
        helpers: extra source files placed in the header after the prelude; ``{backend}`` in a name
            picks the backend's file (``"wgmma_{backend}.inc"``).
        mma: include the matrix-unit primitive (``mma_<backend>.inc``) in the header.
        defines: ``(macro, value)`` pairs defined in the header (variants of one body).
        tunables: ``(template name, candidate values)`` pairs a tuner may pick from.
        max_threads: on CUDA, the most threads per group it is launched with (0: unstated). ptxas then keeps
            its registers within what that many threads may have, spilling if it must, so that a launch
            never fails for want of registers whatever the compiler's version.
        src_dir: where the sources live.
    """

    name: str
    body: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    helpers: Tuple[str, ...] = ()
    mma: bool = False
    defines: Tuple[Tuple[str, int], ...] = ()
    tunables: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()
    max_threads: int = 0
    src_dir: Path = SRC

    def header(self, backend: str) -> str:
        parts = [f"#define {macro} {value}\n" for macro, value in self.defines]
        parts += [_read(SRC / f) for f in PRELUDES[backend] + ((MMA[backend],) if self.mma else ())]
        parts += [_read(self.src_dir / f.format(backend=backend)) for f in self.helper_files()]
        if backend == "cuda" and self.max_threads:  # MLX writes the signature: the bound comes with __global__
            bound = f"__launch_bounds__({self.max_threads})"
            parts.append(f"#undef __global__\n#define __global__ __location__(global) {bound}\n")
        return "\n".join(parts)

    def helper_files(self) -> Tuple[str, ...]:
        """The header's helper sources after the prelude and matrix unit, in order (``{backend}`` unfilled)."""
        return self.helpers

    def source(self, backend: str) -> str:
        return ENTRY[backend] + _read(self.src_dir / self.body)

    def configs(self) -> List[Dict[str, int]]:
        """Every combination of the tunable template values."""
        names = [name for name, _ in self.tunables]
        return [dict(zip(names, values)) for values in itertools.product(*(v for _, v in self.tunables))]


@dataclass
class Launch:
    """One call of a kernel: inputs (in ``kernel.inputs`` order), template values, sizes, outputs, and
    the bytes of dynamic shared memory it asks for (CUDA only; a body declares it with ``extern``)."""

    kernel: Kernel
    inputs: Sequence[mx.array]
    template: Sequence[Tuple[str, object]]
    grid: Tuple[int, int, int]
    threadgroup: Tuple[int, int, int]
    output_shapes: Sequence[Sequence[int]]
    output_dtypes: Sequence[mx.Dtype]
    shared_memory: int = 0
    init_value: Optional[float] = None  # fills every output before the kernel runs (MLX's init_value)

    def arguments(self) -> Dict[str, object]:
        """The keyword arguments of the ``mx.fast`` kernel call besides ``inputs`` and ``verbose``."""
        return dict(template=list(self.template), grid=self.grid, threadgroup=self.threadgroup,
                    output_shapes=[tuple(s) for s in self.output_shapes], output_dtypes=list(self.output_dtypes),
                    init_value=self.init_value)

    def call(self, compiled, verbose: bool = False) -> List[mx.array]:
        return compiled(inputs=list(self.inputs), verbose=verbose, **self.arguments())


def _read(path: Path) -> str:
    """A source file without its whole-line ``//`` comments: MLX copies and hashes a kernel's whole
    source on every call (H100, MLX 0.32.4: ~3 us per 18 KB), and a comment naming ``<input>_shape``
    would add that parameter to the signature."""
    return "\n".join(line for line in path.read_text().split("\n") if not line.lstrip().startswith("//"))


@functools.lru_cache(maxsize=None)
def compiled(kernel: Kernel, backend: str, shared_memory: int = 0):
    """The ``mx.fast`` kernel object of ``kernel`` on ``backend`` (built once per process and size of
    dynamic shared memory, which MLX fixes per object); on CUDA its text comes as ``#include`` lines
    where NVRTC reads them (:mod:`.source_files`)."""
    extra = {"shared_memory": shared_memory} if shared_memory else {}
    make = mx.fast.metal_kernel if backend == "metal" else mx.fast.cuda_kernel
    source, header = kernel.source(backend), kernel.header(backend)
    if backend == "cuda" and source_files.nvrtc_reads_files():
        source, header = source_files.include_stubs(source, header, kernel.inputs) or (source, header)
    return make(
        name=kernel.name,
        input_names=list(kernel.inputs),
        output_names=list(kernel.outputs),
        source=source,
        header=header,
        **extra,
    )


_verified: Dict[tuple, bool] = {}  # (backend, kernel, template, dtypes) -> compiled and ran
_warned: set = set()


def _fallback_warning(name: str, reason: str) -> None:
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"mlx_primitives: kernel '{name}' is unavailable ({reason}); using the MLX reference ops instead",
        RuntimeWarning,
        stacklevel=4,
    )


def launch(plan: Launch, reference: Callable[[], List[mx.array]]) -> List[mx.array]:
    """Run ``plan`` on the GPU, or ``reference()`` where the kernel can't run (warning once per kernel).

    The first launch of each (template, dtypes) is evaluated on the spot so that a compilation
    error turns into the fallback rather than an exception at the user's ``mx.eval``. Inside
    ``mx.compile`` that check can't run and the kernel is trusted.
    """
    return BoundLaunch(plan)(plan.inputs, reference)


class BoundLaunch:
    """A launch with everything but its input arrays fixed, for call paths that repeat one shape.

    ``BoundLaunch(plan)(inputs, reference)`` is :func:`launch` of ``plan`` with ``inputs`` in place of
    ``plan.inputs`` (the same dtypes: they are part of the key of the first-launch check); the key,
    the backend and the keyword arguments of the ``mx.fast`` call are built once, here.
    """

    def __init__(self, plan: Launch):
        self.kernel = plan.kernel
        self.backend = device_profile().backend
        self.compiled = compiled(plan.kernel, self.backend, plan.shared_memory) if self.backend in PRELUDES else None
        self.key = (self.backend, plan.kernel, tuple(plan.template), tuple(a.dtype for a in plan.inputs))
        self.arguments = plan.arguments()
        self.verified = False  # the key's first launch compiled and ran

    def __call__(self, inputs: Sequence[mx.array], reference: Callable[[], List[mx.array]]) -> List[mx.array]:
        if self.backend not in PRELUDES:
            _fallback_warning(self.kernel.name, f"MLX runs on the {self.backend}")
            return reference()
        if self.verified:  # a decode step launches this every layer: no key lookups once it ran
            return self.compiled(inputs=list(inputs), verbose=False, **self.arguments)
        outputs = run_checked(self.key, self.kernel.name,
                              lambda: self.compiled(inputs=list(inputs), verbose=False, **self.arguments), reference)
        self.verified = _verified.get(self.key) is True
        return outputs


def run_checked(
    key: tuple, name: str, run: Callable[[], List[mx.array]], fallback: Callable[[], List[mx.array]]
) -> List[mx.array]:
    """``run()``, evaluated on the spot the first time per ``key``; ``fallback()`` from the first failure on.

    Also how ops guard GPU code they don't own (MLX's own JIT kernels) with a reference path.
    """
    if _verified.get(key) is False:
        return fallback()
    outputs = run()
    if key not in _verified:
        try:
            mx.eval(outputs)
        except (RuntimeError, ValueError) as error:
            if is_traced_error(error):  # under mx.compile / vmap: can't evaluate here
                return outputs
            _verified[key] = False
            _fallback_warning(name, f"{key[0]} compilation or launch failed: {str(error)[:300]}")
            return fallback()
        _verified[key] = True
    return outputs


def verified(key: tuple) -> bool:
    """Whether the first run of ``key`` (:func:`run_checked`) was evaluated and succeeded."""
    return _verified.get(key) is True


def float_bits(value: float) -> int:
    """The float32 bit pattern of ``value`` as a signed int: how float constants become template values."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def with_reference_vjp(forward: Callable, reference: Callable) -> Callable:
    """``forward`` (which launches kernels) made differentiable through ``reference`` (MLX ops).

    Both take the same arrays and return the same structure.
    """
    function = mx.custom_function(forward)

    @function.vjp
    def _vjp(primals, cotangents, outputs):
        # MLX passes a lone primal or cotangent bare, several as a tuple.
        several = isinstance(primals, (list, tuple))
        primals = list(primals) if several else [primals]
        cotangents = list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
        _, grads = mx.vjp(reference, primals, cotangents)
        return tuple(grads) if several else grads[0]

    return function


def div_vec(n: int, itemsize: int, max_bytes: int = 16) -> int:
    """The widest access (elements, a power of two of at most ``max_bytes``) that divides ``n``."""
    vec = max_bytes // itemsize
    while vec > 1 and n % vec:
        vec //= 2
    return vec


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
