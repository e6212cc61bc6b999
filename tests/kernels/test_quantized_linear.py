"""Int8Linear / Int4Linear / W8A8Linear: their products, MLX's format where it fits (and mlx-lm's tools on it),
the fallback where MLX's kernel fails."""

import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_primitives.kernels import (
    Int4Linear,
    Int8Linear,
    W8A8Linear,
    launcher,
    quantize_int8,
    quantized_matmul,
    w8a8_linear,
)
from mlx_primitives.kernels.quantized_linear import dequantized_weight

from .helpers import f64


def relative_error(out, exact) -> float:
    return float(np.linalg.norm(f64(out) - exact) / np.linalg.norm(exact))


def linear(in_dims=128, out_dims=48, bias=True) -> nn.Linear:
    layer = nn.Linear(in_dims, out_dims, bias=bias)
    if bias:
        layer.bias = mx.random.normal((out_dims,))  # not zeros: the bias path is tested
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_layer_is_w8a8_linear_of_its_weights(bias):
    float_layer = linear(bias=bias)
    layer = W8A8Linear.from_linear(float_layer)
    wq = quantize_int8(float_layer.weight)
    assert layer.weight.dtype == mx.int8 and mx.array_equal(layer.weight, wq.values).item()
    x = mx.random.normal((3, 5, 128))
    out = layer(x)
    assert mx.array_equal(out, w8a8_linear(x, wq.values, wq.scales, float_layer.get("bias"))).item()
    assert relative_error(out, f64(float_layer(x))) < 0.02


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_layers_are_mlx_quantized_linear(bits):
    float_layer = linear()
    ours = (Int4Linear if bits == 4 else Int8Linear).from_linear(float_layer, 64)
    mlx_layer = nn.QuantizedLinear.from_linear(float_layer, group_size=64, bits=bits)
    assert isinstance(ours, nn.QuantizedLinear) and ours.bits == bits
    assert mx.array_equal(ours.weight, mlx_layer.weight).item()
    for rows in (1, 7):
        x = mx.random.normal((rows, 128))
        np.testing.assert_allclose(f64(ours(x)), f64(mlx_layer(x)), rtol=1e-5, atol=1e-5)
        bound = 0.02 if bits == 8 else 0.15
        assert relative_error(ours(x), f64(float_layer(x))) < bound


def test_dequantized_weight_is_what_the_layer_multiplies_by():
    float_layer = linear(bias=False)
    x = mx.random.normal((4, 128))
    for layer in (Int8Linear.from_linear(float_layer), Int4Linear.from_linear(float_layer),
                  W8A8Linear.from_linear(float_layer)):
        exact = f64(x) @ f64(dequantized_weight(layer)).T
        assert relative_error(layer(x), exact) < (0.01 if isinstance(layer, W8A8Linear) else 1e-5)
    assert dequantized_weight(float_layer) is None


def test_falls_back_where_mlx_kernel_fails_at_evaluation(monkeypatch):
    """A quantized_matmul whose evaluation fails (as MLX's CUDA JIT on H100 does: no crt/mma.h in NVRTC)
    -> dequantize + @ for that kind of call from then on, one warning."""
    monkeypatch.setattr(launcher, "_verified", {})
    monkeypatch.setattr(launcher, "_warned", set())
    calls = []

    def failing_at_evaluation(x, *args, **kwargs):
        calls.append(x.shape)
        singular = mx.linalg.inv(mx.zeros((2, 2)), stream=mx.cpu)  # raises only when evaluated
        return mx.zeros((x.shape[0], 32)) + singular.sum()

    monkeypatch.setattr(mx, "quantized_matmul", failing_at_evaluation)
    weight, scales, biases = mx.quantize(mx.random.normal((32, 128)), 64, 4)
    x = mx.random.normal((6, 128))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = quantized_matmul(x, weight, scales, biases, group_size=64, bits=4)
        second = quantized_matmul(x, weight, scales, biases, group_size=64, bits=4)
    expected = f64(x) @ f64(mx.dequantize(weight, scales, biases, 64, 4)).T
    np.testing.assert_allclose(f64(first), expected, rtol=1e-5, atol=1e-5)
    assert mx.array_equal(first, second).item()
    assert len(calls) == 1 and sum("quantized_matmul" in str(w.message) for w in caught) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4, 64])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_int4_layer_on_gpu_whatever_route(rows, dtype):
    """Int4Linear works on the GPU for GEMV and GEMM (MLX's kernel, or the fallback where it fails)."""
    layer = Int4Linear.from_linear(linear(512, 256))
    layer.set_dtype(dtype)
    x = mx.random.normal((rows, 512)).astype(dtype)
    exact = f64(x) @ f64(dequantized_weight(layer)).T + f64(layer.bias)
    assert relative_error(layer(x), exact) < 1e-2


