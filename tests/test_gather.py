"""selective_gather and selective_scatter_add against NumPy (np.take, np.add.at), gradients, errors."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives import selective_gather, selective_scatter_add

from .reference import f64, max_error

CASES = [((10, 4), (7,), 0), ((3, 9, 5), (2, 6), 1), ((4, 6), (), -1), ((5, 3, 2), (4, 1), 2)]


@pytest.mark.parametrize("shape,index_shape,axis", CASES)
def test_gather_matches_numpy(shape, index_shape, axis):
    x = mx.random.normal(shape)
    indices = mx.random.randint(0, shape[axis], index_shape)
    assert max_error(selective_gather(x, indices, axis), np.take(f64(x), np.array(indices), axis)) == 0


@pytest.mark.parametrize("shape,index_shape,axis", CASES)
def test_scatter_add_accumulates_duplicates_like_numpy(shape, index_shape, axis):
    target = mx.random.normal(shape)
    indices = mx.random.randint(0, 2, index_shape)  # few distinct values: many duplicates
    ax = axis % len(shape)
    updates = mx.random.normal(shape[:ax] + index_shape + shape[ax + 1:])
    expected = np.moveaxis(f64(target), ax, 0).copy()
    moved = np.moveaxis(f64(updates).reshape(shape[:ax] + (-1,) + shape[ax + 1:]), ax, 0)
    np.add.at(expected, np.array(indices).reshape(-1), moved)
    ours = selective_scatter_add(target, indices, updates, axis)
    assert max_error(ours, np.moveaxis(expected, 0, ax)) < 1e-5


def test_scatter_add_is_the_adjoint_of_gather():
    x = mx.random.normal((6, 3))
    indices = mx.array([0, 5, 5, 2, 0, 0])
    cot = mx.random.normal((6, 3))
    grad = mx.grad(lambda x: (selective_gather(x, indices) * cot).sum())(x)
    assert mx.allclose(grad, selective_scatter_add(mx.zeros_like(x), indices, cot)).item()
    g_upd = mx.grad(lambda u: (selective_scatter_add(x, indices, u) * x).sum())(mx.zeros((6, 3)))
    assert mx.allclose(g_upd, selective_gather(x, indices)).item()


def test_low_precision_scatter_keeps_dtype():
    target = mx.zeros((4, 8), mx.bfloat16)
    out = selective_scatter_add(target, mx.array([1, 1, 3]), mx.ones((3, 8), mx.bfloat16))
    assert out.dtype == mx.bfloat16 and out[1].tolist() == [2.0] * 8


def test_gather_and_scatter_run_under_compile():
    x, indices, updates = mx.random.normal((6, 3)), mx.array([4, 0, 4, 5]), mx.random.normal((4, 3))
    gather = mx.compile(lambda x, i: selective_gather(x, i))
    scatter = mx.compile(lambda x, i, u: selective_scatter_add(x, i, u))
    assert max_error(gather(x, indices), np.take(f64(x), np.array(indices), 0)) == 0
    expected = f64(x).copy()
    np.add.at(expected, np.array(indices), f64(updates))
    assert max_error(scatter(x, indices, updates), expected) < 1e-6


@pytest.mark.parametrize("call,name", [
    (lambda: selective_gather(mx.zeros((4, 2)), mx.array([0, 4])), "indices"),
    (lambda: selective_gather(mx.zeros((4, 2)), mx.array([-1])), "indices"),
    (lambda: selective_gather(mx.zeros((4, 2)), mx.array([0.5])), "indices"),
    (lambda: selective_gather(mx.zeros((4, 2)), mx.array([0]), axis=2), "axis"),
    (lambda: selective_gather(mx.zeros((4, 2)), mx.array([0]), axis=True), "axis"),
    (lambda: selective_gather([1, 2], mx.array([0])), "x"),
    (lambda: selective_scatter_add(mx.zeros((4, 2)), mx.array([0, 1]), mx.zeros((3, 2))), "updates"),
    (lambda: selective_scatter_add(mx.zeros((4, 2)), mx.array([0, 1]), mx.zeros((2, 2), mx.float16)), "updates"),
    (lambda: selective_scatter_add(mx.zeros((4, 2)), mx.array([9]), mx.zeros((1, 2))), "indices"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}\b"):
        call()
