"""save_cache / load_cache: exact round trips, clear errors for truncated or foreign files."""

import json

import mlx.core as mx
import pytest

from mlx_primitives.cache import (
    KVCache,
    PagedKVCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_cache,
    save_cache,
)


def chunk(length, dtype=mx.bfloat16):
    return tuple(mx.random.normal((1, 2, length, 64)).astype(dtype) for _ in range(2))


def filled_caches():
    plain, rotating, quantized = KVCache(), RotatingKVCache(max_size=8, keep=2), QuantizedKVCache(bits=4)
    for cache in (plain, rotating, quantized):
        cache.update_and_fetch(*chunk(5))
        for _ in range(6):
            cache.update_and_fetch(*chunk(1))
    paged = PagedKVCache(6, 4, 2, 64, num_layers=2, dtype=mx.float16)
    a = paged.add_sequence()
    paged.reserve([a], 6)
    paged.fork(a)
    return [plain, rotating, quantized, paged]


def flat(state):
    return [x for item in state for x in (item if isinstance(item, tuple) else (item,))]


def same(a, b):
    assert type(a) is type(b)
    assert a.meta_state == b.meta_state
    left, right = flat(a.state), flat(b.state)
    assert len(left) == len(right)
    for x, y in zip(left, right):
        assert x.dtype == y.dtype and mx.array_equal(x, y)


def test_every_cache_round_trips_exactly(tmp_path):
    caches = filled_caches()
    path = str(tmp_path / "caches.safetensors")
    save_cache(path, caches)
    loaded = load_cache(path)
    for a, b in zip(caches, loaded):
        same(a, b)
    k = mx.random.normal((1, 2, 1, 64)).astype(mx.bfloat16)
    assert mx.array_equal(caches[1].update_and_fetch(k, k)[0], loaded[1].update_and_fetch(k, k)[0])
    paged = loaded[3]
    assert paged.allocator.free_pages == caches[3].allocator.free_pages
    assert [paged.allocator.refcount(p) for p in range(6)] == [caches[3].allocator.refcount(p) for p in range(6)]


def test_one_cache_and_an_empty_one_round_trip(tmp_path):
    path = str(tmp_path / "one.safetensors")
    cache = KVCache()
    cache.update_and_fetch(*chunk(3, mx.float32))
    save_cache(path, cache)
    same(load_cache(path), cache)
    save_cache(path, KVCache())
    assert load_cache(path).empty()


def test_metadata_says_what_the_file_holds(tmp_path):
    path = str(tmp_path / "meta.safetensors")
    save_cache(path, filled_caches())
    _, metadata = mx.load(path, return_metadata=True)
    entries = json.loads(metadata["mlx_primitives.cache"])["caches"]
    assert entries[2]["quantization"] == {"group_size": 64, "bits": 4}
    assert entries[3]["page_size"] == 4 and entries[3]["lengths"] == {"0": 6, "1": 6}
    assert entries[0]["dtype"] == "bfloat16" and entries[0]["offset"] == 11


def test_truncated_file_raises_a_clear_error(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_cache(str(path), filled_caches())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_cache(str(path))


def test_file_without_cache_metadata_is_refused(tmp_path):
    path = str(tmp_path / "weights.safetensors")
    mx.save_safetensors(path, {"w": mx.zeros((2,))})
    with pytest.raises(ValueError, match="not written by save_cache"):
        load_cache(path)


def test_arrays_that_do_not_match_the_metadata_are_refused(tmp_path):
    path = str(tmp_path / "edited.safetensors")
    save_cache(path, filled_caches())
    arrays, metadata = mx.load(path, return_metadata=True)
    arrays["0.0.0"] = arrays["0.0.0"][..., :3, :]
    mx.save_safetensors(path, arrays, metadata)
    with pytest.raises(ValueError, match=r"array '0.0.0' is \(1, 2, 3, 64\)"):
        load_cache(path)


def test_only_caches_can_be_saved(tmp_path):
    with pytest.raises(TypeError, match="save_cache takes"):
        save_cache(str(tmp_path / "x.safetensors"), [object()])
