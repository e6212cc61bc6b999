"""CUDA kernel sources handed to MLX as ``#include`` lines instead of text.

``mx.fast.cuda_kernel`` (MLX 0.32.4, ``custom_kernel.cpp``) copies the kernel's header and body into
a new source string and hashes it on every call: about 3 us per 18 KB on an H100 host, and our
kernels carry 10-50 KB (prelude, matrix-unit helpers, body). NVRTC reads ``#include`` files from the
file system like any C preprocessor, so the header and the body are written once to files named by
their content (under :func:`~mlx_primitives.hardware.tuning.cache_dir`) and MLX gets two short
``#include`` lines: the same translation unit, a few hundred bytes per call.

Where a file can't be written or the first probe kernel does not compile through an include, the
launcher keeps handing MLX the text, as before.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Optional, Sequence, Tuple

import mlx.core as mx

from ..hardware.tuning import cache_dir, write_atomically

SHAPE_SUFFIXES = ("_shape", "_strides", "_ndim")


def shape_flags(source: str, inputs: Sequence[str]) -> Tuple[Tuple[bool, ...], ...]:
    """Per input, which of ``<name>_shape``/``_strides``/``_ndim`` MLX adds to the kernel's signature:
    those whose name appears in ``source`` (a substring search, as ``cuda_kernel`` does)."""
    return tuple(tuple(f"{name}{suffix}" in source for suffix in SHAPE_SUFFIXES) for name in inputs)


def write_source(text: str) -> Path:
    """``text`` in a file named by its SHA-256 under the cache directory (written once, atomically)."""
    directory = Path(cache_dir()).absolute() / "cuda_sources"
    path = directory / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.cuh"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        write_atomically(path, text, mode=0o644)  # 0o600 would hide it from other users of a shared cache
    return path


def include_line(path: Path) -> Optional[str]:
    """``#include "<path>"``, or None where the path can't be spelled inside quotes."""
    spelled = str(path)
    if any(c in spelled for c in '"\n\\'):
        return None
    return f'#include "{spelled}"\n'


def include_stubs(source: str, header: str, inputs: Sequence[str]) -> Optional[Tuple[str, str]]:
    """``(source, header)`` for ``mx.fast.cuda_kernel`` that include files holding ``source`` and
    ``header``, or None where that would change the kernel (a file can't be written, or the stub's
    names would give MLX another signature). The stub source names the ``<input>_shape``-style
    parameters the body uses in a comment, so that MLX still passes them."""
    try:
        body, head = include_line(write_source(source)), include_line(write_source(header))
    except OSError:
        return None
    if body is None or head is None:
        return None
    flags = shape_flags(source, inputs)
    used = [f"{name}{suffix}" for name, named in zip(inputs, flags)
            for suffix, flag in zip(SHAPE_SUFFIXES, named) if flag]
    stub = (f"// uses {' '.join(used)}\n" if used else "") + body
    return (stub, head) if shape_flags(stub, inputs) == flags else None


@functools.lru_cache(maxsize=1)
def nvrtc_reads_files() -> bool:
    """Whether a kernel whose body is an ``#include`` compiles and runs on this CUDA device (checked
    once per process by a one-thread probe kernel on the GPU stream; its constant input evaluates
    inside ``mx.compile`` too)."""
    stubs = include_stubs("  out[0] = inp[0] + 1.0f;\n", "", ("inp",))
    if stubs is None:
        return False
    probe = mx.fast.cuda_kernel(name="mlx_primitives_include_probe", input_names=["inp"], output_names=["out"],
                                source=stubs[0], header=stubs[1])
    try:
        out = probe(inputs=[mx.array([1.0])], grid=(1, 1, 1), threadgroup=(1, 1, 1), output_shapes=[(1,)],
                    output_dtypes=[mx.float32], stream=mx.gpu)[0]
        return out.item() == 2.0
    except (RuntimeError, ValueError):
        return False
