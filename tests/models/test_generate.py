"""Paged continuous-batching generation equals mlx-lm's own greedy decoding, prompt by prompt."""

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from mlx_primitives.models import generate, sample, swap_attention  # noqa: E402
from mlx_primitives.models.configs import TINY_CONFIGS, random_model  # noqa: E402


def greedy_mlx_lm(model, prompt, steps):
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt)[None], cache=cache)
    tokens = []
    for _ in range(steps):
        tokens.append(int(mx.argmax(logits[0, -1])))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)
    return tokens


@pytest.mark.parametrize("name,compiled", [("llama", True), ("gemma2", True), ("mixtral", True),
                                           ("llama_sliding", True), ("llama_sliding", False), ("gemma3_text", True)])
def test_paged_generation_equals_mlx_lm_greedy_per_prompt(name, compiled):
    """Sliding-window models (window 8) with prompts past the window, prefill and decode."""
    config = TINY_CONFIGS[name]
    model = random_model(config, std=0.1)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config["vocab_size"], n).tolist() for n in (5, 19, 11, 3)]
    max_tokens = [6, 3, 9, 4]
    expected = [greedy_mlx_lm(model, p, m) for p, m in zip(prompts, max_tokens)]
    swap_attention(model)
    # Two slots for four prompts: the others join as sequences finish, each at its own max_tokens.
    result = generate(model, prompts, max_tokens=max_tokens, max_batch=2, page_size=4, compiled=compiled)
    assert result.tokens == expected
    assert max(result.batch_sizes) == 2 and result.decode_tokens == sum(m - 1 for m in max_tokens)
    assert result.decode_tokens_per_second > 0


def test_a_small_pool_admits_only_what_it_can_finish():
    """Three prompts that need 4 pages each, a pool of 8: the third waits instead of running out midway."""
    model = random_model(TINY_CONFIGS["llama"], std=0.1)
    swap_attention(model)
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    free = generate(model, prompts, max_tokens=12, max_batch=3, page_size=4)
    small = generate(model, prompts, max_tokens=12, max_batch=3, page_size=4, num_pages=8)
    assert small.tokens == free.tokens and all(len(t) == 12 for t in small.tokens)
    assert max(small.batch_sizes) == 2 and max(free.batch_sizes) == 3
    with pytest.raises(ValueError, match="prompt 0 needs 4 pages; the pool holds 3"):
        generate(model, prompts, max_tokens=12, page_size=4, num_pages=3)


def test_sequences_finish_independently_at_eos():
    config = TINY_CONFIGS["llama"]
    model = random_model(config, std=0.1)
    swap_attention(model)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    free_run = generate(model, prompts, max_tokens=8)
    eos = free_run.tokens[0][2]
    result = generate(model, prompts, max_tokens=8, eos_token_id=eos)
    assert result.tokens[0] == free_run.tokens[0][: free_run.tokens[0].index(eos) + 1]
    cut = free_run.tokens[1].index(eos) + 1 if eos in free_run.tokens[1] else 8
    assert result.tokens[1] == free_run.tokens[1][:cut]
    # A collection of stop tokens (mlx-lm tokenizers' eos_token_ids): each sequence stops at its first.
    stops = {free_run.tokens[0][4], free_run.tokens[1][1]}
    result = generate(model, prompts, max_tokens=8, eos_token_id=stops)
    for got, free in zip(result.tokens, free_run.tokens):
        cut = min((free.index(t) + 1 for t in stops if t in free), default=8)
        assert got == free[:cut]
    assert len(result.tokens[1]) <= 2


@pytest.mark.parametrize("kwargs,error", [(dict(temperature=-1.0), "temperature must be >= 0"),
                                          (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
                                          (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
                                          (dict(max_tokens=[4]), "max_tokens must be a positive int or 2"),
                                          (dict(max_tokens=0), "max_tokens must be a positive int")])
def test_generate_rejects_bad_sampling_arguments(kwargs, error):
    model = random_model(TINY_CONFIGS["llama"])
    swap_attention(model)
    with pytest.raises(ValueError, match=error):
        generate(model, [[1, 2], [3]], **kwargs)
    if "max_tokens" not in kwargs:
        with pytest.raises(ValueError, match=error):
            sample(mx.zeros((1, 4)), **kwargs)
    with pytest.raises(TypeError, match="eos_token_id must be None, an int or a collection of ints"):
        generate(model, [[1, 2]], eos_token_id="</s>")


@pytest.mark.parametrize("quantize", [False, True])
def test_bfloat16_and_4bit_models_page_in_their_activation_dtype(quantize):
    """A bfloat16 model (and a 4-bit one of bfloat16 scales, as mlx-community checkpoints are) pages bfloat16."""
    import mlx.nn as nn

    from mlx_primitives.models import paged_cache_for, paged_forward

    def build(dtype):
        model = random_model(dict(TINY_CONFIGS["llama"], hidden_size=256, intermediate_size=512), dtype=mx.bfloat16,
                             std=0.1)
        if quantize:
            nn.quantize(model, group_size=64, bits=4)
        model.set_dtype(dtype)  # the float parameters: a quantized layer's scales and biases, the norms
        return model

    model, exact_model = build(mx.bfloat16), build(mx.float32)
    prompt = mx.array(np.random.default_rng(2).integers(0, 256, (1, 9)))
    exact, baseline = (np.array(m(prompt, cache=make_prompt_cache(m))[0].astype(mx.float32))
                       for m in (exact_model, model))
    swap_attention(model)
    cache = paged_cache_for(model, num_pages=8, page_size=4)
    assert cache.k_pools[0].dtype == mx.bfloat16
    got = np.array(paged_forward(model, cache, [cache.add_sequence()], prompt)[0].astype(mx.float32))
    assert np.abs(got - exact).max() <= 2 * np.abs(baseline - exact).max() + 1e-3
    assert [len(t) for t in generate(model, [[1, 2, 3], [4]], max_tokens=3).tokens] == [3, 3]


def test_top_p_samples_only_the_nucleus():
    logits = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]] * 256))
    mx.random.seed(0)
    drawn = np.array(sample(logits, temperature=1.0, top_p=0.7))
    assert set(drawn.tolist()) == {0, 1}
    assert (np.array(sample(logits)) == 0).all()


