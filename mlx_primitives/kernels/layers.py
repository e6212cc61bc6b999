"""Layers over the fused kernels: RMSNorm, LayerNorm (with an optional residual) and the gated MLPs."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from ..validation import check_bool, check_choice, check_int
from .glu import APPROXIMATIONS, geglu, swiglu
from .norms import check_eps, layer_norm, rms_norm


def _positive_int(name: str, value) -> int:
    if check_int(name, value) <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return int(value)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation over the last axis, optionally fused with a residual add.

    ``norm(x)`` returns ``rms_norm(x)``; ``norm(x, residual)`` returns ``(rms_norm(x + residual),
    x + residual)`` in one kernel, the two tensors a pre-norm transformer block needs.

    Args:
        dims (int): size of the normalised (last) axis.
        eps (float): added to the mean square. Default: ``1e-5``.
    """

    def __init__(self, dims: int, eps: float = 1e-5):
        super().__init__()
        self.weight = mx.ones((_positive_int("dims", dims),))
        self.eps = check_eps(eps)

    def _extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def __call__(self, x: mx.array, residual: Optional[mx.array] = None):
        return rms_norm(x, self.weight, self.eps, residual=residual)


class LayerNorm(nn.Module):
    """Layer normalisation over the last axis, optionally fused with a residual add.

    Args:
        dims (int): size of the normalised (last) axis.
        eps (float): added to the variance. Default: ``1e-5``.
        affine (bool): learn a weight (and a bias). Default: ``True``.
        bias (bool): learn a bias when ``affine``. Default: ``True``.
    """

    def __init__(self, dims: int, eps: float = 1e-5, affine: bool = True, bias: bool = True):
        super().__init__()
        self.dims = _positive_int("dims", dims)
        self.eps = check_eps(eps)
        if check_bool("affine", affine):
            self.weight = mx.ones((dims,))
            if check_bool("bias", bias):
                self.bias = mx.zeros((dims,))

    def _extra_repr(self) -> str:
        return f"{self.dims}, eps={self.eps}, affine={'weight' in self}"

    def __call__(self, x: mx.array, residual: Optional[mx.array] = None):
        return layer_norm(x, self.get("weight"), self.get("bias"), self.eps, residual=residual)


class _GatedMLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, bias: bool = False):
        super().__init__()
        self.dims, self.hidden_dims = _positive_int("dims", dims), _positive_int("hidden_dims", hidden_dims)
        bias = check_bool("bias", bias)
        self.gate_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.up_proj = nn.Linear(dims, hidden_dims, bias=bias)
        self.down_proj = nn.Linear(hidden_dims, dims, bias=bias)

    def _extra_repr(self) -> str:
        return f"dims={self.dims}, hidden_dims={self.hidden_dims}"


class SwiGLU(_GatedMLP):
    """The SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, the gate product fused.

    The projections are ``nn.Linear`` and may be quantized with ``nn.quantize`` (they become
    ``nn.QuantizedLinear``).

    Args:
        dims (int): input and output features.
        hidden_dims (int): features of the gated hidden layer.
        bias (bool): projections with bias. Default: ``False``.
    """

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class GeGLU(_GatedMLP):
    """The GeGLU MLP: ``down_proj(gelu(gate_proj(x)) * up_proj(x))``, the gate product fused.

    Args:
        dims (int): input and output features.
        hidden_dims (int): features of the gated hidden layer.
        bias (bool): projections with bias. Default: ``False``.
        approximate (str): ``"none"`` (erf GELU) or ``"tanh"``. Default: ``"none"``.
    """

    def __init__(self, dims: int, hidden_dims: int, bias: bool = False, approximate: str = "none"):
        super().__init__(dims, hidden_dims, bias)
        self.approximate = check_choice("approximate", approximate, APPROXIMATIONS)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x), approximate=self.approximate))
