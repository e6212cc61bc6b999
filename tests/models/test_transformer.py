"""The composed Transformer: cached decoding equals the full forward pass; the block is pre-norm."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.models import ModelArgs, Transformer, TransformerBlock

ARGS = ModelArgs(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)


@pytest.mark.parametrize("mlp", ["swiglu", "geglu"])
def test_cached_decode_equals_full_forward(mlp):
    mx.random.seed(0)
    model = Transformer(ModelArgs(**{**ARGS.__dict__, "mlp": mlp}))
    tokens = mx.array(np.random.default_rng(0).integers(0, 97, (2, 12)))
    full = model(tokens)
    cache = model.make_cache()
    steps = [model(tokens[:, :8], cache=cache)]
    steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(8, 12)]
    assert full.shape == (2, 12, 97)
    np.testing.assert_allclose(np.array(mx.concatenate(steps, axis=1)), np.array(full), rtol=1e-4, atol=1e-4)


def test_block_is_pre_norm_with_the_residual_fused():
    mx.random.seed(1)
    block = TransformerBlock(ARGS)
    x = mx.random.normal((1, 5, 64))
    h = x + block.self_attn(block.input_layernorm(x), "causal")
    expected = h + block.mlp(block.post_attention_layernorm(h))
    np.testing.assert_allclose(np.array(block(x, "causal")), np.array(expected), rtol=1e-4, atol=1e-5)


def test_causal_masking_of_the_model():
    mx.random.seed(2)
    model = Transformer(ARGS)
    tokens = mx.array([[3, 1, 4, 1, 5, 9]])
    changed = mx.array([[3, 1, 4, 1, 5, 2]])
    np.testing.assert_allclose(np.array(model(tokens)[:, :5]), np.array(model(changed)[:, :5]), atol=1e-5)
    assert not np.allclose(np.array(model(tokens)[:, 5]), np.array(model(changed)[:, 5]))


def test_unknown_mlp_is_rejected():
    with pytest.raises(ValueError, match="mlp must be"):
        TransformerBlock(ModelArgs(mlp="relu"))
