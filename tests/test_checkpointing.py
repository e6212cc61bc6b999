"""checkpoint and checkpoint_sequential: same values and gradients, lower peak memory (measured on the CPU)."""

import functools

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_primitives import checkpoint, checkpoint_sequential, checkpointing


def _blocks(count=8, width=256):
    blocks = [nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, width), nn.Tanh())
              for _ in range(count)]
    mx.eval([b.parameters() for b in blocks])
    return blocks


def _loss_and_grads(model, forward, x):
    """Loss, parameter gradients and the peak memory of evaluating both."""
    mx.eval(x)
    mx.synchronize()
    mx.reset_peak_memory()
    loss, grads = nn.value_and_grad(model, lambda x: (forward(x) ** 2).mean())(x)
    mx.eval(loss, grads)
    return loss, tree_flatten(grads), mx.get_peak_memory()


def _assert_same(ours, ref):
    assert ours[0].item() == pytest.approx(ref[0].item(), rel=1e-6)
    assert [k for k, _ in ours[1]] == [k for k, _ in ref[1]]
    for (name, g), (_, r) in zip(ours[1], ref[1]):
        assert mx.allclose(g, r, rtol=1e-5, atol=1e-7).item(), name


@pytest.mark.parametrize("segments", [2, 4])
def test_checkpoint_sequential_same_gradients_less_memory(segments):
    blocks = _blocks()
    model = nn.Sequential(*blocks)
    x = mx.random.normal((1024, 256))
    plain = _loss_and_grads(model, model, x)
    ours = _loss_and_grads(model, checkpoint_sequential(blocks, segments), x)
    _assert_same(ours, plain)
    assert ours[2] < 0.85 * plain[2], (ours[2], plain[2])


def test_checkpoint_each_block_same_gradients_less_memory():
    blocks = _blocks()
    model = nn.Sequential(*blocks)
    x = mx.random.normal((1024, 256))
    checkpointed = [checkpoint(b) for b in blocks]

    def forward(x):
        for block in checkpointed:
            x = block(x)
        return x

    plain = _loss_and_grads(model, model, x)
    ours = _loss_and_grads(model, forward, x)
    _assert_same(ours, plain)
    assert ours[2] < 0.85 * plain[2], (ours[2], plain[2])


def test_checkpoint_plain_function_gradients():
    w = mx.random.normal((16, 16))

    def fn(x, y):
        return mx.tanh(x @ w) * y

    x, y = mx.random.normal((4, 16)), mx.random.normal((4, 16))
    ref = mx.grad(lambda x, y: fn(x, y).sum(), argnums=(0, 1))(x, y)
    ours = mx.grad(lambda x, y: checkpoint(fn)(x, y).sum(), argnums=(0, 1))(x, y)
    assert all(mx.allclose(a, b).item() for a, b in zip(ours, ref))


def test_checkpoint_sequential_uneven_segments():
    blocks = _blocks(5, 32)
    x = mx.random.normal((8, 32))
    assert mx.allclose(checkpoint_sequential(blocks, 3)(x), nn.Sequential(*blocks)(x)).item()
    assert mx.allclose(checkpoint_sequential(blocks, 1)(x), nn.Sequential(*blocks)(x)).item()


class _Holder:
    """A plain object holding a layer: a layer reached through it is named with modules=."""

    def __init__(self, layer):
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


_HELD = {}  # a layer a function reads through a global name, inside a comprehension


def _through_global(x):
    return [_HELD["layer"](v) for v in (x,)][0]


def _captured_cases():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    layer0 = model.layers[0]
    holder = _Holder(layer0)
    _HELD["layer"] = layer0
    return model, [
        lambda x: checkpoint(lambda y: model(y))(x),  # a layer in a closure cell
        lambda x: model.layers[2](model.layers[1](checkpoint(layer0.__call__)(x))),  # a bound method
        checkpoint_sequential([functools.partial(layer0), model.layers[1], model.layers[2]], 2),  # a partial
        lambda x: model.layers[2](model.layers[1](checkpoint(holder.forward, x, modules=[layer0]))),
        lambda x: model.layers[2](model.layers[1](checkpoint(_through_global, x))),
    ]


