"""The scan kernels on the GPU against float64 NumPy: chunk edges, channel edges, sequence splits, options,
dtypes, gradients through the reference VJP."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives import associative_scan, selective_scan
from mlx_primitives.kernels import launcher

from ..reference import f64, max_error
from ..scan_reference import linear_scan64, random_selective_inputs, selective_scan64

# A fallback to the reference would pass every accuracy test: make the launcher's warning an error.
pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("error:mlx_primitives. kernel:RuntimeWarning")]

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
OPTIONS = ("D", "z", "bias", "softplus")
# Besides the default: the extremes of the tuning space (each config is one more device compilation).
CONFIGS = [{"WARPS": 2, "ITEMS": 16}, {"WARPS": 8, "ITEMS": 4}]


def test_kernels_compile_and_run_on_the_device():
    args, kwargs = random_selective_inputs(1, 70, 40, 16, options=OPTIONS)
    mx.eval(selective_scan(*args, **kwargs, path="kernel", splits=2))
    ran = {key[1].name for key, ok in launcher._verified.items() if ok}
    assert {"selective_scan", "linear_scan"} <= ran, ran


def _check(ours, ref64, naive, dtype, what):
    """Error against float64 at most twice the reference path's (float32 inside, rounded to ``dtype``)
    plus a floor scaled to the output's size."""
    scale = max(1.0, float(np.abs(ref64).max()))
    bound = 2 * max_error(naive, ref64) + (1e-5 if dtype == mx.float32 else 1e-3) * scale
    err = max_error(ours, ref64)
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} [{dtype}]"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,splits", [((2, 100, 40, 16), 1), ((2, 100, 40, 16), 3), ((1, 300, 70, 16), None)])
def test_selective_scan_kernel_matches_float64(dtype, shape, splits):
    args, kwargs = random_selective_inputs(*shape, dtype=dtype, options=OPTIONS)
    y, last = selective_scan(*args, **kwargs, return_last_state=True, path="kernel", splits=splits)
    naive, naive_last = selective_scan(*args, **kwargs, return_last_state=True, path="reference")
    y64, last64 = selective_scan64(*args, **kwargs)
    assert y.dtype == dtype and last.dtype == mx.float32
    _check(y, y64, naive, dtype, "y")
    _check(last, last64, naive_last, dtype, "last_state")


def test_selective_scan_without_options_small_state():
    args, kwargs = random_selective_inputs(3, 5, 33, 4)
    y = selective_scan(*args, **kwargs, path="kernel")
    _check(y, selective_scan64(*args, **kwargs)[0], selective_scan(*args, **kwargs, path="reference"),
           mx.float32, "y")


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_selective_scan_configs(config):
    args, kwargs = random_selective_inputs(2, 150, 36, 16, dtype=mx.float16, options=OPTIONS)
    y = selective_scan(*args, **kwargs, path="kernel", config=config, splits=2)
    _check(y, selective_scan64(*args, **kwargs)[0], selective_scan(*args, **kwargs, path="reference"),
           mx.float16, str(config))


def test_selective_scan_kernel_gradients_are_the_reference_gradients():
    args, kwargs = random_selective_inputs(2, 40, 34, 16, options=OPTIONS)
    arrays = list(args)

    def loss(path):
        return lambda *a: (selective_scan(*a, **kwargs, path=path) ** 2).sum()

    ours = mx.grad(loss("kernel"), argnums=tuple(range(7)))(*arrays)
    ref = mx.grad(loss("reference"), argnums=tuple(range(7)))(*arrays)
    for name, g, r in zip("x delta A B C D z".split(), ours, ref):
        assert max_error(g, f64(r)) <= 1e-4 * max(1.0, float(mx.abs(r).max())), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis", [((3, 1000, 40), 1), ((2, 70, 5), 1), ((33, 2, 3), 0), ((4, 5, 130), -1)])
def test_ssm_scan_kernel_matches_float64(dtype, shape, axis):
    a = mx.random.uniform(0.8, 1.0, shape).astype(dtype)
    b = mx.random.normal(shape).astype(dtype)
    ours = associative_scan((a, b), "ssm", axis=axis, path="kernel")
    naive = associative_scan((a, b), "ssm", axis=axis, path="reference")
    assert ours.dtype == dtype
    _check(ours, linear_scan64(a, b, axis), naive, dtype, "h")


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_ssm_scan_configs(config):
    a = mx.random.uniform(0.8, 1.0, (2, 200, 35))
    b = mx.random.normal((2, 200, 35))
    ours = associative_scan((a, b), "ssm", axis=1, path="kernel", config=config)
    _check(ours, linear_scan64(a, b, 1), associative_scan((a, b), "ssm", axis=1, path="reference"),
           mx.float32, str(config))
