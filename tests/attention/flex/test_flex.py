"""flex_attention's interface: validation, LSE, empty rows, routing and gradients against float64."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention.flex import create_block_mask, flex_attention, flex_route, mods, noop_mask
from tests.attention.flex.oracle import KERNEL_FALLBACK_IS_AN_ERROR, default_scale, flex64, grids, naive_flex
from tests.reference import assert_within_rule, random_qkv


def test_validation_names_the_argument():
    q, k, v = random_qkv(1, 64, 64, 4, 2, 32, layout="BHSD")
    with pytest.raises(ValueError, match="enable_gqa=True"):
        flex_attention(q, k, v)
    with pytest.raises(ValueError, match=r"block_mask was made for \(Q_LEN, KV_LEN\) = \(64, 32\)"):
        flex_attention(q, k, v, block_mask=create_block_mask(mods.causal(), None, None, 64, 32), enable_gqa=True)
    with pytest.raises(ValueError, match=r"block_mask has \(B, H\) = \(3, 1\)"):
        flex_attention(q, k, v, block_mask=create_block_mask(mods.causal(), 3, None, 64, 64), enable_gqa=True)
    with pytest.raises(TypeError, match="block_mask must be a BlockMask"):
        flex_attention(q, k, v, block_mask=mx.ones((64, 64), mx.bool_), enable_gqa=True)
    with pytest.raises(TypeError, match="score_mod must be a function"):
        flex_attention(q, k, v, score_mod=2.0, enable_gqa=True)
    with pytest.raises(ValueError, match="q must have shape"):
        flex_attention(q[0], k, v)
    with pytest.raises(TypeError, match="scale must be a real number"):
        flex_attention(q, k, v, scale="0.5", enable_gqa=True)
    with pytest.raises(TypeError, match="enable_gqa must be a bool"):
        flex_attention(q, k, v, enable_gqa="yes")
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        flex_attention(q, k, v, enable_gqa=True, return_lse="no")
    with pytest.raises(TypeError, match="score_mod must return an mx.array or a Python scalar; got NoneType"):
        flex_attention(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: None, enable_gqa=True)
    with pytest.raises(ValueError, match=r"score_mod returned shape \(3,\), which does not broadcast"):
        flex_attention(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: mx.zeros(3), enable_gqa=True)


def test_constant_mods_and_empty_queries():
    """Mods returning scalars broadcast (PyTorch's noop_mask); a call without queries returns empty arrays."""
    q, k, v = random_qkv(2, 32, 48, 2, 1, 16, layout="BHSD")
    block_mask = create_block_mask(noop_mask, None, None, 32, 48, BLOCK_SIZE=16)
    out = flex_attention(q, k, v, score_mod=lambda score, b, h, q_idx, kv_idx: 0.0, block_mask=block_mask,
                         enable_gqa=True)
    uniform = lambda s, b, h, qi, ki: np.zeros_like(s)  # noqa: E731
    ref = flex64(q, k, v, default_scale(16), uniform)["out"]
    assert_within_rule(out, ref, naive_flex(q, k, v, default_scale(16), uniform), mx.float32)
    out, lse = flex_attention(q[:, :, :0], k, v, enable_gqa=True, return_lse=True)
    assert out.shape == (2, 2, 0, 16) and lse.shape == (2, 2, 0) and lse.dtype == mx.float32


def test_rows_that_see_no_key_give_zeros_and_minus_inf_lse():
    q, k, v = random_qkv(1, 40, 40, 2, 2, 16, layout="BHSD")
    strictly_past = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx > kv_idx, None, None, 40, 40, BLOCK_SIZE=16)
    out, lse = flex_attention(q, k, v, block_mask=strictly_past, return_lse=True)
    assert np.all(np.array(out[:, :, 0]) == 0) and np.all(np.isneginf(np.array(lse[:, :, 0])))
    visible = grids(1, 2, 40, 40)[2] > grids(1, 2, 40, 40)[3]
    ref = flex64(q, k, v, default_scale(16), None, visible)["out"]
    assert_within_rule(out, ref, naive_flex(q, k, v, default_scale(16), None, visible), mx.float32)
    assert isinstance(flex_attention(q, k, v, scale=0.3), mx.array)


