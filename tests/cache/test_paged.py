"""Paged KV: update_paged_kv_cache, the page allocator, PagedKVCache (fork, copy-on-write, eviction)."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_primitives.cache import (
    AttentionSinks,
    HeavyHitters,
    OutOfPagesError,
    PageAllocator,
    PagedKVCache,
    SlidingWindow,
    update_paged_kv_cache,
)

HK, D = 2, 8


def tokens(batch, count, start=0):
    """Keys whose features all equal a unique token id, values their negation: (batch, count, HK, D)."""
    ids = start + np.arange(batch * count, dtype=np.float32).reshape(batch, count)
    k = mx.broadcast_to(mx.array(ids)[:, :, None, None], (batch, count, HK, D))
    return k, -k


def ids(keys):
    return np.array(keys[:, 0, 0]).astype(int).tolist()


def test_update_paged_kv_cache_writes_through_the_table_and_returns_new_lengths():
    pool_k, pool_v = mx.zeros((6, 4, HK, D)), mx.zeros((6, 4, HK, D))
    table = mx.array([[5, 2, -1], [0, 3, 1]], mx.int32)
    k, v = tokens(2, 3, start=1)
    lengths = update_paged_kv_cache(pool_k, pool_v, k, v, table, mx.array([2, 7], mx.int32))
    assert lengths.tolist() == [5, 10] and lengths.dtype == mx.int32
    assert np.array(pool_k[5, 2:, 0, 0]).tolist() == [1, 2] and float(pool_k[2, 0, 0, 0]) == 3
    assert float(pool_k[3, 3, 0, 0]) == 4 and np.array(pool_k[1, :2, 0, 0]).tolist() == [5, 6]
    assert mx.array_equal(pool_v, -pool_k)
    assert float(mx.abs(pool_k).sum()) == float(np.sum(np.arange(1, 7))) * HK * D  # nothing else written


@pytest.mark.parametrize("table,lengths,error,match", [
    ([[0, 6]], [3], ValueError, r"block_table\[0, 1\] = 6 is not a page of the pool"),
    ([[0, -3]], [3], ValueError, r"block_table\[0, 1\] = -3"),
    ([[-1, 1]], [0], ValueError, r"block_table\[0, 0\] is -1"),
    ([[0, 1]], [7], ValueError, "beyond block_table's capacity"),
    ([[0, 1]], [-1], ValueError, "negative"),
    ([[0], [0]], [1, 1], ValueError, "same page slot"),
])
def test_bad_tables_and_lengths_raise_before_writing(table, lengths, error, match):
    pool_k, pool_v = mx.ones((6, 4, HK, D)), mx.ones((6, 4, HK, D))
    k, v = tokens(len(table), 3 // len(table), start=10)
    with pytest.raises(error, match=match):
        update_paged_kv_cache(pool_k, pool_v, k, v, mx.array(table, mx.int32), mx.array(lengths, mx.int32))
    assert float(pool_k.sum()) == pool_k.size


def test_dtype_mismatch_is_a_type_error():
    pool = mx.zeros((2, 4, HK, D), mx.float16)
    k, v = tokens(1, 1)
    with pytest.raises(TypeError, match="new_k must have the cache's dtype"):
        update_paged_kv_cache(pool, mx.array(pool), k, v, mx.array([[0]], mx.int32), mx.array([0], mx.int32))


def test_allocator_counts_holders_and_refuses_what_it_cannot_give():
    pages = PageAllocator(4)
    a = pages.allocate(3)
    pages.share(a[:1])
    pages.release(a)
    assert pages.free_pages == 3 and pages.refcount(a[0]) == 1
    with pytest.raises(OutOfPagesError):
        pages.allocate(4)
    with pytest.raises(ValueError, match="held"):
        pages.release([a[1]])


def test_fork_shares_pages_and_copies_the_last_one_before_writing():
    cache = PagedKVCache(8, 4, HK, D, dtype=mx.float32)
    parent = cache.add_sequence()
    cache.append([parent], *tokens(1, 6))
    child = cache.fork(parent)
    assert cache.pages(child) == cache.pages(parent) and cache.allocator.refcount(cache.pages(parent)[0]) == 2
    cache.append([child], *tokens(1, 1, start=100))
    cache.append([parent], *tokens(1, 1, start=200))
    assert ids(cache.gather(parent)[0]) == [0, 1, 2, 3, 4, 5, 200]
    assert ids(cache.gather(child)[0]) == [0, 1, 2, 3, 4, 5, 100]
    assert cache.pages(child)[0] == cache.pages(parent)[0] and cache.pages(child)[1] != cache.pages(parent)[1]
    cache.free(parent)
    cache.free(child)
    assert cache.allocator.free_pages == 8


def test_reserve_is_all_or_nothing():
    cache = PagedKVCache(3, 4, HK, D)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve([a], 8)
    with pytest.raises(OutOfPagesError):
        cache.reserve([a, b], 3)
    assert cache.length(a) == 8 and cache.length(b) == 0 and cache.allocator.free_pages == 1


def snapshot(cache):
    return ({s: (cache.length(s), cache.offset(s), cache.pages(s)) for s in cache.sequences},
            cache.allocator.free_pages)


@pytest.mark.parametrize("bad,error", [
    (lambda k, v: (k.astype(mx.float16), v), TypeError),
    (lambda k, v: (k[..., :4], v), ValueError),
    (lambda k, v: (k, v[:, :2]), ValueError),
    (lambda k, v: (k[:, :, :1], v[:, :, :1]), ValueError),
])
def test_a_bad_append_changes_nothing(bad, error):
    cache = PagedKVCache(6, 4, HK, D, dtype=mx.float32)
    a = cache.add_sequence()
    cache.append([a], *tokens(1, 3))
    before = snapshot(cache)
    with pytest.raises(error):
        cache.append([a], *bad(*tokens(1, 3, start=10)))
    assert snapshot(cache) == before


def test_negative_counts_are_refused_and_change_nothing():
    cache = PagedKVCache(6, 4, HK, D)
    a = cache.add_sequence()
    cache.reserve([a], 7)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="num_new must be >= 0; got -5"):
        cache.reserve([a], -5)
    with pytest.raises(ValueError, match="count must be >= 0; got -1"):
        cache.allocator.allocate(-1)
    assert snapshot(cache) == before


def test_one_reserve_for_forks_sharing_a_last_page_copies_it_for_all_holders_but_one():
    cache = PagedKVCache(3, 4, HK, D, dtype=mx.float32)
    a = cache.add_sequence()
    cache.append([a], *tokens(1, 6))
    b = cache.fork(a)
    table, before = cache.reserve([a, b], 1)  # 1 page free: b copies page 1, a writes into it
    assert cache.allocator.free_pages == 0 and before.tolist() == [6, 6]
    update_paged_kv_cache(cache.k_pools[0], cache.v_pools[0], *tokens(2, 1, start=100), table, before)
    assert ids(cache.gather(a)[0]) == [0, 1, 2, 3, 4, 5, 100]
    assert ids(cache.gather(b)[0]) == [0, 1, 2, 3, 4, 5, 101]
    c = cache.fork(b)  # c shares b's last page: b alone must copy it, b and c together copy it once
    with pytest.raises(OutOfPagesError):
        cache.reserve([b], 1)
    cache.free(a)
    cache.reserve([b, c], 1)
    assert cache.allocator.free_pages == 0 and cache.pages(b)[1] != cache.pages(c)[1]


def test_batch_of_different_lengths_gives_table_and_lengths_for_the_kernel():
    cache = PagedKVCache(16, 4, HK, D, num_layers=2)
    seqs = [cache.add_sequence() for _ in range(3)]
    for seq, n in zip(seqs, (1, 9, 4)):
        cache.reserve([seq], n)
    table, before = cache.reserve(seqs, 1)
    assert before.tolist() == [1, 9, 4] and cache.cache_seqlens(seqs).tolist() == [2, 10, 5]
    assert table.shape == (3, 3) and table[0, 1].item() == -1 and table[1, 2].item() >= 0
    assert len(cache.k_pools) == len(cache.v_pools) == 2
    assert cache.nbytes == 4 * 16 * 4 * HK * D * 2


def test_host_reservation_slots_and_device_table_follow_the_page_lists():
    """reserve_host / write_slots keep lengths and slots as ints; device_block_table is rebuilt only on page changes."""
    cache = PagedKVCache(16, 4, HK, D)
    a, b = cache.add_sequence(), cache.add_sequence()
    assert cache.reserve_host([a, b], 3) == [0, 0]
    table = cache.device_block_table([a, b])
    assert cache.reserve_host([a, b], 1) == [3, 3]  # fills page 0 of each: no new page
    assert cache.device_block_table([a, b]) is table
    np.testing.assert_array_equal(np.array(table), np.array(cache.block_table([a, b])))
    before = cache.reserve_host([a, b], 2)  # keys 4, 5: a second page each
    assert before == [4, 4]
    fresh = cache.device_block_table([a, b])
    assert fresh is not table and fresh.shape == (2, 2)
    np.testing.assert_array_equal(np.array(fresh), np.array(cache.block_table([a, b])))
    pages, rows = cache.write_slots([a, b], before, 2)
    assert pages == [cache.pages(a)[1]] * 2 + [cache.pages(b)[1]] * 2 and rows == [0, 1, 0, 1]
    child = cache.fork(a)  # shares a's half-full last page: the next write copies it
    cache.reserve_host([child], 1)
    assert cache.pages(child)[1] != cache.pages(a)[1]
    np.testing.assert_array_equal(np.array(cache.device_block_table([a, child])),
                                  np.array(cache.block_table([a, child])))
    cache.evict(a, SlidingWindow(1))
    np.testing.assert_array_equal(np.array(cache.device_block_table([a, b])), np.array(cache.block_table([a, b])))


@pytest.mark.parametrize("policy,expected", [
    (SlidingWindow(5), list(range(8, 14))),  # page-granular: positions 8..13 of 14 (page 2 and 3)
    (AttentionSinks(2, 5), [0, 1, 2, 3] + list(range(8, 14))),
])
def test_eviction_frees_whole_pages_the_policy_no_longer_needs(policy, expected):
    cache = PagedKVCache(8, 4, HK, D, dtype=mx.float32)
    seq = cache.add_sequence()
    cache.append([seq], *tokens(1, 14))
    kept = cache.evict(seq, policy)
    assert kept.tolist() == expected and ids(cache.gather(seq)[0]) == expected
    assert cache.allocator.free_pages == 8 - len(cache.pages(seq)) and cache.offset(seq) == 14
    cache.append([seq], *tokens(1, 1, start=50))  # appends after the kept keys
    assert ids(cache.gather(seq)[0]) == expected + [50]


def test_compact_eviction_keeps_exactly_the_heavy_hitters():
    cache = PagedKVCache(8, 4, HK, D, dtype=mx.float32, num_layers=2)
    seq = cache.add_sequence()
    table, before = cache.reserve([seq], 14)
    for layer in range(2):
        update_paged_kv_cache(cache.k_pools[layer], cache.v_pools[layer], *tokens(1, 14, start=layer * 100),
                              table, before)
    scores = np.zeros(14)
    scores[[1, 6, 9]] = [3.0, 2.0, 1.0]
    kept = cache.evict(seq, HeavyHitters(budget=5, recent=2), scores, compact=True)
    assert kept.tolist() == [1, 6, 9, 12, 13]
    assert ids(cache.gather(seq, 0)[0]) == [1, 6, 9, 12, 13]
    assert ids(cache.gather(seq, 1)[1]) == [-101, -106, -109, -112, -113]
    assert len(cache.pages(seq)) == 2 and cache.allocator.free_pages == 6


OPS = st.lists(st.tuples(st.sampled_from(["new", "append", "fork", "free", "evict", "compact"]), st.integers(0, 7),
                         st.integers(1, 9)), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_no_page_is_owned_twice_or_lost_and_every_sequence_reads_its_own_keys(ops):
    cache = PagedKVCache(12, 4, 1, 2, dtype=mx.float32)
    expected = {}  # sequence -> token ids it must read back
    next_token = 0
    for op, pick, count in ops:
        live = sorted(expected)
        seq = live[pick % len(live)] if live else None
        try:
            if op == "new" or seq is None:
                expected[cache.add_sequence()] = []
            elif op == "append":
                ids_ = np.arange(next_token, next_token + count, dtype=np.float32)
                next_token += count
                k = mx.broadcast_to(mx.array(ids_)[None, :, None, None], (1, count, 1, 2))
                cache.append([seq], k, -k)
                expected[seq] = expected[seq] + ids_.astype(int).tolist()
            elif op == "fork":
                expected[cache.fork(seq)] = list(expected[seq])
            elif op == "free":
                cache.free(seq)
                del expected[seq]
            elif op == "evict":
                kept = cache.evict(seq, SlidingWindow(count))
                expected[seq] = [expected[seq][i] for i in kept]
            else:
                length = cache.length(seq)
                scores = ((np.arange(length) * 7 + pick) % 5).astype(float)
                kept = cache.evict(seq, HeavyHitters(count, recent=1), scores, compact=True)
                assert len(kept) == min(count, length)
                expected[seq] = [expected[seq][i] for i in kept]
        except OutOfPagesError:
            pass
        holders = [p for s in cache.sequences for p in cache.pages(s)]
        counts = np.bincount(holders, minlength=12)
        for page in range(12):
            assert cache.allocator.refcount(page) == counts[page]
        assert cache.allocator.free_pages == int((counts == 0).sum())
        for s, want in expected.items():
            assert cache.length(s) == len(want) and len(cache.pages(s)) == -(-len(want) // 4)
            assert ids(cache.gather(s)[0]) == want
    for s in list(expected):
        cache.free(s)
    assert cache.allocator.free_pages == 12


def test_compacting_a_sequence_whose_pages_are_shared_fails_cleanly_when_the_pool_is_full():
    cache = PagedKVCache(4, 4, HK, D, dtype=mx.float32)
    seq = cache.add_sequence()
    cache.append([seq], *tokens(1, 12))
    child = cache.fork(seq)
    cache.reserve([cache.add_sequence()], 4)  # the last free page
    with pytest.raises(OutOfPagesError):
        cache.evict(child, HeavyHitters(budget=6, recent=1), np.arange(12.0), compact=True)
    assert cache.pages(child) == cache.pages(seq) and ids(cache.gather(child)[0]) == list(range(12))
    assert [cache.allocator.refcount(p) for p in cache.pages(seq)] == [2, 2, 2]
