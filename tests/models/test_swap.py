"""swap_attention on mlx-lm models: logits equal the unswapped model's through prefill + 16 decode steps."""

import mlx.core as mx
import mlx.nn as nn
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


# Families whose attention classes are not named "Attention" also run through our reference path
# (our math on every device; "flash" runs mx.fast's sdpa where the dispatcher routes there).
OTHER_NAMES = ("mixtral", "phi", "gpt_oss", "deepseek_v3", "qwen3_next")


def attention_layers(model):
    return sum(hasattr(layer, "self_attn") for layer in model.layers)


@pytest.mark.parametrize("name,kernel", [(n, "flash") for n in sorted(TINY_CONFIGS)] +
                         [(n, "reference") for n in OTHER_NAMES])
def test_swap_matches_mlx_lm_through_prefill_and_decode(name, kernel):
    config = TINY_CONFIGS[name]
    model = random_model(config, std=STD)
    tokens = tokens_for(config)
    expected = run_logits(model, tokens)
    replaced = swap_attention(model, kernel=kernel)
    layers = attention_layers(model)
    assert len(replaced) == layers and (name != "qwen3_next" or layers < config["num_hidden_layers"])
    got = run_logits(model, tokens)
    assert relative_error(got, expected) < FLOAT32_RTOL
    routes = model_attention(model).routes
    # One call per attention layer per model call, each labelled with what ran.
    assert sum(routes.values()) == layers * (1 + DECODE_STEPS)
    assert all(label == kernel or label.startswith(f"{kernel}->") for label in routes)


def test_flash_routes_name_the_path_that_ran(monkeypatch):
    """'flash->sdpa' counts exactly the calls that reached mx.fast's sdpa (Gemma-2's softcap never can)."""
    calls = []
    sdpa = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    for name in ("llama", "gemma2"):
        config = TINY_CONFIGS[name]
        model = random_model(config, std=STD)
        swap_attention(model)
        calls.clear()
        mx.eval(model(tokens_for(config)[:, :8]))
        routes = model_attention(model).routes
        assert sum(routes.values()) == config["num_hidden_layers"]
        assert routes["flash->sdpa"] == len(calls)
        assert name != "gemma2" or not calls


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
                                         ("gemma2", "flex"), ("phi", "flash")])
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
    with pytest.raises(ValueError, match="no mlx-lm attention module"):
        swap_attention(nn.Linear(2, 2))


@pytest.mark.parametrize("kernel,options,bad", [("flash", {"softcap": 30.0}, "softcap"),
                                                ("sage", {"smooth_k": True, "pathh": "x"}, "pathh"),
                                                ("sdpa", {"path": "kernel"}, "path"),
                                                ("flash", {"path": "fast"}, "path must be one of")])
def test_swap_rejects_options_its_kernel_does_not_take(kernel, options, bad):
    model = random_model(TINY_CONFIGS["llama"], std=STD)
    with pytest.raises(ValueError, match=bad) as error:
        swap_attention(model, kernel=kernel, **options)
    assert "path must" in bad or "sage: qk_quant_gran" in str(error.value)
    assert model_attention(model) is None


def test_sage_on_gemma2_says_why_it_runs_flash():
    config = TINY_CONFIGS["gemma2"]
    model = random_model(config, std=STD)
    swap_attention(model, kernel="sage", path="kernel")  # sage's path option, not flash's
    mx.eval(model(tokens_for(config)[:, :8]))
    (label,) = model_attention(model).routes
    assert label.startswith("flash->") and "sage takes no mask array, softcap or sinks" in label


def test_partial_swap_warns_with_the_classes_left_alone():
    class LinearAttention(nn.Module):  # attention-named, no scaled_dot_product_attention call
        def __call__(self, x):
            return x

    model = random_model(TINY_CONFIGS["llama"], std=STD)
    model.model.layers[1].extra = LinearAttention()
    with pytest.warns(UserWarning, match="LinearAttention"):
        assert len(swap_attention(model)) == 2


def test_our_transformer_is_refused_with_the_reason():
    from mlx_primitives.models import ModelArgs, Transformer, generate

    model = Transformer(ModelArgs(vocab_size=64, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                                  intermediate_size=96))
    for call in (lambda: swap_attention(model), lambda: generate(model, [[1, 2]])):
        with pytest.raises(ValueError, match="take mlx-lm models; Transformer already runs mlx_primitives"):
            call()
