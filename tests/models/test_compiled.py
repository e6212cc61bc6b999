"""The compiled decode step: masked_decode against float64, logits against the uncompiled step and
mlx-lm, pools written in place, continuous batching through it, and the decode kernel under compile."""

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from mlx_primitives.models import (CompiledDecode, generate, masked_decode, paged_cache_for,  # noqa: E402
                                   paged_forward, swap_attention)
from mlx_primitives.models.compiled import kernel_decodes  # noqa: E402
from mlx_primitives.models.configs import TINY_CONFIGS, random_model  # noqa: E402
from tests.reference import Features, attention64, assert_within_rule, f64, naive_attention  # noqa: E402


@pytest.mark.parametrize("q_len,softcap,dtype,window", [(1, 0.0, mx.float32, (-1, -1)), (3, 2.5, mx.float32, (-1, -1)),
                                                        (1, 0.0, mx.float16, (-1, -1)), (3, 0.0, mx.float32, (4, 0))])
def test_masked_decode_equals_float64_per_sequence(q_len, softcap, dtype, window):
    batch, heads, kv_heads, dim, page, num_pages, width = 3, 4, 2, 16, 4, 12, 4
    k_pool, v_pool = (mx.random.normal((num_pages, page, kv_heads, dim)).astype(dtype) for _ in range(2))
    q = mx.random.normal((batch, q_len, heads, dim)).astype(dtype)
    lengths = [7, 3, 16]
    table = np.full((batch, width), -1, np.int32)
    table[0, :2], table[1, :1], table[2, :4] = [5, 2], [9], [0, 11, 3, 7]
    out = masked_decode(q, k_pool, v_pool, mx.array(lengths, mx.int32), mx.array(table), 0.3, softcap, window)
    features = Features(scale=0.3, causal=True, window=window, softcap=softcap)
    for b, length in enumerate(lengths):
        pages = mx.array(table[b, : -(-length // page)])
        k, v = (pool[pages].reshape(1, -1, kv_heads, dim)[:, :length].swapaxes(1, 2) for pool in (k_pool, v_pool))
        qb = q[b : b + 1].swapaxes(1, 2)
        ref = attention64(f64(qb), f64(k), f64(v), features)["out"]
        naive = naive_attention(qb, k, v, features)[0]
        assert_within_rule(out[b : b + 1].swapaxes(1, 2), ref, naive, dtype)


def _prefilled(model, prompts, num_pages=16, page_size=4):
    cache = paged_cache_for(model, num_pages=num_pages, page_size=page_size)
    seqs = [cache.add_sequence() for _ in prompts]
    for seq, prompt in zip(seqs, prompts):
        paged_forward(model, cache, [seq], mx.array(prompt)[None])
    return cache, seqs


def _mlx_lm_logits(model, prompt, tokens):
    cache = make_prompt_cache(model)
    model(mx.array(prompt)[None], cache=cache)
    return np.stack([np.array(model(mx.array([[t]]), cache=cache)[0, -1].astype(mx.float32)) for t in tokens])


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_compiled_step_equals_uncompiled_and_mlx_lm(name):
    """Two sequences of different lengths decode 6 steps across page boundaries (gemma2: softcap)."""
    config = TINY_CONFIGS[name]
    model = random_model(config, std=0.1)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, n).tolist() for n in (9, 2)]
    steps = rng.integers(0, 256, (2, 6))
    expected = np.stack([_mlx_lm_logits(model, p, s) for p, s in zip(prompts, steps.tolist())], axis=1)
    swap_attention(model)
    plain_cache, plain_seqs = _prefilled(model, prompts)
    cache, seqs = _prefilled(model, prompts)
    step = CompiledDecode(model, cache, max_pages=5)
    got, plain = [], []
    for i in range(steps.shape[1]):
        got.append(np.array(step(seqs, mx.array(steps[:, i]))))
        plain.append(np.array(paged_forward(model, plain_cache, plain_seqs, mx.array(steps[:, i : i + 1]))[:, -1]))
    got, plain = np.stack(got), np.stack(plain)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, plain, atol=1e-5 * scale)
    np.testing.assert_allclose(got, expected, atol=1e-4 * scale)
    assert [cache.length(s) for s in seqs] == [15, 8]


def test_compiled_step_float16_within_twice_mlx_lm_error():
    config = TINY_CONFIGS["llama"]
    model, exact = random_model(config, dtype=mx.float16, std=0.1), random_model(config, std=0.1)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, n).tolist() for n in (13, 5)]
    steps = rng.integers(0, 256, (2, 5))
    expected = np.stack([_mlx_lm_logits(exact, p, s) for p, s in zip(prompts, steps.tolist())], axis=1)
    baseline = np.stack([_mlx_lm_logits(model, p, s) for p, s in zip(prompts, steps.tolist())], axis=1)
    swap_attention(model)
    cache, seqs = _prefilled(model, prompts)
    step = CompiledDecode(model, cache, max_pages=6)
    got = np.stack([np.array(step(seqs, mx.array(steps[:, i])).astype(mx.float32)) for i in range(steps.shape[1])])
    floor = 5e-3 * np.abs(expected).max() if mx.default_device() == mx.gpu else 1e-3 * np.abs(expected).max()
    assert np.abs(got - expected).max() <= 2 * np.abs(baseline - expected).max() + floor


