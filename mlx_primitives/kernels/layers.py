"""Layers over the fused kernels: RMSNorm, LayerNorm (with an optional residual), RoPE and the gated MLPs."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..validation import check_bool, check_choice, check_positive_int, check_positive_real, check_real
from .glu import APPROXIMATIONS, geglu, swiglu
from .norms import layer_norm, rms_norm
from .rotary import rope


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
        self.weight = mx.ones((check_positive_int("dims", dims),))
        self.eps = check_positive_real("eps", eps)

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
        self.dims = check_positive_int("dims", dims)
        self.eps = check_positive_real("eps", eps)
        if check_bool("affine", affine):
            self.weight = mx.ones((dims,))
            if check_bool("bias", bias):
                self.bias = mx.zeros((dims,))

    def _extra_repr(self) -> str:
        return f"{self.dims}, eps={self.eps}, affine={'weight' in self}"

    def __call__(self, x: mx.array, residual: Optional[mx.array] = None):
        return layer_norm(x, self.get("weight"), self.get("bias"), self.eps, residual=residual)


class RoPE(nn.Module):
    """Rotary position embedding: ``nn.RoPE``'s arguments and call, plus queries and keys in one launch.

    ``rope(x, offset)`` is ``nn.RoPE``'s call, ``mx.fast.rope`` on ``x`` of shape ``(..., seq_len,
    head_dim)``. ``rope.qk(q, k, offset)`` rotates queries ``(batch, q_heads, seq_len, head_dim)`` and
    keys ``(batch, kv_heads, seq_len, head_dim)`` together (:func:`mlx_primitives.kernels.rope`).
    ``offset`` is an int or an int array ``(batch,)`` (one start position per batch entry).

    Args:
        dims (int): rotated features (even); features beyond pass through.
        traditional (bool): rotate pairs ``(2j, 2j+1)`` instead of ``(j, j + dims/2)``. Default: ``False``.
        base (float): base of the angular frequencies. Default: ``10000``.
        scale (float): multiplies the positions. Default: ``1.0``.
    """

    def __init__(self, dims: int, traditional: bool = False, base: float = 10000, scale: float = 1.0):
        super().__init__()
        self.dims = check_positive_int("dims", dims)
        if self.dims % 2:
            raise ValueError(f"dims must be even; got {dims!r}")
        self.traditional = check_bool("traditional", traditional)
        self.base = check_positive_real("base", base)
        self.scale = check_real("scale", scale)

    def _extra_repr(self) -> str:
        return f"{self.dims}, traditional={self.traditional}"

    def __call__(self, x: mx.array, offset: Union[int, mx.array] = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=self.traditional, base=self.base, scale=self.scale,
                            offset=offset)

    def qk(self, q: mx.array, k: mx.array, offset: Union[int, mx.array] = 0) -> Tuple[mx.array, mx.array]:
        """``(self(q, offset), self(k, offset))`` in one kernel launch where that is faster."""
        return rope(q, k, self.dims, traditional=self.traditional, base=self.base, scale=self.scale, offset=offset)


class _GatedMLP(nn.Module):
    def __init__(self, dims: int, hidden_dims: int, bias: bool = False):
        super().__init__()
        self.dims, self.hidden_dims = check_positive_int("dims", dims), check_positive_int("hidden_dims", hidden_dims)
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
