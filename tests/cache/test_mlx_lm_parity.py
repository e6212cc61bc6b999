"""Our caches against mlx-lm's (where mlx-lm is installed): same keys back, same offsets and masks, and an
mlx-lm model gives the same logits with either."""

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
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


def filled(make, lengths=(5, 1, 1)):
    """A cache after updates of ``lengths`` positions (float16, head_dim 64 for the quantized one)."""
    cache = make()
    for n in lengths:
        cache.update_and_fetch(*(mx.random.normal((1, 2, n, 64)).astype(mx.float16) for _ in range(2)))
    return cache


def same_fetch(a, b):
    """The same keys and values (quantized ones: the same (packed, scales, biases), tuples or lists)."""
    flat, other = (tree_flatten(list(x)) for x in (a, b))
    return len(flat) == len(other) and all(mx.array_equal(x, y) for (_, x), (_, y) in zip(flat, other))


PAIRS = [(KVCache, theirs.KVCache), (lambda: RotatingKVCache(4, 1), lambda: theirs.RotatingKVCache(4, 1)),
         (lambda: QuantizedKVCache(64, 4), lambda: theirs.QuantizedKVCache(64, 4))]


def test_mlx_lm_saves_and_loads_our_caches(tmp_path):
    ours = [filled(make) for make, _ in PAIRS]
    path = str(tmp_path / "prompt.safetensors")
    theirs.save_prompt_cache(path, ours)
    loaded = theirs.load_prompt_cache(path)
    step = [mx.random.normal((1, 2, 1, 64)).astype(mx.float16) for _ in range(2)]
    for a, b, (_, make_ref) in zip(ours, loaded, PAIRS):
        assert type(b) is type(make_ref()) and b.offset == a.offset
        assert same_fetch(a.keys_and_values(), b.keys_and_values())
        assert same_fetch(a.update_and_fetch(*step), b.update_and_fetch(*step))


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_state_moves_between_our_caches_and_mlx_lm_caches(pair):
    make, make_ref = PAIRS[pair]
    ours, ref = filled(make), filled(make_ref)
    into_ours, into_theirs = make(), make_ref()
    into_ours.state, into_theirs.state = ref.state, ours.state
    step = [mx.random.normal((1, 2, 1, 64)).astype(mx.float16) for _ in range(2)]
    assert same_fetch(into_ours.update_and_fetch(*step), ref.update_and_fetch(*step))
    assert same_fetch(into_theirs.update_and_fetch(*step), ours.update_and_fetch(*step))
    assert into_ours.offset == ref.offset == 8


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_keys_and_values_is_what_update_and_fetch_returned(pair):
    cache = PAIRS[pair][0]()
    for n in (3, 1, 1, 1):
        fetched = cache.update_and_fetch(*(mx.random.normal((1, 2, n, 64)).astype(mx.float16) for _ in range(2)))
        assert same_fetch(cache.keys_and_values(), fetched)


@pytest.mark.parametrize("pair", range(2))
def test_merge_builds_mlx_lm_batch_cache(pair):
    make, make_ref = PAIRS[pair]
    mx.random.seed(pair)
    ours = [filled(make, (3,)), filled(make, (5, 1))]
    mx.random.seed(pair)
    ref = [filled(make_ref, (3,)), filled(make_ref, (5, 1))]
    a, b = type(ours[0]).merge(ours), type(ref[0]).merge(ref)
    assert type(a) is type(b) and mx.array_equal(a.left_padding, b.left_padding)
    assert mx.array_equal(a.offset, b.offset) and same_fetch((a.keys, a.values), (b.keys, b.values))


def test_rotating_make_mask_takes_mlx_lm_positional_order():
    ours, ref = filled(lambda: RotatingKVCache(8, 2)), filled(lambda: theirs.RotatingKVCache(8, 2))
    assert same_mask(ours.make_mask(3, 4), ref.make_mask(3, 4))
    assert same_mask(ours.make_mask(3, None, True), ref.make_mask(3, None, True))
