"""The kernels' tuning spaces and the shapes ``python -m mlx_primitives tune`` times them on.

Each catalog kernel's tunables become a :class:`TuningSpace` whose default is the
catalog's; :func:`config_for` is what an op's launch plan asks for its template
values: the tuned configuration of the call's dtype and shape bucket when the cache
has one, else the default.
"""

from __future__ import annotations

import functools
from typing import Dict, List, Mapping, Optional, Sequence

import mlx.core as mx

from ..hardware import dynamic_shared_memory, static_shared_memory
from ..hardware.tuning import Config, TuningSpace, TuningTask, choose_config, shape_bucket
from . import catalog
from .launcher import Kernel


def _matmul_invalid(config: Config, profile, problem) -> Optional[str]:
    if config["BM"] % (config["WM"] * 16) or config["BN"] % (config["WN"] * 8):
        return "warp tiles do not divide the block"
    return None


def _beyond(needed: int, limit: int) -> Optional[str]:
    return f"needs {needed} bytes of shared memory, the limit is {limit}" if needed > limit else None


def _flash_invalid(config: Config, profile, problem) -> Optional[str]:
    from .flash_attention import shared_memory_bytes

    return _beyond(shared_memory_bytes(problem["D"], config), static_shared_memory(profile.backend))


def _flash_wg_invalid(config: Config, profile, problem) -> Optional[str]:
    from .flash_attention import warpgroup_registers_short, warpgroup_shared_memory_bytes

    return (warpgroup_registers_short(problem["D"], config)
            or _beyond(warpgroup_shared_memory_bytes(problem["D"], config), dynamic_shared_memory(profile)))


def _sage_invalid(config: Config, profile, problem) -> Optional[str]:
    from .sage import shared_memory_bytes

    return _beyond(shared_memory_bytes(problem["D"], config), static_shared_memory(profile.backend))


def _flash_backward_invalid(name: str, config: Config, profile, problem) -> Optional[str]:
    from .flash_backward import SHARED_MEMORY

    return _beyond(SHARED_MEMORY[name](problem["D"], config), dynamic_shared_memory(profile))


_INVALID = {catalog.MATMUL.name: _matmul_invalid, catalog.FLASH_FWD.name: _flash_invalid,
            catalog.FLASH_FWD_WG.name: _flash_wg_invalid, catalog.SAGE_ATTN.name: _sage_invalid}
# The flash backward's kernels: dq and dk/dv, each with its warpgroup variant.
_BACKWARD_KERNELS = (catalog.FLASH_BWD_DQ, catalog.FLASH_BWD_DKDV, catalog.FLASH_BWD_DQ_WG, catalog.FLASH_BWD_DKDV_WG)
_INVALID.update({kernel.name: functools.partial(_flash_backward_invalid, kernel.name) for kernel in _BACKWARD_KERNELS})

SPACES: Dict[str, TuningSpace] = {
    kernel.name: TuningSpace(
        kernel=kernel.name,
        candidates=kernel.configs(),
        default=catalog.DEFAULTS.get(kernel.name, {}),
        invalid=_INVALID.get(kernel.name),
    )
    for kernel in catalog.KERNELS
}


def config_for(kernel: Kernel, dtype: mx.Dtype, problem: Mapping[str, int], exact: Sequence[str] = ()) -> Config:
    """Template values for a launch of ``kernel`` on ``problem`` (tuned, or the default)."""
    return choose_config(SPACES[kernel.name], dtype, shape_bucket(problem, exact))


def _task(kernel: Kernel, dtype, problem, exact, make_call) -> TuningTask:
    return TuningTask(SPACES[kernel.name], dict(problem), dtype, shape_bucket(problem, exact), make_call)


def _variants(kernel: Kernel, warpgroup_kernel: Kernel, spec, head_dims) -> List[tuple]:
    """``(kernel, WG)`` pairs to tune for ``spec``: the kernel, and its warpgroup variant where that one runs."""
    from .flash_attention import uses_warpgroup

    return [(kernel, 0)] + ([(warpgroup_kernel, 1)] if uses_warpgroup(spec, head_dims=head_dims) else [])


