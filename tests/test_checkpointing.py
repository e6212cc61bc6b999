"""checkpoint and checkpoint_sequential: same values and gradients, lower peak memory (measured on the CPU)."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_primitives import checkpoint, checkpoint_sequential


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


@pytest.mark.parametrize("call,name", [
    (lambda: checkpoint(3), "fn"),
    (lambda: checkpoint_sequential([], 1), "blocks"),
    (lambda: checkpoint_sequential([abs, 3], 1), r"blocks\[1\]"),
    (lambda: checkpoint_sequential([abs, abs], 3), "segments"),
    (lambda: checkpoint_sequential([abs, abs], 0), "segments"),
])
def test_bad_arguments_name_the_argument(call, name):
    with pytest.raises((TypeError, ValueError), match=rf"^{name}"):
        call()
