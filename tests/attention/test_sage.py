"""SageAttention on the reference path: the quantization (exact rounding), the quantized attention
math (against a float64 simulation of it), smoothing and its LSE correction, layouts, GQA, the
layers, gradients and bad input."""

import math

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_primitives import Attention, SageAttention
from mlx_primitives.attention import (
    describe_attention,
    dequantize,
    flash_attention,
    quantize_qk,
    sageattn,
    sageattn_mlx,
)
from mlx_primitives.attention.sage import quantized_reference
from mlx_primitives.attention.sage_quant import GRANULARITIES

from ..reference import Features, attention64, f64
from .test_reference_memory import LONG, SHORT, naive, peak_bytes


def _offset_qkv(dtype, q_len=96, k_len=160, heads=4, kv_heads=2, head_dim=64, offset=8.0):
    q = mx.random.normal((2, heads, q_len, head_dim))
    k = mx.random.normal((2, kv_heads, k_len, head_dim)) + offset * mx.random.normal((2, kv_heads, 1, head_dim))
    v = mx.random.normal((2, kv_heads, k_len, head_dim))
    return tuple(x.astype(dtype) for x in (q, k, v))


def _accuracy(out, expected):
    o, e = f64(out).ravel(), np.asarray(expected).ravel()
    return float(o @ e / (np.linalg.norm(o) * np.linalg.norm(e))), float(np.abs(o - e).sum() / np.abs(e).sum())


def _quantize64(x, block, mean=None):
    """NumPy float32 rounding of the documented rule: round(x * float32(127 / absmax)), scale absmax / 127."""
    x = np.array(x.astype(mx.float32), np.float32)
    if mean is not None:
        x = x - np.array(mean, np.float32)
    b, h, n, d = x.shape
    blocks = -(-n // block)
    padded = np.zeros((b, h, blocks * block, d), np.float32)
    padded[:, :, :n] = x
    padded = padded.reshape(b, h, blocks, block * d)
    absmax = np.abs(padded).max(axis=-1)
    inverse = np.where(absmax > 0, np.float32(127) / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)
    values = np.rint(padded * inverse[..., None]).reshape(b, h, -1, d)[:, :, :n]
    return values, absmax / np.float32(127)


@pytest.mark.parametrize("gran", sorted(GRANULARITIES))
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16, mx.float32])
def test_quantization_is_exactly_the_documented_rounding(gran, dtype):
    q, k, _ = _offset_qkv(dtype, q_len=70, k_len=131)
    quant = quantize_qk(q, k, gran, smooth_k=True)
    q_block, k_block = GRANULARITIES[gran]
    assert (quant.q_block, quant.k_block) == (q_block, k_block)
    assert quant.q.dtype == mx.int8 and quant.q_scale.shape == (2, 4, -(-70 // q_block))
    assert quant.k.dtype == mx.int8 and quant.k_scale.shape == (2, 2, -(-131 // k_block))
    np.testing.assert_allclose(np.array(quant.k_mean)[:, :, 0], f64(k).mean(axis=2), rtol=1e-5, atol=1e-5)
    for values, scales, x, block, mean in ((quant.q, quant.q_scale, q, q_block, None),
                                           (quant.k, quant.k_scale, k, k_block, quant.k_mean)):
        expected_values, expected_scales = _quantize64(x, block, mean)
        np.testing.assert_array_equal(np.array(values), expected_values.astype(np.int8))
        np.testing.assert_array_equal(np.array(scales), expected_scales)
        # Round to nearest: the error of every element is at most half its block's step.
        centred = f64(x) - (0 if mean is None else f64(mean))
        step = np.repeat(f64(scales), block, axis=-1)[..., : x.shape[2], None]
        error = np.abs(f64(dequantize(values, scales, block)) - centred)
        assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-7)
        assert np.abs(np.array(values)).max() == 127


def test_smoothing_shrinks_the_key_step_on_offset_keys():
    q, k, _ = _offset_qkv(mx.float16)
    smooth, raw = quantize_qk(q, k, "per_block", True), quantize_qk(q, k, "per_block", False)
    assert raw.k_mean is None
    assert float(smooth.k_scale.max()) < 0.25 * float(raw.k_scale.max())
    restored = dequantize(smooth.k, smooth.k_scale, smooth.k_block, smooth.k_mean)
    assert np.abs(f64(restored) - f64(k)).max() <= float(smooth.k_scale.max()) / 2 + 1e-2


def test_nhd_quantization_is_the_hnd_one():
    q, k, _ = _offset_qkv(mx.float16)
    hnd = quantize_qk(q, k, "per_warp")
    nhd = quantize_qk(q.swapaxes(1, 2), k.swapaxes(1, 2), "per_warp", tensor_layout="NHD")
    for a, b in zip(hnd[:5], nhd[:5]):
        np.testing.assert_array_equal(np.array(a), np.array(b))


MANTISSA = {mx.float16: 10, mx.bfloat16: 7, mx.float32: 23}
MIN_NORMAL = {mx.float16: 2.0 ** -14, mx.bfloat16: 2.0 ** -126, mx.float32: 2.0 ** -126}


def _round64(x, dtype):
    """Float64 ``x`` rounded to ``dtype`` (to nearest even; None: not rounded), as float64."""
    if dtype is None:
        return x
    if dtype == mx.float16:
        return x.astype(np.float16).astype(np.float64)
    if dtype == mx.bfloat16:  # the top 16 bits of the float32 bit pattern
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    return x


def _ulp(x, dtype):
    """The spacing of ``dtype`` numbers at ``|x|``."""
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), MIN_NORMAL[dtype]))) - MANTISSA[dtype])


