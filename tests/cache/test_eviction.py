"""Eviction policies: which positions each keeps."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.cache import AttentionSinks, HeavyHitters, SlidingWindow, received_attention
from mlx_primitives.cache import flash_attn_with_kvcache

from ..reference import Features, attention64


def test_sliding_window_keeps_the_last_positions():
    assert SlidingWindow(3).keep(10).tolist() == [7, 8, 9]
    assert SlidingWindow(30).keep(4).tolist() == [0, 1, 2, 3]


def test_attention_sinks_keep_the_first_and_the_last_positions():
    assert AttentionSinks(2, 3).keep(10).tolist() == [0, 1, 7, 8, 9]
    assert AttentionSinks(4, 3).keep(5).tolist() == [0, 1, 2, 3, 4]
    assert AttentionSinks(0, 2).keep(5).tolist() == [3, 4]


def test_heavy_hitters_keep_the_recent_and_the_highest_scores():
    scores = np.array([0.5, 9.0, 0.1, 3.0, 3.0, 0.2, 0.0, 0.0])
    assert HeavyHitters(budget=5, recent=2).keep(8, scores).tolist() == [1, 3, 4, 6, 7]
    assert HeavyHitters(budget=4, recent=2).keep(8, scores).tolist() == [1, 3, 6, 7]  # tie: the older
    assert HeavyHitters(budget=9).keep(8, scores).tolist() == list(range(8))
    assert HeavyHitters.needs_scores and not SlidingWindow.needs_scores


@pytest.mark.parametrize("make,match", [
    (lambda: SlidingWindow(0), "window"),
    (lambda: AttentionSinks(-1, 3), "sinks"),
    (lambda: HeavyHitters(2, recent=3), "recent"),
    (lambda: HeavyHitters(4).keep(5, np.zeros(4)), "scores of shape"),
])
def test_bad_parameters_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("causal", [False, True])
def test_received_attention_sums_the_softmax_each_key_got(causal):
    q_len, heads, kv_heads, dim, length = 3, 4, 2, 16, 9
    q = mx.random.normal((1, q_len, heads, dim))
    k, v = (mx.random.normal((1, length, kv_heads, dim)) for _ in range(2))
    _, lse = flash_attn_with_kvcache(q, k, v, causal=causal, softmax_scale=0.3, return_softmax_lse=True)
    got = received_attention(q[0], k[0], lse[0], scale=0.3, causal=causal)
    q64, k64, v64 = (np.array(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))
    expected = attention64(q64, k64, v64, Features(scale=0.3, causal=causal))["probs"][0].sum(axis=(0, 1))
    assert got.shape == (length,) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-4, atol=1e-6)
    assert HeavyHitters(budget=4, recent=1).keep(length, np.array(got)).tolist() == \
        sorted(np.argsort(-expected[:-1], kind="stable")[:3].tolist() + [length - 1])


def test_received_attention_checks_its_shapes():
    with pytest.raises(ValueError, match=r"lse must have shape \(4, 3\) float32"):
        received_attention(mx.zeros((3, 4, 8)), mx.zeros((5, 2, 8)), mx.zeros((3, 4)))
    with pytest.raises(ValueError, match="num_kv_heads dividing 4"):
        received_attention(mx.zeros((3, 4, 8)), mx.zeros((5, 3, 8)), mx.zeros((4, 3)))
