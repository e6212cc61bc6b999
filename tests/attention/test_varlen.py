"""flash_attn_varlen_func: packed sequences, each attending only within itself, against per-sequence float64."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import (
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from mlx_primitives.attention.dropout import draw_seed, keep_mask
from tests.reference import (
    DTYPES,
    FEATURE_SETS,
    Features,
    assert_within_rule,
    attention64,
    draw_features,
    f64,
    naive_attention,
)

PATHS = ["reference", "auto"]
LENGTHS = {
    "mixed": ([3, 7, 1, 5], [6, 2, 4, 5]),  # Sq < Sk and Sq > Sk within one batch
    "equal": ([4, 4], [4, 4]),
    "empty_q": ([2, 0, 3], [3, 4, 3]),
}


def pack(lengths, heads, dim, dtype):
    x = mx.random.normal((sum(lengths), heads, dim)).astype(dtype)
    cu = mx.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return x, cu


def per_sequence_check(out, lse, q, k, v, q_lens, k_lens, f_of_seq):
    """Each sequence's slice of out/lse against the float64 oracle of that sequence alone."""
    dtype = q.dtype
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(q_lens, k_lens)):
        qs, ks = slice(q0, q0 + lq), slice(k0, k0 + lk)
        q0, k0 = q0 + lq, k0 + lk
        if lq == 0:
            continue
        if lk == 0:  # no keys at all: zeros and lse = -inf, exactly
            assert (f64(out[qs]) == 0).all()
            assert lse is None or np.isneginf(f64(lse[:, qs])).all()
            continue
        qb, kb, vb = (x[None].swapaxes(1, 2) for x in (q[qs], k[ks], v[ks]))
        f = f_of_seq(b)
        ref = attention64(f64(qb), f64(kb), f64(vb), f)
        naive_out, naive_lse, _ = naive_attention(qb, kb, vb, f)
        assert_within_rule(out[qs][None].swapaxes(1, 2), ref["out"], naive_out, dtype, f"out of sequence {b}")
        if lse is not None:
            assert_within_rule(lse[:, qs][None], ref["lse"], naive_lse, dtype, f"lse of sequence {b}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "causal_sinks", "everything"])
def test_each_packed_sequence_equals_its_own_attention(feature, dtype, lengths, path):
    q_lens, k_lens = LENGTHS[lengths]
    heads, kv_heads, dim = 4, 2, 32
    q, cu_q = pack(q_lens, heads, dim, DTYPES[dtype])
    k, cu_k = pack(k_lens, kv_heads, dim, DTYPES[dtype])
    v, _ = pack(k_lens, kv_heads, dim, DTYPES[dtype])
    spec = FEATURE_SETS[feature]
    kwargs, f = draw_features(spec, len(q_lens), heads)  # alibi "BH" -> one row of slopes per sequence

    def f_of_seq(b):
        fb = Features(**vars(f))
        if f.alibi_slopes is not None and f.alibi_slopes.ndim == 2:
            fb.alibi_slopes = f.alibi_slopes[b]
        return fb

    out, lse, probs = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), return_attn_probs=True, path=path, **kwargs
    )
    assert out.shape == (sum(q_lens), heads, dim) and out.dtype == q.dtype
    assert lse.shape == (heads, sum(q_lens)) and lse.dtype == mx.float32
    assert probs is None
    per_sequence_check(out, lse, q, k, v, q_lens, k_lens, f_of_seq)
    plain = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), path=path, **kwargs)
    per_sequence_check(plain, None, q, k, v, q_lens, k_lens, f_of_seq)  # may take another path than with lse


@pytest.mark.parametrize("path", PATHS)
def test_no_attention_across_sequence_boundaries(path):
    q_lens, k_lens = [4, 5, 3], [6, 5, 2]
    q, cu_q = pack(q_lens, 2, 32, mx.float32)
    k, cu_k = pack(k_lens, 2, 32, mx.float32)
    v, _ = pack(k_lens, 2, 32, mx.float32)
    base = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, path=path)
    # Perturb sequence 1's keys and values: only sequence 1's outputs may move.
    k2, v2 = mx.array(k), mx.array(v)
    k2[6:11] = k2[6:11] * 3.0
    v2[6:11] = v2[6:11] + 5.0
    moved = mx.abs(flash_attn_varlen_func(q, k2, v2, cu_q, cu_k, 5, 6, path=path) - base).max(axis=(1, 2))
    assert moved[:4].max().item() == 0 and moved[9:].max().item() == 0
    assert moved[4:9].min().item() > 0.1


@pytest.mark.parametrize("path", PATHS)
def test_sequences_with_no_keys_give_zeros_and_minus_inf_lse(path):
    q, cu_q = pack([3, 2], 2, 32, mx.float32)
    k, cu_k = pack([0, 4], 2, 32, mx.float32)
    v, _ = pack([0, 4], 2, 32, mx.float32)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 4, return_attn_probs=True, path=path)
    assert (f64(out[:3]) == 0).all() and np.isneginf(f64(lse[:, :3])).all()
    per_sequence_check(out, lse, q, k, v, [3, 2], [0, 4], lambda b: Features())


