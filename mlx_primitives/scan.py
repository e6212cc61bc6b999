"""Scans: ``associative_scan`` (running sums, products, first-order linear recurrences) and Mamba's
``selective_scan``.

On a GPU the linear recurrence and the selective scan run as two-level parallel-prefix kernels
(``kernels/scan.py``): one threadgroup scans a chunk of the sequence at a time and carries the state
to the next chunk, and a long sequence over few channels is also split across threadgroups. Everywhere
else, and as the gradient of the kernels (``mx.custom_function`` with the reference's VJP), the
reference paths below run in MLX ops: a log-depth doubling scan for the recurrence and the sequential
recurrence for the selective scan, both differentiable, float32 inside.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple, Union

import mlx.core as mx

from .hardware import device_profile
from .kernels import scan as scan_kernels
from .kernels.launcher import with_reference_vjp
from .validation import (FLOAT_DTYPES, check_array, check_bool, check_choice, check_int, check_positive_int,
                         check_same_dtype)

OPERATORS = ("add", "mul", "ssm")
PATHS = ("auto", "kernel", "reference")
# associative_scan's "add" / "mul" take what mx.cumsum / mx.cumprod take.
CUMULATIVE_DTYPES = FLOAT_DTYPES + (mx.bool_, mx.int8, mx.int16, mx.int32, mx.int64, mx.uint8, mx.uint16,
                                    mx.uint32, mx.uint64)


def linear_scan_reference(a: mx.array, b: mx.array, axis: int) -> mx.array:
    """``h_t = a_t h_{t-1} + b_t`` along ``axis`` (``h_{-1} = 0``) in MLX ops: Hillis-Steele doubling,
    ``log2(L)`` steps of the operator ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)``, float32 inside."""
    dtype = a.dtype
    a, b = mx.moveaxis(a, axis, 0).astype(mx.float32), mx.moveaxis(b, axis, 0).astype(mx.float32)
    offset = 1
    while offset < a.shape[0]:
        b = mx.concatenate([b[:offset], a[offset:] * b[:-offset] + b[offset:]])
        a = mx.concatenate([a[:offset], a[offset:] * a[:-offset]])
        offset *= 2
    return mx.moveaxis(b, 0, axis).astype(dtype)


@functools.lru_cache(maxsize=16)
def _linear_scan_function(config: Optional[tuple]):
    def ref(a, b):
        return linear_scan_reference(a, b, 1)

    def forward(a, b):
        try:
            return scan_kernels.linear_scan(a, b, dict(config or ()))
        except scan_kernels.KernelUnavailable:
            return ref(a, b)

    return with_reference_vjp(forward, ref)


def associative_scan(
    x: Union[mx.array, Sequence[mx.array]],
    operator: str = "add",
    axis: int = 0,
    *,
    reverse: bool = False,
    inclusive: bool = True,
    path: str = "auto",
    config: Optional[dict] = None,
) -> mx.array:
    """Scan of ``x`` along ``axis`` with an associative operator.

    Args:
        x: an array of any shape, or for ``"ssm"`` a pair ``(a, b)`` of float arrays of one shape and dtype.
        operator (str): ``"add"`` (running sum, ``mx.cumsum``), ``"mul"`` (running product,
            ``mx.cumprod``) or ``"ssm"``: the first-order linear recurrence ``h_t = a_t * h_{t-1} + b_t``
            with ``h_{-1} = 0``, the scan of ``(a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2)`` (S4/S5, linear RNNs).
        axis (int): the scanned axis. Default: ``0``.
        reverse (bool): scan from the end of the axis (``h_t = a_t * h_{t+1} + b_t`` for ``"ssm"``).
            Default: ``False``.
        inclusive (bool): element ``t`` includes ``x_t``; ``False``: the scan up to the element before
            (0 first for ``"add"`` and ``"ssm"``, 1 for ``"mul"``). Default: ``True``.
        path (str): ``"ssm"`` only: ``"auto"`` (the kernel on a GPU), ``"kernel"``, or ``"reference"``.
        config (dict, optional): ``"ssm"`` only: kernel template values, e.g. ``{"WARPS": 4, "ITEMS": 8}``.

    Returns:
        array of ``x``'s shape (``b``'s for ``"ssm"``): for ``"add"`` / ``"mul"`` the dtype of
        ``mx.cumsum`` / ``mx.cumprod`` (x's, bool sums in int32), for ``"ssm"`` ``h`` in b's dtype.
    """
    check_choice("operator", operator, OPERATORS)
    check_choice("path", path, PATHS)
    reverse, inclusive = check_bool("reverse", reverse), check_bool("inclusive", inclusive)
    if operator != "ssm":
        if path != "auto" or config is not None:
            raise ValueError(f"path and config apply to operator='ssm' only; got path={path!r}, config={config!r}")
        check_array("x", x, "(...)", dtypes=CUMULATIVE_DTYPES)
        scan = mx.cumsum if operator == "add" else mx.cumprod
        return scan(x, axis=_check_axis(axis, x.ndim), reverse=reverse, inclusive=inclusive)
    if not isinstance(x, (tuple, list)) or len(x) != 2:
        raise TypeError(f"x must be a pair (a, b) of arrays for operator='ssm'; got {type(x).__name__}")
    a, b = x
    check_array("x[0] (a)", a, "(...)")
    check_array("x[1] (b)", b, f"a's shape {tuple(a.shape)}", shape=a.shape)
    check_same_dtype(("a", "b"), (a, b))
    axis = _check_axis(axis, a.ndim)
    if reverse:
        a, b = _flip(a, axis), _flip(b, axis)
    h = _linear_scan(a, b, axis, path, config)
    if not inclusive:
        h = mx.concatenate([mx.zeros_like(_take(h, axis, slice(0, 1))), _take(h, axis, slice(None, -1))], axis)
    return _flip(h, axis) if reverse else h


def _take(x: mx.array, axis: int, part: slice) -> mx.array:
    """``x``'s slice ``part`` along ``axis``."""
    return x[(slice(None),) * axis + (part,)]


def _flip(x: mx.array, axis: int) -> mx.array:
    return _take(x, axis, slice(None, None, -1))


def _linear_scan(a: mx.array, b: mx.array, axis: int, path: str, config: Optional[dict]) -> mx.array:
    """The inclusive ``"ssm"`` scan on the path chosen (the kernel, or the reference)."""
    if path == "reference" or (path == "auto" and not device_profile().is_gpu) or a.size == 0:
        return linear_scan_reference(a, b, axis)
    outer = 1
    for n in a.shape[:axis]:
        outer *= n
    rows = (outer, a.shape[axis], -1)
    key = tuple(sorted(config.items())) if config else None
    return _linear_scan_function(key)(a.reshape(rows), b.reshape(rows)).reshape(a.shape)


def _check_axis(axis: int, ndim: int) -> int:
    if not -ndim <= check_int("axis", axis) < ndim:
        raise ValueError(f"axis must be an int in [{-ndim}, {ndim}) for an array of {ndim} dims; got {axis!r}")
    return axis % ndim


def selective_scan_reference(
    x: mx.array,
    delta: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: Optional[mx.array] = None,
    z: Optional[mx.array] = None,
    delta_bias: Optional[mx.array] = None,
    delta_softplus: bool = False,
    initial_state: Optional[mx.array] = None,
) -> Tuple[mx.array, mx.array]:
    """The selective scan as the sequential recurrence in MLX ops, float32 inside (differentiable).

    Arguments as :func:`selective_scan`. Returns ``(y, last_state)``: ``y`` ``(batch, L, D)`` in x's
    dtype and ``last_state`` float32 ``(batch, D, N)``.
    """
    batch, length, dims = x.shape
    groups, state_size = (B.shape[2] if B.ndim == 4 else 1), A.shape[1]
    # Channels as (groups, channels per group): group g's channels share B[:, :, g] and C[:, :, g].
    split = (batch, length, groups, dims // groups)
    dt = delta.astype(mx.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(mx.float32)
    if delta_softplus:
        dt = mx.logaddexp(dt, 0.0)
    dt, xf = dt.reshape(split), x.astype(mx.float32).reshape(split)
    Af = A.astype(mx.float32).reshape(groups, -1, state_size)
    Bf, Cf = (t.astype(mx.float32).reshape(batch, length, groups, state_size) for t in (B, C))
    h = (mx.zeros((batch, dims, state_size), mx.float32) if initial_state is None
         else initial_state.astype(mx.float32)).reshape(batch, groups, -1, state_size)
    ys = []
    for t in range(length):
        step = dt[:, t, ..., None]
        h = mx.exp(step * Af) * h + (step * xf[:, t, ..., None]) * Bf[:, t, :, None, :]
        ys.append((h @ Cf[:, t, :, :, None])[..., 0])
    h = h.reshape(batch, dims, state_size)
    y = mx.stack(ys, axis=1).reshape(x.shape) if ys else mx.zeros(x.shape, mx.float32)
    xf = xf.reshape(x.shape)
    if D is not None:
        y = y + xf * D.astype(mx.float32)
    if z is not None:
        zf = z.astype(mx.float32)
        y = y * zf * mx.sigmoid(zf)
    return y.astype(x.dtype), h


@functools.lru_cache(maxsize=64)
def _selective_scan_function(present: Tuple[bool, bool, bool], softplus: bool, config: tuple, splits: Optional[int]):
    """Kernel forward with the reference's VJP over the arrays given (x, delta, A, B, C, then D, z, delta_bias
    for those present)."""

    def unpack(arrays):
        x, delta, A, B, C, *rest = arrays
        optional = iter(rest)
        D, z, bias = (next(optional) if here else None for here in present)
        return x, delta, A, B, C, D, z, bias

    def ref(*arrays):
        x, delta, A, B, C, D, z, bias = unpack(arrays)
        return selective_scan_reference(x, delta, A, B, C, D, z, bias, softplus)

    def forward(*arrays):
        x, delta, A, B, C, D, z, bias = unpack(arrays)
        try:
            return scan_kernels.selective_scan(x, delta, A, B, C, D, z, bias, softplus, dict(config), splits)
        except scan_kernels.KernelUnavailable:
            return ref(*arrays)

    return with_reference_vjp(forward, ref)


def selective_scan(
    x: mx.array,
    delta: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: Optional[mx.array] = None,
    z: Optional[mx.array] = None,
    *,
    delta_bias: Optional[mx.array] = None,
    delta_softplus: bool = False,
    initial_state: Optional[mx.array] = None,
    return_last_state: bool = False,
    path: str = "auto",
    config: Optional[dict] = None,
    splits: Optional[int] = None,
) -> Union[mx.array, Tuple[mx.array, mx.array]]:
    """Mamba's selective state-space scan (``selective_scan_fn`` of mamba-ssm, channels last).

    For each batch ``b``, channel ``d`` and state ``n``, with ``dt = delta (+ delta_bias)``, softplus'd
    when ``delta_softplus``::

        h_t[n] = exp(dt_t * A[d, n]) * h_{t-1}[n] + dt_t * B_t[n] * x_t      (h_{-1} = initial_state or 0)
        y_t    = (sum_n C_t[n] * h_t[n] + D[d] * x_t) * silu(z_t)

    Everything is channels last: mamba_ssm's ``u`` ``(batch, D, L)`` is ``x.swapaxes(1, 2)`` here and its
    ``B`` ``(batch, G, N, L)`` is ``B.transpose(0, 3, 1, 2)``. A time-invariant ``B`` / ``C`` (S4) and a
    complex ``A`` are not supported.

    Args:
        x (array): input ``(batch, L, D)``, float16, bfloat16 or float32.
        delta (array): time steps ``(batch, L, D)``, x's dtype.
        A (array): real state matrix ``(D, N)`` (negative for a decaying state).
        B (array): input projection ``(batch, L, N)``, or ``(batch, L, G, N)`` for ``G`` groups of
            ``D / G`` consecutive channels (Mamba-2's ``ngroups``; ``D % G == 0``).
        C (array): output projection, grouped as ``B``.
        D (array, optional): skip connection ``(D,)``.
        z (array, optional): gate ``(batch, L, D)``; the output is multiplied by ``silu(z)``.
        delta_bias (array, optional): ``(D,)`` added to ``delta``.
        delta_softplus (bool): apply softplus to ``delta`` (after the bias). Default: ``False``.
        initial_state (array, optional): ``h_{-1}`` ``(batch, D, N)`` (e.g. the last state of the previous
            chunk). Default: zeros.
        return_last_state (bool): also return ``h_{L-1}``. Default: ``False``.
        path (str): ``"auto"`` (the kernel on a GPU), ``"kernel"`` or ``"reference"``.
        config (dict, optional): kernel template values, e.g. ``{"WARPS": 4, "ITEMS": 8}``.
        splits (int, optional): sequence splits across threadgroups (default: chosen from the shape).

    Returns:
        ``y`` ``(batch, L, D)`` in x's dtype, and with ``return_last_state`` also the float32 state
        ``(batch, D, N)``. The computation is float32 inside; gradients of the kernel path come from the
        reference recurrence (sequential over L). Grouped ``B``/``C`` (``G > 1``) and ``initial_state``
        run the reference.
    """
    check_array("x", x, "(batch, L, D)", ndim=3)
    batch, length, dims = x.shape
    check_array("delta", delta, f"x's shape {tuple(x.shape)} (batch, L, D)", shape=x.shape)
    check_same_dtype(("x", "delta"), (x, delta))
    layout = "(channels last; mamba_ssm's u (batch, D, L) is x.swapaxes(1, 2) here)"
    check_array("A", A, f"(D, N) with D = x.shape[2] = {dims} {layout}", ndim=2)
    if A.shape[0] != dims:
        raise ValueError(f"A must have shape (D, N) with D = x.shape[2] = {dims} {layout}; got {tuple(A.shape)}")
    state_size = A.shape[1]
    B, C = _check_projections(B, C, batch, length, dims, state_size)
    for name, value in (("D", D), ("delta_bias", delta_bias)):
        if value is not None:
            check_array(name, value, f"(D,) = ({dims},)", shape=(dims,))
    if z is not None:
        check_array("z", z, f"x's shape {tuple(x.shape)} (batch, L, D)", shape=x.shape)
    if initial_state is not None:
        check_array("initial_state", initial_state, f"(batch, D, N) = {(batch, dims, state_size)}",
                    shape=(batch, dims, state_size))
    delta_softplus, return_last_state = check_bool("delta_softplus", delta_softplus), check_bool(
        "return_last_state", return_last_state)
    check_choice("path", path, PATHS)
    if splits is not None:
        check_positive_int("splits", splits)

    chosen = None
    if (path == "kernel" or (path == "auto" and device_profile().is_gpu)) and B.ndim == 3 and initial_state is None:
        chosen = scan_kernels.selective_scan_config(x.dtype, length, dims, state_size, config)
    if chosen is None or x.size == 0 or state_size == 0:
        y, last = selective_scan_reference(x, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    else:
        present = (D is not None, z is not None, delta_bias is not None)
        arrays = [t for t in (x, delta, A, B, C, D, z, delta_bias) if t is not None]
        function = _selective_scan_function(present, delta_softplus, tuple(sorted(chosen.items())), splits)
        y, last = function(*arrays)
    return (y, last) if return_last_state else y


def _check_projections(B: mx.array, C: mx.array, batch: int, length: int, dims: int,
                       state_size: int) -> Tuple[mx.array, mx.array]:
    """``B, C`` checked: ``(batch, L, N)`` both, or ``(batch, L, G, N)`` both with ``D % G == 0``; one group
    comes back as ``(batch, L, N)``."""
    plain = (batch, length, state_size)
    expected = f"(batch, L, N) = {plain} or (batch, L, G, N) with D = {dims} divisible by G"
    for name, value in (("B", B), ("C", C)):
        check_array(name, value, expected, min_ndim=3)
        grouped = value.ndim == 4 and value.shape[2] >= 1 and dims % value.shape[2] == 0
        if tuple(value.shape) != plain and not (grouped and tuple(value.shape[:2]) + value.shape[3:] == plain):
            raise ValueError(f"{name} must have shape {expected}; got {tuple(value.shape)}")
    if tuple(B.shape) != tuple(C.shape):
        raise ValueError(f"C must have B's shape {tuple(B.shape)} (one grouping); got {tuple(C.shape)}")
    if B.ndim == 4 and B.shape[2] == 1:
        return B.reshape(plain), C.reshape(plain)
    return B, C
