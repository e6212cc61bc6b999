"""QuantizedKVCache (mx.quantize, int8/int4, group size) and attention over it."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.cache import KVCache, QuantizedKVCache, dequantize, quantized_attention
from tests.reference import Features, assert_within_rule, attention64, f64, naive_attention


def chunk(length, batch=1, heads=2, dim=64, dtype=mx.float16):
    return tuple(mx.random.normal((batch, heads, length, dim)).astype(dtype) for _ in range(2))


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32), (8, 128)])
def test_update_and_fetch_returns_quantized_tuples_of_everything_cached(bits, group_size):
    cache = QuantizedKVCache(group_size=group_size, bits=bits)
    keys = []
    for length in (5, 1, 300):  # 306 positions: grows past one step of 256
        k, v = chunk(length, dim=128)
        keys.append(k)
        got_k, got_v = cache.update_and_fetch(k, v)
        assert cache.offset == sum(x.shape[2] for x in keys)
    everything = mx.concatenate(keys, axis=2)
    expected = mx.quantize(everything, group_size=group_size, bits=bits)
    assert len(got_k) == 3 and got_k[0].dtype == mx.uint32
    assert got_k[0].shape == (1, 2, 306, 128 * bits // 32) and got_k[1].shape == (1, 2, 306, 128 // group_size)
    for ours, theirs in zip(got_k, expected):  # same bits as quantizing all at once
        assert mx.array_equal(ours, theirs)
    error = float(mx.abs(dequantize(got_k, group_size, bits).astype(mx.float32) - everything).max())
    assert error < (0.06 if bits == 8 else 0.6)
    assert cache.nbytes == sum(x.nbytes for x in cache.keys + cache.values)


def test_attention_over_the_dequantized_cache_matches_float64_and_int8_stays_close_to_fp16():
    k, v = chunk(200, dim=64, dtype=mx.float16)
    q = mx.random.normal((1, 4, 3, 64)).astype(mx.float16)
    cache = QuantizedKVCache(group_size=64, bits=8)
    cache.update_and_fetch(k, v)
    out = quantized_attention(q, cache, mask="causal")
    dk, dv = cache.dequantized()
    ref = attention64(f64(q), f64(dk), f64(dv), Features(causal=True))
    naive_out, _, _ = naive_attention(q, dk.astype(mx.float16), dv.astype(mx.float16), Features(causal=True))
    assert_within_rule(out, ref["out"], naive_out, mx.float16)
    exact = attention64(f64(q), f64(k), f64(v), Features(causal=True))["out"]
    ours = f64(out).reshape(-1)
    cos = ours @ exact.reshape(-1) / np.linalg.norm(ours) / np.linalg.norm(exact)
    assert cos >= 0.999
    same = quantized_attention(q, *cache.keys_and_values(), mask="causal", group_size=64, bits=8)
    assert mx.array_equal(out, same)


def test_state_trim_and_to_quantized():
    plain = KVCache()
    k, v = chunk(7)
    plain.update_and_fetch(k, v)
    cache = plain.to_quantized(group_size=32, bits=4)
    assert (cache.offset, cache.group_size, cache.bits) == (7, 32, 4)
    assert cache.state[2:] == (7, 32, 4)
    restored = QuantizedKVCache.from_state(cache.state)
    assert (restored.offset, restored.group_size, restored.bits) == (7, 32, 4)
    for a, b in zip(restored.keys_and_values()[0], cache.keys_and_values()[0]):
        assert mx.array_equal(a, b)
    assert cache.is_trimmable() and cache.trim(3) == 3 and cache.state[0][0].shape[2] == 4
    assert cache.make_mask(1) is None and cache.make_mask(2) == "causal"


def test_state_setter_restores_the_offset():
    cache = QuantizedKVCache(bits=8)
    cache.update_and_fetch(*chunk(5, dim=64))
    copy = QuantizedKVCache(bits=8)
    copy.state = cache.state
    k, v = chunk(1, dim=64)
    a, b = cache.update_and_fetch(k, v), copy.update_and_fetch(k, v)
    assert copy.offset == 6 and all(mx.array_equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))


def edited(state, index, value):
    return state[:index] + (value,) + state[index + 1:]


@pytest.mark.parametrize("index,value,match", [
    (2, 9, r"offset = 9 must be an int in \[0, 5\]"),
    (4, 4, "uint32 \\(..., 8\\) packed 4-bit"),
    (3, 32, "uint32 \\(..., 8\\) packed 8-bit"),
    (4, 7, "bits must be one of"),
])
def test_state_whose_scalars_do_not_fit_the_arrays_is_refused(index, value, match):
    cache = QuantizedKVCache(group_size=64, bits=8)
    cache.update_and_fetch(*chunk(5, dim=64))
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache.from_state(edited(cache.state, index, value))
    with pytest.raises(ValueError, match="keys must be a \\(packed, scales, biases\\) tuple"):
        QuantizedKVCache.from_state(edited(cache.state, 0, cache.state[0][:2]))


@pytest.mark.parametrize("options,match", [({"bits": 7}, "bits"), ({"group_size": 48}, "group_size")])
def test_bad_quantization_is_refused(options, match):
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache(**options)


def test_head_dim_must_hold_whole_groups():
    with pytest.raises(ValueError, match="multiple of group_size"):
        QuantizedKVCache(group_size=64).update_and_fetch(*chunk(2, dim=32))
