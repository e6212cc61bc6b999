"""Tracing of score and mask mods into kernel expressions.

A mod is called once with symbolic values (:mod:`.symbolic`) in place of ``score``, ``b``, ``h``,
``q_idx`` and ``kv_idx``, on a copy of itself (and of the Python functions it calls) in which the
``mx.array``s it captures (closure, globals, defaults) are proxies that become extra kernel inputs,
and the ``mlx.core`` module is a stand-in whose traced ops accept symbolic values. The result is one
expression in the portable dialect, valid on Metal and CUDA alike.

Indices into captured arrays are clamped to their extent in the kernel (an out-of-range index is a
bug in the mod; the kernel never reads outside its inputs). A mod that branches on a symbolic value
(``if q_idx > kv_idx:``), calls an op not traced or mixes in arrays it creates itself raises
:class:`Untraceable` with the reason.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .symbolic import BOOL, FLOAT, INT, TRACED_OPS, CapturedArray, Sym, Untraceable, as_kind, as_sym

__all__ = ["Untraceable", "fingerprint", "rebind", "trace_mods"]


class _TracedMx:
    """Stands in for the ``mlx.core`` module inside a traced mod: the ops above, everything else as is."""

    def __getattr__(self, name):
        return TRACED_OPS.get(name) or getattr(mx, name)


_TRACED_MX = _TracedMx()
_BY_FUNCTION = {id(getattr(mx, name)): op for name, op in TRACED_OPS.items()}


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> frozenset:
    """Global names ``code`` and the functions defined inside it may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return frozenset(names)


class _Rebinder:
    """Copies of a mod (and of the functions it calls) with captured arrays replaced by ``replace(array)``
    and the ``mlx.core`` module (and its traced ops) by their tracing stand-ins."""

    def __init__(self, replace: Callable[[mx.array], object]):
        self.replace = replace
        self.functions: Dict[int, types.FunctionType] = {}

    def value(self, value):
        if isinstance(value, mx.array):
            return self.replace(value)
        if value is mx:
            return _TRACED_MX
        if isinstance(value, types.FunctionType):
            return self.function(value)
        if type(value) in (tuple, list):  # e.g. the mods that and_masks / compose combine
            return type(value)(self.value(v) for v in value)
        if callable(value) and id(value) in _BY_FUNCTION:
            return _BY_FUNCTION[id(value)]
        return value

    def function(self, fn: types.FunctionType) -> types.FunctionType:
        if id(fn) in self.functions:
            return self.functions[id(fn)]
        self.functions[id(fn)] = fn  # a recursive call sees the original
        global_scope = dict(fn.__globals__)
        for name in _global_names(fn.__code__) & set(global_scope):
            global_scope[name] = self.value(global_scope[name])
        closure = None
        if fn.__closure__:
            closure = tuple(self._cell(c) for c in fn.__closure__)
        defaults = tuple(self.value(d) for d in fn.__defaults__) if fn.__defaults__ else None
        rebuilt = types.FunctionType(fn.__code__, global_scope, fn.__name__, defaults, closure)
        rebuilt.__kwdefaults__ = {k: self.value(v) for k, v in (fn.__kwdefaults__ or {}).items()} or None
        self.functions[id(fn)] = rebuilt
        return rebuilt

    def _cell(self, cell) -> types.CellType:
        try:
            return types.CellType(self.value(cell.cell_contents))
        except ValueError:  # an empty cell (a name assigned after the closure was made)
            return types.CellType()


# Values a trace may read that never change: keyed by identity.
_CONSTANTS = (types.ModuleType, types.BuiltinFunctionType, type, type(mx.exp))
_SCALARS = (bool, int, float, complex, str, bytes, type(None), np.generic)


class _Unkeyable(Exception):
    pass


