"""Every mod of the library against the float64 oracle: reference path (CPU) and kernel (GPU)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention.flex import create_block_mask, flex_attention, flex_route
from tests.attention.flex.oracle import KERNEL_FALLBACK_IS_AN_ERROR, CASE_NAMES, case, default_scale, flex64, naive_flex
from tests.reference import assert_within_rule, random_qkv

BATCH, HEADS, KV_HEADS = 2, 4, 2


def _run(name, dtype, seq_len, head_dim, block_size):
    q, k, v = random_qkv(BATCH, seq_len, seq_len, HEADS, KV_HEADS, head_dim, dtype=dtype, layout="BHSD")
    score_mod, mask_mod, score_fn, _, visible_fn = case(name, BATCH, HEADS, seq_len)
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, BATCH if "per_sequence" in name else None, None, seq_len, seq_len,
                                       BLOCK_SIZE=block_size)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True, return_lse=True)
    scale = default_scale(head_dim)
    from tests.attention.flex.oracle import grids

    visible = None if visible_fn is None else visible_fn(*grids(BATCH, HEADS, seq_len, seq_len))
    ref = flex64(q, k, v, scale, score_fn, visible)
    naive = naive_flex(q, k, v, scale, score_fn, visible)
    assert_within_rule(out, ref["out"], naive, dtype)
    finite = np.isfinite(ref["lse"])
    np.testing.assert_array_equal(np.isfinite(np.array(lse)), finite)
    np.testing.assert_allclose(np.array(lse)[finite], ref["lse"][finite], atol=2e-2 if dtype != mx.float32 else 1e-4)
    return q, k, v, score_mod, block_mask


@pytest.mark.filterwarnings(KERNEL_FALLBACK_IS_AN_ERROR)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_mod_on_reference_path_matches_float64(name):
    _run(name, mx.float32, seq_len=150, head_dim=32, block_size=32)


@pytest.mark.gpu
@pytest.mark.filterwarnings(KERNEL_FALLBACK_IS_AN_ERROR)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_mod_on_kernel_matches_float64(name, dtype):
    q, k, v, score_mod, block_mask = _run(name, dtype, seq_len=333, head_dim=64, block_size=128)
    assert flex_route(q, k, v, score_mod, block_mask, enable_gqa=True).path == "kernel"
