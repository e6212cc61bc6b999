"""The layers over the kernels, as a decoder block uses them, plain and quantized."""

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_primitives import GeGLU, LayerNorm, RMSNorm, SwiGLU
from mlx_primitives.kernels import norms

from .helpers import random

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


@pytest.mark.parametrize("make, error, message", [
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