@pytest.mark.parametrize("path", PATHS)
def test_varlen_equals_batched_flash_attn_for_equal_lengths(path):
    batch, length, heads = 3, 6, 4
    kwargs, _ = draw_features(FEATURE_SETS["everything"], batch, heads)
    q = mx.random.normal((batch, length, heads, 32))
    k = mx.random.normal((batch, length, 2, 32))
    v = mx.random.normal((batch, length, 2, 32))
    cu = mx.array([0, 6, 12, 18], dtype=mx.int32)
    flat = [x.reshape(batch * length, x.shape[2], 32) for x in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu, cu, length, length, path=path, **kwargs)
    dense = flash_attn_func(q, k, v, path=path, **kwargs)
    assert mx.allclose(out.reshape(dense.shape), dense, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_varlen_dropout_uses_the_sequence_index_as_batch_counter(path):
    q_lens, k_lens, heads, p = [3, 5], [4, 6], 2, 0.3
    q, cu_q = pack(q_lens, heads, 16, mx.float32)
    k, cu_k = pack(k_lens, heads, 16, mx.float32)
    v, _ = pack(k_lens, heads, 16, mx.float32)
    key = mx.random.key(12)
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, dropout_p=p, dropout_key=key, path=path)
    assert mx.array_equal(out, flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, dropout_p=p, dropout_key=key))
    seed = draw_seed(key)

    def f_of_seq(b):
        bh = (b * heads + mx.arange(heads, dtype=mx.uint32))[None, :, None, None]
        rows = mx.arange(q_lens[b], dtype=mx.uint32)[:, None]
        cols = mx.arange(k_lens[b], dtype=mx.uint32)[None, :]
        return Features(keep=np.array(keep_mask(seed, bh, rows, cols, p)), dropout_p=p)

    per_sequence_check(out, None, q, k, v, q_lens, k_lens, f_of_seq)


@pytest.mark.parametrize("path", PATHS)
def test_varlen_gradients_match_per_sequence_float64(path):
    q_lens, k_lens, heads = [3, 5], [4, 2], 4
    q, cu_q = pack(q_lens, heads, 16, mx.float32)
    k, cu_k = pack(k_lens, 2, 16, mx.float32)
    v, _ = pack(k_lens, 2, 16, mx.float32)
    w = mx.random.normal(q.shape)

    def loss(q, k, v):
        return (flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 4, causal=True, softcap=2.0, path=path) * w).sum()

    dq, dk, dv = mx.grad(loss, argnums=(0, 1, 2))(q, k, v)
    assert not any(mx.isnan(g).any() for g in (dq, dk, dv))
    f = Features(causal=True, softcap=2.0)
    q0 = k0 = 0
    for lq, lk in zip(q_lens, k_lens):
        qs, ks = slice(q0, q0 + lq), slice(k0, k0 + lk)
        q0, k0 = q0 + lq, k0 + lk
        qb, kb, vb, wb = (f64(x[None]).swapaxes(1, 2) for x in (q[qs], k[ks], v[ks], w[qs]))
        ref = attention64(qb, kb, vb, f, grad_out=wb)
        for ours, name in ((dq[qs], "dq"), (dk[ks], "dk"), (dv[ks], "dv")):
            np.testing.assert_allclose(f64(ours[None]).swapaxes(1, 2), ref[name], atol=2e-5)


def test_int64_offsets_and_numpy_lengths_are_accepted():
    """Offsets built with NumPy (int64) and NumPy ints for the maxima give the int32 call's output."""
    q, cu_q = pack([3, 5], 2, 16, mx.float32)
    k, cu_k = pack([4, 2], 2, 16, mx.float32)
    v, _ = pack([4, 2], 2, 16, mx.float32)
    expected = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 4, causal=True)
    out = flash_attn_varlen_func(q, k, v, cu_q.astype(mx.int64), mx.array(np.cumsum([0, 4, 2])), np.int64(5),
                                 np.int32(4), causal=True)
    assert mx.array_equal(out, expected)
    per_sequence_check(out, None, q, k, v, [3, 5], [4, 2], lambda b: Features(causal=True))


def test_packed_varlen_functions_equal_the_unpacked_call():
    """flash-attn's varlen qkv/kv-packed spellings: (total, 3 or 2, heads, dim) split on axis 1."""
    lengths = [3, 6, 2]
    qkv, cu = pack(lengths, 3 * 2, 16, mx.float32)
    qkv = qkv.reshape(-1, 3, 2, 16)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    out, lse, _ = flash_attn_varlen_qkvpacked_func(qkv, cu, 6, causal=True, softcap=3.0, return_attn_probs=True)
    expected, expected_lse, _ = flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, causal=True, softcap=3.0,
                                                       return_attn_probs=True)
    assert mx.array_equal(out, expected) and mx.array_equal(lse, expected_lse)
    per_sequence_check(out, lse, q, k, v, lengths, lengths, lambda b: Features(causal=True, softcap=3.0))
    kv = mx.stack([k[:, :1], v[:, :1]], axis=1)  # MQA: one KV head
    out = flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 6, 6, window_size=(2, 0))
    assert mx.array_equal(out, flash_attn_varlen_func(q, k[:, :1], v[:, :1], cu, cu, 6, 6, window_size=(2, 0)))
    with pytest.raises(ValueError, match=r"qkv must have shape \(total, 3, nheads, headdim\)"):
        flash_attn_varlen_qkvpacked_func(qkv[:, :2], cu, 6)
    with pytest.raises(TypeError, match=r"kv must be an mx.array of shape \(total_k, 2, nheads_k, headdim\)"):
        flash_attn_varlen_kvpacked_func(q, [k, v], cu, cu, 6, 6)


def test_offsets_traced_by_compile_are_refused_by_name():
    """cu_seqlens splits the sequences on the host: a traced one is an error naming it; a captured one compiles."""
    q, cu = pack([4, 6], 2, 16, mx.float32)
    with pytest.raises(ValueError, match="cu_seqlens_q is read on the host"):
        mx.compile(lambda q, cu: flash_attn_varlen_func(q, q, q, cu, cu, 6, 6))(q, cu)
    compiled = mx.compile(lambda q: flash_attn_varlen_func(q, q, q, cu, cu, 6, 6))
    assert mx.allclose(compiled(q), flash_attn_varlen_func(q, q, q, cu, cu, 6, 6), atol=1e-6)
