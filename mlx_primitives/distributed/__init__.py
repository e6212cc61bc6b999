"""Attention beyond one device, on ``mx.distributed``.

* :func:`ring_attention` -- context parallelism: one sequence split across ranks
  (:func:`shard_sequence` / :func:`gather_sequence`, zigzag-balanced under a causal mask).
* :func:`shard_attention` (``Attention.shard``) -- tensor parallelism: heads split across ranks.
* :func:`launch_local` -- run a script as ``n`` local ranks (ring over loopback, or NCCL).
"""

from .collectives import all_gather, default_transport, ring_shift
from .launch import launch_local
from .ring import ring_attention
from .sequence import chunk_ranges, gather_sequence, shard_sequence
from .tensor_parallel import shard_attention

__all__ = [
    "all_gather",
    "chunk_ranges",
    "default_transport",
    "gather_sequence",
    "launch_local",
    "ring_attention",
    "ring_shift",
    "shard_attention",
    "shard_sequence",
]