def _rms(x):
    return float(np.sqrt(np.mean(np.square(x))))


def _quantized_attention64(quant, v, scale, causal, p_dtype, fp16_accumulator=False, smooth_v=False, chunk=256):
    """Float64 simulation of the reference path's math: ``(out, magnitude)`` BHSD.

    Scores from the integer q.k dots times both scales; online softmax over blocks of ``chunk`` keys;
    P rounded to ``p_dtype`` (None: not rounded) against the running max, and V too (after subtracting
    its mean with ``smooth_v``); PV accumulated exactly or, with ``fp16_accumulator``, in an fp16
    number rounded after every 16 keys and after every rescale. ``magnitude`` is ``(P|V|)/denominator``
    per output element: a rounding of P (or V) to the other neighbour moves it at most
    ``2^-mantissa * magnitude``.
    """
    q8, k8 = np.array(quant.q, np.float64), np.array(quant.k, np.float64)
    qs = np.repeat(np.array(quant.q_scale, np.float64), quant.q_block, -1)[..., : q8.shape[2], None]
    ks = np.repeat(np.array(quant.k_scale, np.float64), quant.k_block, -1)[..., : k8.shape[2], None]
    groups = q8.shape[1] // k8.shape[1]
    s = (q8 @ np.repeat(k8, groups, axis=1).swapaxes(-1, -2)) * qs * np.repeat(ks, groups, axis=1).swapaxes(-1, -2)
    s = s * scale
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool), s.shape[-1] - s.shape[-2]), s, -np.inf)
    v64 = np.repeat(f64(v), groups, axis=1)
    v_mean = v64.mean(axis=2, keepdims=True) if smooth_v else 0.0
    v_pv = _round64(v64 - v_mean, p_dtype)
    run_max = np.full(s.shape[:-1] + (1,), -np.inf)
    denom, acc, magnitude = np.zeros_like(run_max), np.zeros(s.shape[:-1] + v64.shape[-1:]), 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        for j0 in range(0, s.shape[-1], chunk):
            block, v_blk = s[..., j0 : j0 + chunk], v_pv[..., j0 : j0 + chunk, :]
            new_max = np.maximum(run_max, block.max(axis=-1, keepdims=True))
            shift = np.where(np.isneginf(new_max), 0.0, new_max)
            correction, p = np.exp(run_max - shift), np.exp(block - shift)
            denom = denom * correction + p.sum(axis=-1, keepdims=True)
            magnitude = magnitude * correction + p @ np.abs(v_blk)
            p_low = _round64(p, p_dtype)
            if fp16_accumulator:
                acc = _round64(acc * correction, mx.float16)
                for t in range(0, p.shape[-1], 16):
                    acc = _round64(acc + p_low[..., t : t + 16] @ v_blk[..., t : t + 16, :], mx.float16)
            else:
                acc = acc * correction + p_low @ v_blk
            run_max = new_max
        seen = denom > 0
        out = np.where(seen, acc / np.where(seen, denom, 1.0) + v_mean, 0.0)
    return out, magnitude / np.where(seen, denom, 1.0)


