"""quantize_model, save_quantized / load_quantized and the accuracy bounds of the report's model."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_primitives.kernels import Int4Linear, Int8Linear, W8A8Linear, load_quantized, quantize_model, save_quantized
from mlx_primitives.kernels.quantization_report import BOUNDS, SmallTransformer, accuracy_report
from mlx_primitives.models import ModelArgs, Transformer
from mlx_primitives.moe import QuantizedExpertLinear, SparseMoELayer

from .helpers import f64

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


@pytest.mark.parametrize("bits, mode, kind", [(8, "w8a8", W8A8Linear), (8, "weight_only", Int8Linear),
                                              (4, None, Int4Linear)])
def test_swaps_every_linear_and_the_embedding_as_nn_quantize_does(bits, mode, kind):
    m = model()
    specs = quantize_model(m, bits=bits, mode=mode, group_size=32)
    assert len(specs) == SMALL["layers"] * LINEARS_PER_BLOCK + 2
    types = layer_types(m)
    assert not any(t in (nn.Linear, nn.Embedding) for t in types.values())
    assert types["layers.0.mlp.gate_proj"] is kind and types["layers.1.attention.q_proj"] is kind
    assert types["embed"] is nn.QuantizedEmbedding and m.embed.bits == bits  # int8 activations are a Linear's
    assert specs["embed"] == {"kind": "QuantizedEmbedding", "bits": bits, "mode": "weight_only", "group_size": 32,
                              "format": "affine"}


def test_quantizes_moe_experts_and_round_trips(tmp_path):
    m = nn.Sequential(SparseMoELayer(64, 96, num_experts=4))
    quantize_model(m, bits=4, group_size=32)
    assert isinstance(m.layers[0].up_proj, QuantizedExpertLinear) and isinstance(m.layers[0].router, Int4Linear)
    save_quantized(tmp_path / "moe.safetensors", m)
    fresh = load_quantized(tmp_path / "moe.safetensors", nn.Sequential(SparseMoELayer(64, 96, num_experts=4)))
    x = mx.random.normal((2, 5, 64))
    assert mx.array_equal(fresh(x), m(x)).item()


def test_w8a8_model_runs_after_set_dtype_and_after_a_reload(tmp_path):
    """set_dtype(float16) casts the float32 weight scales; W8A8Linear takes them back to float32, and the
    float16 model stays within the report's W8A8 logits bound of the float32 float model."""
    m, t = model(), tokens()
    exact = f64(m(t))
    quantize_model(m, bits=8)
    m.set_dtype(mx.float16)
    assert m.layers[0].mlp.up_proj.scales.dtype == mx.float16
    half = m(t)
    assert half.dtype == mx.float16
    assert np.linalg.norm(f64(half) - exact) / np.linalg.norm(exact) < BOUNDS[(8, "w8a8")][1]
    save_quantized(tmp_path / "half", m)
    assert mx.array_equal(load_quantized(tmp_path / "half", model())(t), half).item()


def test_predicate_dict_sets_each_layer_as_nn_quantize(tmp_path):
    m = model()
    specs = quantize_model(m, bits=4, group_size=32,
                           predicate=lambda path, _: {"bits": 8, "mode": "weight_only"} if "mlp" in path else True)
    assert specs["layers.0.mlp.up_proj"]["bits"] == 8 and specs["layers.0.attention.q_proj"]["bits"] == 4
    types = layer_types(m)
    assert types["layers.0.mlp.up_proj"] is Int8Linear and types["layers.0.attention.q_proj"] is Int4Linear
    save_quantized(tmp_path / "mixed.safetensors", m)
    fresh = load_quantized(tmp_path / "mixed.safetensors", model())
    t = tokens()
    assert layer_types(fresh) == types and mx.array_equal(fresh(t), m(t)).item()


def test_predicate_must_be_callable_and_return_a_bool_or_dict():
    with pytest.raises(TypeError, match="predicate must be a callable"):
        quantize_model(model(), bits=4, predicate=True)
    with pytest.raises(TypeError, match="predicate must return a bool or a dict"):
        quantize_model(model(), bits=4, predicate=lambda path, _: "yes")
    with pytest.raises(ValueError, match=r"predicate returned unknown settings \['bit'\]"):
        quantize_model(model(), bits=4, predicate=lambda path, _: {"bit": 8})
    with pytest.raises(ValueError, match="mode='w8a8' needs bits=8"):
        quantize_model(model(), bits=8, predicate=lambda path, _: {"bits": 4, "mode": "w8a8"})


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
    with pytest.raises(TypeError, match="bits must be an int"):
        quantize_model(model(), bits="8")
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize_model(model(), bits=8, mode="int8")
    with pytest.raises(TypeError, match="mode must be one of"):
        quantize_model(model(), bits=8, mode=["w8a8"])


ROUND_TRIPS = [(8, "w8a8", mx.float32), (8, "weight_only", mx.float16), (4, "weight_only", mx.bfloat16)]


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    ours, theirs = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and mx.array_equal(ours[k], theirs[k]).item() for k in ours)


@pytest.mark.parametrize("bits, mode, dtype", ROUND_TRIPS)
def test_save_and_load_round_trip_bit_exactly(tmp_path, bits, mode, dtype):
    m = model()
    m.set_dtype(dtype)
    quantize_model(m, bits=bits, mode=mode, group_size=32, predicate=lambda path, _: path != "layers.1.mlp.up_proj")
    path = str(tmp_path / "model.safetensors")
    save_quantized(path, m)
    _, metadata = mx.load(path, return_metadata=True)
    layers = json.loads(metadata["layers"])
    assert metadata["bits"] == str(bits) and metadata["mode"] == ",".join(sorted({mode, "weight_only"}))
    assert "layers.1.mlp.up_proj" not in layers and metadata["architecture"] == "SmallTransformer"
    fresh = model()  # other random weights, float32 structure
    load_quantized(path, fresh)
    assert layer_types(fresh) == layer_types(m)
    assert_same_parameters(fresh, m)
    t = tokens()
    assert mx.array_equal(fresh(t), m(t)).item()


