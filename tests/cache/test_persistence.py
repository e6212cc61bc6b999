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
    left, right = flat(a.state), flat(b.state)
    assert len(left) == len(right)
    for x, y in zip(left, right):
        if isinstance(x, mx.array):
            assert x.dtype == y.dtype and mx.array_equal(x, y)
        else:
            assert x == y


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


def test_a_path_without_the_suffix_round_trips_and_a_missing_file_says_so(tmp_path):
    cache = filled_caches()[0]
    save_cache(str(tmp_path / "plain"), cache)
    same(load_cache(str(tmp_path / "plain")), cache)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_cache(str(tmp_path / "absent.safetensors"))


def edit(path, change):
    """Rewrite the cache metadata of the file at ``path`` through ``change(meta)``."""
    arrays, metadata = mx.load(path, return_metadata=True)
    meta = json.loads(metadata["mlx_primitives.cache"])
    change(meta)
    mx.save_safetensors(path, arrays, {"mlx_primitives.cache": json.dumps(meta)})


def layout_edit(**fields):
    def change(meta):
        layout = json.loads(meta["caches"][3]["structure"][2]["value"])
        layout.update(fields)
        meta["caches"][3]["structure"][2]["value"] = json.dumps(layout)
    return change


def scalar_edit(cache, item, value):
    def change(meta):
        meta["caches"][cache]["structure"][item] = {"value": value}
    return change


@pytest.mark.parametrize("change,match", [
    (scalar_edit(2, 2, 14), r"cache 2: QuantizedKVCache.state: offset = 14"),
    (scalar_edit(2, 4, 8), "packed 8-bit"),
    (scalar_edit(1, 4, 4), "more than max_size = 4"),
    (scalar_edit(0, 2, 12), "offset = 12"),
    (layout_edit(sequences=[[0, [0, 1], 9, 9]]), "sequence 0 holds 2 pages for 9 keys"),
    (layout_edit(sequences=[[0, [0, 1], 6, 5]]), "offset 5"),
    (layout_edit(next_id=0), "below next_id 0"),
    (layout_edit(sequences=[[0, [0, 1], 6, 6], [0, [0, 1], 6, 6]]), r"ids \[0, 0\] must be distinct"),
    (layout_edit(page_size=2), "layout page_size 2"),
    (lambda meta: meta["caches"][0].pop("structure"), "malformed 'mlx_primitives.cache' metadata: KeyError"),
])
def test_metadata_that_does_not_fit_the_arrays_is_refused(tmp_path, change, match):
    path = str(tmp_path / "edited.safetensors")
    save_cache(path, filled_caches())
    edit(path, change)
    with pytest.raises(ValueError, match=match):
        load_cache(path)


def test_pools_of_another_shape_in_one_paged_cache_are_refused(tmp_path):
    path = str(tmp_path / "pools.safetensors")
    save_cache(path, filled_caches()[3])
    arrays, metadata = mx.load(path, return_metadata=True)
    arrays["0.0.1"] = arrays["0.0.1"][..., :32]
    meta = json.loads(metadata["mlx_primitives.cache"])
    meta["arrays"]["0.0.1"][0][-1] = 32
    mx.save_safetensors(path, arrays, {"mlx_primitives.cache": json.dumps(meta)})
    with pytest.raises(ValueError, match="as many 4-d pools .* of one shape and dtype"):
        load_cache(path)


@pytest.mark.parametrize("pools", [(None, None), ([1], [1]), (mx.zeros((2, 4, 1, 8)), mx.zeros((2, 4, 1, 8)))])
def test_paged_state_whose_pools_are_not_lists_of_arrays_is_refused(pools):
    with pytest.raises(ValueError, match="k_pools and v_pools must be as many 4-d pools"):
        PagedKVCache.from_state((*pools, "{}"))


def test_format_1_files_still_load(tmp_path):
    """Files of the earlier format kept the scalars in ``meta_state`` and only arrays in the state."""
    plain, rotating, quantized, paged = filled_caches()
    arrays = {"0.0.0": plain.state[0], "0.1.0": plain.state[1], "1.0.0": rotating.state[0],
              "1.1.0": rotating.state[1]}
    arrays.update((f"2.{j}.{t}", x) for j in range(2) for t, x in enumerate(quantized.state[j]))
    arrays.update((f"3.{j}.0", pool) for j, pool in enumerate([paged.k_pools[0], paged.v_pools[0],
                                                                 paged.k_pools[1], paged.v_pools[1]]))
    entries = [{"class": "KVCache", "meta_state": [], "structure": [0, 0]},
               {"class": "RotatingKVCache", "meta_state": ["2", "8", "11", "5"], "structure": [0, 0]},
               {"class": "QuantizedKVCache", "meta_state": ["11", "64", "4"], "structure": [3, 3]},
               {"class": "PagedKVCache", "meta_state": [paged.state[2]], "structure": [0, 0, 0, 0]},
               {"class": "KVCache", "meta_state": [], "structure": []}]
    shapes = {key: [list(a.shape), str(a.dtype).replace("mlx.core.", "")] for key, a in arrays.items()}
    meta = {"format": "mlx_primitives.cache/1", "caches": entries, "arrays": shapes, "list": True}
    path = str(tmp_path / "old.safetensors")
    mx.save_safetensors(path, arrays, {"mlx_primitives.cache": json.dumps(meta)})
    loaded = load_cache(path)
    for a, b in zip([plain, rotating, quantized, paged, KVCache()], loaded):
        same(a, b)
