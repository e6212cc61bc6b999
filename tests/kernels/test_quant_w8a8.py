"""W8A8 linear: the exact integer product, the fp32 epilogue, the kernel against the reference."""

import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.kernels import catalog, launcher, quantize_int8, w8a8, w8a8_linear, w8a8_matmul
from mlx_primitives.kernels.w8a8 import quantize_per_token

from .helpers import f64


def int8(shape, extremes: bool = False) -> mx.array:
    values = mx.random.randint(-128 if extremes else -127, 128, shape).astype(mx.int8)
    return values


def oracle(x_q, x_scale, w_q, w_scale, bias=None, activation=None) -> np.ndarray:
    """Float64 of act(x_q @ w_q^T * x_scale * w_scale + bias), the product in int64."""
    acc = np.array(x_q).astype(np.int64) @ np.array(w_q).astype(np.int64).T
    v = acc * f64(x_scale)[:, None] * f64(w_scale)[None, :]
    if bias is not None:
        v = v + f64(bias)
    if activation == "relu":
        v = np.maximum(v, 0)
    elif activation == "silu":
        v = v / (1 + np.exp(-v))
    elif activation == "gelu":
        v = 0.5 * v * (1 + np.vectorize(math.erf)(v / math.sqrt(2)))
    return v


def scales(n) -> mx.array:
    return mx.random.uniform(1e-3, 2e-2, (n,))


def assert_close_to_oracle(out, exact, dtype):
    """Within the rounding of the output dtype, plus the float32 epilogue's error (relative to the largest
    term: a bias may cancel the product)."""
    eps = {mx.float16: 2**-11, mx.bfloat16: 2**-8, mx.float32: 2**-23}[dtype]
    np.testing.assert_allclose(f64(out), exact, rtol=2 * eps, atol=1e-6 * float(np.abs(exact).max()))


def test_reference_integer_product_is_exact_across_slices():
    """K = 2304 spans three exact-sum slices; -128 * -128 products are the worst case."""
    x_q, w_q = int8((5, 2304), extremes=True), int8((7, 2304), extremes=True)
    x_q[0] = -128
    w_q[0] = -128
    out = w8a8_matmul(x_q, mx.ones((5,)), w_q, mx.ones((7,)), dtype=mx.float32, path="reference")
    exact = np.array(x_q).astype(np.int64) @ np.array(w_q).astype(np.int64).T
    np.testing.assert_array_equal(np.array(out).astype(np.int64), exact)


@pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu"])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_reference_matches_float64_oracle(activation, dtype):
    x_q, w_q = int8((9, 80)), int8((24, 80))
    x_s, w_s, bias = scales(9), scales(24), mx.random.normal((24,)).astype(dtype)
    out = w8a8_matmul(x_q, x_s, w_q, w_s, bias, activation=activation, dtype=dtype, path="reference")
    assert out.dtype == dtype and out.shape == (9, 24)
    assert_close_to_oracle(out, oracle(x_q, x_s, w_q, w_s, bias, activation), dtype)


def test_linear_quantizes_each_token_with_its_own_scale():
    x = mx.random.normal((2, 3, 64)) * mx.array([1.0, 10.0, 0.1])[None, :, None]
    w = mx.random.normal((16, 64))
    wq = quantize_int8(w)
    out = w8a8_linear(x.astype(mx.float16), wq.values, wq.scales, path="reference")
    assert out.shape == (2, 3, 16) and out.dtype == mx.float16
    x_q, x_s = quantize_per_token(x.astype(mx.float16).reshape(-1, 64))
    np.testing.assert_allclose(f64(x_s), np.abs(f64(x.astype(mx.float16))).reshape(-1, 64).max(-1) / 127,
                               rtol=1e-6)
    assert_close_to_oracle(out.reshape(-1, 16), oracle(x_q, x_s, wq.values, wq.scales), mx.float16)
    # and it is a good approximation of the float product
    exact = f64(x) @ f64(w).T
    assert np.linalg.norm(f64(out) - exact) / np.linalg.norm(exact) < 0.02


