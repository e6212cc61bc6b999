"""Gated activations of transformer MLPs: ``swiglu(gate, up) = silu(gate) * up`` and ``geglu`` (GELU).

One elementwise kernel reads gate and up once and writes the product once, in float32 inside; the
MLX expression ``nn.silu(gate) * up`` makes intermediate arrays in the input dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import mlx.core as mx

from . import catalog
from .launcher import Launch, div_vec, launch, with_reference_vjp
from .tuning import config_for
from ..validation import check_array, check_choice, check_same_dtype

# The ACT template value of glu.kern per activation.
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
PATHS = ("auto", "kernel", "reference")
APPROXIMATIONS = ("none", "tanh")  # geglu's approximate: erf GELU, or the tanh approximation


def plan(gate, up, activation: str, config=None) -> Launch:
    """The launch of glu.kern over the flat views of gate and up."""
    n = gate.size
    config = {**config_for(catalog.GLU, gate.dtype, {"N": n}), **(config or {})}
    vec = div_vec(n, gate.dtype.size)
    per_group = config["THREADS"] * config["ITEMS"] * vec
    return Launch(
        kernel=catalog.GLU,
        inputs=[gate.reshape(-1), up.reshape(-1)],
        template=[("T", gate.dtype), ("VEC", vec), ("ITEMS", config["ITEMS"]), ("THREADS", config["THREADS"]),
                  ("ACT", ACTIVATIONS[activation])],
        grid=(-(-n // per_group) * config["THREADS"], 1, 1),
        threadgroup=(config["THREADS"], 1, 1),
        output_shapes=[(n,)],
        output_dtypes=[gate.dtype],
    )


def reference(gate, up, activation: str):
    """``act(gate) * up`` in MLX ops, float32 inside."""
    g = gate.astype(mx.float32)
    if activation == "silu":
        act = g * mx.sigmoid(g)
    elif activation == "gelu":
        act = 0.5 * g * (1.0 + mx.erf(g / math.sqrt(2.0)))
    else:
        act = 0.5 * g * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)))
    return (act * up.astype(mx.float32)).astype(gate.dtype)


@functools.lru_cache(maxsize=64)
def _function(activation: str, config: Optional[tuple]):
    def ref(gate, up):
        return reference(gate, up, activation)

    def forward(gate, up):
        outputs = launch(plan(gate, up, activation, dict(config or ())), lambda: [ref(gate, up)])
        return outputs[0].reshape(gate.shape)

    return with_reference_vjp(forward, ref)


def _glu(gate, up, activation, path, config):
    check_array("gate", gate, "(..., hidden_dims)")
    check_array("up", up, f"gate's shape {tuple(gate.shape)}", shape=gate.shape)
    check_same_dtype(("gate", "up"), (gate, up))
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    if path == "reference" or gate.size == 0:
        return reference(gate, up, activation)
    key = tuple(sorted(config.items())) if config else None
    return _function(activation, key)(gate, up)


def swiglu(gate: mx.array, up: mx.array, *, path: str = "auto", config: Optional[dict] = None) -> mx.array:
    """``silu(gate) * up``, the gated unit of SwiGLU MLPs (LLaMA, Mistral, Qwen).

    Args:
        gate (array): gate projection ``(..., hidden_dims)``, float16, bfloat16 or float32.
        up (array): up projection, same shape and dtype.
        path (str): ``"auto"``/``"kernel"`` (fused kernel) or ``"reference"`` (MLX ops).
        config (dict, optional): template values, e.g. ``{"ITEMS": 2, "THREADS": 256}``.

    Returns:
        array of the shape and dtype of ``gate``.
    """
    return _glu(gate, up, "silu", path, config)


def geglu(
    gate: mx.array, up: mx.array, *, approximate: str = "none", path: str = "auto", config: Optional[dict] = None
) -> mx.array:
    """``gelu(gate) * up``, the gated unit of GeGLU MLPs (T5 v1.1, Gemma).

    Args:
        gate (array): gate projection ``(..., hidden_dims)``, float16, bfloat16 or float32.
        up (array): up projection, same shape and dtype.
        approximate (str): ``"none"`` (erf GELU) or ``"tanh"`` (the tanh approximation, Gemma's).
        path (str): ``"auto"``/``"kernel"`` or ``"reference"``.
        config (dict, optional): template values, e.g. ``{"ITEMS": 2, "THREADS": 256}``.

    Returns:
        array of the shape and dtype of ``gate``.
    """
    check_choice("approximate", approximate, APPROXIMATIONS)
    return _glu(gate, up, "gelu" if approximate == "none" else "gelu_tanh", path, config)


def compile_examples():
    """Launches covering every dtype, activation and tunable configuration (for the Metal compile check)."""
    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        for n in (4096, 1001):
            gate = mx.zeros((n,), dtype)
            for activation in ACTIVATIONS:
                for config in catalog.GLU.configs():
                    yield plan(gate, gate, activation, config)
