"""Attention dropout: counter-based, reproducible from a key, mean-preserving, and exactly the keep mask
the library exposes (``keep_mask``, and negated weights in ``return_attn_probs``)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import FlashAttention, flash_attention, flash_attn_func
from mlx_primitives.attention.dropout import draw_seed, keep_mask, keep_threshold
from tests.reference import (
    DTYPES,
    FEATURE_SETS,
    assert_within_rule,
    attention64,
    check_against_reference,
    draw_features,
    f64,
    naive_attention,
    random_qkv,
)

PATHS = ["reference", "auto"]


def kernel_fmix32(x: np.ndarray) -> np.ndarray:
    """fmix32 of kernels/src/flash.inc in NumPy uint32 (wrapping) arithmetic."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x85EBCA6B)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(0xC2B2AE35)
        return x ^ (x >> np.uint32(16))


def kernel_hash(seed: int, batch_head, rows, cols) -> np.ndarray:
    """The uint32 hash flash.inc's dropout_keep compares with the threshold, for broadcast indices:
    fmix32(fmix32(fmix32(seed + (bh + 1) * golden) ^ row * c1) ^ col * c2), written from the kernel source."""
    seed, batch_head, rows, cols = (np.asarray(x, dtype=np.uint32) for x in (seed, batch_head, rows, cols))
    with np.errstate(over="ignore"):
        head = kernel_fmix32(seed + (batch_head + np.uint32(1)) * np.uint32(0x9E3779B9))
        row = kernel_fmix32(head ^ (rows * np.uint32(0x85EBCA6B)))
        return kernel_fmix32(row ^ (cols * np.uint32(0xC2B2AE35)))


def kernel_keep(seed, batch, heads, q_len, k_len, p):
    """``(grid, keep)``: the (b * H + h, row, col) index grids and the keep mask (B, H, Sq, Sk) the kernels'
    hash (NumPy port) gives ``seed`` and dropout ``p``."""
    grid = ((np.arange(batch)[:, None] * heads + np.arange(heads)[None])[..., None, None],
            np.arange(q_len)[:, None], np.arange(k_len)[None, :])
    return grid, kernel_hash(seed, *grid) >= min(round(p * 2.0**32), 2**32 - 1)


def library_keep(key, batch, heads, q_len, k_len, p):
    """The keep mask (B, H, Sq, Sk) that ``dropout_key=key`` selects, by the kernels' hash (NumPy port)."""
    return kernel_keep(int(draw_seed(key).item()), batch, heads, q_len, k_len, p)[1]


# (seed, b * H + h, row, col, hash): flash.inc's functions compiled as C (gcc, uint32_t) and evaluated.
KERNEL_HASHES = [
    (0, 0, 0, 0, 0x642F30E0), (0, 3, 17, 250, 0x7A201B49), (0, 41, 1000, 7, 0xB28EA25A),
    (0, 65535, 4095, 131071, 0xE90827A8), (12345, 0, 0, 0, 0x7AB4354C), (12345, 3, 17, 250, 0xC3333F25),
    (12345, 41, 1000, 7, 0xC05537BD), (12345, 65535, 4095, 131071, 0xB63AF402),
    (3735928559, 0, 0, 0, 0x214DB2AD), (3735928559, 3, 17, 250, 0xCBF06B05),
    (3735928559, 41, 1000, 7, 0x572D551E), (3735928559, 65535, 4095, 131071, 0xB2CB780C),
]


def test_numpy_port_reproduces_the_kernel_source_hashes():
    for seed, batch_head, row, col, expected in KERNEL_HASHES:
        assert int(kernel_hash(seed, batch_head, row, col)) == expected


