"""Tracing of score and mask mods into kernel expressions.

A mod is called once with symbolic values in place of ``score``, ``b``, ``h``, ``q_idx`` and
``kv_idx``. Each operation on them (arithmetic, comparisons, ``&``, ``|``, ``~``, ``mx.where``,
``abs``, ``mx.exp``, ``mx.tanh``, ``mx.minimum``, ``mx.maximum``, ...) returns a new symbolic value
holding the C expression that computes it; ``mx.array``s the mod captures (closure, globals,
defaults) are swapped for proxies whose indexing emits a bounds-clamped load from an extra kernel
input. The result is one expression in the portable dialect, valid on Metal and CUDA alike.

Semantics follow MLX's on int32 index grids, which the reference path evaluates: ``//`` and ``%``
floor, ``/`` is true division, ``~`` of a bool is logical not. Indices into captured arrays are
clamped to their extent in the kernel (an out-of-range index is a bug in the mod; the kernel
never reads outside its inputs).

A mod that branches on a symbolic value (``if q_idx > kv_idx:``), calls an op not listed here or
mixes in arrays it creates itself raises :class:`Untraceable` with the reason.
"""

from __future__ import annotations

import math
import struct
import types
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

INT, FLOAT, BOOL = "int", "float", "bool"
_C_TYPE = {INT: "int", FLOAT: "float", BOOL: "bool"}


class Untraceable(Exception):
    """The mod cannot be compiled; the message says why."""


def _float_literal(value: float) -> str:
    if math.isfinite(value):
        return f"{float(value)!r}f".replace("inff", "inf")
    bits = struct.unpack("<i", struct.pack("<f", value))[0]
    return f"bits_to_float({bits})"


class Sym:
    """A symbolic scalar: the C expression ``code`` of kind ``"int"``, ``"float"`` or ``"bool"``."""

    __slots__ = ("code", "kind")
    __hash__ = None  # == builds an expression

    def __init__(self, code: str, kind: str):
        self.code, self.kind = code, kind

    def __bool__(self):
        raise Untraceable(
            "the mod branches on a traced value (data-dependent Python control flow: if/and/or/min/max "
            "on score or indices); use mx.where, &, | and mx.minimum/mx.maximum instead"
        )

    def __index__(self):
        raise Untraceable("a traced value was used as a Python int (e.g. to index a list or build a range)")

    def __float__(self):
        raise Untraceable("a traced value was converted to a Python float")

    __int__ = __index__

    def __array__(self, *args, **kwargs):
        raise Untraceable("a traced value was passed to NumPy")

    # Arithmetic
    def __add__(self, other):
        return _arith("+", self, other)

    def __radd__(self, other):
        return _arith("+", other, self)

    def __sub__(self, other):
        return _arith("-", self, other)

    def __rsub__(self, other):
        return _arith("-", other, self)

    def __mul__(self, other):
        return _arith("*", self, other)

    def __rmul__(self, other):
        return _arith("*", other, self)

    def __truediv__(self, other):
        return _truediv(self, other)

    def __rtruediv__(self, other):
        return _truediv(other, self)

    def __floordiv__(self, other):
        return _int_or_float_call("flex_floordiv", self, other)

    def __rfloordiv__(self, other):
        return _int_or_float_call("flex_floordiv", other, self)

    def __mod__(self, other):
        return _int_or_float_call("flex_mod", self, other)

    def __rmod__(self, other):
        return _int_or_float_call("flex_mod", other, self)

    def __pow__(self, other):
        if isinstance(other, int) and not isinstance(other, bool) and 1 <= other <= 4:
            return _fold("*", [self] * other)
        raise Untraceable("only small positive integer powers (x ** 1..4) are traced")

    def __neg__(self):
        kind = INT if self.kind == BOOL else self.kind
        return Sym(f"(-{_cast(self, kind)})", kind)

    def __pos__(self):
        return self

    def __abs__(self):
        return _call("flex_abs", INT if self.kind == BOOL else self.kind, self)

    # Comparisons
    def __lt__(self, other):
        return _compare("<", self, other)

    def __le__(self, other):
        return _compare("<=", self, other)

    def __gt__(self, other):
        return _compare(">", self, other)

    def __ge__(self, other):
        return _compare(">=", self, other)

    def __eq__(self, other):
        return _compare("==", self, other)

    def __ne__(self, other):
        return _compare("!=", self, other)

    # Logic (logical on bools, bitwise on ints, as MLX)
    def __and__(self, other):
        return _logic("&&", "&", self, other)

    def __rand__(self, other):
        return _logic("&&", "&", other, self)

    def __or__(self, other):
        return _logic("||", "|", self, other)

    def __ror__(self, other):
        return _logic("||", "|", other, self)

    def __xor__(self, other):
        return _logic("!=", "^", self, other)

    def __rxor__(self, other):
        return _logic("!=", "^", other, self)

    def __invert__(self):
        if self.kind == BOOL:
            return Sym(f"(!{self.code})", BOOL)
        if self.kind == INT:
            return Sym(f"(~{self.code})", INT)
        raise Untraceable("~ of a float value")

    def __getitem__(self, _):
        raise Untraceable("a traced scalar was indexed")


