"""How much quantization changes a model: per-layer relative error and end-to-end logit difference.

:class:`SmallTransformer` (a pre-norm decoder of this package's layers: ``RMSNorm``, ``Attention``,
``SwiGLU``) is the model the accuracy table of ``benchmarks/quantization.py`` and the bounds in
``tests/kernels/test_quantization_model.py`` are measured on; :func:`accuracy_report` works on any
pair of float and quantized models with the same structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..attention.layers import Attention
from .layers import RMSNorm, SwiGLU
from .quantization_model import quantized_layers


class _Block(nn.Module):
    def __init__(self, dims: int, heads: int, hidden_dims: int):
        super().__init__()
        self.attention_norm = RMSNorm(dims)
        self.attention = Attention(dims, heads)
        self.mlp_norm = RMSNorm(dims)
        self.mlp = SwiGLU(dims, hidden_dims)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.attention(self.attention_norm(x), mask="causal")
        return x + self.mlp(self.mlp_norm(x))


class SmallTransformer(nn.Module):
    """A causal language model of this package's layers: embedding, ``layers`` pre-norm blocks of
    ``Attention`` and ``SwiGLU``, a final ``RMSNorm`` and an untied ``lm_head``.

    Args:
        vocab_size, dims, heads, hidden_dims, layers (int): sizes. Call with tokens ``(batch, seq)``
            int32; returns logits ``(batch, seq, vocab_size)``.
    """

    def __init__(self, vocab_size: int = 512, dims: int = 256, heads: int = 4, hidden_dims: int = 768,
                 layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dims)
        self.layers = [_Block(dims, heads, hidden_dims) for _ in range(layers)]
        self.norm = RMSNorm(dims)
        self.lm_head = nn.Linear(dims, vocab_size, bias=False)

    def __call__(self, tokens: mx.array) -> mx.array:
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


@dataclass
class AccuracyReport:
    """``layer_errors``: ``{path: ||Q(x) - F(x)|| / ||F(x)||}`` of each quantized layer ``Q`` against
    its float layer ``F`` on standard-normal inputs; ``logit_rel_error``: ``||q - f|| / ||f||`` over
    all logits; ``logit_max_abs``: ``max |q - f|``; ``top1_agreement``: share of positions whose
    arg-max token is the same."""

    layer_errors: Dict[str, float]
    logit_rel_error: float
    logit_max_abs: float
    top1_agreement: float


def _relative(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm((a - b).reshape(-1)) / mx.linalg.norm(b.reshape(-1))).item()


def accuracy_report(float_model: nn.Module, quantized_model: nn.Module, tokens: mx.array, rows: int = 64,
                    dtype: Optional[mx.Dtype] = None) -> AccuracyReport:
    """Compare ``quantized_model`` (``quantize_model`` of a copy of ``float_model``) with ``float_model``.

    Args:
        float_model, quantized_model (nn.Module): same structure, called on ``tokens``.
        tokens (array): the model input (e.g. ``(batch, seq)`` int32).
        rows (int): inputs per layer for the per-layer errors. Default: ``64``.
        dtype (optional): activation dtype of ``quantized_model`` (e.g. ``mx.float16``). Default: that of
            the float layers' weights.
    """
    float_layers = dict(tree_flatten(float_model.leaf_modules(), is_leaf=nn.Module.is_module))
    errors = {}
    for path, layer in quantized_layers(quantized_model).items():
        reference = float_layers[path]
        x = mx.random.normal((rows, reference.weight.shape[1]), key=mx.random.key(len(errors)))
        float_dtype = reference.weight.dtype
        errors[path] = _relative(layer(x.astype(dtype or float_dtype)), reference(x.astype(float_dtype)))
    f, q = float_model(tokens), quantized_model(tokens)
    return AccuracyReport(
        layer_errors=errors,
        logit_rel_error=_relative(q, f),
        logit_max_abs=mx.max(mx.abs(q.astype(mx.float32) - f.astype(mx.float32))).item(),
        top1_agreement=mx.mean(mx.argmax(q, axis=-1) == mx.argmax(f, axis=-1)).item(),
    )
