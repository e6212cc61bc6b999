"""The CUDA compile check: kernels compile for the H100 (sm_90a) as MLX's NVRTC would see them.

Every kernel compiles its representative launches (``cuda_check.representative``: every tunable
config once, every dtype, head dim and feature flag at least once; the full cross product of the
compile examples takes ~10 min on one core: ``python -m tests.kernels.cuda_check --all --report``).
"""

import mlx.core as mx
import pytest

from mlx_primitives.kernels.launcher import Kernel, Launch

from . import cuda_check
from .test_metal_compile import PLANS

needs_nvcc = pytest.mark.skipif(
    cuda_check.nvcc() is None, reason="nvcc not found (install the CUDA toolkit or set CUDA_HOME): CUDA compile check skipped"
)


@needs_nvcc
@pytest.mark.parametrize("name", sorted(PLANS))
def test_kernel_compiles_as_cuda(name):
    plans = cuda_check.representative(PLANS[name])
    for result in cuda_check.compile_plans(plans):
        assert result.returncode == 0, result.stderr[:4000]
        assert result.usage and all(u.kernel.startswith(f"custom_kernel_{name}") for u in result.usage)


def test_representative_launches_cover_every_config():
    for name, plans in PLANS.items():
        kernel = plans[0].kernel
        chosen = [dict(p.template) for p in cuda_check.representative(plans)]
        for config in kernel.configs():
            assert any(config.items() <= t.items() for t in chosen), (name, config)


def _variant(tmp_path, body: str, inputs=("inp",), header: str = "") -> Kernel:
    (tmp_path / "variant.kern").write_text(body)
    helpers = ()
    if header:
        (tmp_path / "helpers.inc").write_text(header)
        helpers = ("helpers.inc",)
    return Kernel(name="variant", body="variant.kern", inputs=inputs, outputs=("out",), helpers=helpers,
                  src_dir=tmp_path)


def _plan(kernel, template=(("T", mx.float16),)):
    return Launch(kernel, [mx.zeros((64,), mx.float16)], list(template), (32, 1, 1), (32, 1, 1), [(64,)],
                  [mx.float16])


def test_source_matches_mlx_build_kernel(tmp_path):
    """The signature and constants as MLX 0.32.4 writes them (custom_kernel.cpp, build_kernel)."""
    kernel = _variant(tmp_path, "out[tid] = inp[tid + inp_shape[0] * 0];\n")
    source = cuda_check.cuda_source(_plan(kernel, [("T", mx.bfloat16), ("N", 3), ("B", True)]))
    assert source.startswith('\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n')
    assert (
        "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        "__global__ void custom_kernel_variant_bfloat16_3_t(\n"
        "    const __half* inp,\n"
        "    const __grid_constant__ Shape inp_shape,\n"
        "    __half* out) {\n"
        "  using T = __nv_bfloat16;\n  constexpr int N = 3;\n  constexpr bool B = true;\n\n"
    ) in source
    assert source.endswith("\n}\n\n} // namespace mlx::core::cu\n")


@needs_nvcc
def test_broken_body_fails_the_check(tmp_path):
    good = _variant(tmp_path, "out[tid] = T(float(inp[tid]) * 2.0f + float(inp_shape[0]));\n")
    result = cuda_check.check(cuda_check.translation_unit([_plan(good)]))
    assert result.returncode == 0, result.stderr
    assert [u.kernel for u in result.usage] == ["custom_kernel_variant_float16"] and result.usage[0].registers > 0
    broken = _variant(tmp_path, "out[tid] = T(float(inp[tid]) * 2.0f)\n")  # missing semicolon
    result = cuda_check.check(cuda_check.translation_unit([_plan(broken)]))
    assert result.returncode != 0 and "error" in result.stderr


@needs_nvcc
def test_bad_inline_ptx_fails_the_check(tmp_path):
    """ptxas, not the C++ front end, rejects a malformed instruction: the check runs it."""
    body = (
        "unsigned r;\n"
        'asm volatile("mov.b32 %0, %1;" : "=r"(r) : "r"(tid));\n'
        "out[tid] = T(float(r));\n"
    )
    result = cuda_check.check(cuda_check.translation_unit([_plan(_variant(tmp_path, body))]))
    assert result.returncode == 0, result.stderr
    bad = body.replace("mov.b32", "mov.b99")
    result = cuda_check.check(cuda_check.translation_unit([_plan(_variant(tmp_path, bad))]))
    assert result.returncode != 0 and "ptxas" in result.stderr


def test_ptxas_usage_is_parsed():
    log = (
        "ptxas info    : Compiling entry function '_ZN3mlx4core2cu21custom_kernel_glu_t_1EPK6__halfPS2_' for 'sm_90a'\n"
        "ptxas info    : Function properties for _ZN3mlx4core2cu21custom_kernel_glu_t_1EPK6__halfPS2_\n"
        "    40 bytes stack frame, 24 bytes spill stores, 32 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 9216 bytes smem, 400 bytes cmem[0]\n"
    )
    (usage,) = cuda_check._parse_usage(log)
    assert (usage.kernel, usage.registers, usage.spill_stores, usage.spill_loads, usage.stack, usage.shared) == (
        "custom_kernel_glu_t_1", 255, 24, 32, 40, 9216)
