"""swap_attention on mlx-lm models: logits equal the unswapped model's through prefill + 16 decode steps."""

import mlx.core as mx
import numpy as np
import pytest

pytest.importorskip("mlx_lm")

from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from mlx_primitives.models import model_attention, restore_attention, swap_attention  # noqa: E402
from mlx_primitives.models.configs import TINY_CONFIGS, random_model  # noqa: E402

PROMPT, DECODE_STEPS = 24, 16
STD = 0.1  # large enough weights that attention is peaked: a wrong mask or position shows in the logits
# float32 relative tolerance: on CUDA, MLX runs float32 matmuls (and so our reference path) in TF32.
FLOAT32_RTOL = 5e-3 if mx.default_device() == mx.gpu else 1e-4


def run_logits(model, tokens):
    """Logits of a prefill of ``tokens[:, :PROMPT]`` then one decode step per further token, mlx-lm caches."""
    cache = make_prompt_cache(model)
    outs = [model(tokens[:, :PROMPT], cache=cache)[:, -1]]
    for i in range(PROMPT, tokens.shape[1]):
        outs.append(model(tokens[:, i : i + 1], cache=cache)[:, -1])
    out = mx.stack(outs, axis=1).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def tokens_for(config, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    return mx.array(rng.integers(0, config["vocab_size"], (batch, PROMPT + DECODE_STEPS)))


def relative_error(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_flash_swap_matches_mlx_lm_through_prefill_and_decode(name):
    config = TINY_CONFIGS[name]
    model = random_model(config, std=STD)
    tokens = tokens_for(config)
    expected = run_logits(model, tokens)
    replaced = swap_attention(model, kernel="flash")
    assert len(replaced) == config["num_hidden_layers"]
    got = run_logits(model, tokens)
    assert relative_error(got, expected) < FLOAT32_RTOL
    assert model_attention(model).routes["flash"] > 0


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2"])
def test_flex_swap_matches_mlx_lm(name):
    config = TINY_CONFIGS[name]
    model = random_model(config, std=STD)
    tokens = tokens_for(config)
    expected = run_logits(model, tokens)
    swap_attention(model, kernel="flex")
    assert relative_error(run_logits(model, tokens), expected) < FLOAT32_RTOL
    assert model_attention(model).routes["flex"] > 0


def test_sage_swap_within_its_accuracy():
    config = TINY_CONFIGS["llama"]
    model = random_model(config, std=STD)
    tokens = tokens_for(config)
    expected = run_logits(model, tokens)
    swap_attention(model, kernel="sage")
    got = run_logits(model, tokens)
    # INT8 q and k: a few percent of the logit range (the sage tests bound the attention output itself).
    assert relative_error(got, expected) < 5e-2
    assert model_attention(model).routes["sage"] > 0


@pytest.mark.parametrize("name,kernel", [("qwen2", "flash"), ("gemma2", "flash"), ("llama_sliding", "flash"),
                                         ("gemma2", "flex")])
def test_float16_swap_within_fp16_tolerance(name, kernel):
    """In float16 the kernels run on a GPU (softcap: flash and decode kernels; flex: the flex kernel)."""
    config = TINY_CONFIGS[name]
    model = random_model(config, dtype=mx.float16, std=STD)
    tokens = tokens_for(config)
    exact = run_logits(random_model(config, dtype=mx.float32, std=STD), tokens)
    baseline = run_logits(model, tokens)
    swap_attention(model, kernel=kernel)
    got = run_logits(model, tokens)
    # Within twice mlx-lm's own float16 error against the float32 model, plus a floor.
    assert np.abs(got - exact).max() <= 2 * np.abs(baseline - exact).max() + 1e-3


def test_wrong_mask_is_detected():
    """The comparison can fail: attention without the causal mask changes the logits."""
    config = TINY_CONFIGS["llama"]
    model = random_model(config, std=STD)
    tokens = tokens_for(config)
    expected = run_logits(model, tokens)
    swap_attention(model)
    attention = model_attention(model)
    call = attention.__call__
    attention.__class__ = type("NoMask", (type(attention),),
                               {"__call__": lambda self, q, k, v, cache=None, scale=1.0, mask=None, **o:
                                call(q, k, v, cache, scale, None, **o)})
    assert relative_error(run_logits(model, tokens), expected) > 1e-2


def test_swap_is_per_model_reversible_and_keeps_weights():
    config = TINY_CONFIGS["llama"]
    model, other = random_model(config, std=STD), random_model(config, std=STD)
    original = type(model.layers[0].self_attn)
    weights = dict(model.parameters()["model"]["layers"][0]["self_attn"]["q_proj"])
    replaced = swap_attention(model, kernel="reference")
    assert replaced[0].original is original and replaced[0].hook == "scaled_dot_product_attention"
    assert type(other.layers[0].self_attn) is original  # another model of the family is untouched
    assert model.parameters()["model"]["layers"][0]["self_attn"]["q_proj"]["weight"] is weights["weight"]
    assert len(restore_attention(model)) == config["num_hidden_layers"]
    assert type(model.layers[0].self_attn) is original and model_attention(model) is None


def test_gemma2_uses_the_inline_hook():
    model = random_model(TINY_CONFIGS["gemma2"], std=STD)
    assert {r.hook for r in swap_attention(model)} == {"__call__"}


def test_swap_rejects_unknown_kernel_and_models_without_attention():
    model = random_model(TINY_CONFIGS["llama"], std=STD)
    with pytest.raises(ValueError, match="kernel must be one of"):
        swap_attention(model, kernel="nope")
    import mlx.nn as nn

    with pytest.raises(ValueError, match="no mlx-lm attention module"):
        swap_attention(nn.Linear(2, 2))
