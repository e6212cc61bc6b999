"""KVCache: mlx-lm's interface (update_and_fetch, offset, state, trim) over a step-grown buffer."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.cache import KVCache


def chunk(length, heads=2, dim=8, v_dim=None, batch=1, dtype=mx.float32):
    k = mx.random.normal((batch, heads, length, dim)).astype(dtype)
    v = mx.random.normal((batch, heads, length, v_dim or dim)).astype(dtype)
    return k, v


def test_new_cache_is_empty():
    cache = KVCache()
    assert cache.empty() and cache.offset == 0 and cache.nbytes == 0 and cache.state == (None, None, 0)


@pytest.mark.parametrize("step", [1, 3, 256])
def test_update_and_fetch_returns_everything_cached_so_far(step):
    cache = KVCache(step=step)
    keys, values = [], []
    for length in (5, 1, 1, 4, 1):
        k, v = chunk(length, v_dim=6)
        keys.append(k)
        values.append(v)
        got_k, got_v = cache.update_and_fetch(k, v)
        assert cache.offset == sum(x.shape[2] for x in keys)
        assert mx.array_equal(got_k, mx.concatenate(keys, axis=2))
        assert mx.array_equal(got_v, mx.concatenate(values, axis=2))
        assert cache.keys.shape[2] % step == 0 and cache.keys.shape[2] >= cache.offset
    assert not cache.empty()


def test_capacity_grows_in_steps_and_nbytes_counts_the_buffer():
    cache = KVCache(step=4)
    cache.update_and_fetch(*chunk(3))
    assert cache.keys.shape[2] == 4
    cache.update_and_fetch(*chunk(1))
    assert cache.keys.shape[2] == 4
    cache.update_and_fetch(*chunk(6))
    assert cache.keys.shape[2] == 12
    assert cache.nbytes == cache.keys.nbytes + cache.values.nbytes == 2 * 1 * 2 * 12 * 8 * 4


def test_dtype_of_the_cache_follows_the_keys():
    cache = KVCache()
    k, v = cache.update_and_fetch(*chunk(3, dtype=mx.bfloat16))
    assert k.dtype == v.dtype == mx.bfloat16


def test_trim_drops_the_last_positions_and_later_updates_overwrite_them():
    cache = KVCache(step=4)
    k1, v1 = chunk(6)
    cache.update_and_fetch(k1, v1)
    assert cache.is_trimmable()
    assert cache.trim(2) == 2 and cache.offset == 4
    assert mx.array_equal(cache.state[0], k1[:, :, :4])
    k2, v2 = chunk(3)
    got_k, got_v = cache.update_and_fetch(k2, v2)
    assert mx.array_equal(got_k, mx.concatenate([k1[:, :, :4], k2], axis=2))
    assert mx.array_equal(got_v, mx.concatenate([v1[:, :, :4], v2], axis=2))
    assert cache.trim(100) == 7 and cache.offset == 0


def test_state_round_trips_into_a_fresh_cache():
    cache = KVCache(step=8)
    for length in (3, 2):
        cache.update_and_fetch(*chunk(length))
    keys, values, offset = cache.state
    assert keys.shape[2] == values.shape[2] == offset == 5
    restored = KVCache.from_state(cache.state)
    assert restored.offset == 5 and mx.array_equal(restored.keys_and_values()[0], keys)
    k, v = chunk(2)
    a, b = cache.update_and_fetch(k, v), restored.update_and_fetch(k, v)
    assert mx.array_equal(a[0], b[0]) and mx.array_equal(a[1], b[1])


def test_matches_mlx_lm_kv_cache_over_updates_and_trims():
    mlx_lm_cache = pytest.importorskip("mlx_lm.models.cache")
    ours, theirs = KVCache(step=4), mlx_lm_cache.KVCache()
    rng = np.random.default_rng(0)
    for _ in range(8):
        k, v = chunk(int(rng.integers(1, 6)))
        a, b = ours.update_and_fetch(k, v), theirs.update_and_fetch(k, v)
        assert mx.array_equal(a[0], b[0]) and mx.array_equal(a[1], b[1])
        assert ours.offset == theirs.offset
        n = int(rng.integers(0, 3))
        assert ours.trim(n) == theirs.trim(n)


def test_step_must_be_positive():
    with pytest.raises(ValueError, match="step must be an int >= 1"):
        KVCache(step=0)


@pytest.mark.parametrize("state,match", [
    ((None, None), r"\(keys, values, offset\); got 2 items"),
    ((mx.zeros((1, 2, 3, 4)), mx.zeros((1, 2, 3, 4)), 4), r"offset = 4 must be an int in \[0, 3\]"),
    ((mx.zeros((1, 2, 3, 4)), mx.zeros((1, 2, 2, 4)), 2), "one \\(batch, kv_heads, length\\)"),
    ((None, None, 1), r"offset = 1"),
])
def test_state_that_does_not_fit_its_arrays_is_refused(state, match):
    with pytest.raises(ValueError, match=match):
        KVCache.from_state(state)