def as_sym(value) -> Sym:
    """A Python/NumPy scalar, a captured size-1 array proxy or a :class:`Sym` as a :class:`Sym`."""
    if isinstance(value, Sym):
        return value
    if isinstance(value, CapturedArray):
        if value.array.size != 1:
            raise Untraceable(f"captured array of shape {value.array.shape} used as a scalar; index it")
        return value[(0,) * value.array.ndim]
    if isinstance(value, (bool, np.bool_)):
        return Sym("true" if value else "false", BOOL)
    if isinstance(value, (int, np.integer)):
        if not -(2**31) <= int(value) < 2**31:
            raise Untraceable(f"integer constant {value} does not fit int32")
        return Sym(f"({int(value)})", INT)
    if isinstance(value, (float, np.floating)):
        return Sym(_float_literal(float(value)), FLOAT)
    if isinstance(value, mx.array):
        raise Untraceable("the mod combines a traced value with an mx.array it did not capture (created inside it?)")
    raise Untraceable(f"unsupported value of type {type(value).__name__} in the mod")


def _promote(*syms: Sym) -> str:
    kinds = {s.kind for s in syms}
    return FLOAT if FLOAT in kinds else INT


def _cast(sym: Sym, kind: str) -> str:
    return sym.code if sym.kind == kind else f"{_C_TYPE[kind]}({sym.code})"


