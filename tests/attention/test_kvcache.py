"""flash_attn_with_kvcache: appends, rotary, contiguous and paged caches, decode and prefill, errors."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import flash_attn_with_kvcache, kvcache
import mlx_primitives.cache as cache_api
from mlx_primitives.cache import PagedKVCache, update_paged_kv_cache
from mlx_primitives.hardware import device_profile
from tests.reference import Features, assert_within_rule, attention64, f64, naive_attention

B, HQ, HK, D = 3, 4, 2, 64


def random(shape, dtype=mx.float16):
    return mx.random.normal(shape).astype(dtype)


def oracle_check(out, q, keys, values, f: Features, lse=None):
    """Per sequence: ``out`` (B, Sq, H, D) against float64 attention over ``keys[b]``/``values[b]`` (L_b, Hk, D)."""
    dtype = q.dtype
    for b in range(q.shape[0]):
        qb = q[b : b + 1].swapaxes(1, 2)
        kb, vb = (mx.array(x[b])[None].astype(dtype).swapaxes(1, 2) for x in (keys, values))
        fb = Features(**{**f.__dict__})
        if f.alibi_slopes is not None and np.ndim(f.alibi_slopes) == 2:
            fb.alibi_slopes = f.alibi_slopes[b]
        ref = attention64(f64(qb), f64(kb), f64(vb), fb)
        naive_out, naive_lse, _ = naive_attention(qb, kb, vb, fb)
        assert_within_rule(out[b : b + 1].swapaxes(1, 2), ref["out"], naive_out, dtype, f"out[{b}]")
        if lse is not None:
            assert lse.dtype == mx.float32
            assert_within_rule(lse[b : b + 1], ref["lse"], naive_lse, dtype, f"lse[{b}]")


def paged_copy(cache: np.ndarray, page_size: int, num_pages: int, dtype):
    """A shuffled page pool and block table holding the contiguous ``cache`` (B, S, Hk, D)."""
    batch, seq = cache.shape[:2]
    per_seq = seq // page_size
    order = np.random.default_rng(0).permutation(num_pages)[: batch * per_seq]
    pool = np.random.default_rng(1).normal(size=(num_pages, page_size) + cache.shape[2:])
    pool[order] = cache.reshape(batch * per_seq, page_size, *cache.shape[2:])
    table = order.reshape(batch, per_seq).astype(np.int32)
    return mx.array(pool).astype(dtype), mx.array(table)


@pytest.mark.parametrize("q_len", [1, 4, 20])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_appends_new_keys_and_attends_over_each_sequence(q_len, paged, dtype):
    seq, page = 64, 16
    k_np, v_np = (np.array(random((B, seq, HK, D), mx.float32)) for _ in range(2))
    lengths = np.array([5, 0, 33])
    new_k, new_v = random((B, q_len, HK, D), dtype), random((B, q_len, HK, D), dtype)
    q = random((B, q_len, HQ, D), dtype)
    if paged:
        k_cache, table = paged_copy(k_np, page, 20, dtype)
        v_cache, _ = paged_copy(v_np, page, 20, dtype)
    else:
        k_cache, v_cache, table = mx.array(k_np).astype(dtype), mx.array(v_np).astype(dtype), None
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, new_k, new_v, cache_seqlens=mx.array(lengths, mx.int32),
                                       block_table=table, causal=True, return_softmax_lse=True)
    cached = f64(mx.array(k_np).astype(dtype)), f64(mx.array(v_np).astype(dtype))
    keys = [np.concatenate([cached[0][b, :n], f64(new_k[b])]) for b, n in enumerate(lengths)]
    values = [np.concatenate([cached[1][b, :n], f64(new_v[b])]) for b, n in enumerate(lengths)]
    oracle_check(out, q, keys, values, Features(causal=True), lse)
    assert out.shape == q.shape and out.dtype == dtype
    for b, n in enumerate(lengths):  # the caller's cache now holds the new keys
        if paged:
            pages = np.array(table[b])
            got = np.concatenate([f64(k_cache[int(p)]) for p in pages])[n : n + q_len]
        else:
            got = f64(k_cache[b, n : n + q_len])
        np.testing.assert_array_equal(got, f64(new_k[b]))


@pytest.mark.parametrize("features", [
    {"window_size": (6, 0), "causal": True},
    {"softcap": 2.0, "softmax_scale": 0.3},
    {"alibi": (HQ,)},
    {"alibi": (B, HQ), "causal": True},
    {"causal": False},
])
@pytest.mark.parametrize("q_len", [2, 18])
def test_features_match_float64(features, q_len):
    seq = 48
    k_cache, v_cache = random((B, seq, HK, D)), random((B, seq, HK, D))
    q = random((B, q_len, HQ, D))
    lengths = np.array([40, q_len, 25])
    kwargs, f = dict(features), Features()
    if "alibi" in kwargs:
        slopes = mx.random.uniform(0.05, 0.5, kwargs.pop("alibi"))
        kwargs["alibi_slopes"], f.alibi_slopes = slopes, f64(slopes)
    f.causal = kwargs.get("causal", False)
    f.window = kwargs.get("window_size", (-1, -1))
    f.softcap = kwargs.get("softcap", 0.0)
    f.scale = kwargs.get("softmax_scale")
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=mx.array(lengths, mx.int32), **kwargs)
    keys = [f64(k_cache[b, :n]) for b, n in enumerate(lengths)]
    values = [f64(v_cache[b, :n]) for b, n in enumerate(lengths)]
    oracle_check(out, q, keys, values, f)


def rotary64(x, cos, sin, positions, interleaved):
    """x (B, S, H, D) float64 rotated by table rows positions (B, S)."""
    half = cos.shape[1]
    c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
    out = x.copy()
    if interleaved:
        a, b = x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]
        out[..., 0 : 2 * half : 2], out[..., 1 : 2 * half : 2] = a * c - b * s, b * c + a * s
    else:
        a, b = x[..., :half], x[..., half : 2 * half]
        out[..., :half], out[..., half : 2 * half] = a * c - b * s, b * c + a * s
    return out


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary_rotates_new_keys_at_their_positions_and_queries_as_flash_attention(interleaved, causal):
    seq, q_len, rotary_dim = 32, 3, 32
    theta = np.arange(seq)[:, None] * 10000.0 ** (-np.arange(rotary_dim // 2) / (rotary_dim // 2))
    cos, sin = mx.array(np.cos(theta), mx.float32), mx.array(np.sin(theta), mx.float32)
    k_cache, v_cache = random((B, seq, HK, D), mx.float32), random((B, seq, HK, D), mx.float32)
    cached_k, cached_v = f64(k_cache), f64(v_cache)
    q, k, v = random((B, q_len, HQ, D), mx.float32), random((B, q_len, HK, D), mx.float32), \
        random((B, q_len, HK, D), mx.float32)
    lengths = np.array([4, 10, 0])
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                  cache_seqlens=mx.array(lengths, mx.int32), causal=causal,
                                  rotary_interleaved=interleaved)
    k_pos = lengths[:, None] + np.arange(q_len)
    q_pos = k_pos if causal else np.repeat(lengths[:, None], q_len, axis=1)
    k_rot = rotary64(f64(k), f64(cos), f64(sin), k_pos, interleaved)
    q_rot = rotary64(f64(q), f64(cos), f64(sin), q_pos, interleaved)
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(f64(k_cache[b, n : n + q_len]), k_rot[b], atol=1e-5)
    keys = [np.concatenate([cached_k[b, :n], k_rot[b]]) for b, n in enumerate(lengths)]
    values = [np.concatenate([cached_v[b, :n], f64(v[b])]) for b, n in enumerate(lengths)]
    oracle_check(out, mx.array(q_rot, mx.float32), keys, values, Features(causal=causal))


def test_cache_batch_idx_picks_cache_rows_and_leftpad_hides_the_padding():
    k_cache, v_cache = random((5, 16, HK, D)), random((5, 16, HK, D))
    q, k, v = random((2, 1, HQ, D)), random((2, 1, HK, D)), random((2, 1, HK, D))
    rows, lengths = np.array([4, 1]), np.array([6, 9])
    before_k, before_v = f64(k_cache), f64(v_cache)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=mx.array(lengths, mx.int32),
                                  cache_batch_idx=mx.array(rows, mx.int32))
    keys = [np.concatenate([before_k[r, :n], f64(k[b])]) for b, (r, n) in enumerate(zip(rows, lengths))]
    values = [np.concatenate([before_v[r, :n], f64(v[b])]) for b, (r, n) in enumerate(zip(rows, lengths))]
    oracle_check(out, q, keys, values, Features())
    np.testing.assert_array_equal(f64(k_cache[0]), before_k[0])  # rows nobody uses are untouched
    leftpad = np.array([2, 5])
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=mx.array(lengths + 1, mx.int32),
                                  cache_batch_idx=mx.array(rows, mx.int32), cache_leftpad=mx.array(leftpad, mx.int32))
    oracle_check(out, q, [x[p:] for x, p in zip(keys, leftpad)], [x[p:] for x, p in zip(values, leftpad)], Features())


def test_paged_decode_hands_the_pool_and_table_to_the_decode_kernel(monkeypatch):
    pool_k, pool_v = random((8, 16, HK, D)), random((8, 16, HK, D))
    table = mx.array([[3, 5, -1], [0, -1, -1]], mx.int32)
    seen = {}

    def spy(q, k_cache, v_cache, cache_seqlens, **options):
        seen.update(k=k_cache, table=options["block_table"], lengths=cache_seqlens)
        return real(q, k_cache, v_cache, cache_seqlens, **options)

    real = kvcache.decode_attention
    monkeypatch.setattr(kvcache, "decode_attention", spy)
    flash_attn_with_kvcache(random((2, 1, HQ, D)), pool_k, pool_v, random((2, 1, HK, D)), random((2, 1, HK, D)),
                            cache_seqlens=mx.array([20, 3], mx.int32), block_table=table)
    assert seen["k"] is pool_k and seen["table"] is table  # read in place: no gathered copy
    assert seen["lengths"].tolist() == [21, 4]


ERRORS = [
    ({"block_table": [[0, 9]]}, ValueError, r"block_table\[0, 1\] = 9 is not a page"),
    ({"block_table": [[0, -2]]}, ValueError, r"block_table\[0, 1\] = -2"),
    ({"block_table": [[-1, -1]]}, ValueError, r"is -1 \(unused\) but sequence 0 needs"),
    ({"block_table": [[0, 1]], "cache_seqlens": 32}, ValueError, "beyond block_table's capacity"),
    ({"cache_seqlens": 16}, ValueError, "needs 17 keys"),
    ({"cache_seqlens": -1}, ValueError, "negative"),
    ({"k_dtype": mx.float32}, TypeError, "cache's dtype"),
    ({"cache_dtype": mx.float32}, TypeError, "q's dtype"),
    ({"cache_batch_idx": [3]}, ValueError, r"cache_batch_idx\[0\] = 3"),
    ({"rotary_only_cos": True}, ValueError, "rotary_cos and rotary_sin"),
]


@pytest.mark.parametrize("case,error,match", ERRORS)
def test_bad_input_raises_before_anything_is_written(case, error, match):
    case = dict(case)
    paged = "block_table" in case
    cache_dtype = case.pop("cache_dtype", mx.float16)
    k_cache = random((4, 16, HK, D), cache_dtype) if paged else random((1, 16, HK, D), cache_dtype)
    v_cache = mx.array(k_cache)
    before = f64(k_cache)
    kwargs = {"cache_seqlens": mx.array([case.pop("cache_seqlens", 3)], mx.int32)}
    if paged:
        kwargs["block_table"] = mx.array(case.pop("block_table"), mx.int32)
    if "cache_batch_idx" in case:
        kwargs["cache_batch_idx"] = mx.array(case.pop("cache_batch_idx"), mx.int32)
    if case.pop("rotary_only_cos", False):
        kwargs["rotary_cos"] = mx.zeros((8, 8))
    k = random((1, 1, HK, D), case.pop("k_dtype", mx.float16))
    with pytest.raises(error, match=match):
        flash_attn_with_kvcache(random((1, 1, HQ, D)), k_cache, v_cache, k, mx.array(k), **kwargs)
    np.testing.assert_array_equal(f64(k_cache), before)


@pytest.mark.parametrize("q_len", [1, 3])
def test_paged_attention_attends_over_each_sequences_pages(q_len):
    cache = PagedKVCache(12, 8, HK, D, dtype=mx.float16)
    seqs = [cache.add_sequence() for _ in range(B)]
    for seq, n in zip(seqs, (5, 17, 9)):
        cache.append([seq], random((1, n, HK, D)), random((1, n, HK, D)))
    cache.append([cache.fork(seqs[1])], random((1, 2, HK, D)), random((1, 2, HK, D)))  # shares seqs[1]'s pages
    q = random((B, q_len, HQ, D))
    out = cache_api.paged_attention(q, cache.k_pools[0], cache.v_pools[0], cache.block_table(seqs),
                                    cache.cache_seqlens(seqs), scale=0.2)
    keys, values = zip(*(tuple(f64(x) for x in cache.gather(seq)) for seq in seqs))
    oracle_check(out, q, keys, values, Features(causal=True, scale=0.2))
    assert out.shape == q.shape and out.dtype == q.dtype


def test_appending_through_duplicate_cache_rows_is_refused():
    k_cache = random((2, 16, HK, D))
    before = f64(k_cache)
    k = random((2, 1, HK, D))
    with pytest.raises(ValueError, match=r"cache_batch_idx must name distinct cache rows .* got \[0, 0\]"):
        flash_attn_with_kvcache(random((2, 1, HQ, D)), k_cache, mx.array(k_cache), k, mx.array(k), cache_seqlens=3,
                                cache_batch_idx=mx.array([0, 0], mx.int32))
    np.testing.assert_array_equal(f64(k_cache), before)


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("q_len", [1, 3])
def test_gpu_paged_decode_matches_contiguous_and_float64(page_size, q_len):
    assert device_profile().is_gpu
    seq = 256
    k_np, v_np = (np.array(random((B, seq, HK, 128), mx.float32)) for _ in range(2))
    lengths = np.array([200, 17, 255 - q_len])
    pool_k, table = paged_copy(k_np, page_size, B * seq // page_size + 3, mx.float16)
    pool_v, _ = paged_copy(v_np, page_size, B * seq // page_size + 3, mx.float16)
    q, k, v = random((B, q_len, HQ, 128)), random((B, q_len, HK, 128)), random((B, q_len, HK, 128))
    seqlens = mx.array(lengths, mx.int32)
    contiguous_k, contiguous_v = mx.array(k_np).astype(mx.float16), mx.array(v_np).astype(mx.float16)
    out, lse = flash_attn_with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=seqlens, block_table=table,
                                       causal=True, window_size=(100, -1), return_softmax_lse=True)
    same = flash_attn_with_kvcache(q, contiguous_k, contiguous_v, k, v, cache_seqlens=seqlens, causal=True,
                                   window_size=(100, -1))
    keys = [np.concatenate([f64(contiguous_k[b, :n]), f64(k[b])]) for b, n in enumerate(lengths)]
    values = [np.concatenate([f64(contiguous_v[b, :n]), f64(v[b])]) for b, n in enumerate(lengths)]
    oracle_check(out, q, keys, values, Features(causal=True, window=(100, 0)), lse)
    assert float(mx.abs(out.astype(mx.float32) - same.astype(mx.float32)).max()) < 2e-3
    assert math.isfinite(float(lse.max()))


def test_paged_cache_decode_steps_match_float64_and_forks_diverge_cleanly():
    paged = PagedKVCache(24, 16, HK, D, num_layers=2)
    seqs = [paged.add_sequence() for _ in range(2)]
    history = {}
    for seq, length in zip(seqs, (21, 5)):  # prefill each sequence on its own (different lengths)
        keys = random((1, length, HK, D))
        table, seqlens = paged.reserve([seq], length)
        for layer in range(2):
            update_paged_kv_cache(paged.k_pools[layer], paged.v_pools[layer], keys, keys * 0.5, table, seqlens)
        history[seq] = [f64(keys[0])]
    beam = paged.fork(seqs[0])  # shares the 21-key prefix, then writes into a copy of its last page
    history[beam] = list(history[seqs[0]])
    batch = seqs + [beam]
    for _ in range(3):
        q, k = random((3, 1, HQ, D)), random((3, 1, HK, D))
        table, seqlens = paged.reserve(batch, 1)
        for b, seq in enumerate(batch):
            history[seq].append(f64(k[b]))
        keys = [np.concatenate(history[seq]) for seq in batch]
        for layer in range(2):
            out = flash_attn_with_kvcache(q, paged.k_pools[layer], paged.v_pools[layer], k, k * 0.5,
                                          cache_seqlens=seqlens, block_table=table, causal=True)
            oracle_check(out, q, keys, [x * 0.5 for x in keys], Features(causal=True))
    for seq, want in zip(batch, keys):
        got_k, got_v = paged.gather(seq, layer=1)
        np.testing.assert_array_equal(f64(got_k), want)
        np.testing.assert_array_equal(f64(got_v), f64(mx.array(want).astype(mx.float16) * 0.5))
