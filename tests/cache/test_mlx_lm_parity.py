"""Our caches against mlx-lm's (where mlx-lm is installed): same keys back, same offsets and masks, and an
mlx-lm model gives the same logits with either."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.cache import KVCache, QuantizedKVCache, RotatingKVCache
from mlx_primitives.hardware import detect_backend

theirs = pytest.importorskip("mlx_lm.models.cache")


def same_mask(a, b):
    if a is None or isinstance(a, str):
        return a == b
    return b is not None and not isinstance(b, str) and mx.array_equal(a, b)


@pytest.mark.parametrize("max_size,keep", [(8, 0), (8, 2), (16, 4)])
def test_rotating_cache_returns_what_mlx_lm_returns(max_size, keep):
    rng = np.random.default_rng(max_size + keep)
    ours, ref = RotatingKVCache(max_size, keep), theirs.RotatingKVCache(max_size=max_size, keep=keep)
    for _ in range(30):
        n = int(rng.choice([1, 1, 1, 3, 5]))
        k, v = mx.random.normal((1, 2, n, 4)), mx.random.normal((1, 2, n, 4))
        a, b = ours.update_and_fetch(k, v), ref.update_and_fetch(k, v)
        assert mx.array_equal(a[0], b[0]) and mx.array_equal(a[1], b[1])
        assert ours.offset == ref.offset and ours.is_trimmable() == ref.is_trimmable()
        for rows in (1, 3):
            for window in (None, 4):
                assert same_mask(ours.make_mask(rows, window_size=window), ref.make_mask(rows, window_size=window))
        if ours.is_trimmable() and rng.random() < 0.2:
            t = int(rng.integers(0, 3))
            assert ours.trim(t) == ref.trim(t)


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 32)])
def test_quantized_cache_returns_what_mlx_lm_returns(bits, group_size):
    ours, ref = QuantizedKVCache(group_size, bits), theirs.QuantizedKVCache(group_size=group_size, bits=bits)
    for n in (7, 1, 300, 1):
        k, v = mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64))
        a, b = ours.update_and_fetch(k, v), ref.update_and_fetch(k, v)
        for x, y in zip(a[0] + a[1], b[0] + b[1]):
            assert mx.array_equal(x, y)
        assert ours.offset == ref.offset and ours.trim(1) == ref.trim(1)


def test_an_mlx_lm_model_gives_the_same_logits_with_our_caches():
    llama = pytest.importorskip("mlx_lm.models.llama")
    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50)
    model = llama.Model(args)
    prompt = mx.array([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    for make_ours, make_ref in ((KVCache, theirs.KVCache),
                                (lambda: RotatingKVCache(6, 2), lambda: theirs.RotatingKVCache(max_size=6, keep=2))):
        ours, ref = [make_ours() for _ in range(2)], [make_ref() for _ in range(2)]
        assert mx.allclose(model(prompt, cache=ours), model(prompt, cache=ref), atol=1e-5)
        for token in (7, 8, 9, 1, 2):
            step = mx.array([[token]])
            assert mx.allclose(model(step, cache=ours), model(step, cache=ref), atol=1e-5)


def test_an_mlx_lm_model_gives_the_same_logits_with_our_quantized_cache():
    llama = pytest.importorskip("mlx_lm.models.llama")
    args = llama.ModelArgs(model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=50)
    if detect_backend() == "cuda":
        pytest.skip("mlx-lm attends over quantized caches with mx.quantized_matmul, whose CUDA build fails here")
    model = llama.Model(args)
    ours = [QuantizedKVCache(group_size=64, bits=8) for _ in range(2)]
    ref = [theirs.QuantizedKVCache(group_size=64, bits=8) for _ in range(2)]
    for tokens in ([[3, 1, 4, 1, 5]], [[9]], [[2]]):
        step = mx.array(tokens)
        assert mx.array_equal(model(step, cache=ours), model(step, cache=ref))
