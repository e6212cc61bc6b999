"""Context and tensor parallelism in one process: the split arithmetic, validation and the size-1 paths."""

import json
import os
import subprocess

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_primitives import Attention
from mlx_primitives.attention import flash_attn_func
from mlx_primitives.distributed import (
    all_gather, chunk_ranges, gather_sequence, launch_local, ring_attention, ring_shift, shard_attention,
    shard_sequence,
)
from mlx_primitives.distributed.launch import rank_environments
from mlx_primitives.distributed.sequence import zigzag_chunk_slots
from tests.reference import random_qkv


def test_zigzag_pairs_chunks_from_both_ends():
    assert [chunk_ranges(16, r, 4) for r in range(4)] == [
        [(0, 2), (14, 16)], [(2, 4), (12, 14)], [(4, 6), (10, 12)], [(6, 8), (8, 10)]]
    assert chunk_ranges(12, 1, 3, "contiguous") == [(4, 8)]


@pytest.mark.parametrize("size", [2, 3, 4])
def test_zigzag_balances_causal_pairs(size):
    length = 8 * size
    pairs = [sum(min(stop, i + 1) for start, stop in chunk_ranges(length, r, size) for i in range(start, stop))
             for r in range(size)]
    contiguous = [sum(i + 1 for start, stop in chunk_ranges(length, r, size, "contiguous") for i in range(start, stop))
                  for r in range(size)]
    assert len(set(pairs)) == 1 and sum(pairs) == sum(contiguous) and len(set(contiguous)) == size


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_zigzag_slots_restore_token_order(size):
    length, chunk = 4 * size, 2
    concatenated = np.concatenate([np.arange(length)[start:stop] for r in range(size)
                                   for start, stop in chunk_ranges(length, r, size)])
    restored = np.concatenate([concatenated[s * chunk:(s + 1) * chunk] for s in zigzag_chunk_slots(size)])
    assert np.array_equal(restored, np.arange(length))


@pytest.mark.parametrize("split", ["zigzag", "contiguous"])
def test_sequence_round_trip_on_one_rank(split):
    x = mx.random.normal((2, 8, 3))
    part = shard_sequence(x, axis=1, split=split)
    assert np.array_equal(np.array(gather_sequence(part, axis=1, split=split)), np.array(x))


def test_bad_lengths_and_options_name_the_argument():
    with pytest.raises(ValueError, match="multiple of 6"):
        chunk_ranges(10, 0, 3)
    with pytest.raises(ValueError, match="split"):
        chunk_ranges(8, 0, 2, "striped")
    q, k, v = random_qkv(1, 8, 4, 2, 2, 8)
    with pytest.raises(ValueError, match="same local length"):
        ring_attention(q, k, v)
    q, k, v = random_qkv(1, 8, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="transport"):
        ring_attention(q, k, v, transport="nvlink")
    with pytest.raises(ValueError, match="k must have"):
        ring_attention(q, k[:, :, :1, :5], v)


def test_one_rank_holds_a_zigzag_sequence_of_any_length():
    x = mx.random.normal((1, 7, 2))
    assert chunk_ranges(7, 0, 1) == [(0, 7)]
    assert np.array_equal(np.array(gather_sequence(shard_sequence(x))), np.array(x))


def test_bad_ranges_and_axes_name_the_argument():
    with pytest.raises(ValueError, match="rank < size"):
        chunk_ranges(16, 2, 2)
    with pytest.raises(ValueError, match="length >= 0"):
        chunk_ranges(-4, 0, 2)
    with pytest.raises(TypeError, match="length must be an int"):
        chunk_ranges(8.0, 0, 2)
    x = mx.random.normal((2, 8, 3))
    with pytest.raises(ValueError, match=r"axis must lie in \[-3, 3\)"):
        shard_sequence(x, axis=3)
    with pytest.raises(ValueError, match="axis must lie"):
        gather_sequence(x, axis=-4)
    with pytest.raises(ValueError, match="axis must lie"):
        all_gather(x, axis=5)
    with pytest.raises(TypeError, match="x must be an mx.array"):
        shard_sequence(np.array(x))
    with pytest.raises(TypeError, match="x_local must be an mx.array"):
        gather_sequence(np.array(x))


