"""rope: q and k in one launch against float64, both conventions, per-batch offsets, validation."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.kernels import rope

from .helpers import DTYPES, assert_accurate, f64, max_error, random, rope64


def _check(q_shape, hk, dims, dtype, traditional, offset, path, q=None):
    q = random(q_shape, dtype) if q is None else q
    k = random((q_shape[0], hk) + tuple(q_shape[2:]), dtype)
    base, scale = 10000.0, 0.5
    q_out, k_out = rope(q, k, dims, traditional=traditional, base=base, scale=scale, offset=offset, path=path)
    offsets = np.array(offset if isinstance(offset, mx.array) else [offset] * q_shape[0], dtype=np.float64)
    for x, out in ((q, q_out), (k, k_out)):
        fast = mx.fast.rope(x, dims, traditional=traditional, base=base, scale=scale,
                            offset=offset if isinstance(offset, int) else offset.astype(mx.int32))
        assert_accurate(out, fast, rope64(f64(x), offsets, dims, traditional, base, scale), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [False, True])
def test_reference_matches_float64(dtype, traditional):
    _check((2, 4, 5, 32), 2, 24, dtype, traditional, mx.array([3, 70]), "reference")


def test_validation_names_argument_and_shape():
    q, k = random((2, 4, 5, 32), mx.float16), random((2, 2, 5, 32), mx.float16)
    with pytest.raises(ValueError, match=r"k must have shape \(2, kv_heads, 5, 32\)"):
        rope(q, k[:, :, :4], 32)
    with pytest.raises(ValueError, match=r"dims must be an even int"):
        rope(q, k, 31)
    with pytest.raises(ValueError, match=r"offset must have shape \(batch,\) = \(2,\)"):
        rope(q, k, 32, offset=mx.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"q must have shape \(batch, q_heads, seq_len, head_dim\)"):
        rope(q[0], k, 32)
    with pytest.raises(TypeError, match=r"q and k must share one dtype"):
        rope(q, k.astype(mx.float32), 32)
    with pytest.raises(ValueError, match=r"scale must be finite"):
        rope(q, k, 32, scale=float("nan"))
    with pytest.raises(TypeError, match=r"traditional must be a bool"):
        rope(q, k, 32, traditional="yes")
    with pytest.raises(TypeError, match=r"offset must have dtype int32"):
        rope(q, k, 32, offset=mx.array([1.0, 2.0]))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("path", ["auto", "kernel", "fast", "reference"])
def test_scalar_offset_arrays_and_numpy_scalars_act_as_the_int(path):
    """mlx-lm hands the cache offset over as an int, a NumPy int or an mx.array (0-d or per batch entry)."""
    q, k = random((2, 3, 4, 16), mx.float32), random((2, 1, 4, 16), mx.float32)
    want = rope64(f64(q), np.array([5.0, 5.0]), 16, True, 500.0, 0.5)
    for offset in (mx.array(5), mx.array([5]), np.int64(5)):
        out, _ = rope(q, k, np.int64(16), traditional=np.bool_(True), base=np.float32(500.0),
                      scale=np.float32(0.5), offset=offset, path=path)
        assert max_error(out, want) <= 2e-5


@pytest.mark.parametrize("path", ["auto", "fast", "reference"])
def test_freqs_replace_the_base_as_in_mx_fast_rope(path):
    """Scaled RoPE (mlx-lm's Llama 3 / YaRN / LongRoPE): pair j's wavelength is freqs[j]."""
    q, k = random((2, 3, 4, 16), mx.float32), random((2, 1, 4, 16), mx.float32)
    wavelengths = 10000.0 ** (np.arange(6) / 6) * np.linspace(1.0, 8.0, 6)
    out, _ = rope(q, k, 12, offset=mx.array([3, 900]), freqs=mx.array(wavelengths, dtype=mx.float32), path=path)
    exact = rope64(f64(q), np.array([3, 900]), 12, False, None, 1.0, wavelengths)
    assert max_error(out, exact) <= 1e-4  # float32 angles of positions up to 903


def test_freqs_are_checked_and_not_sent_to_the_kernel():
    q = random((1, 2, 3, 16), mx.float32)
    with pytest.raises(ValueError, match=r"freqs must have shape \(dims // 2,\) = \(8,\)"):
        rope(q, q, 16, freqs=mx.ones((4,)))
    with pytest.raises(ValueError, match=r"path='kernel' computes its angles from base"):
        rope(q, q, 16, freqs=mx.ones((8,)), path="kernel")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize(
    "q_shape, hk, dims, offset",
    [((2, 8, 33, 128), 2, 128, 0), ((3, 4, 1, 64), 4, 64, "per-batch"), ((1, 5, 7, 80), 1, 32, 11), ((2, 3, 9, 6), 3, 4, 5)],
)
def test_kernel_matches_float64(dtype, traditional, q_shape, hk, dims, offset):
    if offset == "per-batch":
        offset = mx.array([0, 17, 4095][: q_shape[0]])
    _check(q_shape, hk, dims, dtype, traditional, offset, "kernel")


@pytest.mark.gpu
def test_kernel_on_non_contiguous_input():
    q = random((2, 9, 4, 64), mx.float16).transpose(0, 2, 1, 3)  # BLHD storage viewed as BHLD
    _check(q.shape, 2, 64, mx.float16, False, 3, "kernel", q=q)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{"HPT": 1, "THREADS": 128}, {"HPT": 16, "THREADS": 256}])
def test_every_heads_per_thread_config(config):
    q, k = random((2, 6, 17, 64), mx.bfloat16), random((2, 3, 17, 64), mx.bfloat16)
    got = rope(q, k, 64, path="kernel", config=config)
    want = rope(q, k, 64, path="reference")
    for a, b in zip(got, want):
        assert mx.allclose(a, b, atol=2e-2, rtol=2e-2)