@pytest.mark.parametrize("seed", [0, 12345, 0xDEADBEEF])
@pytest.mark.parametrize("shape", [(1, 1, 5, 3), (2, 3, 17, 33), (1, 4, 64, 130)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_is_the_kernels_hash_bit_for_bit(seed, shape, p):
    grid, expected = kernel_keep(seed, *shape, p)
    ours = keep_mask(mx.array(seed, dtype=mx.uint32), *(mx.array(x.astype(np.uint32)) for x in grid), p)
    np.testing.assert_array_equal(np.array(ours), expected)


def test_keep_mask_keeps_a_hash_equal_to_the_threshold_and_drops_one_below():
    for seed, batch_head, row, col, hashed in KERNEL_HASHES:
        indices = [mx.array(i, dtype=mx.uint32) for i in (seed, batch_head, row, col)]
        assert keep_threshold(hashed / 2.0**32) == hashed
        assert keep_mask(*indices, hashed / 2.0**32).item()
        assert not keep_mask(*indices, (hashed + 1) / 2.0**32).item()


@pytest.mark.parametrize("path", PATHS)
def test_same_dropout_key_reproduces_and_another_key_differs(path):
    q, k, v = random_qkv(2, 8, 12, 4, 2, 32)
    key = mx.random.key(7)
    a = flash_attn_func(q, k, v, dropout_p=0.3, dropout_key=key, path=path)
    b = flash_attn_func(q, k, v, dropout_p=0.3, dropout_key=key, path=path)
    c = flash_attn_func(q, k, v, dropout_p=0.3, dropout_key=mx.random.key(8), path=path)
    assert mx.array_equal(a, b)
    assert not mx.allclose(a, c)
    assert not mx.allclose(a, flash_attn_func(q, k, v, path=path))


def test_without_a_key_dropout_follows_mlx_global_seed():
    q, k, v = random_qkv(1, 6, 6, 2, 2, 32)
    mx.random.seed(11)
    a = flash_attn_func(q, k, v, dropout_p=0.2)
    b = flash_attn_func(q, k, v, dropout_p=0.2)
    mx.random.seed(11)
    assert mx.array_equal(a, flash_attn_func(q, k, v, dropout_p=0.2))
    assert not mx.array_equal(a, b)


def test_dropout_zero_is_no_dropout():
    q, k, v = random_qkv(1, 6, 9, 2, 1, 32)
    assert mx.array_equal(
        flash_attn_func(q, k, v, dropout_p=0.0, dropout_key=mx.random.key(1), path="reference"),
        flash_attn_func(q, k, v, path="reference"),
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("feature", ["plain", "causal", "everything"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_output_equals_float64_attention_with_the_exposed_keep_mask(p, feature, dtype, path):
    q, k, v = random_qkv(2, 7, 11, 4, 2, 32, DTYPES[dtype])
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, 4)
    key = mx.random.key(3)
    out, lse, probs = flash_attn_func(q, k, v, dropout_p=p, dropout_key=key, return_attn_probs=True, path=path,
                                      **kwargs)
    keep = library_keep(key, 2, 4, 7, 11, p)
    # attn_probs: dropped weights negated (including -0.0 for hidden keys), kept ones as they are.
    np.testing.assert_array_equal(np.signbit(f64(probs)), ~keep)
    f.keep, f.dropout_p = keep, p
    check_against_reference(out, q, k, v, f, lse=lse, probs=probs)
    # The same key without return_attn_probs drops the same weights.
    again = flash_attn_func(q, k, v, dropout_p=p, dropout_key=key, path=path, **kwargs)
    assert mx.array_equal(again, out)


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_keeps_a_fraction_one_minus_p_and_preserves_the_mean(p):
    batch, heads, q_len, k_len = 1, 8, 64, 256
    keep = library_keep(mx.random.key(5), batch, heads, q_len, k_len, p)
    assert abs(keep.mean() - (1 - p)) < 0.01
    # Per (head, row), kept fractions vary as a binomial would; no row or head is systematically off.
    assert np.abs(keep.mean(axis=(0, 2, 3)) - (1 - p)).max() < 0.03
    q, k, _ = random_qkv(batch, q_len, k_len, heads, heads, 32)
    ones = mx.ones((batch, k_len, heads, 32))
    out = flash_attn_func(q, k, ones, dropout_p=p, dropout_key=mx.random.key(6))
    # With v = 1, each output is sum_j keep_j p_j / (1 - p): 1 in expectation.
    assert abs(float(out.mean()) - 1.0) < 0.02
    assert float(out.max()) > 1.0 + 1e-3 and float(out.min()) < 1.0 - 1e-3


def test_expected_output_under_dropout_is_the_output_without_it():
    q, k, v = random_qkv(1, 4, 16, 2, 2, 16)
    plain = f64(flash_attn_func(q, k, v))
    mean = np.mean([f64(flash_attn_func(q, k, v, dropout_p=0.5, dropout_key=mx.random.key(i))) for i in range(400)],
                   axis=0)
    single = f64(flash_attn_func(q, k, v, dropout_p=0.5, dropout_key=mx.random.key(0)))
    assert np.abs(mean - plain).max() < 0.25 * np.abs(single - plain).max()
    assert np.abs(mean - plain).mean() < 0.05


def test_keep_mask_differs_across_batch_heads_rows_and_columns():
    keep = library_keep(mx.random.key(9), 2, 2, 16, 16, 0.5)
    slices = [keep[0, 0], keep[0, 1], keep[1, 0], keep[1, 1], keep[0, 0].T]
    for i in range(len(slices)):
        for j in range(i + 1, len(slices)):
            assert not np.array_equal(slices[i], slices[j])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feature", ["plain", "causal", "everything"])
def test_dropout_gradients_match_float64_with_the_keep_mask(feature, path):
    q, k, v = random_qkv(1, 6, 9, 4, 2, 32, layout="BHSD")
    kwargs, f = draw_features(FEATURE_SETS[feature], 1, 4)
    if "softmax_scale" in kwargs:
        kwargs["scale"] = kwargs.pop("softmax_scale")
    key, p = mx.random.key(4), 0.25
    f.keep, f.dropout_p = library_keep(key, 1, 4, 6, 9, p), p

    def fn(q, k, v):
        return flash_attention(q, k, v, layout="BHSD", dropout_p=p, dropout_key=key, path=path, **kwargs)

    w = mx.random.normal((1, 4, 6, 32))
    grads = mx.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    naive = mx.grad(lambda q, k, v: (naive_attention(q, k, v, f)[0] * w).sum(), argnums=(0, 1, 2))(q, k, v)
    ref = attention64(f64(q), f64(k), f64(v), f, grad_out=f64(w))
    for name, ours, theirs in zip("qkv", grads, naive):
        assert_within_rule(ours, ref[f"d{name}"], theirs, mx.float32, f"d{name}")


def test_dropout_layer_drops_only_in_training_mode():
    layer = FlashAttention(4, 32, causal=True, dropout_p=0.4)
    q, k, v = random_qkv(1, 8, 8, 4, 4, 32)
    plain = flash_attn_func(q, k, v, causal=True)
    layer.eval()
    assert mx.allclose(layer(q, k, v), plain, atol=1e-6)
    layer.train()
    dropped = layer(q, k, v, dropout_key=mx.random.key(2))
    assert not mx.allclose(dropped, plain)
    assert mx.array_equal(dropped, layer(q, k, v, dropout_key=mx.random.key(2)))
