"""SparseMoELayer, build_expert_dispatch and compute_load_balancing_loss against float64 NumPy."""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_primitives import SparseMoELayer, build_expert_dispatch, compute_load_balancing_loss, moe
from mlx_primitives.hardware import device_profile

from .reference import assert_within_rule, f64, max_error

pytestmark = pytest.mark.filterwarnings("ignore:mlx_primitives. kernel 'glu' is unavailable")


def _expert_weights(layer):
    """Each projection's (E, out, in) weights as MLX float32, dequantized where the layer is quantized."""
    weights = {}
    for name in ("gate_proj", "up_proj", "down_proj"):
        proj = getattr(layer, name)
        if hasattr(proj, "scales"):
            weights[name] = mx.dequantize(proj.weight, proj.scales, proj.biases, proj.group_size, proj.bits,
                                          mode=proj.mode)
        else:
            weights[name] = proj.weight
    return weights


def moe64(layer, x, kept=None):
    """The layer in float64, token by token, on the layer's own expert choice (float32 router logits
    can order near-ties differently from float64; CUDA's float32 matmuls are TF32-like). ``kept``:
    ``(tokens, top_k)`` bool, False where an assignment was dropped."""
    x = x.reshape(-1, layer.dims)
    experts = np.array(layer.route(x)[0])
    w = {name: f64(v) for name, v in _expert_weights(layer).items()}
    x = f64(x)
    logits = x @ f64(layer.router.weight).T
    if layer.normalize_weights:  # softmax over the chosen logits, else the full softmax's probabilities
        logits = np.take_along_axis(logits, experts, 1)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    gates = probs if layer.normalize_weights else np.take_along_axis(probs, experts, 1)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(layer.top_k):
            if kept is not None and not kept[t, k]:
                continue
            e = experts[t, k]
            g, u = w["gate_proj"][e] @ x[t], w["up_proj"][e] @ x[t]
            y[t] += gates[t, k] * (w["down_proj"][e] @ (g / (1 + np.exp(-g)) * u))
    return y


def dense_moe(layer, x, kept=None):
    """Every expert on every token, masked by the routing, in plain MLX ops (differentiable): the naive
    computation of the tolerance rule and the gradient reference."""
    experts, weights, _ = layer.route(x)
    if kept is not None:
        weights = weights * mx.array(kept)
    w = _expert_weights(layer)
    mask = (experts[..., None] == mx.arange(layer.num_experts)).astype(x.dtype)  # (T, k, E)
    per_expert = (mask * weights[..., None]).sum(1)  # (T, E)
    g = mx.einsum("ehd,td->teh", w["gate_proj"], x)
    u = mx.einsum("ehd,td->teh", w["up_proj"], x)
    out = mx.einsum("edh,teh->ted", w["down_proj"], nn.silu(g) * u)
    return (out * per_expert[..., None]).sum(1)


ROUTES = ["gather", "per_expert", "batched"]
DEFAULT_PAD_LIMIT = moe.PAD_LIMIT


@pytest.fixture(autouse=True)
def pad_every_batch(monkeypatch):
    """The batched route pads its blocks however unbalanced the routing (small test shapes are)."""
    monkeypatch.setattr(moe, "PAD_LIMIT", math.inf)


@pytest.mark.parametrize("matmuls", ROUTES)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_layer_matches_float64(top_k, matmuls):
    layer = SparseMoELayer(32, 48, num_experts=6, top_k=top_k, matmuls=matmuls)
    x = mx.random.normal((3, 7, 32))
    y = layer(x)
    assert y.shape == x.shape
    assert_within_rule(y.reshape(21, 32), moe64(layer, x), dense_moe(layer, x.reshape(21, 32)), mx.float32)


