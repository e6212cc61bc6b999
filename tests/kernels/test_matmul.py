"""tiled_matmul, the proof of the matrix-unit primitive: every tile position, odd sizes, fp16 and bf16."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.kernels import catalog, tiled_matmul

from .helpers import assert_accurate, f64, random


def test_validation_names_argument_and_shape():
    a = random((5, 7), mx.float16)
    with pytest.raises(ValueError, match=r"b must have shape \(K, N\) = \(7, N\)"):
        tiled_matmul(a, random((6, 3), mx.float16))
    with pytest.raises(TypeError, match=r"a must have dtype float16, bfloat16"):
        tiled_matmul(a.astype(mx.float32), random((7, 3), mx.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("shape", [(37, 71, 53), (128, 64, 128), (1, 16, 8), (200, 33, 131), (16, 1000, 24)])
def test_matches_float64(dtype, shape):
    m, k, n = shape
    a, b = random((m, k), dtype), random((k, n), dtype)
    exact = f64(a) @ f64(b)
    naive = (a @ b).astype(dtype)  # MLX's GEMM in the same dtype
    assert_accurate(tiled_matmul(a, b), naive, exact, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("config", catalog.MATMUL.configs())
def test_every_tile_config(config):
    """Each tile position of each configuration: a product whose every entry identifies its (row, col)."""
    m, k, n = 131, 24, 97
    rows = np.zeros((m, k), np.float32)
    rows[:, 0], rows[:, 1] = np.arange(m) % 64, 1.0
    cols = np.zeros((k, n), np.float32)
    cols[0, :], cols[1, :] = 1.0, np.arange(n) % 64 * 64
    out = tiled_matmul(mx.array(rows, mx.float16), mx.array(cols, mx.float16), config=config)
    want = (np.arange(m)[:, None] % 64) + (np.arange(n)[None] % 64) * 64.0  # exact in fp32, then rounded once
    assert np.array_equal(np.array(out.astype(mx.float32)), want.astype(np.float16).astype(np.float32))