def transformer(**args) -> Transformer:
    m = Transformer(ModelArgs(**{**dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                                        intermediate_size=128, kernel="reference"), **args}))
    mx.eval(m.parameters())
    return m


@pytest.mark.parametrize("bits", [8, 4])
def test_tied_head_transformer_round_trips_bit_exactly(tmp_path, bits):
    """The tied vocabulary head (embed_tokens.as_linear) is quantized with the embedding, and reloads."""
    m = transformer()
    quantize_model(m, bits=bits, group_size=32)
    assert isinstance(m.embed_tokens, nn.QuantizedEmbedding)
    save_quantized(tmp_path / "tied.safetensors", m)
    fresh = load_quantized(tmp_path / "tied.safetensors", transformer())
    assert_same_parameters(fresh, m)
    t = tokens()
    assert mx.array_equal(fresh(t), m(t)).item()


def test_nn_quantize_models_are_recorded_and_rebuilt(tmp_path):
    m = transformer()
    nn.quantize(m, group_size=32, bits=4)
    save_quantized(tmp_path / "mlx.safetensors", m)
    fresh = load_quantized(tmp_path / "mlx.safetensors", transformer())
    assert type(fresh.layers[0].mlp.up_proj) is nn.QuantizedLinear and type(fresh.embed_tokens) is nn.QuantizedEmbedding
    assert_same_parameters(fresh, m)


def test_save_refuses_a_quantized_layer_it_cannot_record(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight, self.scales = mx.zeros((4, 4), mx.int8), mx.ones((4,))

    m = nn.Sequential(nn.Linear(64, 64), Scaled())
    with pytest.raises(ValueError, match=r"cannot record these quantized layers: layers\.1"):
        save_quantized(tmp_path / "x.safetensors", m)


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


def test_other_sizes_are_listed_before_anything_is_quantized(tmp_path):
    """intermediate 80 is no multiple of the file's group size 32: listed, not MLX's [quantize] error."""
    m = transformer()
    quantize_model(m, bits=4, group_size=32)
    save_quantized(tmp_path / "q.safetensors", m)
    with pytest.raises(ValueError) as error:
        load_quantized(tmp_path / "q.safetensors", transformer(intermediate_size=80))
    message = str(error.value)
    assert "not a multiple of the file's group_size (2): layers.0.mlp.down_proj, layers.1.mlp.down_proj" in message
    assert "layers.0.mlp.gate_proj.weight: file (128, 8), model (80, 8)" in message


def test_another_mlp_or_model_class_is_refused(tmp_path):
    """GeGLU and SwiGLU hold the same keys and shapes: the recorded module classes tell them apart."""
    m = transformer()
    quantize_model(m, bits=4, group_size=32)
    save_quantized(tmp_path / "q.safetensors", m)
    with pytest.raises(ValueError, match="module classes that differ .*layers.0.mlp: file SwiGLU, model GeGLU"):
        load_quantized(tmp_path / "q.safetensors", transformer(mlp="geglu"))
    with pytest.raises(ValueError, match=r"\(model\): file Transformer, model Sequential"):
        load_quantized(tmp_path / "q.safetensors", nn.Sequential(nn.Linear(64, 64)))


def test_path_suffix_and_metadata_are_checked(tmp_path):
    m = nn.Sequential(nn.Linear(64, 32))
    quantize_model(m, bits=4, group_size=32)
    save_quantized(tmp_path / "plain", m)  # written as plain.safetensors, found again by the same name
    load_quantized(tmp_path / "plain", nn.Sequential(nn.Linear(64, 32)))
    arrays, metadata = mx.load(str(tmp_path / "plain.safetensors"), return_metadata=True)
    for change, match in (({"format_version": "1"}, "has format_version '1'; this version of mlx_primitives reads"),
                          ({"layers": None}, "metadata lacks layers")):
        damaged = {k: v for k, v in {**metadata, **change}.items() if v is not None}
        mx.save_safetensors(str(tmp_path / "damaged.safetensors"), arrays, metadata=damaged)
        with pytest.raises(ValueError, match=match):
            load_quantized(tmp_path / "damaged.safetensors", nn.Sequential(nn.Linear(64, 32)))


def test_quantized_mlp_repr_shows_float_sizes():
    m = model()
    quantize_model(m, bits=4, group_size=32)
    assert "SwiGLU(dims=64, hidden_dims=128\n" in repr(m)


def test_loading_a_plain_safetensors_file_is_refused(tmp_path):
    path = str(tmp_path / "plain.safetensors")
    mx.save_safetensors(path, {"w": mx.zeros((2,))})
    with pytest.raises(ValueError, match="not an mlx_primitives quantized checkpoint"):
        load_quantized(path, model())


@pytest.mark.parametrize("bits, mode", sorted(BOUNDS))
def test_quantized_logits_stay_within_the_stated_bounds(bits, mode):
    m = model()
    q = model()
    q.update(m.parameters())
    quantize_model(q, bits=bits, mode=mode, group_size=32)
    report = accuracy_report(m, q, tokens())
    assert len(report.layer_errors) == SMALL["layers"] * LINEARS_PER_BLOCK + 2  # the embedding too
    assert min(report.layer_errors.values()) > 0 and report.logit_rel_error > 0
    assert report.within(bits, mode)