def _sage_reference32(q, k, v, causal, pv_accum):
    """The reference path's float32 output before its rounding to the output dtype, and the quantization."""
    quant = quantize_qk(q, k)
    v_pv = v.astype(mx.float16) if pv_accum == "fp16" else v
    spec = describe_attention(q, k, v, causal=causal)
    out, _ = quantized_reference(quant, v_pv, spec, pv_accum, out_dtype=mx.float32)
    return out, quant


@pytest.mark.parametrize("pv_accum", ["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_reference_path_is_exact_to_the_quantized_math(pv_accum, causal, dtype):
    q, k, v = _offset_qkv(dtype, q_len=32, k_len=1000)  # four key blocks: P is rounded against running maxima
    q, k, v = q[:1], k[:1], v[:1]
    out32, quant = _sage_reference32(q, k, v, causal, pv_accum)
    fp16_accumulator = pv_accum == "fp16"
    p_dtype = mx.float16 if fp16_accumulator else dtype
    simulated, magnitude = _quantized_attention64(quant, v, 1 / 8, causal, p_dtype, fp16_accumulator)
    error = np.abs(f64(out32) - simulated)
    # Float32 score arithmetic puts a few P elements (and fp16 accumulator values) on the other side of a
    # rounding point than float64 does: no element may move further than one such rounding of all of P.
    assert np.all(error <= 2.0 ** -MANTISSA[p_dtype] * magnitude)
    # ... and overall we are far closer to the simulation than to the same math without its roundings:
    # P rounded against the final max (one key block), and unrounded P / an fp32 accumulator.
    final_max, _ = _quantized_attention64(quant, v, 1 / 8, causal, p_dtype, fp16_accumulator, chunk=1 << 30)
    coarser, _ = _quantized_attention64(quant, v, 1 / 8, causal, mx.float16 if fp16_accumulator else None)
    for other in (final_max, coarser):
        assert _rms(error) <= 0.3 * _rms(other - simulated), (_rms(error), _rms(other - simulated))
    # The public output is that float32 result rounded once to the input dtype.
    out = sageattn(q, k, v, is_causal=causal, pv_accum_dtype=pv_accum, path="reference")
    assert out.dtype == dtype
    assert mx.array_equal(out, out32.astype(dtype)).item()


@pytest.mark.parametrize("causal", [False, True])
def test_reference_path_is_exact_to_the_quantized_math_in_float32(causal):
    q, k, v = _offset_qkv(mx.float32, q_len=64, k_len=600)
    out = sageattn(q, k, v, is_causal=causal, path="reference")
    simulated, magnitude = _quantized_attention64(quantize_qk(q, k), v, 1 / 8, causal, None)
    # Only float32 arithmetic separates us from the simulation (scores of 64-term dots, then exp).
    assert np.all(np.abs(f64(out) - simulated) <= 4e-6 * magnitude)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_fp16_accumulator_overflows_where_simulated_and_smooth_v_keeps_it_finite(dtype):
    q, k, v = _offset_qkv(mx.float32, q_len=64, k_len=512)
    v = v + 2000 * mx.random.uniform(shape=(2, 2, 1, 64))  # per-channel offsets: some outputs overflow
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    quant = quantize_qk(q, k)
    out = f64(sageattn(q, k, v, pv_accum_dtype="fp16"))
    simulated, magnitude = _quantized_attention64(quant, v, 1 / 8, False, mx.float16, fp16_accumulator=True)
    overflow = ~np.isfinite(simulated)
    assert 0.02 < overflow.mean() < 0.9
    # Where the simulation overflows, so do we: but for the odd element whose accumulator ends within a
    # rounding of the fp16 maximum (a per-chunk fp16 rounding, say, misses a fifth of them).
    assert np.mean(np.isfinite(out) == overflow) <= 1e-3 * overflow.mean()
    with np.errstate(invalid="ignore"):  # inf - inf where both overflow
        error = np.abs(out - simulated)
    # The output's rounding, plus a P and an accumulator rounding gone the other way (see above).
    both = np.isfinite(out) & ~overflow
    assert np.all(error[both] <= (_ulp(simulated, dtype) + 2.0 ** -9 * magnitude)[both])
    assert np.all(np.isfinite(f64(sageattn(q, k, v))))  # fp32 accumulation

    smoothed = f64(sageattn(q, k, v, pv_accum_dtype="fp16", smooth_v=True))
    simulated, magnitude = _quantized_attention64(quant, v, 1 / 8, False, mx.float16, True, smooth_v=True)
    assert np.all(np.isfinite(simulated))
    assert np.all(np.abs(smoothed - simulated) <= _ulp(simulated, dtype) + 2.0 ** -10 * magnitude)
    exact = attention64(f64(q), f64(k), f64(v))["out"]
    assert np.abs(smoothed - exact).max() <= 2 * _ulp(np.abs(exact).max(), dtype)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2), st.integers(1, 40), st.integers(1, 60)),
    head_dim=st.sampled_from([16, 32]),
    gran=st.sampled_from(sorted(GRANULARITIES)),
    causal=st.booleans(),
    nhd=st.booleans(),
    dtype=st.sampled_from([mx.float16, mx.bfloat16]),
)
def test_reference_path_matches_the_quantized_math_on_random_shapes(shape, head_dim, gran, causal, nhd, dtype):
    batch, kv_heads, groups, q_len, k_len = shape
    q_len = min(q_len, k_len) if causal else q_len  # every row sees a key: the simulation needs one
    q = mx.random.normal((batch, kv_heads * groups, q_len, head_dim)).astype(dtype)
    k = (mx.random.normal((batch, kv_heads, k_len, head_dim)) + 3).astype(dtype)
    v = mx.random.normal((batch, kv_heads, k_len, head_dim)).astype(dtype)
    if nhd:
        out = sageattn(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), "NHD", causal, qk_quant_gran=gran)
        out = out.swapaxes(1, 2)
    else:
        out = sageattn(q, k, v, "HND", causal, qk_quant_gran=gran)
    simulated, magnitude = _quantized_attention64(quantize_qk(q, k, gran), v, head_dim ** -0.5, causal, dtype)
    # The output's own rounding, plus P roundings gone the other way (see the test above).
    tolerance = _ulp(simulated, dtype) + 2.0 ** -MANTISSA[dtype] * magnitude
    assert np.all(np.abs(f64(out) - simulated) <= tolerance)


