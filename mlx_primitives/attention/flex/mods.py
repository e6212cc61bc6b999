"""A library of score and mask mods, in PyTorch FlexAttention's terms.

A score mod is ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (``score`` is the scaled
``q . k``); a mask mod is ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True: the query sees the key).
Indices are absolute positions (``q_idx`` in ``0..Q_LEN-1``, ``kv_idx`` in ``0..KV_LEN-1``) and
``h`` is the query head. Every mod here traces into the kernel; each is also plain MLX, so the
reference path and :func:`~.block_mask.create_block_mask` evaluate it on index grids.

    >>> block_mask = create_block_mask(mods.document(doc_ids), None, None, L, L)
    >>> out = flex_attention(q, k, v, score_mod=mods.alibi(slopes), block_mask=block_mask)
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import mlx.core as mx

ScoreMod = Callable[..., object]
MaskMod = Callable[..., object]


def noop_mask(b, h, q_idx, kv_idx) -> bool:
    """Every key visible (PyTorch's ``noop_mask``): a mask mod to pass where one is required."""
    return True


def causal(offset: int = 0) -> MaskMod:
    """Query ``i`` sees keys ``j <= i + offset`` (``offset = KV_LEN - Q_LEN`` aligns bottom-right)."""

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal_mask


def sliding_window(window: int, offset: int = 0) -> MaskMod:
    """Causal with the ``window`` most recent keys before the diagonal: ``i + offset - window <= j <= i + offset``
    (as ``window_size=(window, 0)`` of the flash functions)."""

    def sliding_window_mask(b, h, q_idx, kv_idx):
        distance = q_idx + offset - kv_idx
        return (distance >= 0) & (distance <= window)

    return sliding_window_mask


def prefix_lm(prefix_length: Union[int, mx.array]) -> MaskMod:
    """Bidirectional over the first ``prefix_length`` keys, causal after them; ``prefix_length`` an int
    or a ``(batch,)`` int array (one prefix per sequence)."""
    per_sequence = isinstance(prefix_length, mx.array)

    def prefix_lm_mask(b, h, q_idx, kv_idx):
        prefix = prefix_length[b] if per_sequence else prefix_length
        return (kv_idx < prefix) | (q_idx >= kv_idx)

    return prefix_lm_mask


def document(document_ids: mx.array, causal: bool = False) -> MaskMod:
    """Queries see only keys of their own document; ``document_ids`` ``(seq_len,)`` int, one id per
    token (packed sequences), or ``(batch, seq_len)``. ``causal`` adds the causal mask inside documents."""
    batched = document_ids.ndim == 2

    def document_mask(b, h, q_idx, kv_idx):
        if batched:
            same = document_ids[b, q_idx] == document_ids[b, kv_idx]
        else:
            same = document_ids[q_idx] == document_ids[kv_idx]
        return (same & (q_idx >= kv_idx)) if causal else same

    return document_mask


def alibi(slopes: mx.array) -> ScoreMod:
    """ALiBi: ``score - slopes[h] * |q_idx - kv_idx|``; ``slopes`` ``(num_heads,)`` float."""

    def alibi_bias(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * mx.abs(q_idx - kv_idx)

    return alibi_bias


def softcap(cap: float) -> ScoreMod:
    """Tanh soft-capping of the logits: ``cap * tanh(score / cap)``."""

    def softcap_score(score, b, h, q_idx, kv_idx):
        return cap * mx.tanh(score / cap)

    return softcap_score


def relative_position_bias(table: mx.array, max_distance: int) -> ScoreMod:
    """A learned bias per head and clipped relative distance: ``score + table[h, clip(kv_idx - q_idx,
    -max_distance, max_distance) + max_distance]``; ``table`` ``(num_heads, 2 * max_distance + 1)``.
    Gradients reach ``table``."""

    def relative_bias(score, b, h, q_idx, kv_idx):
        distance = mx.clip(kv_idx - q_idx, -max_distance, max_distance)
        return score + table[h, distance + max_distance]

    return relative_bias


def gemma2(cap: float = 50.0, window: Optional[int] = None) -> Tuple[ScoreMod, MaskMod]:
    """Gemma-2's attention: tanh softcap of the logits and a causal mask (a sliding window of
    ``window`` keys on its local layers). Returns ``(score_mod, mask_mod)``."""
    return softcap(cap), causal() if window is None else sliding_window(window)


def compose(*score_mods: ScoreMod) -> ScoreMod:
    """One score mod applying ``score_mods`` in order."""

    def composed(score, b, h, q_idx, kv_idx):
        for score_mod in score_mods:
            score = score_mod(score, b, h, q_idx, kv_idx)
        return score

    return composed


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """Visible where every mask mod says visible."""

    def all_visible(b, h, q_idx, kv_idx):
        visible = True
        for mask_mod in mask_mods:
            visible = mask_mod(b, h, q_idx, kv_idx) & visible
        return visible

    return all_visible


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """Visible where any mask mod says visible."""

    def any_visible(b, h, q_idx, kv_idx):
        visible = False
        for mask_mod in mask_mods:
            visible = mask_mod(b, h, q_idx, kv_idx) | visible
        return visible

    return any_visible
