"""swiglu / geglu against float64: every activation and dtype, tails, validation, gradients."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_primitives.kernels import geglu, swiglu

from .helpers import DTYPES, assert_accurate, f64, glu64, random

NAIVE = {"silu": nn.silu, "gelu": nn.gelu, "gelu_tanh": nn.gelu_approx}


def _call(gate, up, activation, path):
    if activation == "silu":
        return swiglu(gate, up, path=path)
    return geglu(gate, up, approximate="none" if activation == "gelu" else "tanh", path=path)


def _check(shape, dtype, activation, path, gate=None):
    gate = random(shape, dtype, 3.0) if gate is None else gate
    up = random(gate.shape, dtype)
    out = _call(gate, up, activation, path)
    assert_accurate(out, NAIVE[activation](gate) * up, glu64(f64(gate), f64(up), activation), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
def test_reference_matches_float64(dtype, activation):
    _check((3, 7, 40), dtype, activation, "reference")


def test_validation_names_argument_and_shape():
    gate = random((2, 8), mx.float16)
    with pytest.raises(ValueError, match=r"up must have shape gate's shape \(2, 8\)"):
        swiglu(gate, random((2, 9), mx.float16))
    with pytest.raises(TypeError, match=r"gate and up must share one dtype"):
        swiglu(gate, random((2, 8), mx.float32))
    with pytest.raises(ValueError, match=r"approximate must be one of \('none', 'tanh'\)"):
        geglu(gate, gate, approximate="fast")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_gradient_follows_the_reference():
    gate, up = random((4, 24), mx.float32), random((4, 24), mx.float32)
    grad = mx.grad(lambda g, u: swiglu(g, u).sum(), argnums=(0, 1))(gate, up)
    want = mx.grad(lambda g, u: (nn.silu(g) * u).sum(), argnums=(0, 1))(gate, up)
    for a, b in zip(grad, want):
        assert mx.allclose(a, b, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(4, 4096), (3, 1001), (5,), (2, 3, 8195)])
def test_kernel_matches_float64(dtype, activation, shape):
    _check(shape, dtype, activation, "kernel")


@pytest.mark.gpu
def test_kernel_on_non_contiguous_input():
    gate = random((64, 40), mx.float16).T[:, ::3]
    _check(gate.shape, mx.float16, "silu", "kernel", gate=gate)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{"ITEMS": 1, "THREADS": 128}, {"ITEMS": 4, "THREADS": 512}])
def test_every_config(config):
    gate, up = random((3, 5000), mx.bfloat16), random((3, 5000), mx.bfloat16)
    assert mx.allclose(swiglu(gate, up, config=config), swiglu(gate, up, path="reference"), atol=1e-2, rtol=1e-2)