def test_reference_path_peak_memory_grows_linearly_in_sequence_length():
    def fn(q, k, v):
        return sageattn(q, k, v, is_causal=True, path="reference")

    short, long = peak_bytes(fn, SHORT), peak_bytes(fn, LONG)
    assert long / short < 6, f"peak grew x{long / short:.1f} for 4x the length ({short} -> {long} B)"
    assert long < peak_bytes(naive, LONG) / 3  # int8 and dequantized copies of q and k are O(N) too


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_accuracy_targets_on_offset_keys(dtype):
    q, k, v = _offset_qkv(dtype, q_len=128, k_len=384, offset=10.0)
    exact = attention64(f64(q), f64(k), f64(v))["out"]
    cos, rel_l1 = _accuracy(sageattn(q, k, v), exact)
    assert cos >= 0.999 and rel_l1 <= 0.03, (cos, rel_l1)
    _, raw_l1 = _accuracy(sageattn(q, k, v, smooth_k=False), exact)
    _, fine_l1 = _accuracy(sageattn(q, k, v, qk_quant_gran="per_thread"), exact)
    assert raw_l1 > 2 * rel_l1 and fine_l1 < rel_l1


@pytest.mark.parametrize("smooth_k", [True, False])
def test_lse_is_that_of_the_unsmoothed_scores(smooth_k):
    q, k, v = _offset_qkv(mx.float16, q_len=40, k_len=300)
    out, lse = sageattn(q, k, v, is_causal=True, return_lse=True, smooth_k=smooth_k)
    expected = attention64(f64(q), f64(k), f64(v), Features(causal=True))
    assert lse.dtype == mx.float32 and lse.shape == (2, 4, 40)
    np.testing.assert_allclose(np.array(lse), expected["lse"], atol=0.05 if smooth_k else 0.5)


def test_rows_without_keys_give_zeros_and_minus_inf():
    q, k, v = _offset_qkv(mx.float16, q_len=50, k_len=20)
    out, lse = sageattn(q, k, v, is_causal=True, return_lse=True, smooth_v=True)
    assert np.all(np.array(out)[:, :, :30] == 0) and np.all(np.isneginf(np.array(lse)[:, :, :30]))
    assert np.all(np.isfinite(np.array(lse)[:, :, 30:]))