@pytest.mark.parametrize("case", range(5))
def test_checkpoint_gradients_reach_captured_layers(case):
    model, forwards = _captured_cases()
    x = mx.random.normal((3, 8))
    ref = tree_flatten(nn.value_and_grad(model, lambda x: (model(x) ** 2).sum())(x)[1])
    ours = tree_flatten(nn.value_and_grad(model, lambda x: (forwards[case](x) ** 2).sum())(x)[1])
    assert [k for k, _ in ours] == [k for k, _ in ref]
    for (name, g), (_, r) in zip(ours, ref):
        assert mx.abs(r).max().item() > 0 and mx.allclose(g, r, rtol=1e-5, atol=1e-7).item(), name


def test_checkpoint_gradients_reach_closure_arrays():
    x, w = mx.random.normal((5,)), mx.random.normal((5,))
    ref = mx.grad(lambda w: mx.sin(x * w).sum())(w)
    ours = mx.grad(lambda w: checkpoint(lambda v: mx.sin(v * w))(x).sum())(w)
    assert mx.allclose(ours, ref).item()


def test_checkpoint_recomputes_dropout_with_the_forwards_mask():
    dropout = nn.Dropout(0.5)

    def value_grad_and_next_draw(forward):
        mx.random.seed(7)
        value, grad = mx.value_and_grad(lambda w: forward(mx.ones((256,)), w).sum())(mx.array(1.0))
        return value.item(), grad.item(), mx.random.uniform().item()

    plain = value_grad_and_next_draw(lambda v, w: dropout(v * w))
    ours = value_grad_and_next_draw(checkpoint(lambda v, w: dropout(v * w)))
    # d/dw of sum(mask * w / keep) at w = 1 is the value itself: the recomputed mask is the forward's.
    assert ours[0] == ours[1] and ours == plain


def test_checkpoint_reads_the_random_key_only_to_recompute(monkeypatch):
    """A call that is never differentiated (inference) syncs nothing; a recomputation reads the forward's
    key and the current one."""
    reads = []
    monkeypatch.setattr(checkpointing, "_host_key", lambda key: reads.append(key) or tuple(key.tolist()))
    block = checkpoint(nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5)))
    x = mx.random.normal((2, 8))
    mx.eval(block(x))
    assert reads == []
    mx.eval(mx.grad(lambda x: block(x).sum())(x))
    assert len(reads) == 2


def test_checkpoint_with_arguments_calls_at_once():
    block = nn.Sequential(nn.Linear(8, 8), nn.GELU())
    x = mx.random.normal((2, 8))
    assert mx.allclose(checkpoint(block, x), block(x)).item()
    ref = nn.value_and_grad(block, lambda x: block(x).sum())(x)[1]
    ours = nn.value_and_grad(block, lambda x: checkpoint(block, x).sum())(x)[1]
    assert all(mx.allclose(g, r).item() for (_, g), (_, r) in zip(tree_flatten(ours), tree_flatten(ref)))


@pytest.mark.parametrize("call,name", [
    (lambda: checkpoint(3), "fn"),
    (lambda: checkpoint_sequential([], 1), "blocks"),
    (lambda: checkpoint_sequential([abs, 3], 1), r"blocks\[1\]"),
    (lambda: checkpoint_sequential([abs, abs], 3), "segments"),
    (lambda: checkpoint_sequential([abs, abs], 0), "segments"),
    (lambda: checkpoint_sequential([abs, abs], True), "segments"),
    (lambda: checkpoint_sequential([abs, abs], 1.0), "segments"),
    (lambda: checkpoint(abs, modules=[abs]), "modules"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}"):
        call()


proj = nn.Linear(4, 4)  # a global named like the attribute below: not what the method reads


class _UsesAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def run(self, x):
        return self.proj(x)


def test_attribute_names_do_not_reach_globals():
    block = _UsesAttribute()
    modules, _ = checkpointing._walk([block.run])
    assert any(m is block for m in modules) and not any(m is proj for m in modules)
