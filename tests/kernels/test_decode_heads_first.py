"""Decode over heads-first (mlx-lm layout) caches, float and quantized, against float64; the quantized
cache's in-place route through quantized_attention and the Attention layer."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives import Attention
from mlx_primitives.cache import QuantizedKVCache, quantized_attention
from mlx_primitives.cache.quantized import decodes_in_place
from mlx_primitives.kernels import decode_heads_first

from .helpers import assert_accurate, random
from .test_decode import decode64, kernel_runs, naive  # noqa: F401 -- kernel_runs is a fixture


def _bshd(x: mx.array) -> mx.array:
    return x.swapaxes(1, 2)


def _check(q, k, v, lengths, dtype, path, **options):
    """decode_heads_first over BHSD ``k``/``v`` (float) against the BSHD float64 oracle."""
    out, lse = decode_heads_first(q, k, v, mx.array(lengths, mx.int32), return_lse=True, path=path, **options)
    slopes = options.get("alibi_slopes")
    window = options.get("window_size", (-1, -1))
    oracle = dict(window=(window[0], 0), softcap=options.get("softcap", 0.0), slopes=slopes)
    exact, exact_lse = decode64(_bshd(q), _bshd(k), _bshd(v), lengths, **oracle)
    assert_accurate(_bshd(out), naive(_bshd(q), _bshd(k), _bshd(v), lengths, **oracle), exact, dtype)
    np.testing.assert_allclose(np.array(lse), exact_lse, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("q_len, groups, alibi", [(1, 4, None), (3, 2, "heads"), (2, 1, "batch")])
def test_reference_matches_float64(q_len, groups, alibi):
    lengths, kv_heads = [5, 23], 2
    q = random((2, kv_heads * groups, q_len, 32), mx.float32)
    k, v = (random((2, kv_heads, 24, 32), mx.float32) for _ in range(2))
    slopes = {None: None, "heads": mx.random.uniform(0.0, 0.3, (kv_heads * groups,)),
              "batch": mx.random.uniform(0.0, 0.3, (2, kv_heads * groups))}[alibi]
    _check(q, k, v, lengths, mx.float32, "reference", alibi_slopes=slopes, softcap=3.0)


@pytest.mark.parametrize("bits", [4, 8])
def test_reference_reads_quantized_tuples(bits):
    cache, kd, vd = _quantized_cache(2, 2, 19, 64, mx.float32, bits)
    q = random((2, 4, 2, 64), mx.float32)
    out = decode_heads_first(q, cache.keys, cache.values, mx.array([19, 7], mx.int32), quantization=(64, bits),
                             path="reference")
    lengths = [19, 7]
    exact = decode64(_bshd(q), _bshd(kd), _bshd(vd), lengths)[0]
    assert_accurate(_bshd(out), naive(_bshd(q), _bshd(kd), _bshd(vd), lengths), exact, mx.float32)


def test_one_length_for_every_sequence_and_bad_shapes():
    q = random((2, 4, 1, 32), mx.float32)
    k, v = (random((2, 2, 16, 32), mx.float32) for _ in range(2))
    out = decode_heads_first(q, k, v, 9, path="reference")
    again = decode_heads_first(q, k, v, mx.array([9, 9], mx.int32), path="reference")
    np.testing.assert_array_equal(np.array(out), np.array(again))
    with pytest.raises(ValueError, match="k_cache must have shape"):
        decode_heads_first(q, k[:1], v[:1], 9)
    with pytest.raises(ValueError, match="cache_seqlens"):
        decode_heads_first(q, k, v, mx.array([9], mx.int32))


def _quantized_cache(batch, kv_heads, length, head_dim, dtype, bits, group_size=64):
    cache = QuantizedKVCache(group_size=group_size, bits=bits)
    k, v = (random((batch, kv_heads, length, head_dim), dtype) for _ in range(2))
    cache.update_and_fetch(k, v)
    kd, vd = cache.dequantized()
    return cache, kd, vd


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_kernel_reads_heads_first_float_caches(kernel_runs, dtype):
    lengths = [1, 300, 1029]
    q = random((3, 8, 2, 128), dtype)
    k, v = (random((3, 2, 1100, 128), dtype) for _ in range(2))
    _check(q, k, v, lengths, dtype, "kernel", window_size=(200, 0), alibi_slopes=mx.random.uniform(0.0, 0.3, (8,)))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_attention_reads_the_cache_in_place(kernel_runs, bits):
    cache, kd, vd = _quantized_cache(2, 8, 777, 128, mx.float16, bits)
    q = random((2, 32, 1, 128), mx.float16)
    assert decodes_in_place(q, cache, None)
    out = quantized_attention(q, cache)
    lengths = [777, 777]
    exact = decode64(_bshd(q), _bshd(kd), _bshd(vd), lengths, window=(-1, -1))[0]
    assert_accurate(_bshd(out), naive(_bshd(q), _bshd(kd), _bshd(vd), lengths, window=(-1, -1)), exact, mx.float16)


@pytest.mark.gpu
def test_attention_layer_decodes_over_a_quantized_cache_in_place(kernel_runs):
    layer = Attention(256, 8, num_kv_heads=2)
    layer.set_dtype(mx.float16)
    x = random((1, 40, 256), mx.float16)
    cache = QuantizedKVCache(group_size=32, bits=8)
    layer(x, mask="causal", cache=cache)
    step = random((1, 1, 256), mx.float16)
    keys, values = cache.dequantized()  # what the decode step must attend, plus the step's own key
    out = layer(step, cache=cache)
    k_new, v_new = cache.dequantized()
    q = layer.rope(layer.q_proj(step).reshape(1, 1, 8, 32).transpose(0, 2, 1, 3), offset=40)
    want = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), mx.repeat(k_new, 4, axis=1).astype(mx.float32),
                                                mx.repeat(v_new, 4, axis=1).astype(mx.float32), scale=layer.scale)
    want = layer.o_proj(want.astype(mx.float16).transpose(0, 2, 1, 3).reshape(1, 1, -1))
    assert keys.shape[2] == 40 and k_new.shape[2] == 41
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(want.astype(mx.float32)), atol=2e-2)
