"""create_block_mask against block states computed element by element in NumPy."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention.flex import BlockMask, create_block_mask, create_mask, mods, noop_mask
from mlx_primitives.attention.flex import block_mask as block_mask_module


def _states64(visible: np.ndarray, qb: int, kb: int) -> np.ndarray:
    """(B, H, NQ, NK) states of a dense (B, H, Sq, Sk) boolean: 0 hidden, 1 partly, 2 fully visible."""
    bsz, heads, q_len, k_len = visible.shape
    nq, nk = -(-q_len // qb), -(-k_len // kb)
    states = np.zeros((bsz, heads, nq, nk), np.int32)
    for i in range(nq):
        for j in range(nk):
            tile = visible[:, :, i * qb:(i + 1) * qb, j * kb:(j + 1) * kb]
            states[:, :, i, j] = tile.any(axis=(2, 3)).astype(np.int32) + tile.all(axis=(2, 3))
    return states


def _check_lists(block_mask: BlockMask, states: np.ndarray):
    for count, indices, state in (
        (block_mask.kv_num_blocks, block_mask.kv_indices, 1),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, 2),
    ):
        count, indices = np.array(count), np.array(indices)
        np.testing.assert_array_equal(count, (states == state).sum(axis=-1))
        for index in np.ndindex(*count.shape):
            listed = indices[index][: count[index]]
            np.testing.assert_array_equal(listed, np.nonzero(states[index] == state)[0])
    np.testing.assert_array_equal(np.array(block_mask.to_dense()), states)


@pytest.mark.parametrize("q_len, k_len, block", [(256, 256, 64), (200, 150, 64), (77, 300, (32, 64))])
def test_document_causal_blocks_match_elementwise_states(q_len, k_len, block):
    ids = np.sort(np.random.default_rng(q_len).integers(0, 4, max(q_len, k_len)))
    block_mask = create_block_mask(mods.document(mx.array(ids, mx.int32), causal=True), None, None, q_len, k_len,
                                   BLOCK_SIZE=block)
    q, k = np.arange(q_len)[:, None], np.arange(k_len)[None, :]
    visible = ((ids[q] == ids[k]) & (q >= k))[None, None]
    qb, kb = (block, block) if isinstance(block, int) else block
    _check_lists(block_mask, _states64(visible, qb, kb))
    assert block_mask.block_size == (qb, kb) and block_mask.shape == (1, 1, q_len, k_len)


def test_per_batch_and_head_masks_keep_their_axes():
    prefix = mx.array([5, 90], mx.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return mods.prefix_lm(prefix)(b, h, q_idx, kv_idx) & (kv_idx >= h * 20)

    block_mask = create_block_mask(mask_mod, 2, 3, 128, 128, BLOCK_SIZE=32)
    b, h = np.arange(2).reshape(-1, 1, 1, 1), np.arange(3).reshape(1, -1, 1, 1)
    q, k = np.arange(128).reshape(1, 1, -1, 1), np.arange(128).reshape(1, 1, 1, -1)
    visible = ((k < np.array([5, 90])[b]) | (q >= k)) & (k >= h * 20)
    _check_lists(block_mask, _states64(visible, 32, 32))


def test_chunked_evaluation_equals_one_pass(monkeypatch):
    one_pass = create_block_mask(mods.sliding_window(40), None, None, 300, 300, BLOCK_SIZE=16)
    monkeypatch.setattr(block_mask_module, "CHUNK_ELEMENTS", 16 * 16 * 20)  # one query block per step
    chunked = create_block_mask(mods.sliding_window(40), None, None, 300, 300, BLOCK_SIZE=16)
    np.testing.assert_array_equal(np.array(one_pass.to_dense()), np.array(chunked.to_dense()))
    assert 50.0 < chunked.sparsity() < 100.0


def test_no_mask_mod_lists_every_block_as_full():
    block_mask = create_block_mask(None, None, None, 100, 260, BLOCK_SIZE=128)
    assert np.array(block_mask.to_dense()).tolist() == [[[[2, 2, 2]]]]


@pytest.mark.parametrize("kwargs, match", [
    ({"B": 0}, "B must be a positive int"),
    ({"Q_LEN": -1}, "Q_LEN must be a positive int"),
    ({"BLOCK_SIZE": (64, 0)}, r"BLOCK_SIZE\[1\]"),
    ({"BLOCK_SIZE": (1, 2, 3)}, "BLOCK_SIZE must be an int or a pair"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    args = {"mask_mod": mods.causal(), "B": None, "H": None, "Q_LEN": 64, "KV_LEN": 64, **kwargs}
    with pytest.raises(ValueError, match=match):
        create_block_mask(**args)
    with pytest.raises(TypeError, match="mask_mod must be a function"):
        create_block_mask(3, None, None, 64, 64)


@pytest.mark.parametrize("mask_mod, state", [
    (noop_mask, 2), (mods.and_masks(), 2), (mods.or_masks(), 0), (lambda b, h, q_idx, kv_idx: mx.array(False), 0),
])
def test_constant_mask_mods_give_uniform_blocks(mask_mod, state):
    """A mask mod returning a scalar (PyTorch's noop_mask) broadcasts over the grid, lengths a multiple
    of the block size or not."""
    for q_len, k_len in ((64, 96), (50, 70)):
        block_mask = create_block_mask(mask_mod, None, 2, q_len, k_len, BLOCK_SIZE=32)
        np.testing.assert_array_equal(np.array(block_mask.to_dense()), np.full((1, 2, 2, 3), state))


@pytest.mark.parametrize("returned, error, match", [
    (None, TypeError, "mask_mod must return an mx.array or a Python scalar; got NoneType"),
    (np.ones(3, bool), TypeError, "got ndarray"),
    (mx.ones((3,), mx.bool_), ValueError, r"mask_mod returned shape \(3,\), which does not broadcast"),
])
def test_mask_mod_results_that_are_no_mask_name_the_mod(returned, error, match):
    with pytest.raises(error, match=match):
        create_block_mask(lambda b, h, q_idx, kv_idx: returned, None, None, 64, 64, BLOCK_SIZE=32)


def test_pytorch_spellings_device_and_BLOCK_SIZE():
    """PyTorch code passes device= (ignored here: unified memory) and reads BlockMask.BLOCK_SIZE."""
    block_mask = create_block_mask(mods.causal(), B=None, H=None, Q_LEN=96, KV_LEN=64, BLOCK_SIZE=(32, 16),
                                   device="cuda")
    q, k = np.arange(96)[:, None], np.arange(64)[None, :]
    _check_lists(block_mask, _states64((q >= k)[None, None], 32, 16))
    assert block_mask.BLOCK_SIZE == (32, 16)
    assert block_mask.sparsity() == pytest.approx(100.0 * 2 / 12)  # a percentage, as PyTorch: 2 of 12 blocks hidden
    with pytest.raises(TypeError, match="pass PyTorch's device by keyword"):
        create_block_mask(mods.causal(), None, None, 64, 64, "cuda")


def test_create_mask_is_the_dense_mask_of_the_mod():
    """create_mask (PyTorch's) equals the mod on the full grid; its block states are create_block_mask's."""
    prefix = mx.array([3, 40], mx.int32)

    def mask_mod(b, h, q_idx, kv_idx):
        return mods.prefix_lm(prefix)(b, h, q_idx, kv_idx) & (kv_idx >= h * 7)

    dense = create_mask(mask_mod, 2, 3, 50, 70)
    b, h = np.arange(2).reshape(-1, 1, 1, 1), np.arange(3).reshape(1, -1, 1, 1)
    q, k = np.arange(50).reshape(1, 1, -1, 1), np.arange(70).reshape(1, 1, 1, -1)
    visible = ((k < np.array([3, 40])[b]) | (q >= k)) & (k >= h * 7)
    assert dense.dtype == mx.bool_
    np.testing.assert_array_equal(np.array(dense), visible)
    _check_lists(create_block_mask(mask_mod, 2, 3, 50, 70, BLOCK_SIZE=16), _states64(visible, 16, 16))
    assert create_mask(noop_mask, None, None, 4, 6, device="cuda").shape == (1, 1, 4, 6)
    with pytest.raises(ValueError, match="KV_LEN must be a positive int"):
        create_mask(mask_mod, None, None, 4, 0)


def test_hand_built_block_masks_are_checked():
    """A BlockMask built from its lists (PyTorch's from_kv_blocks use) works like create_block_mask's; lists
    that disagree with the sizes, which the kernel indexes by, are refused."""
    made = create_block_mask(mods.causal(), None, 2, 64, 96, BLOCK_SIZE=32)
    arrays = [made.kv_num_blocks, made.kv_indices, made.full_kv_num_blocks, made.full_kv_indices]
    by_hand = BlockMask(*arrays, 32, [64, 96], mods.causal())
    assert by_hand.block_size == (32, 32) and by_hand.seq_lengths == (64, 96)
    np.testing.assert_array_equal(np.array(by_hand.to_dense()), np.array(made.to_dense()))
    with pytest.raises(ValueError, match=r"kv_indices must have shape \(1, 2, NQ=2, NK=3\); got \(1, 2, 2, 2\)"):
        BlockMask(arrays[0], arrays[1][..., :2], *arrays[2:], 32, (64, 96))
    with pytest.raises(ValueError, match=r"kv_num_blocks must have shape \(1, 2, NQ=3\); got \(1, 2, 2\)"):
        BlockMask(*arrays, 32, (96, 96))
    with pytest.raises(TypeError, match="full_kv_num_blocks must have dtype int32"):
        BlockMask(arrays[0], arrays[1], arrays[2].astype(mx.int64), arrays[3], 32, (64, 96))


def test_traced_mask_inputs_are_refused_by_name():
    """The block lists are built on the host: a mask_mod reading a traced argument of mx.compile is an
    error saying so; one reading a captured constant compiles."""
    ids = mx.array([0] * 20 + [1] * 12, mx.int32)
    with pytest.raises(ValueError, match="create_block_mask builds its block lists on the host"):
        mx.compile(lambda ids: create_block_mask(mods.document(ids), None, None, 32, 32, 16).kv_num_blocks)(ids)
    compiled = mx.compile(lambda: create_block_mask(mods.document(ids), None, None, 32, 32, 16).kv_num_blocks)
    assert compiled().tolist() == [[[1, 2]]]  # query block 1 straddles the documents: both key blocks partial