@pytest.mark.parametrize("matmuls", ROUTES)
def test_moe_layer_with_capacity_drops_late_tokens(matmuls):
    layer = SparseMoELayer(16, 24, num_experts=4, top_k=2, capacity_factor=0.5, matmuls=matmuls)
    x = mx.random.normal((40, 16))
    plan = layer.dispatch(x)
    assert plan.capacity == math.ceil(0.5 * 40 * 2 / 4)
    assert plan.num_dropped.item() == int(np.maximum(np.array(plan.expert_counts) - plan.capacity, 0).sum())
    kept = np.array(plan.kept[plan.inverse]).reshape(40, 2)
    experts = np.array(layer.route(x)[0])
    for e in range(4):  # an expert keeps the first of its queue: every first choice, then second choices
        arrivals = kept.T[experts.T == e]
        assert arrivals.sum() == min(plan.capacity, arrivals.size) and arrivals[: plan.capacity].all()
    assert_within_rule(layer(x), moe64(layer, x, kept), dense_moe(layer, x, kept), mx.float32)


@pytest.mark.parametrize("matmuls", ROUTES)
def test_moe_layer_quantized_uses_quantized_weights(matmuls):
    layer = SparseMoELayer(64, 64, num_experts=4, top_k=2, matmuls=matmuls)
    x = mx.random.normal((9, 64))
    nn.quantize(layer, group_size=32, bits=8, class_predicate=lambda _, m: hasattr(m, "to_quantized")
                and not isinstance(m, nn.Linear))
    assert "QuantizedExpertLinear" in str(layer)
    assert_within_rule(layer(x), moe64(layer, x), dense_moe(layer, x), mx.float32)


@pytest.mark.parametrize("matmuls,capacity_factor", [("gather", None), ("per_expert", None), ("per_expert", 0.75),
                                                     ("batched", None), ("batched", 0.75)])
def test_moe_layer_gradients_match_dense_reference(matmuls, capacity_factor):
    layer = SparseMoELayer(16, 24, num_experts=4, top_k=2, capacity_factor=capacity_factor, matmuls=matmuls)
    x = mx.random.normal((11, 16))
    plan = layer.dispatch(x)
    kept = np.array(plan.kept[plan.inverse]).reshape(11, 2)
    cot = mx.random.normal((11, 16))
    # Both sides use float32 matmuls, TF32-like on CUDA: a looser bound there.
    tolerance = 2e-3 if device_profile().backend == "cuda" else 1e-5

    def grads(fn):
        return nn.value_and_grad(layer, lambda x: (fn(x) * cot).sum())(x)[1]

    ours, ref = tree_flatten(grads(layer)), tree_flatten(grads(lambda x: dense_moe(layer, x, kept)))
    assert [k for k, _ in ours] == [k for k, _ in ref]
    for (name, g), (_, r) in zip(ours, ref):
        assert max_error(g, f64(r)) < tolerance * max(1.0, float(mx.abs(r).max())), name


@pytest.mark.parametrize("matmuls", ["per_expert", "batched"])
def test_moe_blocked_routes_with_an_expert_nobody_picks(matmuls):
    layer = SparseMoELayer(16, 24, num_experts=5, top_k=2, matmuls=matmuls)
    x = mx.random.uniform(0.1, 1.0, (13, 16))
    # Positive inputs: expert 3's all-negative router row gives it the lowest logit for every token.
    layer.router.weight = mx.concatenate([mx.random.uniform(0.0, 1.0, (3, 16)), -mx.ones((1, 16)),
                                          mx.random.uniform(0.0, 1.0, (1, 16))])
    assert layer.dispatch(x).expert_counts.tolist()[3] == 0
    assert_within_rule(layer(x), moe64(layer, x), dense_moe(layer, x), mx.float32)


@pytest.mark.parametrize("matmuls", ["per_expert", "batched"])
def test_moe_blocked_routes_gather_under_compile(matmuls):
    layer = SparseMoELayer(16, 24, num_experts=4, top_k=2, matmuls=matmuls)
    x = mx.random.normal((10, 16))
    compiled = mx.compile(lambda x: layer(x))  # no host read inside compile: the gather route runs
    assert_within_rule(compiled(x), moe64(layer, x), dense_moe(layer, x), mx.float32)


