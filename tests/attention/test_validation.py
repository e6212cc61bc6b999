"""Bad input raises TypeError/ValueError naming the argument (issue 2, item 6); NaN in gives NaN out."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import (
    Attention,
    FlashAttention,
    SlidingWindowAttention,
    flash_attention,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
)
from tests.reference import random_qkv

B, SQ, SK, H, HK, D = 2, 5, 7, 4, 2, 32


class Shape(tuple):
    """An option given as the shape of a random array (arrays are drawn inside the test)."""

    def __new__(cls, *dims):
        return super().__new__(cls, dims)


def qkv(dtype=mx.float32):
    return random_qkv(B, SQ, SK, H, HK, D, dtype)


def normal(*shape, dtype=mx.float32):
    return mx.random.normal(shape).astype(dtype)


BAD_QKV = {
    "q_rank3": (lambda q, k, v: (q[0], k, v), ValueError,
                r"q must have shape \(batch, seqlen_q, num_heads, head_dim\)"),
    "k_rank5": (lambda q, k, v: (q, k[None], v), ValueError, r"k must have shape \(batch, seqlen_k, num_kv_heads"),
    "v_rank2": (lambda q, k, v: (q, k, v[0, 0]), ValueError, r"v must have shape"),
    "q_not_array": (lambda q, k, v: (q.tolist(), k, v), TypeError, r"q must be an mx.array"),
    "k_int_dtype": (lambda q, k, v: (q, k.astype(mx.int32), v), TypeError, r"k must have dtype"),
    "mixed_dtypes": (lambda q, k, v: (q, k.astype(mx.float16), v), TypeError, r"q and k and v must share one dtype"),
    "batch_mismatch": (lambda q, k, v: (q, k[:1], v[:1]), ValueError, r"k must have shape \(batch=2"),
    "head_dim_mismatch": (lambda q, k, v: (q, k[..., :16], v), ValueError, r"k must have shape .*head_dim=32"),
    "v_len_mismatch": (lambda q, k, v: (q, k, v[:, :3]), ValueError, r"v must have shape .*matching k"),
    "v_heads_mismatch": (lambda q, k, v: (q, k, v[:, :, :1]), ValueError, r"v must have shape .*matching k"),
    "heads_not_multiple": (lambda q, k, v: (q[:, :, :3], k, v), ValueError,
                           r"num_heads of q \(3\) must be a multiple of num_kv_heads of k and v \(2\)"),
    "empty_heads": (lambda q, k, v: (q[:, :, :0], k[:, :, :0], v[:, :, :0]), ValueError, r"non-empty"),
}


@pytest.mark.parametrize("case", list(BAD_QKV))
def test_bad_q_k_v_are_rejected_naming_the_argument(case):
    transform, error, message = BAD_QKV[case]
    with pytest.raises(error, match=message):
        flash_attn_func(*transform(*qkv()))


BAD_OPTIONS = {
    "window_negative": ({"window_size": (-2, 0)}, ValueError, r"window_size entries must be >= -1"),
    "window_not_pair": ({"window_size": (1, 2, 3)}, TypeError, r"window_size must be a pair of ints"),
    "window_int": ({"window_size": 3}, TypeError, r"window_size must be a pair of ints"),
    "window_float": ({"window_size": (1.5, 0)}, TypeError, r"window_size\[0\] must be an int; got float"),
    "window_float_equal_to_int": ({"window_size": (3, 0.0)}, TypeError, r"window_size\[1\] must be an int"),
    "window_bool": ({"window_size": (True, 0)}, TypeError, r"window_size\[0\] must be an int; got bool"),
    "softcap_negative": ({"softcap": -1.0}, ValueError, r"softcap must be a finite float >= 0"),
    "softcap_nan": ({"softcap": float("nan")}, ValueError, r"softcap must be finite"),
    "softcap_string": ({"softcap": "5"}, TypeError, r"softcap must be a real number"),
    "softcap_bool": ({"softcap": True}, TypeError, r"softcap must be a real number .*; got bool"),
    "dropout_one": ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
    "dropout_negative": ({"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\)"),
    "dropout_bool": ({"dropout_p": False}, TypeError, r"dropout_p must be a real number"),
    "scale_string": ({"softmax_scale": "0.1"}, TypeError, r"softmax_scale must be a real number"),
    "scale_inf": ({"softmax_scale": float("inf")}, ValueError, r"softmax_scale must be finite"),
    "scale_bool": ({"softmax_scale": True}, TypeError, r"softmax_scale must be a real number .*; got bool"),
    "scale_mx_array": ({"softmax_scale": mx.array(0.1)}, TypeError, r"softmax_scale must be a real number"),
    "causal_string": ({"causal": "yes"}, TypeError, r"causal must be a bool; got str"),
    "causal_int": ({"causal": 1}, TypeError, r"causal must be a bool; got int"),
    "alibi_wrong_heads": ({"alibi_slopes": Shape(3)}, ValueError, r"alibi_slopes must be an mx.array of shape \(4,\)"),
    "alibi_wrong_batch": ({"alibi_slopes": Shape(3, 4)}, ValueError, r"alibi_slopes must .* or \(2, 4\)"),
    "alibi_list": ({"alibi_slopes": [0.1] * 4}, ValueError, r"alibi_slopes must be an mx.array"),
    "sinks_wrong_shape": ({"sinks": Shape(4, 1)}, ValueError, r"sinks must be an mx.array of shape \(4,\)"),
    "sinks_kv_heads": ({"sinks": Shape(2)}, ValueError, r"sinks must .* shape \(4,\); got \(2,\)"),
    "sinks_list": ({"sinks": [0.0] * 4}, ValueError, r"sinks must be an mx.array"),
}


def _materialize(options):
    """Options with each Shape replaced by a fresh normal array of that shape (of ``mask_dtype`` if given;
    integer masks hold 0 and 1, as a careless boolean mask would)."""
    options = dict(options)
    mask_dtype = options.pop("mask_dtype", None)
    drawn = {key: normal(*val) if isinstance(val, Shape) else val for key, val in options.items()}
    if mask_dtype is not None:
        drawn["mask"] = (drawn["mask"] > 0).astype(mask_dtype)
    return drawn


@pytest.mark.parametrize("path", ["reference", "auto"])
@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_options_are_rejected_naming_the_argument(case, path):
    options, error, message = BAD_OPTIONS[case]
    with pytest.raises(error, match=message):
        flash_attn_func(*qkv(), path=path, **_materialize(options))


@pytest.mark.parametrize(
    "options,error,message",
    [
        ({"layout": "SBHD"}, ValueError, r"layout must be one of"),
        ({"mask": "top_left"}, ValueError, r"mask must be 'causal', an mx.array or None"),
        ({"mask": [[True]]}, TypeError, r"mask must be 'causal', an mx.array or None"),
        ({"mask": Shape(5, 6)}, ValueError, r"mask must broadcast to \(batch, num_heads, seqlen_q, seqlen_k\)"),
        ({"mask": Shape(3, 4, 5, 7)}, ValueError, r"mask must broadcast"),
        ({"mask": Shape(1, 1, 1, 5, 7)}, ValueError, r"mask must broadcast"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be a positive int"),
        ({"chunk_size": 2.5}, TypeError, r"chunk_size must be an int"),
        ({"mask": Shape(5, 7), "mask_dtype": mx.int32}, TypeError,
         r"mask must have dtype bool, float16, bfloat16, float32; got mlx.core.int32"),
        ({"mask": Shape(5, 7), "mask_dtype": mx.uint8}, TypeError, r"mask must have dtype bool"),
        ({"path": "fast"}, ValueError, r"path must be one of"),
    ],
)
def test_flash_attention_rejects_bad_layout_mask_chunk_and_path(options, error, message):
    with pytest.raises(error, match=message):
        flash_attention(*qkv(), **_materialize(options))


def test_packed_functions_reject_badly_packed_tensors():
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\)"):
        flash_attn_qkvpacked_func(normal(2, 5, 2, 4, 32))
    with pytest.raises(ValueError, match=r"qkv must have shape"):
        flash_attn_qkvpacked_func(normal(5, 3, 4, 32))
    with pytest.raises(ValueError, match=r"kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\)"):
        flash_attn_kvpacked_func(normal(2, 5, 4, 32), normal(2, 7, 3, 2, 32))
    with pytest.raises(ValueError, match=r"num_heads of q"):
        flash_attn_kvpacked_func(normal(2, 5, 3, 32), normal(2, 7, 2, 2, 32))


def _varlen(**changes):
    args = {
        "q": normal(8, 4, 32), "k": normal(10, 2, 32), "v": normal(10, 2, 32),
        "cu_seqlens_q": mx.array([0, 3, 8], dtype=mx.int32), "cu_seqlens_k": mx.array([0, 6, 10], dtype=mx.int32),
        "max_seqlen_q": 5, "max_seqlen_k": 6,
    }
    args.update(changes)
    return flash_attn_varlen_func(**args)


def test_varlen_accepts_the_good_call():
    assert _varlen().shape == (8, 4, 32)


@pytest.mark.parametrize(
    "changes,error,message",
    [
        ({"cu_seqlens_q": mx.array([0, 3, 8], dtype=mx.uint32)}, TypeError,
         r"cu_seqlens_q must have dtype int32, int64"),
        ({"cu_seqlens_k": mx.array([0.0, 6.0, 10.0])}, TypeError, r"cu_seqlens_k must have dtype int32, int64"),
        ({"cu_seqlens_q": mx.array([0, 5, 3, 8], dtype=mx.int32),
          "cu_seqlens_k": mx.array([0, 3, 6, 10], dtype=mx.int32)}, ValueError,
         r"cu_seqlens_q must be non-decreasing; got cu_seqlens_q\[1\] = 5 > cu_seqlens_q\[2\] = 3"),
        ({"cu_seqlens_k": mx.array([2, 6, 10], dtype=mx.int32)}, ValueError, r"cu_seqlens_k\[0\] must be 0; got 2"),
        ({"cu_seqlens_q": mx.array([0, 3, 7], dtype=mx.int32)}, ValueError,
         r"cu_seqlens_q\[-1\] must equal the number of packed tokens \(8\)"),
        ({"cu_seqlens_q": [0, 3, 8]}, TypeError, r"cu_seqlens_q must be an mx.array of shape \(batch \+ 1,\)"),
        ({"cu_seqlens_q": mx.array([0], dtype=mx.int32)}, ValueError, r"cu_seqlens_q must have shape \(batch \+ 1,\)"),
        ({"cu_seqlens_k": mx.array([0, 10], dtype=mx.int32), "max_seqlen_k": 10}, ValueError,
         r"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences"),
        ({"max_seqlen_q": 4}, ValueError, r"max_seqlen_q must be >= the longest sequence \(5\); got 4"),
        ({"max_seqlen_k": None}, TypeError, r"max_seqlen_k must be an int"),
        ({"max_seqlen_k": 6.0}, TypeError, r"max_seqlen_k must be an int"),
        ({"q": normal(1, 8, 4, 32)}, ValueError, r"q must have shape \(total_q, nheads, headdim\)"),
        ({"v": normal(10, 2)}, ValueError, r"v must have shape \(total_k, nheads_k, headdim_v\)"),
        ({"v": normal(9, 2, 32)}, ValueError, r"v must have shape \(total_k=10, nheads_k=2, headdim_v\) as k"),
        ({"k": normal(10, 2, 16)}, ValueError, r"k must have shape \(total_k, nheads_k, headdim=32\) as q"),
        ({"q": normal(8, 3, 32)}, ValueError, r"num_heads of q \(3\) must be a multiple"),
        ({"k": normal(10, 2, 32, dtype=mx.float16)}, TypeError, r"must share one dtype"),
        ({"alibi_slopes": normal(3, 4)}, ValueError, r"alibi_slopes must have shape \(nheads,\) or \(2, nheads\)"),
        ({"alibi_slopes": normal(5)}, ValueError, r"alibi_slopes must be an mx.array of shape \(4,\)"),
        ({"alibi_slopes": [0.5] * 4}, ValueError, r"alibi_slopes must be an mx.array"),
        ({"sinks": normal(2)}, ValueError, r"sinks must be an mx.array of shape \(4,\)"),
        ({"window_size": (-3, 0)}, ValueError, r"window_size"),
        ({"softcap": -2.0}, ValueError, r"softcap"),
        ({"dropout_p": 1.5}, ValueError, r"dropout_p"),
    ],
)
def test_varlen_rejects_bad_input_naming_the_argument(changes, error, message):
    with pytest.raises(error, match=message):
        _varlen(**changes)


def test_layers_reject_bad_construction_and_calls():
    with pytest.raises(ValueError, match=r"layout must be one of"):
        FlashAttention(4, 32, layout="HSD")
    with pytest.raises(ValueError, match=r"q must have 4 heads of dim 32"):
        FlashAttention(4, 32)(*random_qkv(1, 3, 3, 2, 2, 32))
    with pytest.raises(ValueError, match=r"window_size must be >= 1"):
        SlidingWindowAttention(4, 32, window_size=0)
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        Attention(48, 6, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"kernel must be one of"):
        Attention(32, 4, kernel="metal")
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, dims=32\); got \(5, 32\)"):
        Attention(32, 4)(normal(5, 32))
    with pytest.raises(ValueError, match=r"x must have shape \(batch, seq, dims=64\); got \(1, 5, 32\)"):
        Attention(64, 4)(normal(1, 5, 32))


BAD_LAYER_OPTIONS = [
    ({"window_size": (-3, 0)}, ValueError, r"window_size entries must be >= -1"),
    ({"window_size": (2.0, 0)}, TypeError, r"window_size\[0\] must be an int"),
    ({"softcap": -1.0}, ValueError, r"softcap must be a finite float >= 0"),
    ({"softcap": True}, TypeError, r"softcap must be a real number"),
    ({"scale": "0.1"}, TypeError, r"softmax_scale must be a real number"),
    ({"causal": "yes"}, TypeError, r"causal must be a bool"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
]


@pytest.mark.parametrize("options,error,message", BAD_LAYER_OPTIONS)
def test_layers_reject_bad_options_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        FlashAttention(4, 32, **options)
    with pytest.raises(error, match=message):
        SlidingWindowAttention(4, 32, **{"window_size": 8, **options})
    attention_options = {key: val for key, val in options.items() if key in ("window_size", "softcap", "scale")}
    if attention_options:
        with pytest.raises(error, match=message):
            Attention(32, 4, **attention_options)


def test_sliding_window_takes_numpy_widths_and_rejects_other_types():
    assert SlidingWindowAttention(4, 32, window_size=np.int64(5)).window_size == (4, 0)
    assert SlidingWindowAttention(4, 32, window_size=5, causal=False).window_size == (2, 2)
    with pytest.raises(TypeError, match=r"window_size must be an int; got float"):
        SlidingWindowAttention(4, 32, window_size=5.0)


@pytest.mark.parametrize("path", ["reference", "auto"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_in_any_input_gives_nan_output_not_a_crash(where, path):
    q, k, v = qkv()
    arrays = {"q": q, "k": k, "v": v}
    arrays[where][0, 0, 0, 0] = mx.nan
    for options in ({}, {"causal": True}, {"softcap": 3.0, "alibi_slopes": mx.ones((H,))}):
        out = flash_attn_func(arrays["q"], arrays["k"], arrays["v"], path=path, **options)
        assert mx.isnan(out[0]).any()
        assert not mx.isnan(out[1]).any()  # the other batch row is untouched