def test_validation_names_argument_and_shape():
    x_q, w_q, s = int8((4, 32)), int8((8, 32)), mx.ones((8,))
    with pytest.raises(TypeError, match="x_q must have dtype int8"):
        w8a8_matmul(x_q.astype(mx.int32), mx.ones((4,)), w_q, s)
    with pytest.raises(ValueError, match=r"x_scale must have shape \(4,\)"):
        w8a8_matmul(x_q, mx.ones((3,)), w_q, s)
    with pytest.raises(ValueError, match=r"w_q must have shape \(out_features, 32\)"):
        w8a8_matmul(x_q, mx.ones((4,)), int8((8, 16)), s)
    with pytest.raises(ValueError, match=r"w_scale must have shape \(8,\)"):
        w8a8_matmul(x_q, mx.ones((4,)), w_q, mx.ones((7,)))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        w8a8_linear(mx.ones((4, 32)), w_q, s, mx.ones((5,)))
    with pytest.raises(ValueError, match="activation must be one of"):
        w8a8_linear(mx.ones((4, 32)), w_q, s, activation="tanh")


def _kernel_ran(kernel=catalog.W8A8) -> bool:
    keys = [key for key in launcher._verified if key[1].name == kernel.name]
    return bool(keys) and all(launcher._verified[key] for key in keys)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("shape", [(37, 29, 48), (130, 200, 272), (1, 64, 4096), (256, 256, 1024), (5, 7, 20)])
