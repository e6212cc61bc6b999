"""Quantize a whole model, and save / load quantized models as safetensors.

``quantize_model`` swaps every ``nn.Linear`` (those of :class:`~.layers.SwiGLU` /
:class:`~.layers.GeGLU` and of :class:`~mlx_primitives.Attention` included) for
:class:`~.quantized_linear.Int8Linear` or :class:`~.quantized_linear.Int4Linear`.
``save_quantized`` writes every parameter as it is (so a reload is bit-exact) and, in the file's
metadata, which layers are quantized and how. ``load_quantized`` takes the float model built from
its config, quantizes the layers the metadata names the same way, checks that the file's tensors
are exactly the model's (names and shapes), and loads them.
"""

from __future__ import annotations

import json
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map_with_path

from .quantized_linear import Int4Linear, Int8Linear

FORMAT = "mlx_primitives.quantized"
FORMAT_VERSION = "1"
MODES = ("w8a8", "weight_only")


def _spec(module: nn.Module) -> Optional[dict]:
    """How a quantized layer was made (``None`` for any other module)."""
    if isinstance(module, Int8Linear):
        mode = "w8a8" if module.activations == "int8" else "weight_only"
        return {"bits": 8, "mode": mode, "group_size": module.group_size}
    if isinstance(module, Int4Linear):
        return {"bits": 4, "mode": "weight_only", "group_size": module.group_size}
    return None


def quantized_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The quantized layers (:class:`Int8Linear`, :class:`Int4Linear`) of ``model`` by path."""
    return {path: module for path, module in _leaves(model).items() if _spec(module) is not None}


def _quantized(linear: nn.Linear, spec: dict) -> nn.Module:
    if spec["bits"] == 4:
        return Int4Linear.from_linear(linear, spec["group_size"])
    activations = "int8" if spec["mode"] == "w8a8" else "float"
    return Int8Linear.from_linear(linear, activations, spec["group_size"] or 64)


def _leaves(model: nn.Module) -> Dict[str, nn.Module]:
    return dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))


def _replace(model: nn.Module, replacements: Dict[str, nn.Module]) -> None:
    def swap(path, module):
        return replacements.get(path, module)

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))


def quantize_model(
    model: nn.Module,
    *,
    bits: int = 8,
    group_size: int = 64,
    mode: Optional[str] = None,
    predicate: Optional[Callable[[str, nn.Module], bool]] = None,
) -> Dict[str, dict]:
    """Swap the model's ``nn.Linear`` layers for quantized ones, in place.

    Args:
        model (nn.Module): the float model.
        bits (int): 8 or 4. Default: ``8``.
        group_size (int): weights per scale of the weight-only (affine) format: 32, 64 or 128.
            Layers whose input features are not a multiple of it stay float. Default: ``64``.
        mode (str, optional): ``"w8a8"`` (8-bit weights and per-token 8-bit activations,
            :class:`Int8Linear`) or ``"weight_only"`` (:class:`Int8Linear` with float activations, or
            :class:`Int4Linear`). Default: ``"w8a8"`` for 8 bits, ``"weight_only"`` for 4.
        predicate (callable, optional): ``predicate(path, linear) -> bool``; only layers for which it
            is true are quantized (e.g. ``lambda path, _: "lm_head" not in path``).

    Returns:
        ``{path: {"bits", "mode", "group_size"}}`` of the layers quantized.
    """
    mode = mode or ("w8a8" if bits == 8 else "weight_only")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8; got {bits!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if bits == 4 and mode == "w8a8":
        raise ValueError("mode='w8a8' needs bits=8; 4-bit weights are weight_only")
    if group_size not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128; got {group_size!r}")
    spec = {"bits": bits, "mode": mode, "group_size": None if mode == "w8a8" else group_size}
    specs = {
        path: spec
        for path, module in _leaves(model).items()
        if isinstance(module, nn.Linear)
        and (mode == "w8a8" or module.weight.shape[1] % group_size == 0)
        and (predicate is None or predicate(path, module))
    }
    leaves = _leaves(model)
    _replace(model, {p: _quantized(leaves[p], s) for p, s in specs.items()})
    return specs


def save_quantized(path: str, model: nn.Module) -> None:
    """Write every parameter of ``model`` to the safetensors file ``path``, the quantized layers in
    its metadata (``"layers"``: JSON ``{path: {"bits", "mode", "group_size"}}``; ``"bits"``,
    ``"group_size"``, ``"mode"``: the values the layers use, comma-separated when they differ)."""
    specs = {path: _spec(module) for path, module in quantized_layers(model).items()}

    def summary(key):
        return ",".join(sorted({str(s[key]) for s in specs.values()}))

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": json.dumps(specs, sort_keys=True),
                "bits": summary("bits"), "group_size": summary("group_size"), "mode": summary("mode")}
    mx.save_safetensors(path, dict(tree_flatten(model.parameters())), metadata=metadata)


def _mismatch(path: str, expected: Dict[str, mx.array], found: Dict[str, mx.array], bad_layers) -> Optional[str]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k}: file {tuple(found[k].shape)}, model {tuple(expected[k].shape)}"
                    for k in set(expected) & set(found) if found[k].shape != expected[k].shape)
    parts = [f"{name} ({len(keys)}): {', '.join(keys)}" for name, keys in (
        ("quantized layers that are not nn.Linear in this model", bad_layers),
        ("keys missing from the file", missing),
        ("keys in the file but not in the model", unexpected),
        ("shape mismatches", shapes)) if keys]
    return f"{path} was saved from another architecture; " + "; ".join(parts) if parts else None


def load_quantized(path: str, model: nn.Module) -> nn.Module:
    """Quantize ``model`` as the file ``path`` records and load its weights (bit-exact).

    Args:
        path (str): a file written by :func:`save_quantized`.
        model (nn.Module): the float model built from its config (its weights are replaced).

    Returns:
        ``model``, quantized and loaded in place.

    Raises:
        ValueError: the file is not a quantized checkpoint, or does not fit the model; the message
            lists the mismatched layers and keys, and the model is left as it was.
    """
    arrays, metadata = mx.load(path, return_metadata=True)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mlx_primitives quantized checkpoint (metadata format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    specs = json.loads(metadata["layers"])
    leaves = _leaves(model)
    bad_layers = sorted(p for p in specs if not isinstance(leaves.get(p), nn.Linear))
    replacements = {p: _quantized(leaves[p], s) for p, s in specs.items() if p not in bad_layers}
    expected = {k: v for k, v in tree_flatten(model.parameters())
                if not any(k.startswith(p + ".") for p in replacements)}
    for prefix, module in replacements.items():
        expected.update((f"{prefix}.{k}", v) for k, v in tree_flatten(module.parameters()))
    error = _mismatch(path, expected, arrays, bad_layers)
    if error:
        raise ValueError(error)
    _replace(model, replacements)
    model.load_weights(list(arrays.items()), strict=True)
    mx.eval(model.parameters())
    return model
