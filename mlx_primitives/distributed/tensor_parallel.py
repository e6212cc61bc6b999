"""Tensor (head) parallel attention: the heads of one :class:`~mlx_primitives.Attention` split across ranks.

Megatron's split with MLX's sharded layers (``mlx.nn.layers.distributed.shard_linear``): the
q, k, v projections become ``AllToShardedLinear`` (each rank computes its heads from the full
input; their input gradients are summed over ranks), the output projection a
``ShardedToAllLinear`` (each rank multiplies its heads' slice, one ``all_sum`` joins them),
or their quantized twins for ``nn.QuantizedLinear`` projections. Attention itself needs no
communication: a query head only reads its own KV head.

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
from mlx.nn.layers.distributed import AllToShardedLinear, QuantizedAllToShardedLinear, shard_linear
from mlx.utils import tree_map

from ..attention.layers import Attention
from .collectives import resolve_group


def _repeat_heads(linear: nn.Module, heads: int, copies: int) -> nn.Module:
    """``linear`` with each of its ``heads`` output heads repeated ``copies`` times (in place).

    Every parameter of a (quantized) linear layer has the output rows on axis 0, so this works on
    ``weight``, ``scales``, ``biases`` and ``bias`` alike.
    """
    def repeat(p: mx.array) -> mx.array:
        return mx.repeat(p.reshape(heads, -1, *p.shape[1:]), copies, axis=0).reshape(-1, *p.shape[1:])

    linear.update(tree_map(repeat, linear.parameters()))
    return linear


def shard_attention(attention: nn.Module, group: Optional[mx.distributed.Group] = None) -> nn.Module:
    """Split ``attention``'s heads across ``group`` in place and return it.

    Args:
        attention: an :class:`~mlx_primitives.Attention` holding the full (same on every rank) weights;
            its projections may be ``nn.Linear`` or ``nn.QuantizedLinear`` (MLX's ``shard_linear`` takes both).
            Quantize before sharding: ``nn.quantize`` leaves MLX's sharded linear layers in float (MLX 0.32).
        group: default ``mx.distributed.init()``; size 1 leaves the layer unchanged.

    Returns:
        ``attention``, with ``num_heads`` / ``num_kv_heads`` the per-rank counts. Its output, the
        same on every rank, equals the unsharded layer's.
    """
    if not isinstance(attention, Attention):
        raise TypeError(f"attention must be an mlx_primitives.Attention; got {type(attention).__name__}")
    group = resolve_group(group)
    size = group.size()
    if size == 1:
        return attention
    if isinstance(attention.q_proj, (AllToShardedLinear, QuantizedAllToShardedLinear)):
        raise ValueError("attention is already sharded (its projections are MLX's sharded linear layers)")
    heads, kv_heads = attention.num_heads, attention.num_kv_heads
    if heads % size:
        raise ValueError(f"num_heads ({heads}) must be a multiple of the group size ({size})")
    if kv_heads % size and size % kv_heads:
        raise ValueError(
            f"num_kv_heads ({kv_heads}) must divide or be a multiple of the group size ({size})"
        )
    kv_projections = [attention.k_proj, attention.v_proj]
    if kv_heads < size:  # one copy of each KV head per rank that reads it
        kv_projections = [_repeat_heads(p, kv_heads, size // kv_heads) for p in kv_projections]
    attention.q_proj = shard_linear(attention.q_proj, "all-to-sharded", group=group)
    attention.k_proj, attention.v_proj = (shard_linear(p, "all-to-sharded", group=group) for p in kv_projections)
    attention.o_proj = shard_linear(attention.o_proj, "sharded-to-all", group=group)
    attention.num_heads, attention.num_kv_heads = heads // size, max(kv_heads // size, 1)
    return attention
