"""Flex attention on the prefill kernel: traced mods and BlockMask lists compiled into ``flash_fwd.kern``.

There is no second attention kernel. A pair of traced mods (``attention/flex/trace.py``) becomes a
prologue of ``#define``s in front of the flash body (:class:`~.catalog.FlexKernel`):

* ``FLEX_SCORE(score, b, h, q_idx, kv_idx)`` and ``FLEX_MASK(b, h, q_idx, kv_idx)``, applied by the
  body's ``#ifdef FLEX_MODS`` hook to each scaled score (indices are the absolute query and key
  positions; ``h`` is the query head);
* ``FLEX_BLOCKS`` with ``FLEX_QB`` / ``FLEX_KB``: the body walks, for its query block, the tiles of
  the BlockMask's partly visible KV blocks (mask evaluated) and then of its fully visible ones (no
  mask), instead of the key range of a window.

Block sizes: the kernel's tile is ``BK`` keys by ``BQ = 16 * WARPS`` query rows, the BlockMask's
``(Q_BLOCK, KV_BLOCK)``. The mask is not re-blocked: a launch takes a tile config whose ``BQ``
divides ``Q_BLOCK`` and ``BK`` divides ``KV_BLOCK`` (so each kernel query block lies in one mask
row and each listed KV block is ``KV_BLOCK / BK`` whole tiles); the default 128 fits every
config. Where none fits, :func:`block_config` says why and flex runs on the reference path.

Captured arrays are extra inputs ``flex_cap<i>`` (int32 or float32). The compiled kernel is cached
by its prologue (the traced expressions, the block sizes and the number of captures); tile sizes
come from the flash kernel's tuning entry.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..attention.spec import AttentionSpec
from ..hardware import static_shared_memory
from . import flash_attention, flash_backward
from .catalog import FLASH_FWD, FLEX_FWD, FlexKernel
from .launcher import BoundLaunch, Launch, with_reference_vjp


@functools.lru_cache(maxsize=256)
def flex_kernel(score: str, mask: str, captures: int, blocks: Optional[Tuple[int, int]]) -> FlexKernel:
    """The kernel of one pair of traced expressions (C code over ``score, b, h, q_idx, kv_idx``),
    reading ``captures`` arrays ``flex_cap<i>``; ``blocks = (Q_BLOCK, KV_BLOCK)`` turns on the
    block-sparse walk."""
    qb, kb = blocks or (0, 0)
    prologue = (
        "#define FLEX_MODS 1\n"
        f"#define FLEX_BLOCKS {int(blocks is not None)}\n"
        f"#define FLEX_QB {qb}\n"
        f"#define FLEX_KB {kb}\n"
        f"#define FLEX_SCORE(score, b, h, q_idx, kv_idx) ({score})\n"
        f"#define FLEX_MASK(b, h, q_idx, kv_idx) ({mask})\n"
    )
    digest = hashlib.sha1(f"{prologue}{captures}".encode()).hexdigest()[:12]
    return dataclasses.replace(
        FLEX_FWD,
        name=f"{FLEX_FWD.name}_{digest}",
        inputs=FLEX_FWD.inputs + tuple(f"flex_cap{i}" for i in range(captures)),
        prologue=prologue,
    )


def block_config(spec: AttentionSpec, block_size: Optional[Tuple[int, int]],
                 config: Optional[Dict[str, int]] = None) -> Tuple[Optional[Dict[str, int]], Optional[str]]:
    """Tile sizes for a flex launch (the flash kernel's tuned ones when they fit the BlockMask's
    blocks, else the first fitting candidate), or None and the reason none fits."""
    chosen = flash_attention.config_for(spec, config)
    if block_size is None:
        return chosen, None
    qb, kb = block_size

    def fits(c: Dict[str, int]) -> bool:
        return qb % (16 * c["WARPS"]) == 0 and kb % c["BK"] == 0

    if fits(chosen):
        return chosen, None
    limit = static_shared_memory()
    for candidate in FLASH_FWD.configs():
        if fits(candidate) and flash_attention.shared_memory_bytes(spec.head_dim, candidate) <= limit:
            return candidate, None
    return None, f"BlockMask block size {block_size} is not a multiple of the kernel's tiles (64 rows, 32 keys)"


def _placeholder(dtype=mx.int32) -> mx.array:
    return mx.zeros((1,), dtype)


def block_inputs(block_mask) -> List[mx.array]:
    """The ``flex_kv_num, flex_kv_idx, flex_full_num, flex_full_idx, flex_params`` inputs."""
    if block_mask is None:
        return [_placeholder(), _placeholder(), _placeholder(), _placeholder(), mx.ones((4,), mx.int32)]
    bm, hm, nq, nk = block_mask.kv_indices.shape
    params = mx.array([bm, hm, nq, nk], dtype=mx.int32)
    return [block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices, params]


def kernel_array(captured: mx.array) -> mx.array:
    """How a captured array reaches the kernel: float32 (floating dtypes) or int32 (ints and bools)."""
    return captured.astype(mx.float32 if mx.issubdtype(captured.dtype, mx.floating) else mx.int32)


def plan(q: mx.array, k: mx.array, v: mx.array, spec: AttentionSpec, config: Dict[str, int], kernel: FlexKernel,
         blocks: Sequence[mx.array], captures: Sequence[mx.array]) -> Launch:
    """The flash kernel's launch of a call without built-in features, on ``kernel`` with the flex inputs."""
    window = mx.array(spec.window, dtype=mx.int32)
    rng = flash_backward.dropout_rng(spec, None, 0)
    base = flash_attention.plan(q, k, v, window, _placeholder(mx.float32), _placeholder(mx.float32), rng, spec,
                                config)
    return dataclasses.replace(base, kernel=kernel, inputs=list(base.inputs) + list(blocks) + list(captures))


