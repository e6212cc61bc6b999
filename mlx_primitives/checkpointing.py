"""Activation recomputation for training: ``checkpoint`` and ``checkpoint_sequential`` on ``mx.checkpoint``.

A checkpointed function keeps only its inputs for the backward pass and recomputes its intermediates
there: less peak memory for one more forward. Layers (``nn.Module``) are checkpointed with their
trainable parameters passed as inputs, so their gradients flow as usual (the pattern of mlx-lm's
``grad_checkpoint``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import mlx.core as mx
import mlx.nn as nn


def _recomputed(blocks: Sequence[Callable]) -> Callable:
    """``blocks`` applied in order (the first takes the call's arguments), as one ``mx.checkpoint``."""
    modules = [block for block in blocks if isinstance(block, nn.Module)]

    def run(params, *args, **kwargs):
        for module, p in zip(modules, params):
            module.update(p)
        out = blocks[0](*args, **kwargs)
        for block in blocks[1:]:
            out = block(out)
        return out

    recomputed = mx.checkpoint(run)

    def call(*args: Any, **kwargs: Any):
        return recomputed([module.trainable_parameters() for module in modules], *args, **kwargs)

    return call


def _check_callable(name: str, fn) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable (a function or an nn.Module); got {type(fn).__name__}")


def checkpoint(fn: Callable) -> Callable:
    """``fn`` with its intermediates recomputed in the backward pass instead of stored.

    Args:
        fn: a function of arrays, or an ``nn.Module`` (its trainable parameters still get gradients).

    Returns:
        a callable with ``fn``'s signature and outputs.
    """
    _check_callable("fn", fn)
    return _recomputed([fn])


def checkpoint_sequential(blocks: Sequence[Callable], segments: int) -> Callable:
    """``x -> blocks[-1](...blocks[1](blocks[0](x)))`` storing activations only between segments.

    The blocks are cut into ``segments`` runs of consecutive blocks (as even as possible); each run
    but the last is checkpointed as one function, so the backward pass keeps one activation per
    segment and recomputes one segment at a time (PyTorch's ``checkpoint_sequential``; the last
    segment's activations are needed at once, so it is not recomputed).

    Args:
        blocks (sequence): callables (functions or ``nn.Module``) each taking the previous output.
        segments (int): number of segments, ``1 <= segments <= len(blocks)``.

    Returns:
        a callable of the first block's arguments.
    """
    blocks = list(blocks) if isinstance(blocks, (list, tuple)) else blocks
    if not isinstance(blocks, list) or not blocks:
        raise TypeError(f"blocks must be a non-empty list or tuple of callables; got {blocks!r}")
    for i, block in enumerate(blocks):
        _check_callable(f"blocks[{i}]", block)
    if not isinstance(segments, int) or not 1 <= segments <= len(blocks):
        raise ValueError(f"segments must be an int in [1, {len(blocks)}] (the number of blocks); got {segments!r}")
    size, extra = divmod(len(blocks), segments)
    runs, start = [], 0
    for s in range(segments):
        stop = start + size + (s < extra)
        runs.append(blocks[start:stop])
        start = stop
    stages = [_recomputed(run) for run in runs[:-1]]

    def call(*args: Any, **kwargs: Any):
        out = stages[0](*args, **kwargs) if stages else runs[-1][0](*args, **kwargs)
        for stage in stages[1:]:
            out = stage(out)
        for block in runs[-1] if stages else runs[-1][1:]:
            out = block(out)
        return out

    return call