def test_empty_sequences():
    q, k, v = _offset_qkv(mx.float16, q_len=4, k_len=6)
    assert sageattn(q[:, :, :0], k, v).shape == (2, 4, 0, 64)
    out, lse = sageattn(q, k[:, :, :0], v[:, :, :0], return_lse=True)
    assert np.all(np.array(out) == 0) and np.all(np.isneginf(np.array(lse)))


def test_gqa_equals_repeated_heads_and_nhd_equals_hnd():
    q, k, v = _offset_qkv(mx.float16)
    out = sageattn(q, k, v, is_causal=True)
    repeated = sageattn(q, mx.repeat(k, 2, axis=1), mx.repeat(v, 2, axis=1), is_causal=True)
    np.testing.assert_array_equal(np.array(out), np.array(repeated))
    nhd = sageattn(q.swapaxes(1, 2), k.swapaxes(1, 2), v.swapaxes(1, 2), "NHD", is_causal=True)
    assert nhd.shape == (2, 96, 4, 64)
    np.testing.assert_array_equal(np.array(nhd.swapaxes(1, 2)), np.array(out))


@pytest.mark.parametrize("options", [{"smooth_v": True}, {"pv_accum_dtype": "fp16"}, {"qk_quant_gran": "per_warp"},
                                     {"sm_scale": 0.05}])
def test_options_stay_close_to_exact_attention(options):
    q, k, v = _offset_qkv(mx.float16)
    v = v + 4  # an offset for smooth_v to remove
    out = sageattn(q, k, v, **options)
    exact = attention64(f64(q), f64(k), f64(v), Features(scale=options.get("sm_scale")))["out"]
    cos, rel_l1 = _accuracy(out, exact)
    assert cos >= 0.999 and rel_l1 <= 0.03, (options, cos, rel_l1)


def test_gradients_pass_straight_through_to_exact_attention():
    q, k, v = _offset_qkv(mx.float32, q_len=24, k_len=40, offset=1.0)
    cotangent = mx.random.normal(q.shape)
    grads = mx.grad(lambda q, k, v: (sageattn(q, k, v) * cotangent).sum(), argnums=(0, 1, 2))(q, k, v)
    expected = attention64(f64(q), f64(k), f64(v), grad_out=f64(cotangent))
    for got, name in zip(grads, ("dq", "dk", "dv")):
        np.testing.assert_allclose(f64(got), expected[name], atol=1e-4, rtol=1e-3)


def test_sageattn_mlx_takes_the_seed_call():
    q, k, v = (mx.random.normal((2, 8, 128, 64)).astype(mx.float16) for _ in range(3))
    out = sageattn_mlx(q, k, v, sm_scale=1.0 / (64 ** 0.5))
    np.testing.assert_array_equal(np.array(out), np.array(sageattn(q, k, v)))
    unbatched, lse = sageattn_mlx(q[0], k[0], v[0], is_causal=True, return_lse=True, qk_quant_gran="per_thread")
    assert unbatched.shape == (8, 128, 64) and lse.shape == (8, 128)
    full = sageattn_mlx(q, k, v, pv_dtype="float32")
    exact = attention64(f64(q), f64(k), f64(v))["out"]
    assert _accuracy(full, exact)[0] >= 0.999
    with pytest.raises(ValueError, match="pv_dtype"):
        sageattn_mlx(q, k, v, pv_dtype="int8")


def test_sageattn_mlx_takes_any_leading_dims():
    q, k, v = (mx.random.normal((2, 3, heads, 16, 32)).astype(mx.float16) for heads in (4, 2, 2))
    out, lse = sageattn_mlx(q, k, v, is_causal=True, return_lse=True)
    flat_out, flat_lse = sageattn(*(x.reshape(6, -1, 16, 32) for x in (q, k, v)), is_causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    assert mx.array_equal(out, flat_out.reshape(q.shape)).item() and mx.array_equal(lse, flat_lse.reshape(lse.shape)).item()
    single = sageattn_mlx(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0])  # (seq, dim)
    assert mx.array_equal(single, sageattn(q[:1, 0, :1], k[:1, 0, :1], v[:1, 0, :1])[0, 0]).item()
    with pytest.raises(ValueError, match=r"q must have shape \(\.\.\., seq_len, head_dim\)"):
        sageattn_mlx(q[0, 0, 0, 0], k[0, 0, 0, 0], v[0, 0, 0, 0])
    with pytest.raises(ValueError, match="k must have q's leading dims"):
        sageattn_mlx(q, k.reshape(3, 2, 2, 16, 32), v)


