"""How much quantization changes a model: per-layer relative error and end-to-end logit difference.

:class:`SmallTransformer` (a pre-norm decoder of this package's layers: ``RMSNorm``, ``Attention``,
``SwiGLU``) is the model the accuracy table of ``benchmarks/quantization.py`` and the tests of
``tests/kernels/test_quantization_model.py`` measure; :data:`BOUNDS` are the errors its quantized
versions must stay within (:meth:`AccuracyReport.within`). :func:`accuracy_report` works on any pair
of float and quantized models with the same structure.
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
from .quantized_linear import dequantized_weight

# (max per-layer relative error, logits relative error) within which quantize_model(bits=, mode=) of
# SmallTransformer (random weights, group size 32 or 64, float32 or float16 activations) must stay against
# float32. Measured at dims 256 (benchmarks/quantization.py accuracy(ACCURACY_SIZES["quick"]), CPU, embedding
# quantized too): int8 w8a8 0.009 / 0.023, int8 weight-only 0.006 / 0.013, int4 0.091 (the embedding's normal
# weights; Linears 0.067) / 0.22; the bounds keep 1.4-2x of slack.
BOUNDS = {(8, "w8a8"): (0.02, 0.05), (8, "weight_only"): (0.01, 0.03), (4, "weight_only"): (0.15, 0.3)}


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
    its float layer ``F`` on standard-normal inputs (an embedding: its ``as_linear``);
    ``logit_rel_error``: ``||q - f|| / ||f||`` over all logits; ``logit_max_abs``: ``max |q - f|``;
    ``top1_agreement``: share of positions whose arg-max token is the same."""

    layer_errors: Dict[str, float]
    logit_rel_error: float
    logit_max_abs: float
    top1_agreement: float

    def within(self, bits: int, mode: str) -> bool:
        """Whether the errors stay within :data:`BOUNDS` of a ``quantize_model(bits=bits, mode=mode)``."""
        layer_bound, logit_bound = BOUNDS[(bits, mode)]
        return max(self.layer_errors.values(), default=0.0) < layer_bound and self.logit_rel_error < logit_bound


def _relative(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm((a - b).reshape(-1)) / mx.linalg.norm(b.reshape(-1))).item()


def _layer_error(layer: nn.Module, reference: nn.Module, rows: int, dtype: Optional[mx.Dtype], key) -> float:
    """``||Q(x) - F(x)|| / ||F(x)||`` on ``rows`` standard-normal inputs of a Linear, or of an
    embedding's ``as_linear`` (a tied output head); for other layers (experts), that of the weight."""
    if isinstance(reference, nn.Embedding):
        quantized, exact = layer.as_linear, reference.as_linear
    elif isinstance(reference, nn.Linear):
        quantized, exact = layer, reference
    else:
        return _relative(dequantized_weight(layer), reference.weight)
    x = mx.random.normal((rows, reference.weight.shape[-1]), key=key)
    float_dtype = reference.weight.dtype
    return _relative(quantized(x.astype(dtype or float_dtype)), exact(x.astype(float_dtype)))


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
        errors[path] = _layer_error(layer, float_layers[path], rows, dtype, mx.random.key(len(errors)))
    f, q = float_model(tokens), quantized_model(tokens)
    return AccuracyReport(
        layer_errors=errors,
        logit_rel_error=_relative(q, f),
        logit_max_abs=mx.max(mx.abs(q.astype(mx.float32) - f.astype(mx.float32))).item(),
        top1_agreement=mx.mean(mx.argmax(q, axis=-1) == mx.argmax(f, axis=-1)).item(),
    )