def test_generate_needs_a_swapped_model():
    model = random_model(TINY_CONFIGS["llama"])
    with pytest.raises(ValueError, match="swap_attention"):
        generate(model, [[1, 2]])


def test_paged_layers_take_make_masks_window_and_refuse_mask_arrays():
    """make_mask gives a sliding-window layer its window; a mask array (which the pages cannot apply) is refused
    before any key is written."""
    from mlx_primitives.models import PagedLayerCache, PagedStep, paged_cache_for

    model = random_model(TINY_CONFIGS["llama"])
    swap_attention(model)
    cache = paged_cache_for(model, num_pages=4, page_size=4)
    seq = cache.add_sequence()
    layer = PagedLayerCache(PagedStep(cache, [seq], 3), 0)
    assert layer.make_mask(3) is None and layer.make_mask(3, window_size=8).size == 8
    heads, kv_heads, dim = cache.k_pools[0].shape[2] * 2, cache.k_pools[0].shape[2], cache.k_pools[0].shape[3]
    layer.update_and_fetch(*(mx.ones((1, kv_heads, 3, dim)) for _ in range(2)))
    with pytest.raises(ValueError, match=r"got a mask it cannot apply \(array\)"):
        layer.attend(mx.ones((1, heads, 3, dim)), 0.1, mask=mx.ones((3, 3), mx.bool_))
    assert not mx.any(cache.k_pools[0]).item()
    out = layer.attend(mx.ones((1, heads, 3, dim)), 0.1, mask=layer.make_mask(3, window_size=2))
    assert out.shape == (1, heads, 3, dim) and mx.any(cache.k_pools[0]).item()


@pytest.mark.parametrize("name,dtype", [("gemma2", mx.float32), ("gemma2", mx.float16), ("gemma3_text", mx.float32)])
def test_batched_paged_decode_logits_equal_mlx_lm_per_sequence(name, dtype):
    """Two sequences of different lengths decode together over pages (float16: the decode kernel on a GPU;
    gemma3_text: a sliding window of 8 keys, passed by the 21-token prompt)."""
    from mlx_primitives.models import paged_cache_for, paged_forward

    config = TINY_CONFIGS[name]
    model = random_model(config, dtype=dtype, std=0.1)
    exact = random_model(config, dtype=mx.float32, std=0.1)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, n).tolist() for n in (21, 7)]
    steps = rng.integers(0, 256, (2, 8))

    def mlx_lm_logits(m, prompt, tokens):
        cache = make_prompt_cache(m)
        m(mx.array(prompt)[None], cache=cache)
        return np.stack([np.array(m(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)) for t in tokens])

    expected = np.stack([mlx_lm_logits(exact, p, s) for p, s in zip(prompts, steps.tolist())], axis=1)
    baseline = np.stack([mlx_lm_logits(model, p, s) for p, s in zip(prompts, steps.tolist())], axis=1)
    swap_attention(model)
    cache = paged_cache_for(model, num_pages=16, page_size=4)
    seqs = [cache.add_sequence() for _ in prompts]
    for seq, prompt in zip(seqs, prompts):
        paged_forward(model, cache, [seq], mx.array(prompt)[None])
    got = np.stack([np.array(paged_forward(model, cache, seqs, mx.array(steps[:, i : i + 1]))[:, -1]
                             .astype(mx.float32)) for i in range(steps.shape[1])])
    # Floor: float32 matmuls (and so the reference path) run in TF32 on CUDA.
    floor = 5e-3 * np.abs(expected).max() if mx.default_device() == mx.gpu else 1e-4
    assert np.abs(got - expected).max() <= 2 * np.abs(baseline - expected).max() + floor


def test_single_sequence_chunks_within_and_across_pages_equal_mlx_lm():
    """One sequence, 3-token chunks over 4-key pages: writes within one page (a slice update) and
    across two (a scatter) both give mlx-lm's logits."""
    from mlx_primitives.models import paged_cache_for, paged_forward

    config = TINY_CONFIGS["llama"]
    model = random_model(config, std=0.1)
    rng = np.random.default_rng(5)
    prompt, chunks = rng.integers(0, 256, 5).tolist(), rng.integers(0, 256, (4, 3))
    cache = make_prompt_cache(model)
    model(mx.array(prompt)[None], cache=cache)
    expected = [np.array(model(mx.array(c)[None], cache=cache)[0]) for c in chunks.tolist()]
    swap_attention(model)
    pages = paged_cache_for(model, num_pages=8, page_size=4)
    seq = pages.add_sequence()
    paged_forward(model, pages, [seq], mx.array(prompt)[None])
    for chunk, want in zip(chunks.tolist(), expected):  # keys 5-7 (one page), 8-10, 11-13 (two), 14-16
        got = np.array(paged_forward(model, pages, [seq], mx.array(chunk)[None])[0])
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
