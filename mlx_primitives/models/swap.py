"""``swap_attention``: run an mlx-lm model's attention through mlx_primitives, in place and reversibly.

The hook is per attention module, never global: each attention module of the model (any class of
``mlx_lm.models`` whose ``__call__`` calls ``scaled_dot_product_attention``, whatever its name:
``Attention``, ``MixtralAttention``, gpt-oss's ``AttentionBlock``, ...) gets a subclass of its own
class (same parameters, so weights, ``load_weights`` and caches are untouched) whose ``__call__`` is
either

* the original ``__call__`` with its module's ``scaled_dot_product_attention`` name bound to ours
  (Llama, Mistral, Mixtral, Qwen2/3, Qwen3-Next, Phi-2, Phi-3, Gemma-3, GLM-4, OLMo-3, gpt-oss,
  DeepSeek-V3 and every mlx-lm model that calls ``mlx_lm.models.base.scaled_dot_product_attention``), or
* a rewrite of the model's attention for models that inline the math (:data:`INLINE_ATTENTION`:
  Gemma-2 with its logit softcap).

Modules named like attention that do neither (linear or delta-rule attention of hybrid models) keep
mlx-lm's computation, with a warning naming their classes.

mlx-lm's mask conventions are kept: ``None``, the ``"causal"`` string (bottom-right aligned), and
boolean or additive arrays (sliding windows, rotating caches, padding) go through unchanged. Caches
quantized by mlx-lm (``cache.bits``) keep mlx-lm's quantized attention. A cache with an
``attend(queries, scale, softcap, sinks, mask)`` method (the paged caches of :mod:`.generate`)
computes the attention itself over its pages.
"""

from __future__ import annotations

import collections
import inspect
import types
import warnings
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..attention.dispatch import PATHS
from ..attention.flash import explain, flash_attention
from ..attention.flex import create_block_mask, flex_attention
from ..attention.flex import mods
from ..attention.sage import sageattn
from ..memo import CallMemo

KERNELS = ("flash", "sdpa", "reference", "sage", "flex")
HOOK_NAME = "scaled_dot_product_attention"
Mask = Union[None, str, mx.array]


class Replaced(NamedTuple):
    """One attention module swap_attention changed: its path in the model, its class, the hook used."""

    path: str
    original: type
    hook: str


def _keyword_options(function: Callable) -> Tuple[str, ...]:
    return tuple(name for name, p in inspect.signature(function).parameters.items() if p.kind is p.KEYWORD_ONLY)


# The options each kernel takes (swap_attention(..., **options)).
OPTIONS: Dict[str, Tuple[str, ...]] = {"flash": ("path",), "sdpa": (), "reference": (),
                                       "sage": _keyword_options(sageattn), "flex": ("score_mod", "block_size")}


