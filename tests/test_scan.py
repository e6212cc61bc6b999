"""associative_scan and selective_scan on the reference path (every backend) against float64 NumPy."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives import associative_scan, selective_scan
from mlx_primitives.scan import selective_scan_reference

from .reference import f64, max_error
from .scan_reference import linear_scan64, random_selective_inputs, selective_scan64

OPTION_SETS = [(), ("D",), ("z",), ("bias", "softplus"), ("D", "z", "bias", "softplus")]
NAMES = ("x", "delta", "A", "B", "C", "D", "z")


def _scaled_error(ours, ref):
    return max_error(ours, ref) / max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "+".join(o) or "plain")
def test_selective_scan_reference_matches_float64(options):
    args, kwargs = random_selective_inputs(2, 23, 6, 4, options=options)
    y, last = selective_scan(*args, **kwargs, return_last_state=True, path="reference")
    y64, last64 = selective_scan64(*args, **kwargs)
    assert y.shape == (2, 23, 6) and last.shape == (2, 6, 4) and last.dtype == mx.float32
    assert _scaled_error(y, y64) < 1e-5
    assert _scaled_error(last, last64) < 1e-5


def test_selective_scan_low_precision_keeps_dtype_and_float32_state():
    args, kwargs = random_selective_inputs(1, 17, 8, 4, dtype=mx.bfloat16, options=("D", "z"))
    y, last = selective_scan(*args, **kwargs, return_last_state=True, path="reference")
    y64, _ = selective_scan64(*args, **kwargs)
    assert y.dtype == mx.bfloat16 and last.dtype == mx.float32
    assert _scaled_error(y, y64) < 1e-2


def test_selective_scan_empty_sequence():
    args, kwargs = random_selective_inputs(2, 0, 3, 4)
    y, last = selective_scan(*args, **kwargs, return_last_state=True)
    assert y.shape == (2, 0, 3) and last.shape == (2, 3, 4) and not mx.any(last).item()


def _directional_check(fn64, fn_mlx, arrays, names):
    """<grad, v> of sum(w * y) against a float64 central difference along a random direction v."""
    y64 = fn64(*arrays)
    weight = np.random.default_rng(0).normal(size=y64.shape)
    directions = [np.random.default_rng(i + 1).normal(size=a.shape) for i, a in enumerate(arrays)]
    grads = mx.grad(lambda *xs: (fn_mlx(*xs) * mx.array(weight, mx.float32)).sum(),
                    argnums=tuple(range(len(arrays))))(*arrays)
    eps = 1e-6
    for name, array, grad, v in zip(names, arrays, grads, directions):
        def loss(shift, array=array, v=v):
            moved = [f64(a) + (shift * v if a is array else 0.0) for a in arrays]
            return float((fn64(*moved) * weight).sum())

        expected = (loss(eps) - loss(-eps)) / (2 * eps)
        got = float((f64(grad) * v).sum())
        assert abs(got - expected) <= 1e-3 * max(1.0, abs(expected)), (name, got, expected)


@pytest.mark.parametrize("path", ["reference", "kernel"])
def test_selective_scan_gradients_match_float64(path):
    """Every input's gradient; the kernel path (the CPU falls back) differentiates through the reference VJP."""
    (x, delta, A, B, C, D, z), _ = random_selective_inputs(1, 9, 3, 2, options=("D", "z"))
    bias = mx.random.uniform(-1.0, 0.0, (3,))
    arrays = [x, delta, A, B, C, D, z, bias]

    def fn64(*a):
        return selective_scan64(*a[:7], delta_bias=a[7], delta_softplus=True)[0]

    def fn_mlx(*a):
        return selective_scan(*a[:7], delta_bias=a[7], delta_softplus=True, path=path)

    with pytest.warns(RuntimeWarning) if path == "kernel" and not mx.metal.is_available() else _no_check():
        _directional_check(fn64, fn_mlx, arrays, NAMES + ("delta_bias",))


class _no_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_selective_scan_reference_is_the_documented_function():
    args, kwargs = random_selective_inputs(1, 5, 2, 3, options=("D",))
    y, last = selective_scan_reference(*args, **kwargs)
    assert mx.array_equal(y, selective_scan(*args, **kwargs, path="reference"))


@pytest.mark.parametrize("operator", ["add", "mul"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_associative_scan_add_mul(operator, axis):
    x = mx.random.uniform(0.5, 1.5, (5, 7, 3))
    ours = associative_scan(x, operator, axis=axis)
    ref = (np.cumsum if operator == "add" else np.cumprod)(f64(x), axis=axis)
    assert max_error(ours, ref) < 1e-5 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("shape,axis", [((37,), 0), ((3, 70, 5), 1), ((4, 6, 33), -1), ((9, 2, 3), 0)])
def test_associative_scan_ssm_matches_sequential_float64(shape, axis):
    a = mx.random.uniform(0.5, 1.0, shape)
    b = mx.random.normal(shape)
    ours = associative_scan((a, b), "ssm", axis=axis, path="reference")
    assert max_error(ours, linear_scan64(a, b, axis)) < 1e-5 * max(1.0, float(np.abs(linear_scan64(a, b, axis)).max()))


def test_associative_scan_ssm_gradients_match_float64():
    a = mx.random.uniform(0.5, 1.0, (2, 11, 3))
    b = mx.random.normal((2, 11, 3))
    _directional_check(lambda a, b: linear_scan64(a, b, 1),
                       lambda a, b: associative_scan((a, b), "ssm", axis=1, path="reference"), [a, b], ("a", "b"))


def _bad_selective(**changes):
    args, kwargs = random_selective_inputs(2, 5, 4, 3, options=("D", "z"))
    named = dict(zip(NAMES, args), **kwargs)
    named.update(changes)
    return named


@pytest.mark.parametrize("changes,name", [
    ({"x": mx.zeros((2, 5))}, "x"),
    ({"x": [1.0]}, "x"),
    ({"delta": mx.zeros((2, 5, 3))}, "delta"),
    ({"delta": mx.zeros((2, 5, 4), mx.float16)}, "x and delta"),
    ({"A": mx.zeros((3, 3))}, "A"),
    ({"B": mx.zeros((2, 5, 2))}, "B"),
    ({"C": mx.zeros((2, 4, 3))}, "C"),
    ({"D": mx.zeros((5,))}, "D"),
    ({"z": mx.zeros((2, 5, 5))}, "z"),
    ({"delta_bias": mx.zeros((4, 1))}, "delta_bias"),
    ({"x": mx.zeros((2, 5, 4), mx.int32)}, "x"),
    ({"path": "fast"}, "path"),
    ({"splits": 0}, "splits"),
])
def test_selective_scan_bad_arguments_name_the_argument(changes, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}\b"):
        selective_scan(**_bad_selective(**changes))


@pytest.mark.parametrize("x,operator,axis,name", [
    (mx.zeros((3,)), "max", 0, "operator"),
    (mx.zeros((3,)), "add", 1, "axis"),
    (mx.zeros((3,)), "ssm", 0, "x"),
    ((mx.zeros((3,)), mx.zeros((4,))), "ssm", 0, r"x\[1\]"),
    ((mx.zeros((3,)), mx.zeros((3,), mx.float16)), "ssm", 0, "a and b"),
])
def test_associative_scan_bad_arguments_name_the_argument(x, operator, axis, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}"):
        associative_scan(x, operator, axis=axis)
