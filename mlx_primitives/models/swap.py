"""``swap_attention``: run an mlx-lm model's attention through mlx_primitives, in place and reversibly.

The hook is per attention module, never global: each ``Attention`` instance of the model gets a
subclass of its own class (same parameters, so weights, ``load_weights`` and caches are untouched)
whose ``__call__`` is either

* the original ``__call__`` with its module's ``scaled_dot_product_attention`` name bound to ours
  (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma-3 and every mlx-lm model that calls
  ``mlx_lm.models.base.scaled_dot_product_attention``), or
* a rewrite of the model's attention for models that inline the math (:data:`INLINE_ATTENTION`:
  Gemma-2 with its logit softcap).

mlx-lm's mask conventions are kept: ``None``, the ``"causal"`` string (bottom-right aligned), and
boolean or additive arrays (sliding windows, rotating caches, padding) go through unchanged. Caches
quantized by mlx-lm (``cache.bits``) keep mlx-lm's quantized attention. A cache with an
``attend(queries, scale, softcap)`` method (the paged caches of :mod:`.generate`) computes the
attention itself over its pages.
"""

from __future__ import annotations

import collections
import sys
import types
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..attention.flash import explain, flash_attention
from ..attention.flex import create_block_mask, flex_attention
from ..attention.flex import mods
from ..attention.sage import sageattn

KERNELS = ("flash", "sdpa", "reference", "sage", "flex")
HOOK_NAME = "scaled_dot_product_attention"
Mask = Union[None, str, mx.array]


class Replaced(NamedTuple):
    """One attention module swap_attention changed: its path in the model, its class, the hook used."""

    path: str
    original: type
    hook: str


class SwappedAttention:
    """mlx-lm's ``scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)`` on
    our kernels; ``queries`` ``(B, Hq, L, D)``, ``keys``/``values`` ``(B, Hk, S, D)`` (BHSD).

    ``routes`` counts which computation each call took (``"flash"``, ``"sage"``, ``"flex"``,
    ``"paged"``, ``"mlx-lm quantized"``, or ``"flash (<why>)"`` where the kernel asked for cannot
    run the call), so a caller can say which paths ran.
    """

    def __init__(self, kernel: str, original: Optional[Callable] = None, **options: Any):
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
        self.kernel = kernel
        self.options = options
        self.original = original
        self.routes: collections.Counter = collections.Counter()
        self._block_masks: Dict[tuple, Any] = {}
        self._sdpa_shapes: Dict[tuple, bool] = {}  # plain call shapes -> the dispatcher routes them to sdpa

    def __repr__(self) -> str:
        return f"SwappedAttention(kernel={self.kernel!r}, options={self.options})"

    def __call__(self, queries: mx.array, keys: Any, values: Any, cache: Any = None, scale: float = 1.0,
                 mask: Mask = None, sinks: Optional[mx.array] = None, softcap: float = 0.0) -> mx.array:
        if hasattr(cache, "attend"):
            self.routes["paged"] += 1
            return cache.attend(queries, scale, softcap, sinks)
        if hasattr(cache, "bits"):
            if self.original is None or softcap:
                raise ValueError("mlx-lm's quantized caches keep mlx-lm's attention; this model has none to keep")
            self.routes["mlx-lm quantized"] += 1
            return self.original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        plain_mask = mask is None or isinstance(mask, str)
        if self.kernel == "sage":
            if plain_mask and not softcap and sinks is None:
                self.routes["sage"] += 1
                return sageattn(queries, keys, values, "HND", is_causal=mask == "causal", sm_scale=scale,
                                **self.options)
            return self._flash(queries, keys, values, scale, mask, sinks, softcap,
                               "flash (sage takes no mask array, softcap or sinks)")
        if self.kernel == "flex":
            if plain_mask and sinks is None:
                self.routes["flex"] += 1
                return self._flex(queries, keys, values, scale, mask, softcap)
            return self._flash(queries, keys, values, scale, mask, sinks, softcap,
                               "flash (flex here takes no mask array or sinks)")
        return self._flash(queries, keys, values, scale, mask, sinks, softcap, self.kernel)

    def _flash(self, queries, keys, values, scale, mask, sinks, softcap, route: str) -> mx.array:
        self.routes[route] += 1
        path = {"sdpa": "sdpa", "reference": "reference"}.get(self.kernel, self.options.get("path", "auto"))
        key = None
        if sinks is None and not softcap and (mask is None or isinstance(mask, str)):
            key = (queries.shape, keys.shape, values.shape, queries.dtype, keys.dtype, scale, mask, path)
            direct = self._sdpa_shapes.get(key)
            if direct is None:
                direct = self._sdpa_shapes[key] = path in ("auto", "sdpa") and explain(
                    queries, keys, values, layout="BHSD", scale=scale, mask=mask).path == "sdpa"
            if direct:  # what the dispatcher would call, without its per-call Python
                return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
        return flash_attention(queries, keys, values, layout="BHSD", scale=scale, mask=mask, sinks=sinks,
                               softcap=softcap, path=path)

    def _flex(self, queries, keys, values, scale, mask, softcap) -> mx.array:
        q_len, kv_len = queries.shape[2], keys.shape[2]
        score_mod = self.options.get("score_mod")
        if softcap:
            score_mod = mods.softcap(softcap) if score_mod is None else mods.compose(score_mod, mods.softcap(softcap))
        block_mask = None
        if mask == "causal":
            key = (q_len, kv_len)
            if key not in self._block_masks:
                self._block_masks[key] = create_block_mask(mods.causal(kv_len - q_len), None, None, q_len, kv_len,
                                                           self.options.get("block_size", 128))
            block_mask = self._block_masks[key]
        return flex_attention(queries, keys, values, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=True)