def test_moe_batched_route_pads_only_balanced_dense_blocks(monkeypatch):
    monkeypatch.setattr(moe, "PAD_LIMIT", DEFAULT_PAD_LIMIT)
    layer = SparseMoELayer(32, 64, num_experts=4, top_k=2, matmuls="batched")
    assert layer._blocks([5, 4, 5, 4], None, "batched") == ([0, 5, 10, 15], [5, 4, 5, 4], 5)
    assert layer._blocks([5, 4, 5, 4], 3, "batched") == ([0, 3, 6, 9], [3, 3, 3, 3], 3)
    assert layer._blocks([9, 1, 5, 3], None, "batched") == ([0, 9, 10, 15], [9, 1, 5, 3], None)
    assert layer._blocks([5, 4, 5, 4], None, "per_expert")[2] is None
    x = mx.random.uniform(0.1, 1.0, (9, 16))
    unbalanced = SparseMoELayer(16, 24, num_experts=4, top_k=2, matmuls="batched")
    unbalanced.router.weight = mx.zeros((4, 16)).at[0].add(10.0)  # positive x: every token to expert 0
    counts = unbalanced.dispatch(x).expert_counts.tolist()
    assert counts[0] == 9 and unbalanced._blocks(counts, None, "batched")[2] is None
    assert_within_rule(unbalanced(x), moe64(unbalanced, x), dense_moe(unbalanced, x), mx.float32)
    nn.quantize(layer, group_size=32, bits=8, class_predicate=lambda _, m: hasattr(m, "to_quantized")
                and not isinstance(m, nn.Linear))
    assert layer._blocks([5, 4, 5, 4], None, "batched")[2] is None  # quantized: one quantized_matmul per block


@pytest.mark.parametrize("top_k", [1, 3])
def test_moe_layer_routes_to_the_top_k_logits_with_aux_loss(top_k):
    layer = SparseMoELayer(16, 24, num_experts=5, top_k=top_k)
    x = mx.random.normal((20, 16))
    _, aux = layer(x, return_aux_loss=True)
    logits = f64(x) @ f64(layer.router.weight).T
    experts = np.array(layer.route(x)[0])
    top = np.argsort(-logits, axis=1)[:, :top_k]
    assert all(set(experts[t]) == set(top[t]) for t in range(20))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    f = np.bincount(top.reshape(-1), minlength=5) / (20 * top_k)
    assert abs(aux.item() - 5 * (f * probs.mean(0)).sum()) < 1e-5


def test_moe_default_gate_weights_train_a_top1_router():
    layer = SparseMoELayer(16, 24, num_experts=4, top_k=1)
    x = mx.random.normal((12, 16))
    grad = nn.value_and_grad(layer, lambda x: layer(x).sum())(x)[1]["router"]["weight"]
    assert mx.abs(grad).max().item() > 1e-3  # softmax over one chosen logit is 1: no router gradient
    weights = layer.route(x)[1]
    assert max_error(weights, np.max(f64(mx.softmax(layer.router(x), axis=-1)), 1, keepdims=True)) < 1e-6


@pytest.mark.parametrize("matmuls", ROUTES)
def test_moe_layer_on_no_tokens(matmuls):
    layer = SparseMoELayer(16, 24, num_experts=4, top_k=2, capacity_factor=1.0, matmuls=matmuls)
    y, aux = layer(mx.zeros((2, 0, 16)), return_aux_loss=True)
    assert y.shape == (2, 0, 16) and aux.item() == 0.0
    plan = build_expert_dispatch(mx.zeros((0, 2), mx.int32), mx.zeros((0, 2)), 4)
    assert plan.order.shape == (0,) and plan.expert_counts.tolist() == [0] * 4 and plan.dropped_tokens.size == 0