@pytest.mark.parametrize("bits", [4, 8])
def test_layer_calls_mlx_directly_once_its_kind_of_call_ran(monkeypatch, bits):
    """The second call of the same rows and dtype skips the checked call; another kind checks again."""
    monkeypatch.setattr(launcher, "_verified", {})
    layer = (Int4Linear if bits == 4 else Int8Linear).from_linear(linear())
    checked = []
    real = launcher.run_checked

    def counting(key, *args):
        checked.append(key)
        return real(key, *args)

    monkeypatch.setattr("mlx_primitives.kernels.quantized_linear.run_checked", counting)
    x = mx.random.normal((1, 128))
    first, second = layer(x), layer(x)
    assert len(checked) == 1 and mx.array_equal(first, second).item()
    layer(mx.random.normal((3, 128)))
    layer(x.astype(mx.float16))
    assert len(checked) == 3
    expected = f64(x) @ f64(dequantized_weight(layer)).T + f64(layer.bias)
    assert relative_error(second, expected) < 1e-4
    assert "_ready_rows" not in layer.parameters() and "_ready_dtype" not in layer.parameters()


def test_w8a8_layer_sizes_and_float_version():
    float_layer = linear(128, 48)
    layer = W8A8Linear.from_linear(float_layer)
    assert (layer.input_dims, layer.output_dims) == (128, 48)
    assert repr(layer) == "W8A8Linear(input_dims=128, output_dims=48, bias=True)"
    back = layer.to_float()
    assert type(back) is nn.Linear and mx.array_equal(back.weight, dequantized_weight(layer)).item()
    assert mx.array_equal(back.bias, float_layer.bias).item()
    np.testing.assert_allclose(f64(back.weight), f64(float_layer.weight), atol=float(mx.max(layer.scales)) / 2 + 1e-7)


def test_w8a8_layer_takes_scales_cast_by_set_dtype():
    layer = W8A8Linear.from_linear(linear(bias=False))
    x = mx.random.normal((3, 128))
    exact = f64(x) @ f64(dequantized_weight(layer)).T
    layer.set_dtype(mx.bfloat16)
    assert layer.scales.dtype == mx.bfloat16
    assert relative_error(layer(x), exact) < 0.02


class Block(nn.Module):
    """A model block of one projection, as mlx-lm's LoRA finds them (``model.layers[i].<name>``)."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


def test_mlx_lm_dequantizes_and_adds_lora_to_weight_only_layers():
    """mlx-lm's dequantize_model and LoRA take Int8Linear / Int4Linear as nn.QuantizedLinear."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.utils import linear_to_lora_layers

    for kind in (Int8Linear, Int4Linear):
        layer = kind.from_linear(linear())
        x = mx.random.normal((2, 128))
        model = mlx_lm_utils.dequantize_model(nn.Sequential(layer))
        assert type(model.layers[0]) is nn.Linear
        assert mx.array_equal(model.layers[0].weight, dequantized_weight(layer)).item()
        model = nn.Sequential(Block(kind.from_linear(linear())))
        linear_to_lora_layers(model, 1, {"rank": 4, "scale": 1.0, "dropout": 0.0})
        assert isinstance(model.layers[0].proj, LoRALinear) and model(x).shape == (2, 48)


def test_layers_name_the_wrong_argument():
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128; got 48"):
        Int8Linear(96, 16, group_size=48)
    with pytest.raises(ValueError, match=r"input_dims \(40\) must be a multiple of group_size \(64\)"):
        Int4Linear(40, 16)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 64\) \(w_q's in_features\); got \(2, 32\)"):
        W8A8Linear(64, 16)(mx.ones((2, 32)))