def prepare_kernel(q: mx.array, k: mx.array, v: mx.array, spec: AttentionSpec, kernel: FlexKernel,
                   config: Dict[str, int], block_mask, captures: Sequence[mx.array]) -> Callable[..., Tuple[mx.array, mx.array]]:
    """The launch of a flex call on ``kernel``, built once for calls like this one:
    ``run(q, k, v, block_mask, captures, reference) -> (out, lse)``, differentiable through ``reference``.

    Args:
        q, k, v: BHSD, float16 or bfloat16; ``spec`` their description (no built-in features).
        kernel: from :func:`flex_kernel`; ``config`` from :func:`block_config`.
        block_mask: the :class:`~mlx_primitives.attention.flex.BlockMask` the kernel walks, or None.
        captures: the arrays behind ``flex_cap<i>``, in slot order.

    ``run`` takes arrays of the same shapes and dtypes (a BlockMask of the same shapes, captures of
    the same dtypes) and ``reference(q, k, v, *float_captures) -> [out, lse]``: the reference path
    with the float captures rebound, so gradients reach them too.
    """
    blocks = block_inputs(block_mask)
    template = plan(q, k, v, spec, config, kernel, blocks, [kernel_array(c) for c in captures])
    bound = BoundLaunch(template)
    fixed = list(template.inputs[3:7])  # window, slopes, sinks, rng: constants of the spec
    params = blocks[4]
    floating = [i for i, c in enumerate(captures) if mx.issubdtype(c.dtype, mx.floating)]

    def run(q, k, v, block_mask, captures: Sequence[mx.array], reference) -> Tuple[mx.array, mx.array]:
        lists = blocks[:4] if block_mask is None else [block_mask.kv_num_blocks, block_mask.kv_indices,
                                                         block_mask.full_kv_num_blocks, block_mask.full_kv_indices]

        def forward(q, k, v, *float_arrays) -> List[mx.array]:
            arrays = list(captures)
            for i, array in zip(floating, float_arrays):
                arrays[i] = array
            inputs = [q, k, v, *fixed, *lists, params, *(kernel_array(a) for a in arrays)]
            return bound(inputs, lambda: reference(q, k, v, *float_arrays))

        out, lse = with_reference_vjp(forward, reference)(q, k, v, *(captures[i] for i in floating))
        return out, lse

    return run


def compile_examples():
    """Launches of representative traced mods (block-sparse causal, document mask through a captured
    id array, ALiBi + softcap score mod without a block mask) for both dtypes, two head dims and
    every tile config (Metal compile check)."""
    from ..attention.flex import create_block_mask, mods
    from ..attention.flex.trace import trace_mods
    from ..attention.spec import describe_attention

    q_len = 256
    document_ids = mx.zeros((q_len,), mx.int32)
    slopes = mx.zeros((4,), mx.float32)
    cases = [
        (None, create_block_mask(mods.causal(), None, None, q_len, q_len)),
        (None, create_block_mask(mods.document(document_ids), None, None, q_len, q_len)),
        (mods.compose(mods.alibi(slopes), mods.softcap(30.0)), None),
        (mods.softcap(50.0), create_block_mask(mods.sliding_window(64), 1, 4, q_len, q_len)),
    ]
    for score_mod, block_mask in cases:
        score, mask, captures = trace_mods(score_mod, None if block_mask is None else block_mask.mask_mod)
        blocks = None if block_mask is None else block_mask.block_size
        kernel = flex_kernel(score, mask, len(captures), blocks)
        for dtype in flash_attention.DTYPES:
            for head_dim in (64, 128):
                q = mx.zeros((1, 4, q_len, head_dim), dtype)
                kv = mx.zeros((1, 2, q_len, head_dim), dtype)
                spec = describe_attention(q, kv, kv)
                for config in FLASH_FWD.configs():
                    if flash_attention.shared_memory_bytes(head_dim, config) > static_shared_memory(
                            "metal"):
                        continue
                    arrays = [kernel_array(c) for c in captures]
                    yield plan(q, kv, kv, spec, config, kernel, block_inputs(block_mask), arrays)
