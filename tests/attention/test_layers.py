"""Attention layers: FlashAttention, SlidingWindowAttention, ChunkedCrossAttention and the full Attention block."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
import pytest

import mlx_primitives
from mlx_primitives.attention import (
    Attention,
    ChunkedCrossAttention,
    FlashAttention,
    SlidingWindowAttention,
    explain,
    flash_attention,
)
from mlx_primitives.cache import KVCache, QuantizedKVCache
from tests.reference import DTYPES, Features, attention64, check_against_reference, f64, random_qkv


def test_layers_are_exported_from_the_package_root():
    for name in ("FlashAttention", "SlidingWindowAttention", "ChunkedCrossAttention", "Attention"):
        assert getattr(mlx_primitives, name) is getattr(mlx_primitives.attention, name)
        assert issubclass(getattr(mlx_primitives, name), nn.Module)


@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "options", [{}, {"causal": True}, {"causal": True, "window_size": (3, 0), "softcap": 2.0}, {"window_size": (2, 1)}],
    ids=["plain", "causal", "causal_window_softcap", "window"],
)
def test_flash_attention_layer_matches_reference_in_both_layouts_with_gqa(options, dtype, layout):
    layer = FlashAttention(4, 32, layout=layout, **options)
    q, k, v = random_qkv(2, 6, 9, 4, 2, 32, DTYPES[dtype], layout=layout)
    out = layer(q, k, v)
    assert out.shape == q.shape
    f = Features(causal=options.get("causal", False), window=options.get("window_size", (-1, -1)),
                 softcap=options.get("softcap", 0.0))
    check_against_reference(out, q, k, v, f, layout=layout)
    kwargs = {key: val for key, val in options.items() if key != "causal"}
    same = flash_attention(q, k, v, causal=options.get("causal", False), layout=layout, **kwargs)
    assert mx.array_equal(out, same)


def test_flash_attention_layer_takes_a_mask_and_a_scale():
    layer = FlashAttention(2, 16, layout="BHSD", scale=0.5)
    q, k, v = random_qkv(1, 5, 7, 2, 2, 16, layout="BHSD")
    mask = np.asarray(mx.random.bernoulli(0.6, (5, 7)))
    mask[:, 0] = True
    check_against_reference(layer(q, k, v, mask=mx.array(mask)), q, k, v, Features(scale=0.5, mask=mask),
                            layout="BHSD")


def test_printing_a_layer_shows_its_configuration():
    text = str(FlashAttention(8, 64, causal=True, window_size=(16, 0), softcap=30.0))
    for part in ("FlashAttention", "num_heads=8", "head_dim=64", "causal=True", "window_size=(16, 0)",
                 "softcap=30.0", "layout='BSHD'"):
        assert part in text
    assert "chunk_size=512" in str(ChunkedCrossAttention(4, 32, chunk_size=512))
    assert "window_size=(127, 0)" in str(SlidingWindowAttention(4, 32, window_size=128))
    text = str(Attention(64, 8, num_kv_heads=2))
    for part in ("num_heads=8", "num_kv_heads=2", "head_dim=8", "kernel='flash'", "q_proj", "o_proj"):
        assert part in text


@pytest.mark.parametrize(
    "width,causal,window", [(4, True, (3, 0)), (1, True, (0, 0)), (5, False, (2, 2)), (4, False, (1, 2))]
)
def test_sliding_window_of_width_w_shows_w_keys_per_query(width, causal, window):
    layer = SlidingWindowAttention(2, 32, window_size=width, causal=causal)
    assert layer.window_size == window
    q, k, v = random_qkv(1, 12, 12, 2, 2, 32)
    out = layer(q, k, v)
    check_against_reference(out, q, k, v, Features(causal=causal, window=window))
    if width > 1:
        _, _, probs = mlx_primitives.attention.flash_attn_func(q, k, v, causal=causal, window_size=window,
                                                               return_attn_probs=True)
        visible = (f64(probs) > 0).sum(axis=-1)  # (B, H, Sq)
        assert visible.max() == width  # interior rows see exactly W keys


def test_sliding_window_accepts_an_explicit_pair():
    layer = SlidingWindowAttention(2, 32, window_size=(2, 1), causal=False, layout="BHSD")
    q, k, v = random_qkv(1, 8, 10, 2, 1, 32, layout="BHSD")
    check_against_reference(layer(q, k, v), q, k, v, Features(window=(2, 1)), layout="BHSD")


@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
def test_chunked_cross_attention_matches_reference_and_runs_blockwise(layout):
    layer = ChunkedCrossAttention(4, 32, chunk_size=8, layout=layout)
    q, k, v = random_qkv(2, 5, 45, 4, 2, 32, layout=layout)
    check_against_reference(layer(q, k, v), q, k, v, Features(), layout=layout)
    route = explain(q, k, v, layout=layout, chunk_size=8)
    assert route.path == "reference" and "bounded memory" in route.reason


# ---- the full block ------------------------------------------------------------------------------------


def manual_attention_block(layer: Attention, x, mask_causal=True):
    """Projections + RoPE in MLX, attention in float64 NumPy, output projection: what Attention must compute."""
    batch, length, _ = x.shape
    heads, kv_heads, dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).reshape(batch, length, heads, dim).transpose(0, 2, 1, 3)
    k = layer.k_proj(x).reshape(batch, length, kv_heads, dim).transpose(0, 2, 1, 3)
    v = layer.v_proj(x).reshape(batch, length, kv_heads, dim).transpose(0, 2, 1, 3)
    rope = nn.RoPE(dim)
    q, k = rope(q), rope(k)
    out = attention64(f64(q), f64(k), f64(v), Features(causal=mask_causal, window=layer.window_size,
                                                       softcap=layer.softcap))["out"]
    out = mx.array(out.transpose(0, 2, 1, 3).reshape(batch, length, heads * dim).astype(np.float32))
    return layer.o_proj(out)


@pytest.mark.parametrize("kernel", ["flash", "reference", "sdpa"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_block_equals_projections_rope_and_float64_attention(kv_heads, kernel):
    layer = Attention(64, 4, num_kv_heads=kv_heads, kernel=kernel)
    x = mx.random.normal((2, 9, 64))
    out = layer(x, mask="causal")
    assert out.shape == x.shape
    np.testing.assert_allclose(f64(out), f64(manual_attention_block(layer, x)), atol=2e-5)


@pytest.mark.parametrize("kernel", ["flash", "reference"])
@pytest.mark.parametrize(
    "options", [{}, {"window_size": (3, -1)}, {"softcap": 1.0}], ids=["plain", "window", "softcap"]
)
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_prefill_then_decode_with_kv_cache_equals_the_full_causal_sequence(kv_heads, options, kernel):
    layer = Attention(64, 4, num_kv_heads=kv_heads, kernel=kernel, **options)
    x = mx.random.normal((2, 12, 64))
    full = layer(x, mask="causal")
    cache = KVCache(step=4)
    pieces = [layer(x[:, :6], mask="causal", cache=cache)]  # prefill crosses a capacity step
    for t in range(6, 9):  # single-token decode steps
        pieces.append(layer(x[:, t : t + 1], cache=cache))
    pieces.append(layer(x[:, 9:12], mask="causal", cache=cache))  # a multi-token chunk on a warm cache
    assert cache.offset == 12
    np.testing.assert_allclose(f64(mx.concatenate(pieces, axis=1)), f64(full), atol=2e-5)


def test_attention_block_works_with_mlx_lm_cache():
    cache_module = pytest.importorskip("mlx_lm.models.cache")
    layer = Attention(32, 4, num_kv_heads=2)
    x = mx.random.normal((1, 7, 32))
    full = layer(x, mask="causal")
    cache = cache_module.KVCache()
    pieces = [layer(x[:, :4], mask="causal", cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(4, 7)]
    np.testing.assert_allclose(f64(mx.concatenate(pieces, axis=1)), f64(full), atol=2e-5)


@pytest.mark.parametrize("options", [{}, {"window_size": (3, -1)}], ids=["plain", "window"])
def test_attention_block_accepts_a_quantized_kv_cache(options):
    layer = Attention(128, 4, num_kv_heads=2, **options)  # head_dim 32: one quantization group
    x = mx.random.normal((2, 10, 128))
    full = layer(x, mask="causal")
    cache = QuantizedKVCache(group_size=32, bits=8)
    pieces = [layer(x[:, :6], mask="causal", cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in range(6, 10)]
    err = np.abs(f64(mx.concatenate(pieces, axis=1)) - f64(full)).max()
    assert cache.offset == 10 and 0 < err < 2e-2  # int8 keys and values: close, not bit-equal


def test_attention_block_without_mask_is_bidirectional_and_takes_mask_arrays():
    layer = Attention(32, 4, rope=False)
    x = mx.random.normal((1, 6, 32))
    causal, plain = layer(x, mask="causal"), layer(x)
    assert mx.allclose(causal[:, -1], plain[:, -1], atol=1e-6)  # the last row sees everything either way
    assert not mx.allclose(causal[:, 0], plain[:, 0])
    tril = mx.array(np.tril(np.ones((6, 6), bool)))
    assert mx.allclose(layer(x, mask=tril), causal, atol=1e-5)


def test_attention_block_custom_rope_module_gets_the_cache_offset():
    seen = []

    class Recorder(nn.Module):
        def __call__(self, x, offset=0):
            seen.append(offset)
            return x

    layer = Attention(32, 4, rope=Recorder())
    cache = KVCache()
    layer(mx.random.normal((1, 3, 32)), mask="causal", cache=cache)
    layer(mx.random.normal((1, 1, 32)), cache=cache)
    assert seen == [0, 0, 3, 3]


def test_attention_block_parameters_get_finite_gradients():
    layer = Attention(32, 4, num_kv_heads=2, window_size=(4, -1), softcap=5.0)
    x = mx.random.normal((2, 8, 32))
    loss, grads = nn.value_and_grad(layer, lambda x: (layer(x, mask="causal") ** 2).sum())(x)
    flat = [g for _, g in tree_flatten(grads)]
    assert len(flat) == 4 and all(not mx.isnan(g).any() and mx.abs(g).max() > 0 for g in flat)
    assert np.isfinite(loss.item())
