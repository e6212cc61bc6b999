"""Symbolic scalars: what a mod's operations on ``score``, ``b``, ``h``, ``q_idx``, ``kv_idx`` build.

A :class:`Sym` holds the C expression (valid in both kernel dialects) that computes a value of kind
``"int"``, ``"float"`` or ``"bool"``; arithmetic, comparisons, ``&``, ``|``, ``~`` and the ``mx``
functions of :data:`TRACED_OPS` on it return new ones. A :class:`CapturedArray` stands for an
``mx.array`` the mod captured: indexing it emits a load from kernel input ``flex_cap<slot>`` with
each index clamped to its axis. Semantics follow MLX's on int32 grids (``//`` and ``%`` floor,
``/`` is true division, ``~`` of a bool is logical not); anything else raises :class:`Untraceable`.
"""

from __future__ import annotations

import math
import struct
from typing import Callable, Dict, List

import mlx.core as mx
import numpy as np

INT, FLOAT, BOOL = "int", "float", "bool"
_C_TYPE = {INT: "int", FLOAT: "float", BOOL: "bool"}


class Untraceable(Exception):
    """The mod cannot be compiled; the message says why."""


def _float_literal(value: float) -> str:
    if math.isfinite(value):
        return f"{float(value)!r}f"
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
        return Sym(f"(-{as_kind(self, kind)})", kind)

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


def as_kind(sym: Sym, kind: str) -> str:
    """The code of ``sym`` converted to ``kind``."""
    return sym.code if sym.kind == kind else f"{_C_TYPE[kind]}({sym.code})"


def _arith(op: str, a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    kind = _promote(a, b)
    return Sym(f"({as_kind(a, kind)} {op} {as_kind(b, kind)})", kind)


def _fold(op: str, operands: List[Sym]) -> Sym:
    result = operands[0]
    for operand in operands[1:]:
        result = _arith(op, result, operand)
    return result


def _truediv(a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    return Sym(f"({as_kind(a, FLOAT)} / {as_kind(b, FLOAT)})", FLOAT)


def _call(function: str, kind: str, *args) -> Sym:
    syms = [as_sym(a) for a in args]
    return Sym(f"{function}({', '.join(as_kind(s, kind) for s in syms)})", kind)


def _int_or_float_call(function: str, a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    return _call(function, _promote(a, b), a, b)


def _compare(op: str, a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    kind = _promote(a, b)
    return Sym(f"({as_kind(a, kind)} {op} {as_kind(b, kind)})", BOOL)


def _logic(logical: str, bitwise: str, a, b) -> Sym:
    a, b = as_sym(a), as_sym(b)
    if a.kind == BOOL and b.kind == BOOL:
        return Sym(f"({a.code} {logical} {b.code})", BOOL)
    if FLOAT in (a.kind, b.kind):
        raise Untraceable(f"{bitwise} of a float value")
    return Sym(f"({as_kind(a, INT)} {bitwise} {as_kind(b, INT)})", INT)


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
    return Sym(f"({as_kind(c, BOOL)} ? {as_kind(x, kind)} : {as_kind(y, kind)})", kind)


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
        return Sym(f"({as_kind(a, BOOL)} {logical} {as_kind(b, BOOL)})", BOOL)

    return op


def _logical_not(a, **kwargs):
    if not _symbolic(a):
        return mx.logical_not(a, **kwargs)
    return Sym(f"(!{as_kind(as_sym(a), BOOL)})", BOOL)


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
            clamped = f"flex_index({as_kind(i, INT)}, {self.name}_shape[{axis}])"
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