def test_moe_layer_output_dtype_follows_promotion():
    layer = SparseMoELayer(16, 24, num_experts=4, top_k=2)  # float32 weights, like nn.Linear
    assert layer(mx.random.normal((3, 16)).astype(mx.bfloat16)).dtype == mx.float32


def test_dispatch_sorts_by_expert_and_counts_drops():
    indices = mx.array([[0, 1], [0, 2], [0, 1], [3, 0]])
    weights = mx.random.uniform(shape=(4, 2))
    plan = build_expert_dispatch(indices, weights, num_experts=4, capacity_factor=0.5)
    assert plan.capacity == 1
    assert plan.expert_indices.tolist() == [0, 0, 0, 0, 1, 1, 2, 3]
    assert plan.token_indices.tolist() == [0, 1, 2, 3, 0, 2, 1, 3]
    assert plan.kept.tolist() == [True, False, False, False, True, False, True, True]
    assert plan.expert_counts.tolist() == [4, 2, 1, 1]
    assert plan.num_dropped.item() == 4
    assert plan.dropped_tokens.tolist() == [False, False, True, False]
    flat_w = np.array(weights).reshape(-1)
    expected = np.where(np.array(plan.kept), flat_w[np.array(plan.order)], 0)
    assert np.array_equal(np.array(plan.weights), expected)
    assert np.array_equal(np.array(plan.order)[np.array(plan.inverse)], np.arange(8))


def test_dispatch_capacity_serves_first_choices_before_second_choices():
    # Expert 0's queue: token 0's first choice, then the second choices of tokens 1 and 2; expert 1's:
    # the first choices of tokens 1 and 2, then token 0's second choice. Capacity 2 keeps every first choice.
    plan = build_expert_dispatch(mx.array([[0, 1], [1, 0], [1, 0]]), mx.ones((3, 2)), 2, capacity_factor=0.34)
    assert plan.capacity == 2
    assert plan.kept[plan.inverse].reshape(3, 2).tolist() == [[True, False], [True, True], [True, False]]
    assert plan.token_indices.tolist() == [0, 1, 2, 1, 2, 0]


def test_dispatch_under_compile_skips_the_host_check():
    indices, weights = mx.random.randint(0, 4, (9, 2)), mx.random.uniform(shape=(9, 2))
    compiled = mx.compile(lambda i, w: build_expert_dispatch(i, w, 4, 1.0).weights)
    assert mx.array_equal(compiled(indices, weights), build_expert_dispatch(indices, weights, 4, 1.0).weights).item()


def test_dispatch_without_capacity_keeps_everything():
    indices = mx.random.randint(0, 5, (50, 2))
    plan = build_expert_dispatch(indices, mx.ones((50, 2)), num_experts=5)
    assert plan.capacity is None and plan.num_dropped.item() == 0
    assert plan.expert_counts.tolist() == np.bincount(np.array(indices).reshape(-1), minlength=5).tolist()
    sorted_experts = np.array(plan.expert_indices)
    assert np.all(np.diff(sorted_experts) >= 0)


def test_load_balancing_loss_matches_float64_and_is_one_when_uniform():
    probs = mx.softmax(mx.random.normal((30, 6)), axis=-1)
    experts = mx.random.randint(0, 6, (30, 2))
    f = np.bincount(np.array(experts).reshape(-1), minlength=6) / 60
    expected = 6 * (f * f64(probs).mean(0)).sum()
    assert abs(compute_load_balancing_loss(probs, experts).item() - expected) < 1e-6
    uniform = mx.full((12, 4), 0.25)
    balanced = mx.array([[0, 1], [2, 3]] * 6)
    assert abs(compute_load_balancing_loss(uniform, balanced).item() - 1.0) < 1e-6
    grad = mx.grad(lambda p: compute_load_balancing_loss(p, experts))(probs)
    assert max_error(grad, np.broadcast_to(6 * f / 30, (30, 6))) < 1e-6