def _sage_tasks(q: mx.array, k: mx.array, dtype) -> List[TuningTask]:
    """SageAttention's kernel on causal GQA calls at head dims 64 and 128 (quantized once, outside the timing)."""
    from ..attention.sage import quantized_reference
    from ..attention.sage_quant import quantize_bhsd
    from ..attention.spec import describe_attention
    from .sage import WG_HEAD_DIMS, sage_attention

    tasks = []
    for head_dim in (64, 128):
        hq, hk = q[..., :head_dim], k[..., :head_dim]
        spec = describe_attention(hq, hk, hk, causal=True)
        quant = quantize_bhsd(hq, hk, "per_block", True)
        for kernel, warpgroup in _variants(catalog.SAGE_ATTN, catalog.SAGE_ATTN_WG, spec, WG_HEAD_DIMS):
            def make_call(config, hk=hk, spec=spec, quant=quant, warpgroup=warpgroup):
                return lambda: sage_attention(quant.q, quant.q_scale, quant.k, quant.k_scale, hk, spec, quant.q_block,
                                              quant.k_block, lambda: quantized_reference(quant, hk, spec),
                                              {"WG": warpgroup, **config})[0]

            tasks.append(_task(kernel, dtype, {"D": head_dim, "L": spec.k_len}, ("D",), make_call))
    return tasks


def flash_backward_tasks(dtype, length: int = 4096, heads: int = 16, head_dims: Sequence[int] = (64, 128)
                         ) -> List[TuningTask]:
    """Both backward kernels of attention with softcap (and their warpgroup variants where those run), B=1,
    on their own (the delta and the forward's lse computed once, outside the timing)."""
    from ..attention.spec import describe_attention
    from .flash_attention import WG_HEAD_DIMS, flash_attention
    from .flash_backward import dropout_rng, plan_dkdv, plan_dq
    from .launcher import launch

    tasks = []
    for head_dim in head_dims:
        q, k, v, dout = (mx.random.normal((1, heads, length, head_dim)).astype(dtype) for _ in range(4))
        spec = describe_attention(q, k, v, layout="BHSD", softcap=30.0)
        out, lse = flash_attention(q, k, v, spec)
        delta = (dout.astype(mx.float32) * out.astype(mx.float32)).sum(axis=-1)
        inputs = [q, k, v, dout, lse, delta, mx.array(spec.window, dtype=mx.int32), mx.zeros((1,), mx.float32),
                  dropout_rng(spec, None, 0)]
        mx.eval(inputs)
        problem = {"D": head_dim, "L": length}
        for kernels, make in (((catalog.FLASH_BWD_DQ, catalog.FLASH_BWD_DQ_WG), plan_dq),
                              ((catalog.FLASH_BWD_DKDV, catalog.FLASH_BWD_DKDV_WG), plan_dkdv)):
            for kernel, warpgroup in _variants(*kernels, spec, WG_HEAD_DIMS):
                def make_call(config, make=make, spec=spec, inputs=inputs, name=kernel.name, warpgroup=warpgroup):
                    def failed():
                        raise RuntimeError(f"{name} did not run with {config}")

                    return lambda: launch(make(inputs, spec, {**config, "WG": warpgroup}), failed)[0]

                tasks.append(_task(kernel, dtype, problem, ("D",), make_call))
    return tasks


def check_kernel_names(kernels: Optional[Sequence[str]]) -> None:
    """Raise ValueError naming the kernels of ``kernels`` that have no tuning space."""
    unknown = set(kernels or ()) - set(SPACES)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {sorted(SPACES)}")