def test_layers():
    q, k, v = (mx.random.normal((1, 33, heads, 32)).astype(mx.float16) for heads in (4, 2, 2))
    layer = SageAttention(num_heads=4, head_dim=32, causal=True)
    assert "qk_quant_gran" in repr(layer)
    out = layer(q, k, v)
    exact = flash_attention(q, k, v, causal=True)
    assert _accuracy(out, f64(exact))[0] >= 0.999
    with pytest.raises(ValueError, match="mask"):
        layer(q, k, v, mask=mx.ones((33, 33), mx.bool_))
    with pytest.raises(ValueError, match="heads"):
        layer(q[..., :2, :], k, v)

    block = Attention(dims=64, num_heads=4, num_kv_heads=2, kernel="sage")
    flash_block = Attention(dims=64, num_heads=4, num_kv_heads=2)
    flash_block.update(block.parameters())
    x = mx.random.normal((2, 20, 64))
    assert _accuracy(block(x, mask="causal"), f64(flash_block(x, mask="causal")))[0] >= 0.999
    with pytest.raises(ValueError, match="window_size or softcap"):
        Attention(dims=64, num_heads=4, kernel="sage", softcap=30.0)
    with pytest.raises(ValueError, match="mask"):
        block(x, mask=mx.zeros((20, 20)))


def test_attention_block_forwards_sage_options():
    options = {"qk_quant_gran": "per_thread", "smooth_k": False}
    block = Attention(dims=64, num_heads=4, num_kv_heads=2, rope=False, kernel="sage", sage_options=options)
    assert "per_thread" in repr(block)
    x = mx.random.normal((2, 20, 64)) + 3 * mx.random.normal((64,))
    q, k, v = (proj(x).reshape(2, 20, -1, 16) for proj in (block.q_proj, block.k_proj, block.v_proj))
    direct = sageattn(q, k, v, "NHD", is_causal=True, sm_scale=0.25, **options)
    expected = block.o_proj(direct.reshape(2, 20, 64))
    assert mx.array_equal(block(x, mask="causal"), expected).item()
    default = Attention(dims=64, num_heads=4, num_kv_heads=2, rope=False, kernel="sage")
    default.update(block.parameters())
    assert not mx.array_equal(default(x, mask="causal"), expected).item()


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: sageattn(q, k, v, tensor_layout="BHSD"), ValueError, "tensor_layout"),
    (lambda q, k, v: sageattn(q, k, v, qk_quant_gran="per_row"), ValueError, "qk_quant_gran"),
    (lambda q, k, v: sageattn(q, k, v, pv_accum_dtype="fp8"), ValueError, "pv_accum_dtype"),
    (lambda q, k, v: sageattn(q, k[:, :, :, :32], v), ValueError, "k must have shape"),
    (lambda q, k, v: sageattn(q, k, v[:, :, :5]), ValueError, "v must have shape"),
    (lambda q, k, v: sageattn(q[:, :3], k, v), ValueError, "multiple of num_kv_heads"),
    (lambda q, k, v: sageattn(q, k.astype(mx.float32), v), TypeError, "dtype"),
    (lambda q, k, v: sageattn(np.zeros((1, 4, 8, 64)), k, v), TypeError, "q must be an mx.array"),
    (lambda q, k, v: sageattn(q, k, v, path="fast"), ValueError, "path"),
    (lambda q, k, v: sageattn(q, k, v, sm_scale=float("nan")), ValueError, "sm_scale"),
    (lambda q, k, v: quantize_qk(q, k[0]), ValueError, "k must have shape"),
    (lambda q, k, v: quantize_qk(q.astype(mx.int8), k), TypeError, "q must have dtype"),
    (lambda q, k, v: dequantize(q, mx.ones((1,)), 64), TypeError, "values must have dtype int8"),
    (lambda q, k, v: dequantize(mx.zeros((1, 4, 8, 64), mx.int8), mx.ones((1, 4, 2)), 64), ValueError, "scales"),
    (lambda q, k, v: sageattn(q, k, v, is_causal="no"), TypeError, "is_causal must be a bool"),
    (lambda q, k, v: sageattn(q, k, v, return_lse=1), TypeError, "return_lse must be a bool"),
    (lambda q, k, v: sageattn(q, k, v, smooth_k="False"), TypeError, "smooth_k must be a bool"),
    (lambda q, k, v: sageattn(q, k, v, smooth_v="x"), TypeError, "smooth_v must be a bool"),
    (lambda q, k, v: sageattn(q, k, v, sm_scale=True), TypeError, "sm_scale must be a real number"),
    (lambda q, k, v: sageattn(q, k, v, qk_quant_gran=["per_block"]), TypeError, "qk_quant_gran must be one of"),
    (lambda q, k, v: sageattn(q, k, v, tensor_layout=["HND"]), TypeError, "tensor_layout must be one of"),
    (lambda q, k, v: quantize_qk(q, k, "per_row"), ValueError, "^gran must be one of"),
    (lambda q, k, v: quantize_qk(q, k, smooth_k="no"), TypeError, "smooth_k must be a bool"),
    (lambda q, k, v: dequantize(mx.zeros((1, 2, 8, 64), mx.int8), mx.ones((1, 2, 1)), 0), ValueError, "block must"),
    (lambda q, k, v: dequantize(mx.zeros((1, 2, 8, 64), mx.int8), mx.ones((1, 2, 1)), 64.0), TypeError, "block must"),
    (lambda q, k, v: dequantize(mx.zeros((1, 2, 8, 64), mx.int8), mx.ones((1, 2, 1)), 64, mx.ones((1, 2, 8, 64))),
     ValueError, r"mean must have shape \(1, 2, 1, 64\)"),
    (lambda q, k, v: SageAttention(4, 64, pv_accum_dtype="fp8"), ValueError, "pv_accum_dtype"),
    (lambda q, k, v: SageAttention(4, 64, smooth_v="x"), TypeError, "smooth_v"),
    (lambda q, k, v: SageAttention(0, 64), ValueError, "num_heads must be a positive int"),
    (lambda q, k, v: SageAttention(4, 64, causal=1), TypeError, "causal must be a bool"),
    (lambda q, k, v: Attention(64, 4, kernel="sage", sage_options={"qk_quant_gran": "x"}), ValueError, "qk_quant_gran"),
    (lambda q, k, v: Attention(64, 4, sage_options={"smooth_k": False}), ValueError, "sage_options need kernel='sage'"),
])
def test_bad_input_names_the_argument(call, error, match):
    q, k, v = _offset_qkv(mx.float16, q_len=8, k_len=8)
    with pytest.raises(error, match=match):
        call(q[:1], k[:1], v[:1])


