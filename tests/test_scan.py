"""associative_scan and selective_scan on the reference path (every backend) against float64 NumPy."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives import associative_scan, selective_scan

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


def test_selective_scan_grouped_projections_match_float64_per_group():
    (x, delta, A, _, _, D, z), kwargs = random_selective_inputs(2, 13, 6, 3, options=("D", "z", "softplus"))
    B, C = mx.random.normal((2, 13, 3, 3)), mx.random.normal((2, 13, 3, 3))  # 3 groups of 2 channels
    y, last = selective_scan(x, delta, A, B, C, D, z, **kwargs, return_last_state=True)
    for g in range(3):
        channels = slice(2 * g, 2 * g + 2)
        y64, last64 = selective_scan64(x[..., channels], delta[..., channels], A[channels], B[:, :, g], C[:, :, g],
                                       D[channels], z[..., channels], **kwargs)
        assert _scaled_error(y[..., channels], y64) < 1e-5 and _scaled_error(last[:, channels], last64) < 1e-5
    one = selective_scan(x, delta, A, B[:, :, :1], C[:, :, :1], D, z, **kwargs)
    assert mx.array_equal(one, selective_scan(x, delta, A, B[:, :, 0], C[:, :, 0], D, z, **kwargs)).item()


@pytest.mark.parametrize("path", ["auto", "kernel"])
def test_selective_scan_initial_state_chains_two_halves(path):
    args, kwargs = random_selective_inputs(2, 16, 5, 3, options=("D", "z", "bias", "softplus"))
    x, delta, A, B, C, D, z = args
    y64, last64 = selective_scan64(*args, **kwargs)
    first = [t[:, :9] for t in (x, delta)] + [A] + [t[:, :9] for t in (B, C)] + [D, z[:, :9]]
    second = [t[:, 9:] for t in (x, delta)] + [A] + [t[:, 9:] for t in (B, C)] + [D, z[:, 9:]]
    y1, h1 = selective_scan(*first, **kwargs, return_last_state=True, path=path)
    y2, h2 = selective_scan(*second, **kwargs, initial_state=h1, return_last_state=True, path=path)
    assert _scaled_error(mx.concatenate([y1, y2], axis=1), y64) < 1e-5 and _scaled_error(h2, last64) < 1e-5


@pytest.mark.parametrize("operator", ["add", "mul"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_associative_scan_add_mul(operator, axis):
    x = mx.random.uniform(0.5, 1.5, (5, 7, 3))
    ours = associative_scan(x, operator, axis=axis)
    ref = (np.cumsum if operator == "add" else np.cumprod)(f64(x), axis=axis)
    assert max_error(ours, ref) < 1e-5 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("operator", ["add", "mul"])
@pytest.mark.parametrize("reverse,inclusive", [(True, True), (False, False), (True, False)])
def test_associative_scan_add_mul_reverse_exclusive(operator, reverse, inclusive):
    x = mx.random.uniform(0.5, 1.5, (4, 9))
    ref = f64(x)[:, ::-1] if reverse else f64(x)
    ref = (np.cumsum if operator == "add" else np.cumprod)(ref, axis=1)
    if not inclusive:
        ref = np.concatenate([np.full((4, 1), 0.0 if operator == "add" else 1.0), ref[:, :-1]], axis=1)
    ref = ref[:, ::-1] if reverse else ref
    ours = associative_scan(x, operator, axis=1, reverse=reverse, inclusive=inclusive)
    assert max_error(ours, ref) < 1e-5 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("reverse,inclusive", [(True, True), (False, False), (True, False)])
def test_associative_scan_ssm_reverse_exclusive(reverse, inclusive):
    a, b = mx.random.uniform(0.5, 1.0, (3, 12, 2)), mx.random.normal((3, 12, 2))
    flip = (lambda t: t[:, ::-1]) if reverse else (lambda t: t)
    ref = linear_scan64(flip(f64(a)), flip(f64(b)), 1)
    if not inclusive:
        ref = np.concatenate([np.zeros((3, 1, 2)), ref[:, :-1]], axis=1)
    ours = associative_scan((a, b), "ssm", axis=1, reverse=reverse, inclusive=inclusive)
    assert max_error(ours, flip(ref)) < 1e-5 * max(1.0, float(np.abs(ref).max()))


def test_associative_scan_add_counts_bools_and_small_ints():
    flags = mx.random.uniform(shape=(40,)) < 0.5
    assert associative_scan(flags).tolist() == np.cumsum(np.array(flags)).tolist()
    small = mx.random.randint(-3, 3, (20,)).astype(mx.int8)
    ours = associative_scan(small)
    assert ours.dtype == mx.int8 and ours.tolist() == np.cumsum(np.array(small), dtype=np.int8).tolist()


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
    ({"B": mx.zeros((2, 5, 3, 3))}, "B"),  # D = 4 channels do not split into 3 groups
    ({"C": mx.zeros((2, 5, 2, 3)), "B": mx.zeros((2, 5, 4, 3))}, "C"),
    ({"initial_state": mx.zeros((2, 3, 4))}, "initial_state"),
    ({"delta_softplus": 1}, "delta_softplus"),
    ({"x": mx.zeros((2, 4, 5)), "delta": mx.zeros((2, 4, 5)), "z": None}, r"A .*mamba_ssm.s u .* x\.swapaxes"),
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
    (mx.zeros((3, 3)), "add", True, "axis"),
    (mx.zeros((3,)), "add", {"path": "kernel"}, "path and config"),
    (mx.zeros((3,)), "mul", {"config": {"WARPS": 4}}, "path and config"),
    (mx.zeros((3,)), "add", {"reverse": 1}, "reverse"),
])
def test_associative_scan_bad_arguments_name_the_argument(x, operator, axis, name):
    options = axis if isinstance(axis, dict) else {"axis": axis}
    with pytest.raises((TypeError, ValueError), match=rf"^{name}"):
        associative_scan(x, operator, **options)