def test_load_balancing_loss_is_mixtral_over_top_k_and_masks_padding():
    logits = mx.random.normal((2, 9, 6))
    probs, top_k = mx.softmax(logits, axis=-1), 2
    experts = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k]
    mask = mx.random.uniform(shape=(2, 9)) < 0.7

    def mixtral(keep):
        # transformers' load_balancing_loss_func, float64, with its attention_mask branch.
        p, hot = f64(probs).reshape(-1, 6), np.eye(6)[np.array(experts).reshape(-1, top_k)]  # (T, k, E)
        w = keep.reshape(-1).astype(np.float64)
        tokens_per_expert = (hot * w[:, None, None]).sum(0) / w.sum()
        return 6 * (tokens_per_expert * ((p * w[:, None]).sum(0) / w.sum())[None]).sum()

    assert abs(top_k * compute_load_balancing_loss(probs, experts).item() - mixtral(np.ones((2, 9)))) < 1e-5
    masked = compute_load_balancing_loss(probs, experts, mask)
    assert abs(top_k * masked.item() - mixtral(np.array(mask))) < 1e-5


@pytest.mark.parametrize("call,name", [
    (lambda: build_expert_dispatch(mx.zeros((4,), mx.int32), mx.zeros((4,)), 2), "expert_indices"),
    (lambda: build_expert_dispatch(mx.zeros((4, 2)), mx.zeros((4, 2)), 2), "expert_indices"),
    (lambda: build_expert_dispatch(mx.zeros((4, 2), mx.int32), mx.zeros((4, 1)), 2), "expert_weights"),
    (lambda: build_expert_dispatch(mx.zeros((4, 2), mx.int32), mx.zeros((4, 2)), 0), "num_experts"),
    (lambda: build_expert_dispatch(mx.zeros((4, 2), mx.int32), mx.zeros((4, 2)), 2, 0.0), "capacity_factor"),
    (lambda: compute_load_balancing_loss(mx.zeros((4, 3)), mx.zeros((5, 2), mx.int32)), "expert_indices"),
    (lambda: compute_load_balancing_loss([0.5], mx.zeros((1, 1), mx.int32)), "router_probs"),
    (lambda: SparseMoELayer(8, 8, 4, 2)(mx.zeros((3, 7))), "x"),
    (lambda: SparseMoELayer(8, 8, 4, 5), "top_k"),
    (lambda: build_expert_dispatch(mx.array([[0, 2]]), mx.zeros((1, 2)), 2), "expert_indices"),
    (lambda: build_expert_dispatch(mx.array([[0, -1]]), mx.zeros((1, 2)), 2), "expert_indices"),
    (lambda: build_expert_dispatch(mx.array([[0, 1]]), mx.zeros((1, 2)), 2, "1"), "capacity_factor"),
    (lambda: build_expert_dispatch(mx.array([[0, 1]]), mx.zeros((1, 2)), 2, True), "capacity_factor"),
    (lambda: compute_load_balancing_loss(mx.ones((4, 3)), mx.full((4, 2), 3)), "expert_indices"),
    (lambda: compute_load_balancing_loss(mx.ones((4, 3)), mx.zeros((4, 2), mx.int32), mx.ones((4,))), "mask"),
    (lambda: SparseMoELayer(8, 8, 4, 1.5), "top_k"),
    (lambda: SparseMoELayer(8, 8, 0, 1), "num_experts"),
    (lambda: SparseMoELayer(0, 8, 4, 2), "dims"),
    (lambda: SparseMoELayer(8, 8, 4, 2, capacity_factor=-1.0), "capacity_factor"),
    (lambda: SparseMoELayer(8, 8, 4, 2, normalize_weights="yes"), "normalize_weights"),
    (lambda: SparseMoELayer(8, 8, 4, 2, matmuls="loop"), "matmuls"),
])
def test_moe_bad_arguments_name_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}\b"):
        call()
