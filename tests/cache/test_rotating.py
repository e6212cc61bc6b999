"""RotatingKVCache: attention sinks plus a ring of recent positions, mlx-lm's interface and behaviour."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.cache import KVCache, RotatingKVCache


def tagged(positions, heads=2, dim=4):
    """Keys whose every feature is the position (so returned rows say which positions they hold)."""
    pos = mx.array(np.asarray(positions, np.float32))
    k = mx.broadcast_to(pos[None, None, :, None], (1, heads, len(positions), dim))
    return k, -k


def held(keys):
    return np.array(keys[0, 0, :, 0]).astype(int).tolist()


def kept_positions(total, max_size, keep):
    """What a StreamingLLM cache of max_size holds after ``total`` single-position updates."""
    if total <= max_size:
        return list(range(total))
    return list(range(keep)) + list(range(total - (max_size - keep), total))


@pytest.mark.parametrize("max_size,keep", [(8, 0), (8, 2), (5, 4)])
def test_single_updates_keep_the_sinks_and_the_latest_positions(max_size, keep):
    cache = RotatingKVCache(max_size=max_size, keep=keep)
    for t in range(3 * max_size):
        k, v = cache.update_and_fetch(*tagged([t]))
        assert sorted(held(k)) == kept_positions(t + 1, max_size, keep)
        assert held(v) == [-x for x in held(k)]
        assert cache.offset == t + 1 and cache.size() == min(t + 1, max_size)


def test_chunks_are_returned_in_time_order_and_each_row_still_sees_max_size_positions():
    cache = RotatingKVCache(max_size=8, keep=2)
    k, _ = cache.update_and_fetch(*tagged(range(10)))
    assert held(k) == list(range(10))
    for t in range(10, 13):  # wrap the ring
        cache.update_and_fetch(*tagged([t]))
    k, _ = cache.update_and_fetch(*tagged([13, 14, 15]))
    # time order: sinks, the latest max_size - 1 - keep before the chunk, then the chunk
    assert held(k) == [0, 1, 8, 9, 10, 11, 12, 13, 14, 15]
    k, _ = cache.update_and_fetch(*tagged([16]))
    assert sorted(held(k)) == kept_positions(17, 8, 2)


def test_same_attention_as_kv_cache_while_nothing_is_evicted():
    from mlx_primitives import Attention

    layer = Attention(32, num_heads=4, num_kv_heads=2)
    x = mx.random.normal((1, 6, 32))
    rotating, plain = RotatingKVCache(max_size=64, keep=4), KVCache()
    a = layer(x, mask=rotating.make_mask(6), cache=rotating)
    b = layer(x, mask="causal", cache=plain)
    assert mx.allclose(a, b, atol=1e-5)
    step = mx.random.normal((1, 1, 32))
    assert rotating.make_mask(1) is None
    assert mx.allclose(layer(step, cache=rotating), layer(step, cache=plain), atol=1e-5)


def test_make_mask_follows_mlx_lm():
    cache = RotatingKVCache(max_size=8, keep=0)
    assert cache.make_mask(3) == "causal"
    cache.update_and_fetch(*tagged(range(7)))
    mask = cache.make_mask(3)  # 7 + 3 > 8 keys: a windowed array
    assert mask.shape == (3, 10) and mask.dtype == mx.bool_
    assert np.array(mask).sum(axis=1).tolist() == [8, 8, 8]
    for t in range(7, 12):
        cache.update_and_fetch(*tagged([t]))
    one = cache.make_mask(1, window_size=4)  # ring of 8 slots, only the 4 newest visible
    assert one.shape == (8,) and int(one.sum()) == 4


def test_trim_only_before_the_ring_wraps_and_state_round_trips():
    cache = RotatingKVCache(max_size=8, keep=1)
    cache.update_and_fetch(*tagged(range(5)))
    assert cache.is_trimmable() and cache.trim(2) == 2 and cache.offset == 3
    for t in range(3, 12):
        cache.update_and_fetch(*tagged([t]))
    assert not cache.is_trimmable()
    copy = RotatingKVCache(max_size=4)
    copy.state = cache.state  # the setter restores offset, keep, max_size and the ring slot
    assert copy.state[2:] == cache.state[2:] == (12, 1, 8, 5)
    a, b = cache.update_and_fetch(*tagged([12])), copy.update_and_fetch(*tagged([12]))
    assert held(a[0]) == held(b[0])


@pytest.mark.parametrize("index,value,match", [
    (4, 4, "holds 8 keys, more than max_size = 4"),
    (5, 9, r"_idx = 9 must be an int in \[0, 8\]"),
    (3, 8, r"keep must be an int in \[0, max_size=8\)"),
    (2, -1, "offset = -1 must be an int >= 0"),
])
def test_state_whose_scalars_do_not_fit_the_arrays_is_refused(index, value, match):
    cache = RotatingKVCache(max_size=8, keep=2)
    for t in range(11):
        cache.update_and_fetch(*tagged([t]))
    state = cache.state
    with pytest.raises(ValueError, match=match):
        RotatingKVCache.from_state(state[:index] + (value,) + state[index + 1:])


def test_to_quantized_raises_as_mlx_lm_does():
    with pytest.raises(NotImplementedError, match="RotatingKVCache"):
        RotatingKVCache(max_size=8).to_quantized()


def test_keep_must_leave_room_for_the_ring():
    with pytest.raises(ValueError, match="keep"):
        RotatingKVCache(max_size=4, keep=4)


def test_sizes_are_ints():
    assert RotatingKVCache(np.int64(8), keep=np.int32(2)).max_size == 8
    for bad in (True, 8.0):
        with pytest.raises(TypeError, match="max_size must be an int"):
            RotatingKVCache(bad)
    with pytest.raises(ValueError, match="keep must be an int in"):
        RotatingKVCache(4, keep=4)
