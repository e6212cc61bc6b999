"""Eviction policies: which positions each keeps."""

import numpy as np
import pytest

from mlx_primitives.cache import AttentionSinks, HeavyHitters, SlidingWindow


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
