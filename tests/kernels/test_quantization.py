"""quantize_int8 / quantize_int4 and their inverses against a float64 NumPy oracle of the same math."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.kernels import dequantize, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

from .helpers import f64

QUANTIZE = {8: quantize_int8, 4: quantize_int4}
DEQUANTIZE = {8: dequantize_int8, 4: dequantize_int4}


def oracle(x: np.ndarray, bits: int, granularity: str, group_size, symmetric: bool):
    """Float64 (integers, scales, zeros, x / scale) of the module docstring's math, blocks as rows."""
    if granularity == "tensor":
        blocks = x.reshape(1, -1)
    elif granularity == "channel":
        blocks = x.reshape(-1, x.shape[-1])
    else:
        blocks = x.reshape(-1, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = np.abs(blocks).max(-1) / qmax
        zero, low, high = np.zeros_like(scale), -qmax, qmax
    else:
        qmax = 2**bits - 1
        scale = (np.maximum(blocks.max(-1), 0) - np.minimum(blocks.min(-1), 0)) / qmax
        zero = np.clip(np.round(-np.minimum(blocks.min(-1), 0) / scale), 0, qmax)
        low, high = 0, qmax
    ratio = blocks / scale[:, None]
    q = np.clip(np.round(ratio) + zero[:, None], low, high)
    return q, scale, zero, ratio


def integers(q) -> np.ndarray:
    """The stored integers, unpacked and centred as the oracle's."""
    values = np.array(q.values).astype(np.int64)
    if q.bits == 4:
        values = np.stack([values & 0xF, values >> 4], axis=-1).reshape(q.shape)
        if q.symmetric:
            values = values - 8
    return values


CASES = [
    (bits, granularity, symmetric)
    for bits in (8, 4)
    for granularity in ("tensor", "channel", "group")
    for symmetric in (True, False)
]


@pytest.mark.parametrize("bits, granularity, symmetric", CASES)
def test_matches_float64_oracle(bits, granularity, symmetric):
    x = mx.random.normal((3, 5, 64)) * 3.0 + 0.5
    q = QUANTIZE[bits](x, granularity=granularity, group_size=32, symmetric=symmetric)
    expect, scale, zero, ratio = oracle(f64(x), bits, granularity, 32, symmetric)
    np.testing.assert_allclose(f64(q.scales).reshape(-1), scale, rtol=1e-6)
    got = integers(q).reshape(expect.shape)
    # float32 division may round a value within a hair of .5 the other way: only there may they differ
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
    differ = got != expect
    assert not np.any(differ & ~near_tie) and np.all(np.abs(got - expect) <= 1)
    back = f64(DEQUANTIZE[bits](q))
    zeros = f64(q.zeros).reshape(-1) if q.zeros is not None else np.zeros_like(scale)
    exact_back = (got - zeros[:, None]) * scale[:, None]
    np.testing.assert_allclose(back.reshape(exact_back.shape), exact_back, rtol=1e-6, atol=1e-7)
    # every value is within half a step of x (no clipping: the range covers the block)
    assert np.all(np.abs(back - f64(x)).reshape(exact_back.shape) <= scale[:, None] * (0.5 + 1e-4))


@pytest.mark.parametrize("bits, granularity, symmetric", CASES)
def test_requantizing_the_dequantized_tensor_is_the_identity(bits, granularity, symmetric):
    x = mx.random.uniform(-2.0, 5.0, (4, 96))
    q = QUANTIZE[bits](x, granularity=granularity, group_size=32, symmetric=symmetric)
    again = QUANTIZE[bits](DEQUANTIZE[bits](q), granularity=granularity, group_size=32, symmetric=symmetric)
    np.testing.assert_array_equal(integers(again), integers(q))


@pytest.mark.parametrize("bits", [8, 4])
def test_storage_dtypes_and_shapes(bits):
    x = mx.random.normal((6, 128)).astype(mx.float16)
    sym = QUANTIZE[bits](x, granularity="group", group_size=64)
    asym = QUANTIZE[bits](x, granularity="channel", symmetric=False)
    values_shape = (6, 128) if bits == 8 else (6, 64)
    assert sym.values.shape == values_shape and asym.values.shape == values_shape
    assert sym.values.dtype == (mx.int8 if bits == 8 else mx.uint8) and asym.values.dtype == mx.uint8
    assert sym.scales.shape == (6, 2) and sym.scales.dtype == mx.float32 and sym.zeros is None
    assert asym.scales.shape == (6,) and asym.zeros.shape == (6,) and asym.zeros.dtype == mx.uint8
    assert DEQUANTIZE[bits](sym, mx.float16).dtype == mx.float16
    assert quantize_int8(x, granularity="tensor").scales.shape == ()


def test_a_block_of_zeros_round_trips_to_zeros():
    x = mx.concatenate([mx.zeros((1, 32)), mx.random.normal((1, 32))])
    for bits in (8, 4):
        for symmetric in (True, False):
            q = QUANTIZE[bits](x, granularity="channel", symmetric=symmetric)
            back = DEQUANTIZE[bits](q)
            assert mx.all(back[0] == 0).item() and mx.all(mx.isfinite(back)).item()


def test_invalid_arguments_name_what_is_wrong():
    x = mx.random.normal((4, 48))
    with pytest.raises(ValueError, match="granularity must be one of"):
        quantize_int8(x, granularity="row")
    with pytest.raises(ValueError, match=r"last axis \(48\) must be a multiple of group_size \(32\)"):
        quantize_int8(x, granularity="group", group_size=32)
    with pytest.raises(ValueError, match="group_size must be an even integer"):
        quantize_int4(x, granularity="group", group_size=None)
    with pytest.raises(ValueError, match="last axis must be even for 4-bit"):
        quantize_int4(mx.random.normal((4, 7)), granularity="channel")
    with pytest.raises(TypeError, match="x must be an mx.array"):
        quantize_int8(np.ones((2, 2)))
    with pytest.raises(ValueError, match="needs an 8-bit QuantizedTensor"):
        dequantize_int8(quantize_int4(x, granularity="channel"))
    with pytest.raises(TypeError, match="q must be a QuantizedTensor"):
        dequantize_int8(x)
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        dequantize(quantize_int8(x), mx.int32)


@pytest.mark.parametrize("bits, symmetric", [(8, True), (8, False), (4, True), (4, False)])
def test_to_mlx_gives_mlx_affine_format_of_the_same_values(bits, symmetric):
    x = mx.random.normal((6, 128)) * 2.0 + 0.3
    q = QUANTIZE[bits](x, granularity="group", group_size=32, symmetric=symmetric)
    weight, scales, biases = q.to_mlx()
    assert weight.dtype == mx.uint32 and weight.shape == (6, 128 * bits // 32) and biases.shape == (6, 4)
    back = mx.dequantize(weight, scales, biases, group_size=32, bits=bits)
    # q * scale + bias against (q - zero) * scale: a few float32 roundings of 2^bits * scale
    atol = 8 * 2**-24 * 2**bits * float(mx.max(q.scales))
    np.testing.assert_allclose(f64(back), f64(DEQUANTIZE[bits](q)), rtol=0, atol=atol)
    with pytest.raises(ValueError, match="to_mlx needs granularity='group'"):
        QUANTIZE[bits](x, granularity="channel", symmetric=symmetric).to_mlx()
