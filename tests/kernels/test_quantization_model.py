"""quantize_model, save_quantized / load_quantized and the accuracy bounds of the report's model."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_primitives.kernels import Int4Linear, Int8Linear, load_quantized, quantize_model, save_quantized
from mlx_primitives.kernels.quantization_report import SmallTransformer, accuracy_report

SMALL = dict(vocab_size=128, dims=64, heads=2, hidden_dims=128, layers=2)
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


def model(**sizes) -> SmallTransformer:
    m = SmallTransformer(**{**SMALL, **sizes})
    mx.eval(m.parameters())
    return m


def tokens():
    return mx.random.randint(0, SMALL["vocab_size"], (2, 16))


def layer_types(m):
    return {path: type(module) for path, module in tree_flatten(m.leaf_modules(), is_leaf=nn.Module.is_module)}


@pytest.mark.parametrize("bits, mode, kind", [(8, "w8a8", Int8Linear), (8, "weight_only", Int8Linear),
                                              (4, None, Int4Linear)])
def test_swaps_every_linear_including_swiglu_and_attention(bits, mode, kind):
    m = model()
    specs = quantize_model(m, bits=bits, mode=mode, group_size=32)
    assert len(specs) == SMALL["layers"] * LINEARS_PER_BLOCK + 1
    types = layer_types(m)
    assert not any(t is nn.Linear for t in types.values())
    assert types["layers.0.mlp.gate_proj"] is kind and types["layers.1.attention.q_proj"] is kind
    assert types["embed"] is nn.Embedding


def test_predicate_and_group_size_choose_the_layers():
    m = model(hidden_dims=96)  # down_proj has 96 inputs: not a multiple of 64
    specs = quantize_model(m, bits=4, group_size=64, predicate=lambda path, _: "lm_head" not in path)
    types = layer_types(m)
    assert types["lm_head"] is nn.Linear and types["layers.0.mlp.down_proj"] is nn.Linear
    assert types["layers.0.mlp.up_proj"] is Int4Linear and "lm_head" not in specs


def test_invalid_arguments():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(model(), bits=3)
    with pytest.raises(ValueError, match="mode='w8a8' needs bits=8"):
        quantize_model(model(), bits=4, mode="w8a8")
    with pytest.raises(ValueError, match="group_size must be 32, 64 or 128"):
        quantize_model(model(), bits=4, group_size=48)


@pytest.mark.parametrize("bits, mode", [(8, "w8a8"), (8, "weight_only"), (4, "weight_only")])
def test_save_and_load_round_trip_bit_exactly(tmp_path, bits, mode):
    m = model()
    quantize_model(m, bits=bits, mode=mode, group_size=32, predicate=lambda path, _: path != "layers.1.mlp.up_proj")
    path = str(tmp_path / "model.safetensors")
    save_quantized(path, m)
    _, metadata = mx.load(path, return_metadata=True)
    layers = json.loads(metadata["layers"])
    assert metadata["bits"] == str(bits) and metadata["mode"] == mode and "layers.1.mlp.up_proj" not in layers
    fresh = model()  # other random weights, float structure
    load_quantized(path, fresh)
    assert layer_types(fresh) == layer_types(m)
    ours, theirs = dict(tree_flatten(fresh.parameters())), dict(tree_flatten(m.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and mx.array_equal(ours[k], theirs[k]).item() for k in ours)
    t = tokens()
    assert mx.array_equal(fresh(t), m(t)).item()


def test_loading_another_architecture_lists_the_mismatches(tmp_path):
    m = model()
    quantize_model(m, bits=8)
    path = str(tmp_path / "model.safetensors")
    save_quantized(path, m)
    other = model(layers=1, hidden_dims=192)
    before = dict(tree_flatten(other.parameters()))
    with pytest.raises(ValueError) as error:
        load_quantized(path, other)
    message = str(error.value)
    assert "another architecture" in message
    assert "layers.1.mlp.up_proj" in message  # a layer the other model lacks
    assert "shape mismatches" in message and "layers.0.mlp.up_proj.weight: file (128, 64), model (192, 64)" in message
    after = dict(tree_flatten(other.parameters()))  # left as it was
    assert before.keys() == after.keys() and all(before[k] is after[k] for k in before)


def test_loading_a_plain_safetensors_file_is_refused(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    mx.save_safetensors(path, {"w": mx.zeros((2,))})
    with pytest.raises(ValueError, match="not an mlx_primitives quantized checkpoint"):
        load_quantized(path, model())


# The accuracy report's bounds (benchmarks/quantization.py prints the same quantities on a larger model).
BOUNDS = {(8, "w8a8"): (0.02, 0.05), (8, "weight_only"): (0.01, 0.03), (4, "weight_only"): (0.1, 0.3)}


@pytest.mark.parametrize("bits, mode", sorted(BOUNDS))
def test_quantized_logits_stay_within_the_stated_bounds(bits, mode):
    m = model()
    q = model()
    q.update(m.parameters())
    quantize_model(q, bits=bits, mode=mode, group_size=32)
    report = accuracy_report(m, q, tokens())
    layer_bound, logit_bound = BOUNDS[(bits, mode)]
    assert len(report.layer_errors) == SMALL["layers"] * LINEARS_PER_BLOCK + 1
    assert 0 < max(report.layer_errors.values()) < layer_bound
    assert 0 < report.logit_rel_error < logit_bound
