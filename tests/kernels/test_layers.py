"""The layers over the kernels, as a decoder block uses them, plain and quantized."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_primitives import GeGLU, LayerNorm, RMSNorm, RoPE, SwiGLU
from mlx_primitives.kernels import norms, rotary

from .helpers import f64, max_error, random, rope64

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def test_rmsnorm_matches_mlx_layer_and_fuses_residual():
    x, r = random((2, 5, 64), mx.float32), random((2, 5, 64), mx.float32)
    ours, theirs = RMSNorm(64), nn.RMSNorm(64)
    assert mx.allclose(ours(x), theirs(x), atol=1e-5)
    out, h = ours(x, r)
    assert mx.allclose(h, x + r) and mx.allclose(out, theirs(x + r), atol=1e-5)
    assert "64" in repr(ours)


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_matches_mlx_layer(affine):
    x = random((3, 48), mx.float32)
    assert mx.allclose(LayerNorm(48, affine=affine)(x), nn.LayerNorm(48, affine=affine)(x), atol=1e-5)


@pytest.mark.parametrize("ours, theirs", [(RMSNorm, nn.RMSNorm), (LayerNorm, nn.LayerNorm)])
def test_norm_layers_keep_mlx_output_dtype_whichever_path_runs(ours, theirs, monkeypatch):
    """A fresh layer has float32 weights: on float16 input MLX's layers return float32, at any size."""
    x = random((2, 3, 32), mx.float16)
    for min_elements in (1 << 40, 0):  # mx.fast route, then the kernel route of path="auto"
        monkeypatch.setattr(norms, "AUTO_MIN_ELEMENTS", min_elements)
        got, want = ours(32)(x), theirs(32)(x)
        assert got.dtype == want.dtype == mx.float32
        assert mx.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("traditional", [False, True])
def test_rope_is_a_drop_in_for_mlx_rope_and_fuses_q_and_k(traditional, monkeypatch):
    ours, theirs = RoPE(16, traditional, 500.0, 0.5), nn.RoPE(16, traditional, 500.0, 0.5)
    assert repr(ours) == repr(theirs)
    q, k, offset = random((2, 4, 3, 24), mx.float32), random((2, 2, 3, 24), mx.float32), mx.array([5, 40])
    assert mx.array_equal(ours(q[0], offset=7), theirs(q[0], offset=7))  # any (..., seq_len, dim)
    monkeypatch.setattr(rotary, "AUTO_MIN_ELEMENTS", 0)  # path="auto" takes the fused route
    for x, out in zip((q, k), ours.qk(q, k, offset=offset)):
        exact = rope64(f64(x), np.array([5.0, 40.0]), 16, traditional, 500.0, 0.5)
        assert max_error(out, exact) <= 2e-5 and max_error(theirs(x, offset=offset), exact) <= 2e-5


@pytest.mark.parametrize("make, error, message", [
    (lambda: RoPE(15), ValueError, r"dims must be even; got 15"),
    (lambda: RoPE(16, base=0), ValueError, r"base must be a positive float"),
    (lambda: RMSNorm(64.0), TypeError, r"dims must be an int; got float"),
    (lambda: RMSNorm(0), ValueError, r"dims must be a positive int; got 0"),
    (lambda: RMSNorm(8, eps=-1e-5), ValueError, r"eps must be a positive float"),
    (lambda: LayerNorm(8, eps="1e-5"), TypeError, r"eps must be a real number"),
    (lambda: LayerNorm(8, affine=None), TypeError, r"affine must be a bool"),
    (lambda: SwiGLU(8, 0), ValueError, r"hidden_dims must be a positive int; got 0"),
    (lambda: GeGLU(8, 16, approximate="precise"), ValueError, r"approximate must be one of \('none', 'tanh'\)"),
])
def test_layers_check_their_arguments_at_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("layer, act", [(SwiGLU, nn.silu), (GeGLU, nn.gelu)])
def test_gated_mlp_matches_its_definition_and_quantizes(layer, act):
    mlp = layer(64, 128)
    x = random((2, 3, 64), mx.float32)
    want = mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert mx.allclose(mlp(x), want, atol=1e-5)
    nn.quantize(mlp, group_size=64, bits=4)
    assert isinstance(mlp.gate_proj, nn.QuantizedLinear)
    want = mlp.down_proj(act(mlp.gate_proj(x)) * mlp.up_proj(x))
    assert mlp(x).shape == (2, 3, 64) and mx.allclose(mlp(x), want, atol=1e-4)