def check_kernel_options(kernel: str, options: Dict[str, Any]) -> None:
    """Raise ValueError for an unknown ``kernel``, or an option ``kernel`` does not take (:data:`OPTIONS`)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    unknown = sorted(set(options) - set(OPTIONS[kernel]))
    if unknown:
        accepted = "; ".join(f"{name}: {', '.join(OPTIONS[name]) or 'none'}" for name in KERNELS)
        raise ValueError(f"kernel={kernel!r} takes no option {', '.join(unknown)}; options per kernel: {accepted}")
    if kernel == "flash" and options.get("path", "auto") not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {options['path']!r}")


class SwappedAttention:
    """mlx-lm's ``scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)`` on
    our kernels; ``queries`` ``(B, Hq, L, D)``, ``keys``/``values`` ``(B, Hk, S, D)`` (BHSD).

    ``routes`` counts which computation each call took: ``"sage"``, ``"flex"``, ``"paged"``,
    ``"mlx-lm quantized"``, the dispatcher's route for ``"flash"`` (``"flash->sdpa"``,
    ``"flash->kernel"``, ``"flash->decode"``, ``"flash->reference"``), ``"sdpa"`` and
    ``"reference"`` where forced, and ``"flash->... (<why>)"`` where ``"sage"`` or ``"flex"``
    cannot run the call (e.g. Gemma-2: mlx-lm passes its masks as arrays and sage takes none).
    """

    def __init__(self, kernel: str, original: Optional[Callable] = None, **options: Any):
        check_kernel_options(kernel, options)
        self.kernel = kernel
        self.options = options
        self.original = original
        self.routes: collections.Counter = collections.Counter()
        self._block_masks = CallMemo(256)  # (q_len, kv_len) -> causal block mask
        self._paths = CallMemo(256)  # call signature -> the dispatcher's path

    def __repr__(self) -> str:
        return f"SwappedAttention(kernel={self.kernel!r}, options={self.options})"

    def __call__(self, queries: mx.array, keys: Any, values: Any, cache: Any = None, scale: float = 1.0,
                 mask: Mask = None, sinks: Optional[mx.array] = None, softcap: float = 0.0) -> mx.array:
        if hasattr(cache, "attend"):
            self.routes["paged"] += 1
            return cache.attend(queries, scale, softcap, sinks, mask)
        if hasattr(cache, "bits"):
            if self.original is None or softcap:
                raise ValueError("mlx-lm's quantized caches keep mlx-lm's attention; this model has none to keep")
            self.routes["mlx-lm quantized"] += 1
            return self.original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        if keys.dtype != queries.dtype or values.dtype != queries.dtype:  # Phi-2: float32 queries, its cache's keys
            dtype = mx.result_type(queries, keys, values)
            queries, keys, values = (a.astype(dtype) for a in (queries, keys, values))
        plain_mask = mask is None or isinstance(mask, str)
        if self.kernel == "sage":
            if plain_mask and not softcap and sinks is None:
                self.routes["sage"] += 1
                return sageattn(queries, keys, values, "HND", is_causal=mask == "causal", sm_scale=scale,
                                **self.options)
            return self._flash(queries, keys, values, scale, mask, sinks, softcap,
                               " (sage takes no mask array, softcap or sinks)")
        if self.kernel == "flex":
            if plain_mask and sinks is None:
                self.routes["flex"] += 1
                return self._flex(queries, keys, values, scale, mask, softcap)
            return self._flash(queries, keys, values, scale, mask, sinks, softcap,
                               " (flex here takes no mask array or sinks)")
        return self._flash(queries, keys, values, scale, mask, sinks, softcap)

    def _flash(self, queries, keys, values, scale, mask, sinks, softcap, why: str = "") -> mx.array:
        """:func:`flash_attention` (``mx.fast`` sdpa directly where the dispatcher routes the call there)."""
        forced = {"sdpa": "sdpa", "reference": "reference"}.get(self.kernel)
        path = forced or (self.options.get("path", "auto") if self.kernel == "flash" else "auto")  # sage's is its own
        masks = mask if mask is None or isinstance(mask, str) else (mask.shape, mask.dtype)
        key = (queries.shape, keys.shape, values.shape, queries.dtype, scale, masks, softcap,
               None if sinks is None else sinks.shape, path)
        route = self._paths.get(key, lambda: explain(queries, keys, values, layout="BHSD", scale=scale, mask=mask,
                                                     sinks=sinks, softcap=softcap, path=path).path)
        self.routes[forced or f"flash->{route}{why}"] += 1
        if route == "sdpa" and sinks is None and not softcap and (mask is None or isinstance(mask, str)):
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
            block_mask = self._block_masks.get((q_len, kv_len), lambda: create_block_mask(
                mods.causal(kv_len - q_len), None, None, q_len, kv_len, self.options.get("block_size", 128)))
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
    """How ``cls`` (a module class) can be swapped: ``"sdpa"`` (an mlx-lm class, whatever its name, whose
    ``__call__`` calls ``scaled_dot_product_attention``), ``"inline"`` (:data:`INLINE_ATTENTION`) or None."""
    if not cls.__module__.startswith("mlx_lm.models."):
        return None
    if cls.__module__ in INLINE_ATTENTION and cls.__name__ == "Attention":
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
            or sinks take ``"flash"``: so every call of Gemma-2, whose mlx-lm attention always gets
            an array mask and a softcap) or ``"flex"`` (:func:`flex_attention`; calls with mask
            arrays or sinks take ``"flash"``). ``model_attention(model).routes`` says what ran.
        **options: the kernel's (:data:`OPTIONS`): ``path=`` for ``"flash"``; ``qk_quant_gran=``,
            ``smooth_k=``, ... for ``"sage"``; ``score_mod=``, ``block_size=`` for ``"flex"``.

    Returns:
        One :class:`Replaced` per attention module: its path, its original class and the hook
        (``"scaled_dot_product_attention"`` or ``"__call__"``). The shared :class:`SwappedAttention`
        (its ``routes`` count what ran) is ``model_attention(model)``.

    Raises:
        ValueError: an unknown kernel or option, or a model without attention modules this knows how
            to swap (mlx_primitives' own :class:`~mlx_primitives.models.Transformer` included: it
            already runs our attention).
    """
    check_kernel_options(kernel, options)
    restore_attention(model)
    replaced, others = [], []
    swapped_classes: Dict[type, type] = {}
    shared: Optional[SwappedAttention] = None
    for path, module in model.named_modules():
        cls = type(module)
        hook = _hook(cls)
        if hook is None:
            if "attention" in cls.__name__.lower():
                others.append((path, cls))
            continue
        if shared is None:
            original = getattr(cls.__call__, "__globals__", {}).get(HOOK_NAME)
            shared = SwappedAttention(kernel, original, **options)
        if cls not in swapped_classes:
            swapped_classes[cls] = _swapped_class(cls, hook, shared)
        module.__class__ = swapped_classes[cls]
        replaced.append(Replaced(path, cls, HOOK_NAME if hook == "sdpa" else "__call__"))
    # Attention-named modules left as they are, unless they only hold swapped ones.
    kept = sorted({f"{c.__module__}.{c.__name__}" for p, c in others
                   if not any(r.path.startswith(p + ".") for r in replaced)})
    if not replaced:
        _check_not_ours(model)
        raise ValueError(f"no mlx-lm attention module to swap in {type(model).__module__}.{type(model).__name__}: "
                         "swap_attention swaps mlx-lm classes whose __call__ calls scaled_dot_product_attention, and "
                         f"{sorted(INLINE_ATTENTION)}; found {kept or 'no attention-named module'}")
    if kept:
        warnings.warn(f"swap_attention({kernel!r}) swapped {len(replaced)} modules; these keep mlx-lm's own "
                      f"attention (no scaled_dot_product_attention call): {kept}", stacklevel=2)
    return replaced


def _check_not_ours(model: nn.Module) -> None:
    if type(model).__module__.startswith("mlx_primitives."):
        raise ValueError(f"swap_attention and paged generation take mlx-lm models; {type(model).__name__} already "
                         "runs mlx_primitives' attention (ModelArgs.kernel picks it) over its own KV caches")


def require_swapped(model: nn.Module, what: str) -> SwappedAttention:
    """``model``'s :class:`SwappedAttention`; ValueError saying why ``what`` cannot run it otherwise."""
    swapped = model_attention(model)
    if swapped is None:
        _check_not_ours(model)
        raise ValueError(f"{what} runs the model's attention over pages: call swap_attention(model) first")
    return swapped


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