@pytest.mark.parametrize("prompts", [[[1, 2, 3]], [[1, 2, 3], [4, 5]]])
@pytest.mark.parametrize("device", ["default", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_compiled_step_writes_the_pools_in_place(prompts, device):
    """Peak memory over 4 evaluated steps stays far below one pool: no step copies a pool (on the GPU too,
    where the decode kernel runs and MLX's ops decide for themselves whether to donate)."""
    model = random_model(TINY_CONFIGS["llama"], std=0.1)
    swap_attention(model)
    cache, seqs = _prefilled(model, prompts, num_pages=2048, page_size=16)
    step = CompiledDecode(model, cache, max_pages=4)
    tokens = mx.arange(len(seqs))
    mx.eval(step(seqs, tokens), cache.k_pools, cache.v_pools)  # traced; pools evaluated
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for token in range(4):
        mx.eval(step(seqs, tokens + token))
    assert mx.get_peak_memory() - base < cache.k_pools[0].nbytes // 4
    assert [cache.length(s) for s in seqs] == [len(p) + 5 for p in prompts]


def test_compiled_step_takes_the_positions_the_last_step_computed_while_its_pages_stay():
    """Steps within a page run on the positions the step before computed on the device (equal to the host's);
    a new page (a new block table) or other sequences bring positions from the host again."""
    model = random_model(TINY_CONFIGS["llama"], std=0.1)
    swap_attention(model)
    cache, seqs = _prefilled(model, [[1, 2, 3, 4, 5], [6, 7]], num_pages=16, page_size=4)
    step = CompiledDecode(model, cache, max_pages=4)
    given, upcoming = [], [None]
    compiled = step._compiled
    step._compiled = lambda tokens, positions, *rest: given.append(positions) or compiled(tokens, positions, *rest)
    for token in range(5):  # lengths 5, 2 -> 10, 7: a new page at the third step (second) and the fourth (first)
        before = [cache.length(s) for s in seqs]
        step(seqs, mx.array([token, token + 1]))
        upcoming.append(step._last[3])
        pages, rows = cache.write_slots(seqs, before, 1)
        host = [[cache.offset(s) - 1 for s in seqs], [cache.length(s) for s in seqs], pages, rows]
        assert [np.array(p).tolist() for p in given[-1]] == host
    assert [g is u for g, u in zip(given, upcoming)] == [False, True, False, False, True]
    fork = cache.fork(seqs[0])
    step([fork, seqs[1]], mx.array([1, 2]))
    assert given[-1] is not upcoming[-1]
    assert np.array(given[-1].lengths).tolist() == [cache.length(fork), cache.length(seqs[1])]


def test_compiled_step_checks_its_width_before_reserving():
    model = random_model(TINY_CONFIGS["llama"], std=0.1)
    swap_attention(model)
    cache, seqs = _prefilled(model, [[1, 2, 3, 4]], num_pages=4, page_size=4)
    step = CompiledDecode(model, cache, max_pages=1)
    with pytest.raises(ValueError, match="max_pages=1"):
        step(seqs, mx.array([5]))
    assert cache.length(seqs[0]) == 4
    with pytest.raises(ValueError, match="swap_attention"):
        CompiledDecode(random_model(TINY_CONFIGS["llama"]), cache)


def test_generation_compiled_equals_uncompiled_with_sequences_joining_and_leaving():
    model = random_model(TINY_CONFIGS["llama"], std=0.1)
    swap_attention(model)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 256, n).tolist() for n in (6, 17, 2, 9, 4)]
    compiled = generate(model, prompts, max_tokens=7, max_batch=3, page_size=4)
    plain = generate(model, prompts, max_tokens=7, max_batch=3, page_size=4, compiled=False)
    assert compiled.tokens == plain.tokens
    assert max(compiled.batch_sizes) == 3 and len(set(compiled.batch_sizes)) > 1  # traced per batch size


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_compiled_step_runs_the_decode_kernel_on_gpu(dtype):
    """The decode kernel under mx.compile: same logits as the uncompiled step (which runs it too)."""
    config = TINY_CONFIGS["llama"]
    model = random_model(config, dtype=dtype, std=0.1)
    swap_attention(model)
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 256, n).tolist() for n in (70, 33)]
    steps = rng.integers(0, 256, (2, 4))
    cache, seqs = _prefilled(model, prompts, num_pages=64, page_size=16)
    plain_cache, plain_seqs = _prefilled(model, prompts, num_pages=64, page_size=16)
    assert kernel_decodes(mx.zeros((2, 1, 4, 64), dtype), cache.k_pools[0], 0.125, 0.0)
    step = CompiledDecode(model, cache, max_pages=8)
    for i in range(steps.shape[1]):
        got = np.array(step(seqs, mx.array(steps[:, i])).astype(mx.float32))
        want = np.array(paged_forward(model, plain_cache, plain_seqs, mx.array(steps[:, i : i + 1]))[:, -1]
                        .astype(mx.float32))
        np.testing.assert_allclose(got, want, atol=2e-2 * np.abs(want).max())