def test_kernel_matches_oracle(dtype, shape):
    m, n, k = shape
    x_q, w_q, x_s, w_s = int8((m, k), extremes=True), int8((n, k), extremes=True), scales(m), scales(n)
    out = w8a8_matmul(x_q, x_s, w_q, w_s, dtype=dtype, path="kernel")
    assert _kernel_ran()
    assert_close_to_oracle(out, oracle(x_q, x_s, w_q, w_s), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("config", catalog.W8A8.configs())
def test_every_tile_config_is_exact(config):
    """Unit scales and float32 output: the kernel's integer product must equal the int64 one."""
    m, n, k = 200, 150, 192
    x_q, w_q = int8((m, k), extremes=True), int8((n, k), extremes=True)
    out = w8a8_matmul(x_q, mx.ones((m,)), w_q, mx.ones((n,)), dtype=mx.float32, path="kernel", config=config)
    assert _kernel_ran()
    exact = np.array(x_q).astype(np.int64) @ np.array(w_q).astype(np.int64).T
    np.testing.assert_array_equal(np.array(out).astype(np.int64), exact)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", [None, "relu", "silu", "gelu"])
@pytest.mark.parametrize("path, kernel", [("kernel", catalog.W8A8), ("warpgroup", catalog.W8A8_WG)])
def test_kernel_fuses_bias_and_activation(activation, path, kernel):
    x = mx.random.normal((70, 96)).astype(mx.float16)
    wq = quantize_int8(mx.random.normal((40, 96)))
    bias = mx.random.normal((40,)).astype(mx.float16)
    out = w8a8_linear(x, wq.values, wq.scales, bias, activation=activation, path=path)
    ref = w8a8_linear(x, wq.values, wq.scales, bias, activation=activation, path="reference")
    assert _kernel_ran(kernel)
    np.testing.assert_allclose(f64(out), f64(ref), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("family, expected", [("sm_90", "warpgroup"), ("sm_80", "kernel"),
                                              ("apple-m3-max", "kernel")])
def test_auto_route_takes_the_warpgroup_kernel_on_hopper(monkeypatch, family, expected):
    monkeypatch.setattr(w8a8, "device_profile", lambda: SimpleNamespace(family=family))
    assert w8a8._route("auto") == expected
    assert w8a8._route("kernel") == "kernel" and w8a8._route("warpgroup") == "warpgroup"


@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
@pytest.mark.parametrize("sms", [None, 132])
def test_warpgroup_launch_fits_hopper_shared_memory(monkeypatch, dtype, sms):
    """Every config fits the 227 KiB of an H100 (a float32 output's staging takes fewer stages where needed),
    and the launch is persistent where the SM count is known: one threadgroup per SM at most."""
    monkeypatch.setattr(w8a8, "device_profile", lambda: SimpleNamespace(family="sm_90", backend="cuda", gpu_cores=sms))
    monkeypatch.setattr(w8a8, "dynamic_shared_memory", lambda: 227 * 1024)
    x_q, w_q = int8((300, 4112)), int8((520, 4112))
    for config in catalog.W8A8_WG.configs():
        plan = w8a8.plan_warpgroup(x_q, mx.ones((300,)), w_q, mx.ones((520,)), None, None, dtype, config)
        threads = 256 + 32 * config["PW"]  # two consumer warpgroups and the producer warps
        tiles = -(-520 // config["BN"]) * 3
        template = dict(plan.template)
        assert plan.shared_memory <= 227 * 1024 and template["STAGES"] >= 2
        assert template["GROUPS"] == (sms or w8a8.ONE_TILE_EACH)
        assert plan.grid == (min(tiles, sms or tiles) * threads, 1, 1) and plan.threadgroup == (threads, 1, 1)


def _exact_on_warpgroup(m, n, k, config=None):
    x_q, w_q = int8((m, k), extremes=True), int8((n, k), extremes=True)
    out = w8a8_matmul(x_q, mx.ones((m,)), w_q, mx.ones((n,)), dtype=mx.float32, path="warpgroup", config=config)
    assert _kernel_ran(catalog.W8A8_WG)
    exact = np.array(x_q).astype(np.int64) @ np.array(w_q).astype(np.int64).T
    np.testing.assert_array_equal(np.array(out).astype(np.int64), exact)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(300, 520, 4112), (129, 257, 80), (1, 64, 4096), (5, 7, 20), (256, 256, 1024)])
def test_warpgroup_kernel_is_exact_whatever_the_tiles(shape):
    """M, N not multiples of the 128 x BN tile, K not a multiple of the 128-k stage (K = 20 padded to 32),
    extreme int8 values."""
    _exact_on_warpgroup(*shape)


@pytest.mark.gpu
@pytest.mark.parametrize("config", catalog.W8A8_WG.configs())
def test_every_warpgroup_config_is_exact(config):
    _exact_on_warpgroup(200, 300, 784, config)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_warpgroup_epilogue_matches_oracle(dtype, activation):
    m, n, k = 133, 270, 208
    x_q, w_q, x_s, w_s = int8((m, k), extremes=True), int8((n, k), extremes=True), scales(m), scales(n)
    bias = mx.random.normal((n,)).astype(dtype)
    out = w8a8_matmul(x_q, x_s, w_q, w_s, bias, activation=activation, dtype=dtype, path="warpgroup")
    assert _kernel_ran(catalog.W8A8_WG) and out.dtype == dtype
    assert_close_to_oracle(out, oracle(x_q, x_s, w_q, w_s, bias, activation), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("shape", [(37, 4096), (5, 40), (3, 4100), (2, 11008)])
def test_row_quantization_kernel_gives_the_reference_bytes(dtype, shape):
    """One-pass per-token quantization on the GPU: the same int8 values and scales as quantize_int8, rows of
    very different magnitudes, a row of zeros (scale 1) and values on the rounding midpoints."""
    x = mx.random.normal(shape) * mx.exp(4 * mx.random.normal((shape[0], 1)))
    x[1] = 0
    x[2, :4] = mx.array([127.0, -63.5, 0.5, 1.5])
    x = x.astype(dtype)
    values, scales_ = quantize_per_token(x)
    assert _kernel_ran(catalog.QUANTIZE_ROWS)
    q = quantize_int8(x, granularity="channel")
    np.testing.assert_array_equal(np.array(scales_), np.array(q.scales))
    np.testing.assert_array_equal(np.array(values), np.array(q.values))
    assert float(scales_[1]) == 1.0 and not np.any(np.array(values[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("k", [48, 400])
def test_persistent_warpgroup_kernel_is_exact_over_many_tiles_per_threadgroup(k):
    """More 128 x 256 tiles (9 x 16) than the H100 has SMs, so threadgroups take several tiles and the stage
    buffers' barriers go on counting across tiles (1 or 4 stages a tile)."""
    m, n = 1100, 3900
    x_q, w_q = int8((m, k), extremes=True), int8((n, k), extremes=True)
    out = w8a8_matmul(x_q, mx.ones((m,)), w_q, mx.ones((n,)), dtype=mx.float32, path="warpgroup",
                      config={"BN": 256, "STAGES": 4, "PW": 4})
    assert _kernel_ran(catalog.W8A8_WG)
    exact = np.array(x_q).astype(np.float64) @ np.array(w_q).astype(np.float64).T  # integers below 2^53
    np.testing.assert_array_equal(np.array(out).astype(np.float64), exact)
