"""CI's Metal compile check: every kernel, dtype and tunable configuration compiles as Metal would see it."""

import collections

import pytest

from mlx_primitives.kernels import catalog, decode, flash_attention, flash_backward, flex_attention, glu, matmul, norms, rotary, w8a8, sage, scan
from mlx_primitives.kernels.launcher import Kernel

from . import metal_check

pytestmark = pytest.mark.skipif(
    metal_check.clang() is None, reason="clang++ not found: Metal compile check skipped (make test installs clang)"
)


def _plans_by_kernel():
    plans = collections.defaultdict(list)
    for module in (norms, rotary, glu, matmul, decode, flash_attention, flash_backward, flex_attention, scan, sage,
                   w8a8):
        for plan in module.compile_examples():
            plans[plan.kernel.name].append(plan)
    return plans


PLANS = _plans_by_kernel()


def test_every_catalog_kernel_has_compile_examples_for_every_config():
    for kernel in catalog.KERNELS:
        templates = [dict(p.template) for p in PLANS[kernel.name]]
        for config in kernel.configs():
            assert any(config.items() <= t.items() for t in templates), (kernel.name, config)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_kernel_compiles_as_metal(name):
    result = metal_check.check(metal_check.translation_unit(PLANS[name]))
    assert result.returncode == 0, result.stderr[:4000]


def _variant(tmp_path, body: str, inputs=("inp",)) -> Kernel:
    (tmp_path / "variant.kern").write_text(body)
    return Kernel(name="variant", body="variant.kern", inputs=inputs, outputs=("out",), src_dir=tmp_path)


def _single_plan(kernel, inputs):
    import mlx.core as mx

    from mlx_primitives.kernels.launcher import Launch

    return Launch(kernel, inputs, [("T", mx.float16)], (32, 1, 1), (32, 1, 1), [(64,)], [mx.float16])


def test_broken_body_fails_the_check(tmp_path):
    import mlx.core as mx

    good = _variant(tmp_path, "out[tid] = T(float(inp[tid]) * 2.0f);\n")
    source = metal_check.translation_unit([_single_plan(good, [mx.zeros((64,), mx.float16)])])
    assert metal_check.check(source).returncode == 0
    broken = _variant(tmp_path, "out[tid] = T(float(inp[tid]) * 2.0f)\n")  # missing semicolon
    result = metal_check.check(metal_check.translation_unit([_single_plan(broken, [mx.zeros((64,), mx.float16)])]))
    assert result.returncode != 0 and "error" in result.stderr


def test_wrong_address_space_fails_the_check(tmp_path):
    """Inputs under 8 elements arrive in Metal's constant space: a device-only helper call must fail."""
    import mlx.core as mx

    body = "out[tid] = T(read_device(inp));\n"
    (tmp_path / "helpers.inc").write_text("KFN float read_device(const device half* p) { return float(p[0]); }\n")
    kernel = Kernel(name="variant", body="variant.kern", inputs=("inp",), outputs=("out",),
                    helpers=("helpers.inc",), src_dir=tmp_path)
    (tmp_path / "variant.kern").write_text(body)
    ok = metal_check.check(metal_check.translation_unit([_single_plan(kernel, [mx.zeros((64,), mx.float16)])]))
    assert ok.returncode == 0, ok.stderr
    small = metal_check.check(metal_check.translation_unit([_single_plan(kernel, [mx.zeros((4,), mx.float16)])]))
    assert small.returncode != 0 and "address space" in small.stderr
