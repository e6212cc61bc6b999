"""The memo of validated specs never changes what a call means or lets bad input through."""

import mlx.core as mx
import pytest

from mlx_primitives.attention import flash_attention
from mlx_primitives.attention.flash import _SPECS, _describe


def _qkv(length=24, heads=4, dim=32, dtype=mx.float32):
    return [mx.random.normal((1, heads, length, dim)).astype(dtype) for _ in range(3)]


def test_memoized_spec_matches_a_fresh_validation_for_each_option_set():
    q, k, v = _qkv()
    for causal, window in [(False, (-1, -1)), (True, (-1, -1)), (True, (4, 0)), (False, (3, 2))]:
        first = _describe(q, k, v, "BHSD", 0.0, None, causal, window, 0.0, None, None)
        again = _describe(q, k, v, "BHSD", 0.0, None, causal, window, 0.0, None, None)
        assert again is first
        assert first.causal == causal and first.window[0] == window[0]


def test_same_shapes_with_other_options_give_other_results():
    q, k, v = _qkv()
    plain = flash_attention(q, k, v, layout="BHSD")
    causal = flash_attention(q, k, v, layout="BHSD", causal=True)
    assert not mx.allclose(plain, causal)


def test_bad_input_is_rejected_every_time_not_memoized():
    q, k, v = _qkv()
    flash_attention(q, k, v, layout="BHSD")
    for _ in range(2):
        with pytest.raises(ValueError, match="softcap"):
            flash_attention(q, k, v, layout="BHSD", softcap=-1.0)
        with pytest.raises(TypeError, match="window_size"):
            flash_attention(q, k, v, layout="BHSD", window_size=(3, "0"))
        with pytest.raises(TypeError, match="q must"):
            flash_attention(q.tolist(), k, v, layout="BHSD")


def test_memo_stays_bounded():
    q, k, v = _qkv(length=8)
    for scale in range(600):
        _describe(q, k, v, "BHSD", 0.0, 0.01 * (scale + 1), False, (-1, -1), 0.0, None, None)
    assert len(_SPECS) <= 512
