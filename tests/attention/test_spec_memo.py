"""The memo of validated specs never changes what a call means or lets bad input through."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import flash_attention, flash_attn_func
from mlx_primitives.attention.flash import _SPECS, _describe
from tests.reference import Features, check_against_reference, random_qkv


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


# A good option, then a bad one equal to it (same hash) that fresh validation rejects.
EQUAL_BUT_INVALID = [
    ({"window_size": (3, 0)}, {"window_size": (3.0, 0)}, TypeError, r"window_size\[0\] must be an int"),
    ({"window_size": (3, 1)}, {"window_size": (3, True)}, TypeError, r"window_size\[1\] must be an int"),
    ({"causal": True}, {"causal": 1}, TypeError, r"causal must be a bool"),
    ({"softcap": 1.0}, {"softcap": True}, TypeError, r"softcap must be a real number"),
    ({"softcap": 0.0}, {"softcap": False}, TypeError, r"softcap must be a real number"),
    ({"dropout_p": 0.0}, {"dropout_p": False}, TypeError, r"dropout_p must be a real number"),
]


@pytest.mark.parametrize("good,bad,error,message", EQUAL_BUT_INVALID)
def test_validation_does_not_depend_on_earlier_calls(good, bad, error, message):
    q, k, v = random_qkv(1, 6, 6, 2, 2, 16)
    with pytest.raises(error, match=message):  # a fresh memo
        flash_attn_func(q, k, v, **bad)
    flash_attn_func(q, k, v, **good)
    for _ in range(2):  # a warm memo
        with pytest.raises(error, match=message):
            flash_attn_func(q, k, v, **bad)


def test_chunk_size_equal_to_a_valid_one_is_rejected_on_a_warm_memo():
    q, k, v = _qkv(length=8)
    flash_attention(q, k, v, layout="BHSD", chunk_size=4)
    with pytest.raises(TypeError, match=r"chunk_size must be an int"):
        flash_attention(q, k, v, layout="BHSD", chunk_size=4.0)


def test_numpy_scalar_options_mean_what_python_ones_mean():
    q, k, v = random_qkv(1, 7, 9, 4, 2, 32)
    python = dict(softmax_scale=0.25, window_size=(4, 1), softcap=5.0, causal=True)
    numpy = dict(softmax_scale=np.float32(0.25), window_size=(np.int64(4), np.int32(1)), softcap=np.float64(5.0),
                 causal=np.bool_(True))
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **numpy)
    check_against_reference(out, q, k, v, Features(scale=0.25, causal=True, window=(4, 1),
                                                   softcap=5.0), lse=lse)
    assert mx.array_equal(out, flash_attn_func(q, k, v, **python))
    spec = _describe(q, k, v, "BSHD", 0.0, np.float32(0.25), np.bool_(True), numpy["window_size"], np.float64(5.0),
                     None, None)
    assert type(spec.scale) is float and type(spec.softcap) is float and spec.causal is True
    assert all(type(w) is int for w in spec.window) and spec.window == (4, 0)
