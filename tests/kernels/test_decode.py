"""Decode attention (split-KV) over contiguous and paged caches: reference and kernel against float64."""

import math
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.kernels import catalog, decode_attention, launcher
from mlx_primitives.kernels.decode import _CALLS, bind_decode, unsupported
from mlx_primitives.kernels.decode_launch import MMA_CONFIG, _resident, geometry, num_splits, staging
from mlx_primitives.hardware import static_shared_memory
from mlx_primitives.attention.spec import describe_attention

from .helpers import assert_accurate, f64, random


def decode64(q, k, v, lengths, scale=None, window=(-1, 0), softcap=0.0, slopes=None, sinks=None):
    """Float64 NumPy decode attention over a contiguous cache: (out (B, Sq, Hq, D), lse (B, Hq, Sq))."""
    q, k, v = f64(q), f64(k), f64(v)
    batch, q_len, num_heads, head_dim = q.shape
    groups = num_heads // k.shape[2]
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    slopes = None if slopes is None else np.broadcast_to(f64(slopes), (batch, num_heads))
    out = np.zeros(q.shape)
    lse = np.full((batch, num_heads, q_len), -np.inf)
    left, right = window
    for b, length in enumerate(lengths):
        pos = length - q_len + np.arange(q_len)[:, None]
        keys = np.arange(length)[None, :]
        visible = np.ones((q_len, length), bool)
        if right >= 0:
            visible &= keys <= pos + right
        if left >= 0:
            visible &= keys >= pos - left
        for h in range(num_heads):
            kh, vh = k[b, :length, h // groups], v[b, :length, h // groups]
            s = q[b, :, h] @ kh.T * scale
            if softcap:
                s = softcap * np.tanh(s / softcap)
            if slopes is not None:
                s = s - slopes[b, h] * np.abs(pos - keys)
            s = np.where(visible, s, -np.inf)
            top = s.max(axis=1, initial=-np.inf)
            if sinks is not None:
                top = np.maximum(top, float(sinks[h]))
            seen = top > -np.inf
            safe = np.where(seen, top, 0.0)[:, None]
            p = np.exp(s - safe)
            denom = p.sum(axis=1) + (np.exp(float(sinks[h]) - safe[:, 0]) if sinks is not None else 0.0)
            ok = denom > 0
            out[b, :, h] = np.where(ok[:, None], p @ vh / np.where(ok, denom, 1.0)[:, None], 0.0)
            lse[b, h] = np.where(ok, safe[:, 0] + np.log(np.where(ok, denom, 1.0)), -np.inf)
    return out, lse


def naive(q, k, v, lengths, scale=None, window=(-1, 0), softcap=0.0, slopes=None, sinks=None):
    """The same attention in MLX ops in the input dtype: the error the tolerance rule compares with."""
    head_dim, num_heads, groups = q.shape[3], q.shape[2], q.shape[2] // k.shape[2]
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    outs = []
    for b, length in enumerate(lengths):
        qb = q[b].swapaxes(0, 1)  # (Hq, Sq, D)
        kb = mx.repeat(k[b, :length].swapaxes(0, 1), groups, axis=0)
        vb = mx.repeat(v[b, :length].swapaxes(0, 1), groups, axis=0)
        s = (qb * scale) @ kb.swapaxes(1, 2)
        if softcap:
            s = softcap * mx.tanh(s / softcap)
        pos = length - q.shape[1] + mx.arange(q.shape[1])[:, None]
        keys = mx.arange(length)[None, :]
        if slopes is not None:
            row = slopes if slopes.ndim == 1 else slopes[b]
            s = s - (row[:, None, None] * mx.abs(pos - keys)).astype(s.dtype)
        visible = mx.ones(s.shape[1:], mx.bool_)
        if window[1] >= 0:
            visible = visible & (keys <= pos + window[1])
        if window[0] >= 0:
            visible = visible & (keys >= pos - window[0])
        s = mx.where(visible, s, mx.array(-mx.inf, s.dtype))
        if sinks is not None:
            s = mx.concatenate([mx.broadcast_to(sinks.astype(s.dtype)[:, None, None], s.shape[:2] + (1,)), s], -1)
        p = mx.softmax(s, axis=-1)
        p = mx.where(mx.isnan(p), 0.0, p).astype(q.dtype)
        outs.append((p[..., 0 if sinks is None else 1:] @ vb).swapaxes(0, 1))
    return mx.stack(outs)


def cache_for(lengths, q_len, num_heads, num_kv_heads, head_dim, dtype, capacity=None):
    batch = len(lengths)
    capacity = capacity or max(lengths)
    q = random((batch, q_len, num_heads, head_dim), dtype)
    k = random((batch, capacity, num_kv_heads, head_dim), dtype)
    v = random((batch, capacity, num_kv_heads, head_dim), dtype)
    return q, k, v, mx.array(lengths, dtype=mx.int32)


def paged_from(k, v, lengths, page_size, rng):
    """The contiguous cache as a shuffled page pool: unused table slots hold -1 or a bogus id."""
    batch, capacity = k.shape[:2]
    max_pages = -(-capacity // page_size)
    pad = max_pages * page_size - capacity
    k, v = (mx.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (k, v))
    num_pages = batch * max_pages + 3
    order = rng.permutation(num_pages)[: batch * max_pages].reshape(batch, max_pages)
    pool_k = mx.zeros((num_pages, page_size) + k.shape[2:], k.dtype)
    pool_v = mx.zeros_like(pool_k)
    flat = mx.array(order.reshape(-1))
    pool_k[flat] = k.reshape(batch * max_pages, page_size, *k.shape[2:])
    pool_v[flat] = v.reshape(batch * max_pages, page_size, *k.shape[2:])
    table = order.copy()
    for b, length in enumerate(lengths):
        used = -(-length // page_size)
        table[b, used:] = -1 if b % 2 else 10**6
    return pool_k, pool_v, mx.array(table, dtype=mx.int32)


FEATURES = {
    "causal": {},
    "full": {"causal": False},
    "window": {"window_size": (40, 0)},
    "window_noncausal": {"causal": False, "window_size": (300, 2)},
    "softcap": {"softcap": 5.0},
    "alibi": {"alibi_slopes": "heads"},
    "alibi_batch": {"alibi_slopes": "batch"},
    "sinks": {"sinks": True},
}


def _options(name, batch, num_heads):
    options = dict(FEATURES[name])
    if options.get("alibi_slopes") == "heads":
        options["alibi_slopes"] = mx.random.uniform(0.0, 0.3, (num_heads,))
    elif options.get("alibi_slopes") == "batch":
        options["alibi_slopes"] = mx.random.uniform(0.0, 0.3, (batch, num_heads))
    if options.pop("sinks", False):
        options["sinks"] = mx.random.normal((num_heads,))
    return options


def _oracle_args(options):
    causal = options.get("causal", True)
    left, right = options.get("window_size", (-1, -1))
    right = (0 if right < 0 else min(right, 0)) if causal else right
    sinks = options.get("sinks")
    return dict(window=(left, right), softcap=options.get("softcap", 0.0), slopes=options.get("alibi_slopes"),
                sinks=None if sinks is None else np.array(sinks))


# ----------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("feature", sorted(FEATURES))
@pytest.mark.parametrize("q_len", [1, 3])
def test_reference_matches_float64(feature, q_len):
    lengths = [0, 2, 37, 90]
    q, k, v, seqlens = cache_for(lengths, q_len, 4, 2, 64, mx.float32, capacity=96)
    options = _options(feature, len(lengths), 4)
    out, lse = decode_attention(q, k, v, seqlens, return_lse=True, path="reference", **options)
    exact, exact_lse = decode64(q, k, v, lengths, **_oracle_args(options))
    assert out.shape == (4, q_len, 4, 64) and lse.shape == (4, 4, q_len)
    np.testing.assert_allclose(f64(out), exact, atol=2e-5)
    np.testing.assert_allclose(np.array(lse), exact_lse, atol=2e-5)


def test_rows_without_keys_are_zero_with_lse_minus_inf():
    q, k, v, seqlens = cache_for([0, 2], 4, 2, 1, 64, mx.float32, capacity=8)
    out, lse = decode_attention(q, k, v, seqlens, return_lse=True, path="reference")
    assert np.all(np.array(out[0]) == 0) and np.all(np.array(lse[0]) == -np.inf)
    assert np.all(np.array(out[1, :2]) == 0) and np.all(np.isfinite(np.array(lse[1, :, 2:])))


@pytest.mark.parametrize("page_size", [4, 16])
def test_paged_equals_contiguous_on_the_reference_path(page_size):
    lengths = [5, 33, 64]
    q, k, v, seqlens = cache_for(lengths, 2, 4, 2, 64, mx.float16, capacity=64)
    pool_k, pool_v, table = paged_from(k, v, lengths, page_size, np.random.default_rng(page_size))
    contiguous = decode_attention(q, k, v, seqlens, path="reference")
    paged = decode_attention(q, pool_k, pool_v, seqlens, block_table=table, path="reference")
    np.testing.assert_array_equal(np.array(paged), np.array(contiguous))


def test_gradients_flow_through_the_reference():
    q, k, v, seqlens = cache_for([3, 9], 1, 4, 2, 64, mx.float32)
    grad = mx.grad(lambda q: decode_attention(q, k, v, seqlens).sum())(q)
    assert grad.shape == q.shape and bool(mx.all(mx.isfinite(grad)))


@pytest.mark.parametrize(
    "change, error, words",
    [
        ({"cache_seqlens": mx.zeros((2,), mx.float32)}, TypeError, "cache_seqlens"),
        ({"cache_seqlens": mx.zeros((3,), mx.int32)}, ValueError, "cache_seqlens"),
        ({"k_cache": mx.zeros((3, 16, 2, 64), mx.float16)}, ValueError, "k_cache"),
        ({"v_cache": mx.zeros((2, 8, 2, 64), mx.float16)}, ValueError, "v_cache"),
        ({"k_cache": mx.zeros((2, 16, 2, 64), mx.float32)}, TypeError, "k_cache"),
        ({"k_cache": mx.zeros((2, 16, 3, 64), mx.float16), "v_cache": mx.zeros((2, 16, 3, 64), mx.float16)},
         ValueError, "num_kv_heads"),
        ({"q": mx.zeros((2, 4, 64), mx.float16)}, ValueError, "q must"),
        ({"block_table": mx.zeros((2, 4), mx.float32)}, TypeError, "block_table"),
        ({"block_table": mx.zeros((3, 4), mx.int32)}, ValueError, "block_table"),
        ({"alibi_slopes": mx.zeros((3,))}, ValueError, "alibi_slopes"),
        ({"window_size": (-2, 0)}, ValueError, "window_size"),
        ({"path": "fast"}, ValueError, "path"),
        ({"cache_seqlens": mx.array([3, 17], mx.int32), "path": "reference"}, ValueError, "cache_seqlens[1]"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(change, error, words):
    args = {
        "q": mx.zeros((2, 1, 4, 64), mx.float16),
        "k_cache": mx.zeros((2, 16, 2, 64), mx.float16),
        "v_cache": mx.zeros((2, 16, 2, 64), mx.float16),
        "cache_seqlens": mx.array([3, 4], mx.int32),
    }
    args.update(change)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        out = decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("cache_seqlens"),
                               **args)
        mx.eval(out)


def test_reference_rejects_a_page_outside_the_pool_within_the_length():
    q, k, v, seqlens = cache_for([20, 4], 1, 4, 2, 64, mx.float16, capacity=32)
    pool_k, pool_v, table = paged_from(k, v, [20, 4], 16, np.random.default_rng(0))
    table = np.array(table)
    table[0, 1] = pool_k.shape[0]
    with pytest.raises(ValueError, match=r"block_table\[0\]"):
        decode_attention(q, pool_k, pool_v, seqlens, block_table=mx.array(table), path="reference")


def test_split_count_fills_the_gpu_and_keeps_chunks_long():
    spec = describe_attention(mx.zeros((1, 1, 32, 128)), mx.zeros((1, 4096, 8, 128)), mx.zeros((1, 4096, 8, 128)),
                              layout="BSHD")
    slots = 132 * _resident(128, 192)
    splits = num_splits(spec, 4096, 256, 128, 192)
    assert 8 <= splits <= 16  # 4096 keys in chunks of at least 256, most of them
    assert num_splits(spec, 100, 256, 128, 192) == 1
    big = describe_attention(mx.zeros((32, 1, 32, 128)), mx.zeros((32, 8, 8, 128)), mx.zeros((32, 8, 8, 128)),
                             layout="BSHD")
    assert num_splits(big, 32768, 256, 128, 192) == 1  # 256 (batch, kv head) groups already fill the slots
    mid = describe_attention(mx.zeros((8, 1, 32, 128)), mx.zeros((8, 8, 8, 128)), mx.zeros((8, 8, 8, 128)),
                             layout="BSHD")
    waves = 64 * num_splits(mid, 32768, 256, 128, 192) / slots
    assert waves / math.ceil(waves) >= 0.85  # the last wave of threadgroups is nearly full


@pytest.mark.parametrize("threads, head_dim, rows", [(64, 128, 4), (128, 128, 4), (128, 256, 8), (256, 256, 4)])
@pytest.mark.parametrize("backend", ["cuda", "metal"])
def test_staging_fits_shared_memory(threads, head_dim, rows, backend):
    ch = 2
    used_threads, kb, stages = staging(threads, ch, head_dim, rows, backend)
    stage_bytes = 2 * stages * kb * ch * used_threads * 16
    reductions = 4 * (used_threads // 32) * (head_dim + 2 * rows)
    assert stages >= 2 and stage_bytes + reductions <= static_shared_memory(backend)
    assert used_threads == threads or backend == "metal"


@pytest.mark.parametrize("dtype, head_dim, bits, config, mma", [
    (mx.float16, 128, 8, {}, 1), (mx.float16, 64, 4, {}, 1), (mx.float16, 128, 8, {"MMA": 0}, 0),
    (mx.bfloat16, 128, 8, {}, 0), (mx.float16, 96, 8, {}, 0), (mx.float16, 128, 2, {}, 0), (mx.float16, 256, 8, {}, 0),
])
def test_quantized_caches_take_the_matrix_unit_where_it_reads_them(dtype, head_dim, bits, config, mma):
    q, view = mx.zeros((2, 1, 32, head_dim), dtype), mx.zeros((2, 64, 8, head_dim), dtype)
    spec = describe_attention(q, view, view, layout="BSHD", causal=True)
    chosen = {**catalog.DEFAULTS["decode_attention"], **config}
    assert geometry(spec, chosen, "cuda", bits)["MMA"] == mma
    assert geometry(spec, chosen, "metal", bits)["MMA"] == 0
    if mma:  # two warps a group, several stages beside the dequantized tiles in 48 KiB
        shape = geometry(spec, chosen, "cuda", bits)
        stages = 2 * shape["STAGES"] * shape["THREADS"] // 2 * (head_dim // 16 + 1) * 2 * bits
        tiles = max(shape["THREADS"] // 32 * 16 * (head_dim + 8) * 2, 16 * head_dim * 4)
        assert shape["THREADS"] == 64 and shape["STAGES"] >= 3 and stages + tiles <= static_shared_memory("cuda")


@pytest.mark.parametrize("group_size, bits", [(32, 8), (64, 8), (128, 4), (64, 4)])
def test_quantized_cache_is_attended_as_its_dequantized_values(group_size, bits):
    lengths = [5, 40, 64]
    q, k, v, seqlens = cache_for(lengths, 2, 4, 2, 128, mx.float16, capacity=64)
    kq, vq = (tuple(mx.quantize(x, group_size=group_size, bits=bits)) for x in (k, v))
    out = decode_attention(q, kq, vq, seqlens, quantization=(group_size, bits), path="reference")
    kd, vd = (mx.dequantize(*x, group_size=group_size, bits=bits) for x in (kq, vq))
    assert_accurate(out, naive(q, kd, vd, lengths), decode64(q, kd, vd, lengths)[0], mx.float16)
    exact = decode64(q, k, v, lengths)[0].reshape(-1)
    cos = float(np.dot(f64(out).reshape(-1), exact) / np.linalg.norm(f64(out)) / np.linalg.norm(exact))
    assert cos >= (0.999 if bits == 8 else 0.99)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"quantization": None}, "quantization must be"),
        ({"quantization": (48, 8)}, "quantization must be"),
        ({"quantization": (64, 4)}, r"k_cache\[0\] must hold"),
        ({"v_cache": "plain"}, "v_cache must be a"),
        ({"scales": mx.zeros((2, 16, 2, 3), mx.float16)}, r"k_cache\[1\]"),
    ],
)
def test_quantized_cache_arguments_are_checked(change, words):
    q, k, v, seqlens = cache_for([3, 9], 1, 4, 2, 128, mx.float16, capacity=16)
    kq, vq = (tuple(mx.quantize(x, group_size=64, bits=8)) for x in (k, v))
    if "scales" in change:
        kq = (kq[0], change["scales"], kq[2])
    if change.get("v_cache") == "plain":
        vq = v
    with pytest.raises(ValueError, match=words):
        decode_attention(q, kq, vq, seqlens, quantization=change.get("quantization", (64, 8)))


def test_bound_call_equals_decode_attention_for_every_layer_and_other_shapes():
    """bind_decode: validated once, then each layer's arrays; other shapes go through decode_attention."""
    lengths = [5, 33]
    q, k, v, seqlens = cache_for(lengths, 1, 4, 2, 64, mx.float32, capacity=64)
    pool_k, pool_v, table = paged_from(k, v, lengths, 16, np.random.default_rng(0))
    call = bind_decode(q, pool_k, pool_v, seqlens, block_table=table, softmax_scale=0.3, softcap=2.0)
    for layer in range(2):  # another layer: fresh queries and pools of the bound shapes
        q2, pool_k2, pool_v2 = q * (layer + 1), pool_k - layer, pool_v + layer
        expected = decode_attention(q2, pool_k2, pool_v2, seqlens, block_table=table, softmax_scale=0.3, softcap=2.0)
        np.testing.assert_array_equal(np.array(call(q2, pool_k2, pool_v2)), np.array(expected))
    wider = mx.concatenate([q, q], axis=2)  # 8 heads: not the bound shape
    expected = decode_attention(wider, pool_k, pool_v, seqlens, block_table=table, softmax_scale=0.3, softcap=2.0)
    np.testing.assert_array_equal(np.array(call(wider, pool_k, pool_v)), np.array(expected))
    exact, _ = decode64(q, k, v, lengths, scale=0.3, softcap=2.0)
    np.testing.assert_allclose(np.array(call(q, pool_k, pool_v)), exact, atol=1e-5)
    with pytest.raises(ValueError, match="softcap"):
        bind_decode(q, pool_k, pool_v, seqlens, block_table=table, softcap=-1.0)


def test_calls_are_memoized_per_signature_and_still_validated():
    q, k, v, seqlens = cache_for([3, 9], 1, 4, 2, 64, mx.float32)
    first = decode_attention(q, k, v, seqlens)
    assert len(_CALLS) >= 1
    again = decode_attention(q, k, v, seqlens)
    np.testing.assert_array_equal(np.array(first), np.array(again))
    windowed = decode_attention(q, k, v, seqlens, window_size=(2, 0))
    assert not np.allclose(np.array(first), np.array(windowed))
    for _ in range(2):
        with pytest.raises(ValueError, match="softcap"):
            decode_attention(q, k, v, seqlens, softcap=-1.0)
        with pytest.raises(ValueError, match=r"cache_seqlens\[1\]"):
            mx.eval(decode_attention(q, k, v, mx.array([3, 99], mx.int32)))


def test_kernel_takes_power_of_two_pages_and_short_queries():
    spec = describe_attention(mx.zeros((1, 1, 4, 128)), mx.zeros((1, 8, 2, 128)), mx.zeros((1, 8, 2, 128)),
                              layout="BSHD")
    assert unsupported(spec, 64) is None and unsupported(spec) is None
    assert "power of two" in unsupported(spec, 48)
    long_q = describe_attention(mx.zeros((1, 17, 4, 128)), mx.zeros((1, 8, 2, 128)), mx.zeros((1, 8, 2, 128)),
                                layout="BSHD")
    assert "seqlen_q" in unsupported(long_q)


def test_decode_kernels_are_in_the_catalog_with_defaults():
    assert catalog.DECODE in catalog.KERNELS and catalog.DECODE_COMBINE in catalog.KERNELS
    assert catalog.DEFAULTS["decode_attention"] in catalog.DECODE.configs()


# ----------------------------------------------------------------------------------------- GPU


@pytest.fixture
def kernel_runs():
    """Fails the test if a decode kernel fell back to the reference (warning or failed launch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield
    failed = [key for key, ok in launcher._verified.items() if key[1].name.startswith("decode_attention") and not ok]
    assert not failed and not any(name.startswith("decode_attention") for name in launcher._warned)


GPU_LENGTHS = [1, 17, 1000, 4097]


def _check_kernel(q, k, v, seqlens, lengths, dtype, **options):
    out, lse = decode_attention(q, k, v, seqlens, return_lse=True, path="kernel", **options)
    exact, exact_lse = decode64(q, k, v, lengths, **_oracle_args(options))
    base = naive(q, k, v, lengths, **{key: val for key, val in _oracle_args(options).items()
                                       if key != "sinks"}, sinks=options.get("sinks"))
    assert_accurate(out, base, exact, dtype)
    finite = np.isfinite(exact_lse)
    assert np.array_equal(np.isfinite(np.array(lse)), finite)
    np.testing.assert_allclose(np.array(lse)[finite], exact_lse[finite], atol=1e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("q_len, groups", [(1, 1), (1, 4), (4, 8), (4, 1)])
def test_kernel_matches_float64(kernel_runs, dtype, head_dim, q_len, groups):
    q, k, v, seqlens = cache_for(GPU_LENGTHS, q_len, 2 * groups, 2, head_dim, dtype)
    _check_kernel(q, k, v, seqlens, GPU_LENGTHS, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_kernel_features_match_float64(kernel_runs, feature):
    q, k, v, seqlens = cache_for(GPU_LENGTHS, 4, 8, 2, 128, mx.float16)
    _check_kernel(q, k, v, seqlens, GPU_LENGTHS, mx.float16, **_options(feature, len(GPU_LENGTHS), 8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, head_dim", [(mx.float16, 80), (mx.bfloat16, 96), (mx.float32, 128), (mx.float32, 80)])
def test_kernel_other_head_dims_and_float32(kernel_runs, dtype, head_dim):
    q, k, v, seqlens = cache_for(GPU_LENGTHS, 2, 8, 2, head_dim, dtype)
    _check_kernel(q, k, v, seqlens, GPU_LENGTHS, dtype)


@pytest.mark.gpu
def test_kernel_long_query_rows_take_several_row_blocks(kernel_runs):
    q, k, v, seqlens = cache_for([700, 33], 16, 16, 2, 128, mx.float16)
    _check_kernel(q, k, v, seqlens, [700, 33], mx.float16, softcap=20.0)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [{"THREADS": 64, "SPLIT": 128, "CHUNKS": 1}, {"THREADS": 256, "SPLIT": 512},
                                    {"THREADS": 128, "CHUNKS": 1}])
def test_kernel_configs_agree(kernel_runs, config):
    q, k, v, seqlens = cache_for(GPU_LENGTHS, 1, 8, 2, 128, mx.float16)
    out = decode_attention(q, k, v, seqlens, path="kernel", config=config)
    assert_accurate(out, naive(q, k, v, GPU_LENGTHS), decode64(q, k, v, GPU_LENGTHS)[0], mx.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_kernel_matrix_unit_path_features_match_float64(kernel_runs, feature):
    q, k, v, seqlens = cache_for(GPU_LENGTHS, 4, 8, 2, 128, mx.float16)
    _check_kernel(q, k, v, seqlens, GPU_LENGTHS, mx.float16, config=MMA_CONFIG, **_options(feature, 4, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("threads", [32, 128])
@pytest.mark.parametrize("dtype, head_dim, q_len, groups", [(mx.float16, 128, 1, 4), (mx.bfloat16, 80, 1, 4),
                                                            (mx.float16, 64, 16, 2), (mx.bfloat16, 96, 3, 8)])
def test_kernel_matrix_unit_path_matches_float64(kernel_runs, threads, dtype, head_dim, q_len, groups):
    q, k, v, seqlens = cache_for(GPU_LENGTHS, q_len, 2 * groups, 2, head_dim, dtype)
    _check_kernel(q, k, v, seqlens, GPU_LENGTHS, dtype, config=dict(MMA_CONFIG, THREADS=threads))


@pytest.mark.gpu
def test_kernel_matrix_unit_path_paged_equals_contiguous(kernel_runs):
    lengths = [1, 17, 1000, 4097]
    q, k, v, seqlens = cache_for(lengths, 2, 8, 2, 128, mx.float16, capacity=4112)
    pool_k, pool_v, table = paged_from(k, v, lengths, 16, np.random.default_rng(3))
    contiguous = decode_attention(q, k, v, seqlens, path="kernel", config=MMA_CONFIG)
    paged = decode_attention(q, pool_k, pool_v, seqlens, block_table=table, path="kernel", config=MMA_CONFIG)
    np.testing.assert_array_equal(np.array(paged), np.array(contiguous))


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 64, 256])
def test_kernel_paged_equals_contiguous(kernel_runs, page_size):
    lengths = [1, 17, 1000, 4097]
    capacity = -(-max(lengths) // page_size) * page_size  # same capacity, so the same split of the keys
    q, k, v, seqlens = cache_for(lengths, 4, 8, 2, 128, mx.float16, capacity=capacity)
    pool_k, pool_v, table = paged_from(k, v, lengths, page_size, np.random.default_rng(page_size))
    contiguous, lse = decode_attention(q, k, v, seqlens, return_lse=True, path="kernel")
    paged, paged_lse = decode_attention(q, pool_k, pool_v, seqlens, block_table=table, return_lse=True, path="kernel")
    np.testing.assert_array_equal(np.array(paged), np.array(contiguous))
    np.testing.assert_array_equal(np.array(paged_lse), np.array(lse))
    assert_accurate(paged, naive(q, k, v, lengths), decode64(q, k, v, lengths)[0], mx.float16)


@pytest.mark.gpu
def test_kernel_skips_pages_outside_the_pool_and_clamps_lengths(kernel_runs):
    lengths = [40, 64]
    q, k, v, seqlens = cache_for(lengths, 1, 4, 2, 64, mx.float16, capacity=64)
    pool_k, pool_v, table = paged_from(k, v, lengths, 16, np.random.default_rng(1))
    table = np.array(table)
    table[0, 1] = -7  # keys 16..31 of sequence 0 are not in the pool: never read, masked
    out = decode_attention(q, pool_k, pool_v, mx.array([40, 10**6], mx.int32), block_table=mx.array(table),
                           path="kernel")
    kept = mx.concatenate([k[:1, :16], k[:1, 32:40]], axis=1)
    kept_v = mx.concatenate([v[:1, :16], v[:1, 32:40]], axis=1)
    first = decode64(q[:1], kept, kept_v, [24], window=(-1, -1))[0]
    assert_accurate(out[:1], naive(q[:1], kept, kept_v, [24], window=(-1, -1)), first, mx.float16)
    assert_accurate(out[1:], naive(q[1:], k[1:], v[1:], [64]), decode64(q[1:], k[1:], v[1:], [64])[0], mx.float16)


def _quantized(k, v, group_size, bits):
    """``mx.quantize`` of a cache and its dequantized values (what the kernel must attend)."""
    kq, vq = (tuple(mx.quantize(x, group_size=group_size, bits=bits)) for x in (k, v))
    kd, vd = (mx.dequantize(*x, group_size=group_size, bits=bits) for x in (kq, vq))
    return kq, vq, kd, vd


QUANTIZED_SHAPES = [(mx.float16, 128, 1, 4), (mx.bfloat16, 64, 4, 8), (mx.float16, 256, 1, 1)]  # dtype, D, Sq, groups


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size, dtype, head_dim, q_len, groups",
                         [(g, *shape) for g in (32, 64, 128) for shape in QUANTIZED_SHAPES if shape[1] % g == 0])
def test_kernel_reads_quantized_caches_in_place(kernel_runs, bits, group_size, dtype, head_dim, q_len, groups):
    q, k, v, seqlens = cache_for(GPU_LENGTHS, q_len, 2 * groups, 2, head_dim, dtype)
    kq, vq, kd, vd = _quantized(k, v, group_size, bits)
    out, lse = decode_attention(q, kq, vq, seqlens, quantization=(group_size, bits), return_lse=True, path="kernel")
    exact, exact_lse = decode64(q, kd, vd, GPU_LENGTHS)
    assert_accurate(out, naive(q, kd, vd, GPU_LENGTHS), exact, dtype)
    np.testing.assert_allclose(np.array(lse), exact_lse, atol=1e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["window", "softcap", "alibi_batch", "sinks"])
def test_kernel_quantized_cache_features(kernel_runs, feature):
    q, k, v, seqlens = cache_for(GPU_LENGTHS, 2, 8, 2, 128, mx.float16)
    kq, vq, kd, vd = _quantized(k, v, 64, 8)
    options = _options(feature, len(GPU_LENGTHS), 8)
    out = decode_attention(q, kq, vq, seqlens, quantization=(64, 8), path="kernel", **options)
    exact = decode64(q, kd, vd, GPU_LENGTHS, **_oracle_args(options))[0]
    base = naive(q, kd, vd, GPU_LENGTHS, **{key: val for key, val in _oracle_args(options).items() if key != "sinks"},
                 sinks=options.get("sinks"))
    assert_accurate(out, base, exact, mx.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_kernel_paged_quantized_equals_contiguous(kernel_runs, bits):
    lengths, page_size = [5, 300, 1000], 64
    q, k, v, seqlens = cache_for(lengths, 1, 8, 2, 128, mx.float16, capacity=1024)
    kq, vq, kd, vd = _quantized(k, v, 32, bits)
    pool_k, pool_v, table = paged_from(k, v, lengths, page_size, np.random.default_rng(bits))
    pool_kq, pool_vq = (tuple(mx.quantize(x, group_size=32, bits=bits)) for x in (pool_k, pool_v))
    contiguous = decode_attention(q, kq, vq, seqlens, quantization=(32, bits), path="kernel")
    paged = decode_attention(q, pool_kq, pool_vq, seqlens, block_table=table, quantization=(32, bits), path="kernel")
    np.testing.assert_array_equal(np.array(paged), np.array(contiguous))
    assert_accurate(paged, naive(q, kd, vd, lengths), decode64(q, kd, vd, lengths)[0], mx.float16)


def test_quantized_calls_are_memoized_and_other_widths_are_dequantized():
    q, k, v, seqlens = cache_for([3, 9], 1, 4, 2, 64, mx.float32)
    _CALLS.clear()
    for bits in (8, 8, 3):
        kq, vq, kd, vd = _quantized(k, v, 32, bits)
        out = decode_attention(q, kq, vq, seqlens, quantization=(32, bits))
        assert_accurate(out, naive(q, kd, vd, [3, 9]), decode64(q, kd, vd, [3, 9])[0], mx.float32)
    assert len(_CALLS) == 2  # 8 bits once (memoized), 3 bits as a float cache
