"""Tensor (head) parallel attention: the heads of one :class:`~mlx_primitives.Attention` split across ranks.

Megatron's split with MLX's sharded layers (``mlx.nn.layers.distributed``): the q, k, v
projections become :class:`~mlx.nn.AllToShardedLinear` (each rank computes its heads from
the full input; their input gradients are summed over ranks), the output projection a
:class:`~mlx.nn.ShardedToAllLinear` (each rank multiplies its heads' slice, one
``all_sum`` joins them). Attention itself needs no communication: a query head only reads
its own KV head.

GQA: with ``n`` ranks, ``Hq`` query and ``Hk`` KV heads, rank ``r`` keeps query heads
``[r Hq / n, (r + 1) Hq / n)``. When ``n`` divides ``Hk`` it keeps KV heads
``[r Hk / n, (r + 1) Hk / n)``, the ones those queries read. When ``Hk`` divides ``n``
(fewer KV heads than ranks, MQA) each rank keeps a copy of the one KV head its queries
read; in training the gradients of such a copy are partial (this rank's queries only)
and must be summed over the ``n / Hk`` ranks sharing it before an update.

The KV cache shards with the heads: ``k``/``v`` reaching the cache have ``num_kv_heads``
(per rank) heads, so mlx-lm style caches hold ``1 / n`` of the keys (or ``1 / Hk`` of
them when copies are kept); caches built with a head count (``PagedKVCache``) take the
layer's ``num_kv_heads`` after :func:`shard_attention`.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import AllToShardedLinear, ShardedToAllLinear


def _kv_heads_slice(linear: nn.Linear, head_dim: int, first: int, count: int,
                    group: mx.distributed.Group) -> AllToShardedLinear:
    """An all-to-sharded projection computing heads ``[first, first + count)`` of ``linear`` on this rank."""
    rows = slice(first * head_dim, (first + count) * head_dim)
    sharded = AllToShardedLinear(linear.weight.shape[1], count * head_dim * group.size(), "bias" in linear, group)
    sharded.weight = linear.weight[rows]
    if "bias" in linear:
        sharded.bias = linear.bias[rows]
    return sharded


def shard_attention(attention: nn.Module, group: Optional[mx.distributed.Group] = None) -> nn.Module:
    """Split ``attention``'s heads across ``group`` in place and return it.

    Args:
        attention: an :class:`~mlx_primitives.Attention` holding the full (same on every rank) weights.
        group: default ``mx.distributed.init()``; size 1 leaves the layer unchanged.

    Returns:
        ``attention``, with ``num_heads`` / ``num_kv_heads`` the per-rank counts. Its output, the
        same on every rank, equals the unsharded layer's.
    """
    group = group if group is not None else mx.distributed.init()
    size, rank = group.size(), group.rank()
    if size == 1:
        return attention
    heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    if heads % size:
        raise ValueError(f"num_heads ({heads}) must be a multiple of the group size ({size})")
    if kv_heads % size and size % kv_heads:
        raise ValueError(
            f"num_kv_heads ({kv_heads}) must divide or be a multiple of the group size ({size})"
        )
    local_heads = heads // size
    if kv_heads % size == 0:
        local_kv, first_kv = kv_heads // size, rank * (kv_heads // size)
    else:
        local_kv, first_kv = 1, rank * local_heads // (heads // kv_heads)
    attention.q_proj = AllToShardedLinear.from_linear(attention.q_proj, group=group)
    attention.k_proj = _kv_heads_slice(attention.k_proj, head_dim, first_kv, local_kv, group)
    attention.v_proj = _kv_heads_slice(attention.v_proj, head_dim, first_kv, local_kv, group)
    attention.o_proj = ShardedToAllLinear.from_linear(attention.o_proj, group=group)
    attention.num_heads, attention.num_kv_heads = local_heads, local_kv
    return attention