def _gemma2_call(self, x: mx.array, mask: Mask = None, cache: Any = None) -> mx.array:
    """mlx-lm's Gemma-2 attention with the softcapped softmax computed by ``self._swapped``."""
    batch, length, _ = x.shape
    queries = self.q_proj(x).reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
    keys = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    values = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
    offset = cache.offset if cache is not None else 0
    queries, keys = self.rope(queries, offset=offset), self.rope(keys, offset=offset)
    if cache is not None:
        keys, values = cache.update_and_fetch(keys, values)
    out = self._swapped(queries, keys, values, cache=cache, scale=self.scale, mask=mask,
                        softcap=self.attn_logit_softcapping)
    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))


# Attention classes whose math is inline (no scaled_dot_product_attention call): module -> __call__.
INLINE_ATTENTION: Dict[str, Callable] = {"mlx_lm.models.gemma2": _gemma2_call}


def _hook(cls: type) -> Optional[str]:
    """How ``cls`` (an mlx-lm attention class) can be swapped: ``"sdpa"``, ``"inline"`` or None."""
    if not cls.__module__.startswith("mlx_lm.models.") or cls.__name__ != "Attention":
        return None
    if cls.__module__ in INLINE_ATTENTION:
        return "inline"
    code = getattr(cls.__call__, "__code__", None)
    return "sdpa" if code is not None and HOOK_NAME in code.co_names else None


def _swapped_class(cls: type, hook: str, swapped: SwappedAttention) -> type:
    if hook == "inline":
        call = INLINE_ATTENTION[cls.__module__]
    else:
        original = cls.__call__
        scope = dict(original.__globals__, **{HOOK_NAME: swapped})
        call = types.FunctionType(original.__code__, scope, original.__name__, original.__defaults__,
                                  original.__closure__)
        call.__kwdefaults__ = original.__kwdefaults__
    return type(cls.__name__, (cls,), {"__call__": call, "_original_class": cls, "_swapped": swapped,
                                       "__module__": cls.__module__})


def swap_attention(model: nn.Module, kernel: str = "flash", **options: Any) -> List[Replaced]:
    """Run every attention module of an mlx-lm ``model`` through ``kernel``, in place.

    Weights, RoPE, caches and masks stay the model's: only the softmax(q kᵀ) v computation changes.
    Swapping a swapped model replaces the previous kernel; :func:`restore_attention` undoes it.

    Args:
        model: an mlx-lm model (``mlx_lm.models.<arch>.Model``), e.g. from ``mlx_lm.load``.
        kernel: ``"flash"`` (the dispatcher: sdpa, flash/decode kernels or the reference path),
            ``"sdpa"``, ``"reference"``, ``"sage"`` (INT8 q and k; calls with mask arrays, softcap
            or sinks take ``"flash"``) or ``"flex"`` (:func:`flex_attention`; ``score_mod=`` and
            ``block_size=`` options; calls with mask arrays or sinks take ``"flash"``).
        **options: passed on: ``path=`` for ``"flash"``; ``qk_quant_gran=``, ``smooth_k=``, ... for
            ``"sage"``; ``score_mod=``, ``block_size=`` for ``"flex"``.

    Returns:
        One :class:`Replaced` per attention module: its path, its original class and the hook
        (``"scaled_dot_product_attention"`` or ``"__call__"``). The shared :class:`SwappedAttention`
        (its ``routes`` count what ran) is ``model_attention(model)``.

    Raises:
        ValueError: an unknown kernel, or a model without attention modules this knows how to swap.
    """
    restore_attention(model)
    replaced = []
    swapped_classes: Dict[type, type] = {}
    shared: Optional[SwappedAttention] = None
    for path, module in model.named_modules():
        cls = type(module)
        hook = _hook(cls)
        if hook is None:
            continue
        if shared is None:
            original = sys.modules[cls.__module__].__dict__.get(HOOK_NAME)
            shared = SwappedAttention(kernel, original, **options)
        if cls not in swapped_classes:
            swapped_classes[cls] = _swapped_class(cls, hook, shared)
        module.__class__ = swapped_classes[cls]
        replaced.append(Replaced(path, cls, HOOK_NAME if hook == "sdpa" else "__call__"))
    if not replaced:
        raise ValueError(f"no mlx-lm attention module to swap in {type(model).__module__}.{type(model).__name__}: "
                         "swap_attention knows mlx-lm Attention classes that call scaled_dot_product_attention, "
                         f"and {sorted(INLINE_ATTENTION)}")
    return replaced


def restore_attention(model: nn.Module) -> List[str]:
    """Give every swapped attention module of ``model`` its original class back; returns their paths."""
    restored = []
    for path, module in model.named_modules():
        original = type(module).__dict__.get("_original_class")
        if original is not None:
            module.__class__ = original
            restored.append(path)
    return restored


def model_attention(model: nn.Module) -> Optional[SwappedAttention]:
    """The :class:`SwappedAttention` a swapped ``model`` runs, or None when it is not swapped."""
    for _, module in model.named_modules():
        swapped = type(module).__dict__.get("_swapped")
        if swapped is not None:
            return swapped
    return None
