"""SageAttention kernels on a GPU: the quantization pass against the reference quantization, the
attention kernel against the reference path's quantized math (same INT8 inputs) and against float64."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import describe_attention, sageattn
from mlx_primitives.attention.sage import quantized_reference
from mlx_primitives.attention.sage_quant import GRANULARITIES, key_mean, quantize_bhsd, quantize_reference
from mlx_primitives.kernels import sage as sage_kernels
from mlx_primitives.kernels.flash_attention import warpgroup_available

from ..reference import attention64, f64

pytestmark = pytest.mark.gpu


def _accuracy(out, expected):
    o, e = f64(out).ravel(), np.asarray(expected).ravel()
    cos = float(o @ e / (np.linalg.norm(o) * np.linalg.norm(e)))
    return cos, float(np.abs(o - e).sum() / np.abs(e).sum())


@pytest.mark.parametrize("gran", sorted(GRANULARITIES))
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_quantize_kernel_matches_reference(gran, dtype, head_dim):
    x = (mx.random.normal((2, 3, 203, head_dim)) * 2 + mx.random.normal((2, 3, 1, head_dim)) * 5).astype(dtype)
    mean = key_mean(x)
    for block in GRANULARITIES[gran]:
        values, scales = sage_kernels.quantize(x, block, mean)
        ref_values, ref_scales = quantize_reference(x, block, mean)
        np.testing.assert_allclose(np.array(scales), np.array(ref_scales), rtol=1e-6)
        diff = np.abs(np.array(values, np.int32) - np.array(ref_values, np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # the mean's summation order may flip a tie


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("gran", ["per_block", "per_thread"])
@pytest.mark.parametrize("dtype,head_dim", [(mx.float16, 64), (mx.float16, 128), (mx.bfloat16, 128), (mx.float16, 96)])
def test_kernel_matches_quantized_reference_and_float64(causal, gran, dtype, head_dim):
    q = mx.random.normal((2, 4, 173, head_dim)).astype(dtype)
    k = (mx.random.normal((2, 2, 301, head_dim)) + mx.random.normal((2, 2, 1, head_dim)) * 4).astype(dtype)
    v = mx.random.normal((2, 2, 301, head_dim)).astype(dtype)
    spec = describe_attention(q, k, v, causal=causal)
    quant = quantize_bhsd(q, k, gran, True, "kernel")
    out, lse = sage_kernels.sage_attention(quant.q, quant.q_scale, quant.k, quant.k_scale, v, spec,
                                           quant.q_block, quant.k_block, lambda: pytest.fail("kernel fell back"))
    ref_out, ref_lse = quantized_reference(quant, v, spec)
    # Same quantized inputs: only the fp32 summation order and P's rounding differ.
    np.testing.assert_allclose(f64(out), f64(ref_out), atol=4e-3 if dtype == mx.float16 else 2e-2)
    np.testing.assert_allclose(np.array(lse), np.array(ref_lse), atol=1e-3)

    full_out, full_lse = sageattn(q, k, v, is_causal=causal, qk_quant_gran=gran, return_lse=True, path="kernel")
    exact = attention64(f64(q), f64(k), f64(v), _features(causal))
    cos, rel_l1 = _accuracy(full_out, exact["out"])
    assert cos >= 0.999 and rel_l1 <= 0.03, (cos, rel_l1)
    np.testing.assert_allclose(np.array(full_lse), exact["lse"], atol=0.05)


def _features(causal):
    from ..reference import Features

    return Features(causal=causal)


_WARPGROUP_CONFIGS = [{"WG": 1, **c} for c in sage_kernels.SAGE_ATTN_WG.configs()] if warpgroup_available() else []


@pytest.mark.parametrize("config", [{"WG": 0, **c} for c in sage_kernels.SAGE_ATTN.configs()] + _WARPGROUP_CONFIGS)
def test_every_config_and_ragged_lengths(config):
    q = mx.random.normal((1, 2, 77, 128)).astype(mx.float16)
    k = mx.random.normal((1, 1, 50, 128)).astype(mx.float16)
    v = mx.random.normal((1, 1, 50, 128)).astype(mx.float16)
    spec = describe_attention(q, k, v, causal=True)  # q_len > k_len: the first 27 rows see no key
    quant = quantize_bhsd(q, k, "per_warp", True, "kernel")
    out, lse = sage_kernels.sage_attention(quant.q, quant.q_scale, quant.k, quant.k_scale, v, spec,
                                           quant.q_block, quant.k_block, lambda: pytest.fail("fell back"), config)
    ref_out, ref_lse = quantized_reference(quant, v, spec)
    np.testing.assert_allclose(f64(out), f64(ref_out), atol=4e-3)
    assert np.all(np.isneginf(np.array(lse)[:, :, :27])) and np.all(np.array(out)[:, :, :27] == 0)
    np.testing.assert_allclose(np.array(lse)[:, :, 27:], np.array(ref_lse)[:, :, 27:], atol=1e-3)


def test_nhd_layout_smooth_v_and_long_sequence_on_kernel():
    q = mx.random.normal((1, 1100, 8, 64)).astype(mx.float16)
    k = mx.random.normal((1, 1100, 2, 64)).astype(mx.float16)
    v = (mx.random.normal((1, 1100, 2, 64)) + 3).astype(mx.float16)
    out = sageattn(q, k, v, "NHD", smooth_v=True, path="kernel")
    exact = attention64(*(f64(x).swapaxes(1, 2) for x in (q, k, v)))["out"].swapaxes(1, 2)
    cos, rel_l1 = _accuracy(out, exact)
    assert cos >= 0.999 and rel_l1 <= 0.03, (cos, rel_l1)