def _gradient_check(dtype, seq_len, head_dim, block_size, atol):
    q, k, v = random_qkv(2, seq_len, seq_len, 4, 2, head_dim, dtype=dtype, layout="BHSD")
    ids = np.sort(np.random.default_rng(seq_len).integers(0, 3, seq_len))
    table = mx.random.normal((4, 7))
    cotangent = mx.random.normal(q.shape).astype(dtype)
    block_mask = create_block_mask(mods.document(mx.array(ids, mx.int32), causal=True), None, None, seq_len,
                                   seq_len, BLOCK_SIZE=block_size)

    def loss(q, k, v, table):
        score_mod = mods.compose(mods.softcap(4.0), mods.relative_position_bias(table, 3))
        out = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
        return (out.astype(mx.float32) * cotangent.astype(mx.float32)).sum()

    grads = mx.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, table)
    table64 = np.array(table, np.float64)
    b, h, qi, ki = grids(2, 4, seq_len, seq_len)
    bucket = np.broadcast_to(np.clip(ki - qi, -3, 3) + 3, (2, 4, seq_len, seq_len))
    ref = flex64(q, k, v, default_scale(head_dim),
                 lambda s, b, h, qi, ki: 4.0 * np.tanh(s / 4.0) + table64[h, np.clip(ki - qi, -3, 3) + 3],
                 (ids[qi] == ids[ki]) & (qi >= ki), lambda s, b, h, qi, ki: 1.0 - np.tanh(s / 4.0) ** 2,
                 grad_out=cotangent)
    dtable = np.zeros((4, 7))
    np.add.at(dtable, (np.broadcast_to(h, bucket.shape), bucket), ref["dscore"])
    for ours, name in zip(grads, ("dq", "dk", "dv")):
        np.testing.assert_allclose(np.array(ours.astype(mx.float32)), ref[name], atol=atol, err_msg=name)
    np.testing.assert_allclose(np.array(grads[3]), dtable, atol=atol * 4, err_msg="dtable")
    return q, k, v, block_mask


def test_gradients_match_float64_including_the_captured_table():
    _gradient_check(mx.float32, seq_len=70, head_dim=16, block_size=32, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.filterwarnings(KERNEL_FALLBACK_IS_AN_ERROR)
def test_kernel_gradients_match_float64_including_the_captured_table():
    q, k, v, block_mask = _gradient_check(mx.float16, seq_len=200, head_dim=64, block_size=128, atol=3e-2)
    score_mod = mods.compose(mods.softcap(4.0), mods.relative_position_bias(mx.zeros((4, 7)), 3))
    assert flex_route(q, k, v, score_mod, block_mask, enable_gqa=True).path == "kernel"


@pytest.mark.gpu
def test_block_sizes_the_kernel_cannot_walk_go_to_the_reference():
    q, k, v = random_qkv(1, 96, 96, 2, 2, 64, dtype=mx.float16, layout="BHSD")
    route = flex_route(q, k, v, block_mask=create_block_mask(mods.causal(), None, None, 96, 96, BLOCK_SIZE=48))
    assert route.path == "reference" and "not a multiple" in route.reason


def test_prepared_calls_follow_what_the_mods_read():
    """Calls are prepared once per key (trace.fingerprint); a mod whose closure, default or global
    changes, or a new captured array, gets a fresh preparation and the answer it asks for."""
    from mlx_primitives.attention.flex import api
    from mlx_primitives.attention.flex.trace import fingerprint

    q, k, v = random_qkv(1, 48, 48, 2, 2, 16, layout="BHSD")
    scale = default_scale(16)

    def shifted(bias):
        return lambda score, b, h, q_idx, kv_idx: score + bias * (q_idx - kv_idx)

    api._PREPARED.clear()
    for bias in (0.1, 0.1, -0.2):
        out = flex_attention(q, k, v, score_mod=shifted(bias))
        fn = lambda s, b, h, qi, ki: s + bias * (qi - ki)  # noqa: E731
        assert_within_rule(out, flex64(q, k, v, scale, fn)["out"], naive_flex(q, k, v, scale, fn), mx.float32)
    assert len(api._PREPARED) == 2  # 0.1 twice, then -0.2

    for table in (mx.random.normal((2,)), mx.random.normal((2,))):  # a new captured array each time
        out = flex_attention(q, k, v, score_mod=lambda s, b, h, q_idx, kv_idx: s + table[h])
        table64 = np.array(table, np.float64)
        fn = lambda s, b, h, qi, ki: s + table64[h]  # noqa: E731
        assert_within_rule(out, flex64(q, k, v, scale, fn)["out"], naive_flex(q, k, v, scale, fn), mx.float32)

    class Holder:
        bias = 0.5

    holder = Holder()
    unkeyable = lambda s, b, h, q_idx, kv_idx: s + holder.bias  # noqa: E731
    assert fingerprint(unkeyable) is None  # an object's attribute: traced on every call