def _arith(op: str, a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    kind = _promote(a, b)
    return Sym(f"({_cast(a, kind)} {op} {_cast(b, kind)})", kind)


def _fold(op: str, operands: List[Sym]) -> Sym:
    result = operands[0]
    for operand in operands[1:]:
        result = _arith(op, result, operand)
    return result


def _truediv(a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    return Sym(f"({_cast(a, FLOAT)} / {_cast(b, FLOAT)})", FLOAT)


def _call(function: str, kind: str, *args) -> Sym:
    syms = [as_sym(a) for a in args]
    return Sym(f"{function}({', '.join(_cast(s, kind) for s in syms)})", kind)


def _int_or_float_call(function: str, a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    return _call(function, _promote(a, b), a, b)


def _compare(op: str, a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    kind = _promote(a, b)
    return Sym(f"({_cast(a, kind)} {op} {_cast(b, kind)})", BOOL)


def _logic(logical: str, bitwise: str, a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    if a.kind == BOOL and b.kind == BOOL:
        return Sym(f"({a.code} {logical} {b.code})", BOOL)
    if FLOAT in (a.kind, b.kind):
        raise Untraceable(f"{bitwise} of a float value")
    return Sym(f"({_cast(a, INT)} {bitwise} {_cast(b, INT)})", INT)


def _float_op(function: str, name: str) -> Callable:
    def op(x, *args, **kwargs):
        if args or kwargs or not _symbolic(x):
            if _symbolic(x, *args, *kwargs.values()):
                raise Untraceable(f"mx.{name} with extra arguments is not traced")
            return getattr(mx, name)(x, *args, **kwargs)
        return _call(function, FLOAT, x)

    return op


def _symbolic(*values) -> bool:
    return any(isinstance(v, (Sym, CapturedArray)) for v in values)


def _where(condition, x, y, **kwargs):
    if not _symbolic(condition, x, y):
        return mx.where(condition, x, y, **kwargs)
    c, x, y = as_sym(condition), as_sym(x), as_sym(y)
    kind = BOOL if x.kind == y.kind == BOOL else _promote(x, y)
    return Sym(f"({_cast(c, BOOL)} ? {_cast(x, kind)} : {_cast(y, kind)})", kind)


def _binary(function: str, name: str) -> Callable:
    def op(a, b, **kwargs):
        if not _symbolic(a, b):
            return getattr(mx, name)(a, b, **kwargs)
        return _int_or_float_call(function, a, b)

    return op


def _logical(logical: str, name: str) -> Callable:
    def op(a, b, **kwargs):
        if not _symbolic(a, b):
            return getattr(mx, name)(a, b, **kwargs)
        a, b = as_sym(a), as_sym(b)
        return Sym(f"({_cast(a, BOOL)} {logical} {_cast(b, BOOL)})", BOOL)

    return op


def _logical_not(a, **kwargs):
    if not _symbolic(a):
        return mx.logical_not(a, **kwargs)
    return Sym(f"(!{_cast(as_sym(a), BOOL)})", BOOL)


def _abs(a, **kwargs):
    return abs(as_sym(a)) if _symbolic(a) else mx.abs(a, **kwargs)


def _clip(a, a_min, a_max, **kwargs):
    if not _symbolic(a, a_min, a_max):
        return mx.clip(a, a_min, a_max, **kwargs)
    result = a
    if a_min is not None:
        result = _binary("flex_max", "maximum")(result, a_min)
    if a_max is not None:
        result = _binary("flex_min", "minimum")(result, a_max)
    return result


# The mx functions a traced mod may call; any other mx function sees the symbolic value and fails.
TRACED_OPS: Dict[str, Callable] = {
    "where": _where,
    "abs": _abs,
    "exp": _float_op("k_exp", "exp"),
    "tanh": _float_op("k_tanh", "tanh"),
    "log": _float_op("flex_log", "log"),
    "sigmoid": _float_op("flex_sigmoid", "sigmoid"),
    "minimum": _binary("flex_min", "minimum"),
    "maximum": _binary("flex_max", "maximum"),
    "logical_and": _logical("&&", "logical_and"),
    "logical_or": _logical("||", "logical_or"),
    "logical_not": _logical_not,
    "clip": _clip,
}


class _TracedMx:
    """Stands in for the ``mlx.core`` module inside a traced mod: the ops above, everything else as is."""

    def __getattr__(self, name):
        return TRACED_OPS.get(name) or getattr(mx, name)


_TRACED_MX = _TracedMx()
_BY_FUNCTION = {id(getattr(mx, name)): op for name, op in TRACED_OPS.items()}


class CapturedArray:
    """An ``mx.array`` a mod captured, standing for kernel input ``flex_cap<slot>``."""

    def __init__(self, array: mx.array, slot: int):
        self.array, self.slot = array, slot
        self.kind = BOOL if array.dtype == mx.bool_ else (FLOAT if mx.issubdtype(array.dtype, mx.floating) else INT)

    @property
    def name(self) -> str:
        return f"flex_cap{self.slot}"

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != self.array.ndim:
            raise Untraceable(
                f"captured array of shape {self.array.shape} indexed with {len(index)} indices; index every axis"
            )
        flat = None
        for axis, i in enumerate(index):
            i = as_sym(i)
            if i.kind == FLOAT:
                raise Untraceable("a captured array was indexed with a float value")
            clamped = f"flex_index({_cast(i, INT)}, {self.name}_shape[{axis}])"
            flat = clamped if flat is None else f"({flat} * {self.name}_shape[{axis}] + {clamped})"
        load = f"{self.name}[{flat}]"
        if self.kind == BOOL:
            return Sym(f"({load} != 0)", BOOL)
        return Sym(f"{_C_TYPE[self.kind]}({load})", self.kind)

    def __getattr__(self, name):
        raise Untraceable(f"attribute or method '{name}' of a captured array is not traced")

    def _scalar(self) -> Sym:
        return as_sym(self)

    # A size-1 captured array (a learned temperature, a cap) works as a scalar operand.
    def __add__(self, o):
        return self._scalar() + o

    def __radd__(self, o):
        return o + self._scalar()

    def __sub__(self, o):
        return self._scalar() - o

    def __rsub__(self, o):
        return o - self._scalar()

    def __mul__(self, o):
        return self._scalar() * o

    def __rmul__(self, o):
        return o * self._scalar()

    def __truediv__(self, o):
        return self._scalar() / o

    def __rtruediv__(self, o):
        return _truediv(o, self._scalar())

    def __neg__(self):
        return -self._scalar()


def kernel_array(array: mx.array) -> mx.array:
    """How a captured array travels to the kernel: int32 (ints and bools) or float32, row-contiguous."""
    if mx.issubdtype(array.dtype, mx.floating):
        return array.astype(mx.float32)
    return array.astype(mx.int32)


def _global_names(code: types.CodeType) -> set:
    """Global names ``code`` and the functions defined inside it may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


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
        score_code = _cast(_checked(result, "score_mod"), FLOAT)
    if mask_mod is not None:
        result, _, _ = _trace(mask_mod, 4, slots)
        mask_code = _cast(_checked(result, "mask_mod"), BOOL)
    arrays = [c.array for c in sorted(slots.values(), key=lambda c: c.slot)]
    return score_code, mask_code, arrays


def _checked(result, name: str) -> Sym:
    try:
        return as_sym(result)
    except Untraceable as error:
        raise Untraceable(f"{name} returned {type(result).__name__}: {error}") from None
