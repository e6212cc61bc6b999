"""FlexAttention for MLX: ``score_mod`` / ``mask_mod`` functions compiled into the prefill kernel.

* :func:`flex_attention` -- attention with a score mod and a :class:`BlockMask` (BHSD).
* :func:`create_block_mask` -- the block-sparse mask of a ``mask_mod``.
* :mod:`.mods` -- causal, sliding window, prefix LM, document masking, ALiBi, softcap, relative
  position bias, Gemma-2.
"""

from . import mods
from .api import FlexRoute, flex_attention, flex_route
from .block_mask import BlockMask, create_block_mask, create_mask
from .mods import and_masks, noop_mask, or_masks
from .reference import flex_reference
from .trace import Untraceable

__all__ = [
    "BlockMask",
    "FlexRoute",
    "Untraceable",
    "and_masks",
    "create_block_mask",
    "create_mask",
    "flex_attention",
    "flex_reference",
    "flex_route",
    "mods",
    "noop_mask",
    "or_masks",
]
