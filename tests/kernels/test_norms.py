"""rms_norm / layer_norm: reference and kernel against float64, residual fusion, validation, gradients."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.kernels import layer_norm, norms, rms_norm

from .helpers import DTYPES, FLOOR, assert_accurate, f64, layer_norm64, max_error, random, rms_norm64


def _naive(x, residual, weight, bias, eps):
    """The norm written in the input dtype, the low-precision baseline of the accuracy rule."""
    h = x if residual is None else x + residual
    if bias is None:
        return h * mx.rsqrt(mx.mean(h * h, axis=-1, keepdims=True) + eps) * weight
    centred = h - mx.mean(h, axis=-1, keepdims=True)
    return centred * mx.rsqrt(mx.mean(centred * centred, axis=-1, keepdims=True) + eps) * weight + bias


def _check(shape, dtype, layer, with_residual, path, x=None):
    eps = 1e-5
    x = random(shape, dtype, 2.0) if x is None else x
    residual = random(shape, dtype) if with_residual else None
    weight = random(shape[-1:], dtype) + 1
    bias = random(shape[-1:], dtype) if layer else None
    if layer:
        result = layer_norm(x, weight, bias, eps, residual=residual, path=path)
    else:
        result = rms_norm(x, weight, eps, residual=residual, path=path)
    out, h = result if with_residual else (result, x)
    if with_residual:  # h is the sum rounded to the dtype, exactly as x + residual
        assert mx.array_equal(h, x + residual)
    h64 = f64(h)
    exact = layer_norm64(h64, f64(weight), f64(bias), eps) if layer else rms_norm64(h64, f64(weight), eps)
    assert_accurate(out, _naive(x, residual, weight, bias, eps), exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_matches_float64(dtype, layer, with_residual):
    _check((3, 5, 96), dtype, layer, with_residual, "reference")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("layer", [False, True])
def test_auto_path_matches_float64(layer):
    _check((4, 64), mx.float32, layer, True, "auto")
    _check((4, 64), mx.float32, layer, False, "auto")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("layer", [False, True])
@pytest.mark.parametrize("path", ["auto", "kernel", "fast", "reference"])
def test_float32_weight_on_half_input_gives_mlx_result_dtype_on_every_path(layer, path, monkeypatch):
    monkeypatch.setattr(norms, "AUTO_MIN_ELEMENTS", 0)  # path="auto" would pick the kernel at any size
    x, r = random((3, 64), mx.float16, 2.0), random((3, 64), mx.float16)
    w, b = random((64,), mx.float32) + 1, random((64,), mx.float32)
    if layer:
        out, h = layer_norm(x, w, b, residual=r, path=path)
        exact = layer_norm64(f64(x + r), f64(w), f64(b), 1e-5)
    else:
        out, h = rms_norm(x, w, residual=r, path=path)
        exact = rms_norm64(f64(x + r), f64(w), 1e-5)
    assert out.dtype == mx.float32 and h.dtype == mx.float16 and mx.array_equal(h, x + r)
    # path="kernel" writes float16 and casts; every other path computes the float32 result directly
    assert max_error(out, exact) <= (FLOOR[mx.float16] * 8 if path == "kernel" else FLOOR[mx.float32])


def test_layer_norm_without_weight_takes_the_bias_dtype():
    x, b = random((2, 8), mx.float16), random((8,), mx.float32)
    out = layer_norm(x, None, b, path="reference")
    assert out.dtype == mx.float32
    assert max_error(out, layer_norm64(f64(x), np.ones(8), f64(b), 1e-5)) <= FLOOR[mx.float32]


def test_validation_names_argument_and_shape():
    x = random((2, 8), mx.float16)
    with pytest.raises(ValueError, match=r"weight must have shape \(dims,\) = \(8,\)"):
        rms_norm(x, mx.ones((7,), mx.float16))
    with pytest.raises(ValueError, match=r"residual must have shape x's shape \(2, 8\)"):
        rms_norm(x, None, residual=random((2, 9), mx.float16))
    with pytest.raises(TypeError, match=r"x and residual must share one dtype"):
        rms_norm(x, None, residual=random((2, 8), mx.float32))
    with pytest.raises(TypeError, match=r"x must have dtype"):
        layer_norm(mx.zeros((2, 8), mx.int32), None, None)
    with pytest.raises(TypeError, match=r"x must be an mx.array"):
        rms_norm(np.zeros((2, 8)), None)
    with pytest.raises(ValueError, match=r"eps must be a positive float"):
        rms_norm(x, None, eps=0.0)
    with pytest.raises(TypeError, match=r"eps must be a real number"):
        rms_norm(x, None, eps=True)
    with pytest.raises(ValueError, match=r"bias must have shape \(dims,\)"):
        layer_norm(x, None, mx.zeros((3,), mx.float16))


@pytest.mark.parametrize("layer", [False, True])
def test_no_rows_launch_nothing(layer, monkeypatch):
    def no_launch(*args):
        raise AssertionError("a kernel launch over zero rows")

    monkeypatch.setattr(norms, "launch", no_launch)
    x, w = mx.zeros((0, 3, 64), mx.float16), mx.ones((64,), mx.float16)
    out, h = (layer_norm(x, w, None, residual=x, path="kernel") if layer else
              rms_norm(x, w, residual=x, path="kernel"))
    assert out.shape == h.shape == (0, 3, 64) and out.dtype == mx.float16


def test_eps_accepts_numpy_scalars():
    x, w = random((2, 8), mx.float32), random((8,), mx.float32)
    assert mx.array_equal(rms_norm(x, w, np.float32(1e-3), path="reference"), rms_norm(x, w, 1e-3, path="reference"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_gradient_follows_the_reference():
    x, r, w = random((3, 16), mx.float32), random((3, 16), mx.float32), random((16,), mx.float32)

    def loss(path):
        def f(x, r, w):
            out, h = rms_norm(x, w, residual=r, path=path)
            return (out * out).sum() + (h * out).sum()

        return mx.grad(f, argnums=(0, 1, 2))(x, r, w)

    for got, want in zip(loss("kernel"), loss("reference")):
        assert mx.allclose(got, want, atol=1e-5, rtol=1e-5)


# GPU: the kernel itself, every dtype, odd and tail-heavy shapes, strided inputs.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 4096), (7, 1000), (5, 6), (1, 3), (3, 8200)])
def test_kernel_matches_float64(dtype, layer, with_residual, shape):
    _check(shape, dtype, layer, with_residual, "kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("layer", [False, True])
def test_kernel_on_non_contiguous_input(layer):
    x = random((64, 6, 48), mx.bfloat16).transpose(1, 0, 2)[:, ::2]  # strided view (6, 32, 48)
    _check(x.shape, mx.bfloat16, layer, True, "kernel", x=x)


@pytest.mark.gpu
@pytest.mark.parametrize("tpr", [32, 256, 1024])
def test_every_threads_per_row_config(tpr):
    x, w = random((9, 2048), mx.float16), random((2048,), mx.float16)
    out = rms_norm(x, w, residual=x, path="kernel", config={"TPR": tpr})[0]
    want = rms_norm(x, w, residual=x, path="reference")[0]
    assert mx.allclose(out, want, atol=2e-3, rtol=2e-3)