class _Fingerprint:
    """The values :class:`_Rebinder` reads from a mod, recursively, as a hashable key."""

    def __init__(self):
        self.visiting: set = set()

    def value(self, value):
        if isinstance(value, mx.array):
            # A captured array becomes a kernel input read at each call: its identity (and what the
            # expression depends on, shape and dtype) is the key, not its contents.
            return ("array", id(value), value.shape, value.dtype)
        if isinstance(value, types.FunctionType):
            return self.function(value)
        if type(value) in (tuple, list):
            return (type(value), tuple(self.value(v) for v in value))
        if isinstance(value, _SCALARS):
            return (type(value), value)
        if isinstance(value, _CONSTANTS):
            return ("constant", id(value))
        raise _Unkeyable

    def function(self, fn: types.FunctionType):
        if id(fn) in self.visiting:  # a recursive call: the outer visit covers it
            return ("recursive", fn.__code__)
        self.visiting.add(id(fn))
        scope = fn.__globals__
        names = tuple((name, self.value(scope[name])) for name in sorted(_global_names(fn.__code__)) if name in scope)
        closure = tuple(self.value(c.cell_contents) if _filled(c) else ("empty",) for c in fn.__closure__ or ())
        defaults = tuple(self.value(d) for d in fn.__defaults__ or ())
        kwdefaults = tuple((k, self.value(v)) for k, v in sorted((fn.__kwdefaults__ or {}).items()))
        self.visiting.discard(id(fn))
        return (fn.__code__, names, closure, defaults, kwdefaults)


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def fingerprint(mod: Optional[Callable]) -> Optional[tuple]:
    """A key for what tracing ``mod`` gives: its code and the values it reads (closure cells, defaults,
    the globals it names, recursively through the functions it calls), or None where ``mod`` or one of
    those values is not a function, scalar, tuple/list, module, type, builtin or ``mx.array``.

    Scalars count by value; modules, types and builtins by identity (their attributes are taken as
    constants); a captured ``mx.array`` by identity, shape and dtype, since the trace reads it as a
    kernel input whose contents are loaded at each call (holders of the trace keep the array alive,
    so its identity is not reused). Mods reading other objects (a config instance) get None: they
    are traced on every call.
    """
    if mod is None:
        return ()
    if not isinstance(mod, types.FunctionType):
        return None
    try:
        return _Fingerprint().function(mod)
    except _Unkeyable:
        return None


def rebind(mod: Optional[Callable], arrays: Dict[int, mx.array]) -> Optional[Callable]:
    """``mod`` with each captured array ``a`` replaced by ``arrays[id(a)]`` (so gradients reach those)."""
    if mod is None or not isinstance(mod, types.FunctionType) or not arrays:
        return mod
    return _Rebinder(lambda a: arrays.get(id(a), a)).function(mod)


def _trace(mod: Callable, n_args: int, slots: Optional[Dict[int, CapturedArray]] = None):
    if not isinstance(mod, types.FunctionType):
        raise Untraceable(f"only Python functions are traced; got {type(mod).__name__}")
    slots = {} if slots is None else slots

    def proxy(array: mx.array) -> CapturedArray:
        if id(array) not in slots:
            slots[id(array)] = CapturedArray(array, len(slots))
        return slots[id(array)]

    symbolic = _Rebinder(proxy).function(mod)
    names = [("score", FLOAT), ("b", INT), ("h", INT), ("q_idx", INT), ("kv_idx", INT)][5 - n_args:]
    try:
        result = symbolic(*(Sym(name, kind) for name, kind in names))
    except Untraceable:
        raise
    except Exception as error:  # an op MLX or Python refused on a traced value
        raise Untraceable(f"{type(error).__name__}: {str(error)[:200]}") from None
    ordered = sorted(slots.values(), key=lambda c: c.slot)
    return result, [c.array for c in ordered], slots


def trace_mods(score_mod: Optional[Callable], mask_mod: Optional[Callable]) -> Tuple[str, str, List[mx.array]]:
    """C expressions of ``score_mod(score, b, h, q_idx, kv_idx)`` (float) and ``mask_mod(b, h, q_idx,
    kv_idx)`` (bool; ``"true"`` when None) and the captured arrays they read as ``flex_cap<i>``.

    Raises:
        Untraceable: with the reason, when either mod cannot be compiled.
    """
    slots: Dict[int, CapturedArray] = {}
    score_code, mask_code = "score", "true"
    if score_mod is not None:
        result, _, _ = _trace(score_mod, 5, slots)
        score_code = as_kind(_checked(result, "score_mod"), FLOAT)
    if mask_mod is not None:
        result, _, _ = _trace(mask_mod, 4, slots)
        mask_code = as_kind(_checked(result, "mask_mod"), BOOL)
    arrays = [c.array for c in sorted(slots.values(), key=lambda c: c.slot)]
    return score_code, mask_code, arrays


def _checked(result, name: str) -> Sym:
    try:
        return as_sym(result)
    except Untraceable as error:
        raise Untraceable(f"{name} returned {type(result).__name__}: {error}") from None