def test_group_that_is_no_group_is_named():
    q, k, v = random_qkv(1, 8, 8, 2, 2, 8)
    calls = [lambda: ring_attention(q, k, v, group=2), lambda: shard_sequence(q, "world"),
             lambda: gather_sequence(q, 0), lambda: all_gather(q, 1), lambda: ring_shift(q, 1),
             lambda: Attention(16, 2).shard(2)]
    for call in calls:
        with pytest.raises(TypeError, match="group must be an mx.distributed.Group"):
            call()


def test_bad_options_of_the_layer_and_launcher_are_named():
    with pytest.raises(TypeError, match="attention must be an mlx_primitives.Attention"):
        shard_attention(nn.Linear(4, 4))
    q, k, v = random_qkv(1, 8, 8, 2, 2, 8)
    with pytest.raises(TypeError, match="return_lse must be a bool"):
        ring_attention(q, k, v, return_lse=1)
    with pytest.raises(ValueError, match="size must be at least 1"):
        launch_local(0, ["-c", "pass"])
    with pytest.raises(TypeError, match="args must be a list"):
        launch_local(1, "-c pass")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("transport", ["ring", "gather"])
def test_one_rank_is_plain_attention(causal, transport):
    q, k, v = random_qkv(2, 16, 16, 4, 2, 8, v_dim=4)
    out, lse = ring_attention(q, k, v, causal=causal, transport=transport, return_lse=True)
    want, want_lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert np.allclose(np.array(out), np.array(want), atol=1e-5)
    assert np.allclose(np.array(lse), np.array(want_lse), atol=1e-5)
    grads = mx.grad(lambda q: ring_attention(q, k, v, causal=causal).sum())(q)
    want_grads = mx.grad(lambda q: flash_attn_func(q, k, v, causal=causal).sum())(q)
    assert np.allclose(np.array(grads), np.array(want_grads), atol=1e-5)


def test_one_rank_leaves_attention_unsharded():
    layer = Attention(16, 4, num_kv_heads=2)
    weights = np.array(layer.q_proj.weight)
    assert layer.shard() is layer and shard_attention(layer) is layer
    assert layer.num_heads == 4 and np.array_equal(np.array(layer.q_proj.weight), weights)


def test_rank_environments_follow_mlx_launch(tmp_path):
    hostfile = str(tmp_path / "hosts.json")
    ring = rank_environments(3, "ring", hostfile)
    assert [env["MLX_RANK"] for env in ring] == ["0", "1", "2"]
    hosts = json.load(open(hostfile))
    assert len(hosts) == 3 and all(len(h) == 1 and h[0].startswith("127.0.0.1:") for h in hosts)
    nccl = rank_environments(2, "nccl", hostfile)
    assert [env["CUDA_VISIBLE_DEVICES"] for env in nccl] == ["0", "1"]
    assert {env["MLX_WORLD_SIZE"] for env in nccl} == {"2"} and len({env["NCCL_PORT"] for env in nccl}) == 1
    assert {env["NCCL_NVLS_ENABLE"] for env in nccl} <= {"0", os.environ.get("NCCL_NVLS_ENABLE")}
    with pytest.raises(ValueError, match="backend"):
        rank_environments(2, "gloo", hostfile)


def test_ranks_that_time_out_leave_their_output():
    script = "import os, time; print('rank', os.environ['MLX_RANK'], 'started', flush=True); time.sleep(60)"
    with pytest.raises(subprocess.TimeoutExpired) as error:
        launch_local(2, ["-c", script], timeout=3, capture=True)
    assert "--- rank 1 ---\nrank 1 started" in error.value.output and error.value.stderr is not None