def tuning_tasks(quick: bool = False, kernels: Optional[Sequence[str]] = None) -> List[TuningTask]:
    """Representative problems of every tunable kernel (LLM-sized, float16)."""
    check_kernel_names(kernels)
    from ..attention.spec import describe_attention
    from .flash_attention import WG_HEAD_DIMS, flash_attention, tuning_problem
    from .glu import swiglu
    from .matmul import tiled_matmul
    from .norms import layer_norm, rms_norm
    from .rotary import rope
    from .w8a8 import quantize_per_token, w8a8_matmul

    dtype = mx.float16
    rows, dims = (4 * 1024, 4096) if quick else (8 * 2048, 4096)
    x = mx.random.normal((rows, dims)).astype(dtype)
    r = mx.random.normal((rows, dims)).astype(dtype)
    w = mx.random.normal((dims,)).astype(dtype)
    hidden = (rows, 11008 if not quick else 4096)
    gate, up = (mx.random.normal(hidden).astype(dtype) for _ in range(2))
    batch, length = (2, 2048) if quick else (8, 2048)
    q = mx.random.normal((batch, 32, length, 128)).astype(dtype)
    k = mx.random.normal((batch, 8, length, 128)).astype(dtype)
    size = 2048 if quick else 4096
    a, b = (mx.random.normal((size, size)).astype(dtype) for _ in range(2))
    a_q, a_scale = quantize_per_token(a)
    b_q, b_scale = quantize_per_token(b)
    mx.eval(x, r, w, gate, up, q, k, a, b, a_q, a_scale, b_q, b_scale)

    norm_problem = {"rows": rows, "D": dims}
    tasks = [
        _task(catalog.RMS_NORM, dtype, norm_problem, ("D",),
              lambda c: lambda: rms_norm(x, w, path="kernel", config=c)),
        _task(catalog.RMS_NORM_RESIDUAL, dtype, norm_problem, ("D",),
              lambda c: lambda: rms_norm(x, w, residual=r, path="kernel", config=c)),
        _task(catalog.LAYER_NORM, dtype, norm_problem, ("D",),
              lambda c: lambda: layer_norm(x, w, None, path="kernel", config=c)),
        _task(catalog.LAYER_NORM_RESIDUAL, dtype, norm_problem, ("D",),
              lambda c: lambda: layer_norm(x, w, None, residual=r, path="kernel", config=c)),
        _task(catalog.GLU, dtype, {"N": gate.size}, (),
              lambda c: lambda: swiglu(gate, up, path="kernel", config=c)),
        _task(catalog.ROPE, dtype, {"L": length, "H": 40, "D": 128}, ("H", "D"),
              lambda c: lambda: rope(q, k, 128, path="kernel", config=c)),
        _task(catalog.MATMUL, dtype, {"M": size, "N": size, "K": size}, (),
              lambda c: lambda: tiled_matmul(a, b, config=c)),
        _task(catalog.W8A8, dtype, {"M": size, "N": size, "K": size}, (),
              lambda c: lambda: w8a8_matmul(a_q, a_scale, b_q, b_scale, config=c)),
    ]
    for head_dim in (64, 128, 256):
        hq, hk = (t[..., :head_dim] if head_dim <= 128 else mx.concatenate([t, t], axis=-1) for t in (q, k))
        spec = describe_attention(hq, hk, hk, causal=True, softcap=30.0)
        for kernel, warpgroup in _variants(catalog.FLASH_FWD, catalog.FLASH_FWD_WG, spec, WG_HEAD_DIMS):
            tasks.append(_task(kernel, dtype, tuning_problem(spec), ("D",),
                               lambda c, hq=hq, hk=hk, spec=spec, wg=warpgroup:
                               lambda: flash_attention(hq, hk, hk, spec, {"WG": wg, **c})[0]))
    tasks += _sage_tasks(q, k, dtype)
    if not kernels or {kernel.name for kernel in _BACKWARD_KERNELS} & set(kernels):
        tasks += flash_backward_tasks(dtype, length=2048 if quick else 4096)
    if kernels:
        tasks = [t for t in tasks if t.space.kernel in kernels]
    return tasks
