"""Flex attention: the generality's cost and the block-sparse payoff.

* Causal and sliding-window (W=1k) masks through ``create_block_mask`` + ``flex_attention`` against
  our dedicated flash kernel with the same mask (issue-8 target: flex >= 70% of its speed).
* Document masking, 8 equal documents in L=16k, against ``mx.fast.scaled_dot_product_attention``
  with the equivalent boolean mask (target: flex >= 5x faster) and against sdpa without a mask.
* ``create_block_mask`` at L=32k (target: < 50 ms), B and H broadcast.

Rows: fp16, B=1, H=16, D=128, BLOCK_SIZE=128. "max |diff|" compares flex's output with the
dedicated kernel's (or sdpa's) on the same inputs. Attention times are per call with several calls
queued in one graph (``time_per_call_ms``) in the mask table, which also gives one-call-at-a-time
times; the document table times one call at a time.
"""

from __future__ import annotations

from typing import List

import mlx.core as mx

from mlx_primitives.attention.flex import create_block_mask, flex_attention, flex_route, mods
from mlx_primitives.attention.spec import describe_attention
from mlx_primitives.kernels.flash_attention import flash_attention

from .common import Table, time_ms, time_per_call_ms

HEADS, HEAD_DIM, WINDOW, DOCUMENTS = 16, 128, 1024, 8


def _inputs(length: int):
    q, k, v = (mx.random.normal((1, HEADS, length, HEAD_DIM)).astype(mx.float16) for _ in range(3))
    mx.eval(q, k, v)
    return q, k, v


def _diff(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


def run(quick: bool = False) -> List[Table]:
    lengths = (4096,) if quick else (4096, 16384)
    repeats = 3 if quick else 10
    masks = Table(
        title=f"Flex vs the dedicated flash kernel (fp16, B=1, H={HEADS}, D={HEAD_DIM}, BLOCK_SIZE=128)",
        columns=("mask", "L", "flex ms", "dedicated ms", "flex speed / dedicated", "sync flex ms",
                 "sync dedicated ms", "sync ratio", "max |diff|", "flex route", "target"),
        note="ms: per call with 20 calls queued in one graph (as in a model; Python overhead overlaps the GPU). "
             "sync: one call evaluated at a time (adds each call's Python time, ~0.2 ms for flex, to the GPU time). "
             "The dedicated kernel is timed with its AttentionSpec prepared outside the loop; flex pays its "
             "argument checks and mod tracing in every call.",
    )
    for length in lengths:
        q, k, v = _inputs(length)
        for name, mask_mod, options in (
            ("causal", mods.causal(), {"causal": True}),
            (f"sliding window {WINDOW}", mods.sliding_window(WINDOW), {"causal": True, "window_size": (WINDOW, -1)}),
        ):
            block_mask = create_block_mask(mask_mod, None, None, length, length)
            spec = describe_attention(q, k, v, **options)
            flex_ms = time_per_call_ms(lambda: flex_attention(q, k, v, block_mask=block_mask), repeats=repeats)
            dedicated_ms = time_per_call_ms(lambda: flash_attention(q, k, v, spec)[0], repeats=repeats)
            flex_sync_ms = time_ms(lambda: flex_attention(q, k, v, block_mask=block_mask), repeats=repeats)
            dedicated_sync_ms = time_ms(lambda: flash_attention(q, k, v, spec)[0], repeats=repeats)
            diff = _diff(flex_attention(q, k, v, block_mask=block_mask), flash_attention(q, k, v, spec)[0])
            masks.add(name, length, flex_ms, dedicated_ms, dedicated_ms / flex_ms, flex_sync_ms, dedicated_sync_ms,
                      dedicated_sync_ms / flex_sync_ms, diff,
                      flex_route(q, k, v, block_mask=block_mask).path, ">= 0.70")

    documents = Table(
        title=f"Document masking, {DOCUMENTS} equal documents (fp16, B=1, H={HEADS}, D={HEAD_DIM})",
        columns=("L", "flex ms", "sdpa + bool mask ms", "speedup", "sdpa no mask ms", "max |diff|", "target"),
    )
    length = 4096 if quick else 16384
    q, k, v = _inputs(length)
    ids = mx.arange(length, dtype=mx.int32) // (length // DOCUMENTS)
    block_mask = create_block_mask(mods.document(ids), None, None, length, length)
    dense = ids[:, None] == ids[None, :]
    mx.eval(dense)
    scale = HEAD_DIM**-0.5
    # One call at a time: sdpa with a boolean mask materializes the (H, L, L) scores (8 GiB here).
    flex_ms = time_ms(lambda: flex_attention(q, k, v, block_mask=block_mask), repeats=repeats)
    sdpa_ms = time_ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=dense), repeats=repeats)
    plain_ms = time_ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale), repeats=repeats)
    diff = _diff(flex_attention(q, k, v, block_mask=block_mask),
                 mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=dense))
    documents.add(length, flex_ms, sdpa_ms, sdpa_ms / flex_ms, plain_ms, diff, ">= 5x")
    del dense

    creation = Table(
        title="create_block_mask (B = H = None, BLOCK_SIZE=128)",
        columns=("mask_mod", "L", "ms", "sparsity", "target"),
    )
    length = 8192 if quick else 32768
    ids = mx.arange(length, dtype=mx.int32) // (length // DOCUMENTS)
    for name, mask_mod in (("causal", mods.causal()), (f"sliding window {WINDOW}", mods.sliding_window(WINDOW)),
                           ("document (8)", mods.document(ids))):
        ms = time_ms(lambda: create_block_mask(mask_mod, None, None, length, length).kv_indices, repeats=repeats)
        sparsity = create_block_mask(mask_mod, None, None, length, length).sparsity()
        creation.add(name, length, ms, f"{sparsity:.1f}%", "< 50 ms")
    return [masks, documents, creation]