def test_numpy_scalars_are_accepted():
    q, k, v = _offset_qkv(mx.float16, q_len=8, k_len=8)
    out = sageattn(q, k, v, is_causal=np.bool_(True), sm_scale=np.float32(0.125))
    assert mx.array_equal(out, sageattn(q, k, v, is_causal=True, sm_scale=0.125)).item()


def test_default_scale_and_float32_inputs():
    q, k, v = _offset_qkv(mx.float32, offset=0.0)
    exact = attention64(f64(q), f64(k), f64(v), Features(scale=1 / math.sqrt(64)))["out"]
    assert _accuracy(sageattn(q, k, v), exact)[0] >= 0.999


def test_sage_kernel_variant_follows_the_device_and_config(monkeypatch):
    from mlx_primitives.hardware import profile_from_info
    from mlx_primitives.kernels import flash_attention as fa
    from mlx_primitives.kernels import sage as sage_kernels

    hopper = profile_from_info("cuda", {"device_name": "NVIDIA H100", "architecture": "sm_90"})
    monkeypatch.setattr(fa, "device_profile", lambda: hopper)
    specs = {d: describe_attention(*(mx.zeros((1, 2, 8, d), mx.float16),) * 3) for d in (64, 96, 128)}
    wg = sage_kernels.WG_HEAD_DIMS
    assert fa.uses_warpgroup(specs[64], None, wg) and fa.uses_warpgroup(specs[128], None, wg)
    assert not fa.uses_warpgroup(specs[96], None, wg) and not fa.uses_warpgroup(specs[128], {"WG": 0}, wg)
    with pytest.raises(ValueError, match="head_dim"):
        fa.uses_warpgroup(specs[96], {"WG": 1}, wg)
    assert sage_kernels.warpgroup_config_for(specs[128]) in sage_kernels.SAGE_ATTN_WG.configs()
    with pytest.raises(ValueError, match="warpgroup kernel takes"):
        sage_kernels.warpgroup_config_for(specs[128], {"BK": 32})
    assert sage_kernels.config_for(specs[128], {"WG": 0, "BK": 32})["BK"] == 32
