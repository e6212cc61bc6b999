"""Quantize a whole model, and save / load quantized models as safetensors.

``quantize_model`` swaps every ``nn.Linear`` (those of :class:`~.layers.SwiGLU` /
:class:`~.layers.GeGLU` and of :class:`~mlx_primitives.Attention` included) for
:class:`~.quantized_linear.W8A8Linear`, :class:`~.quantized_linear.Int8Linear` or
:class:`~.quantized_linear.Int4Linear`, and, as ``nn.quantize`` does, every other layer with a
``to_quantized`` method (``nn.Embedding``, a mixture of experts' ``ExpertLinear``) for its MLX
affine version. ``save_quantized`` writes every parameter as it is (so a reload is bit-exact) and,
in the file's metadata, which layers are quantized and how, the model's class and the class of each
of its other modules. ``load_quantized`` takes the float model built from its config, checks it
against the file (classes, tensor names and shapes, computed from the metadata without quantizing
anything), then quantizes the layers the metadata names the same way and loads the tensors.
Layers quantized by ``nn.quantize`` (MLX's ``QuantizedLinear``, ``QuantizedEmbedding``, ...) are
recorded and rebuilt too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from ..validation import check_choice, check_int
from .quantized_linear import Int4Linear, Int8Linear, W8A8Linear, check_group_size, is_affine_quantized

FORMAT = "mlx_primitives.quantized"
FORMAT_VERSION = "2"
MODES = ("w8a8", "weight_only")
SUFFIX = ".safetensors"
_AFFINE_LINEARS = {"Int8Linear": Int8Linear, "Int4Linear": Int4Linear}
_LINEAR_KINDS = ("W8A8Linear", *_AFFINE_LINEARS)  # built from an nn.Linear by this module's classes
Predicate = Callable[[str, nn.Module], Union[bool, dict]]


def _spec(module: nn.Module) -> Optional[dict]:
    """How a quantized layer was made, ``{"kind", "bits", "mode", "group_size"}`` (and ``"format"``,
    MLX's quantization mode, for weight-only layers); ``None`` for a float module."""
    if isinstance(module, W8A8Linear):
        return {"kind": "W8A8Linear", "bits": 8, "mode": "w8a8", "group_size": None}
    if is_affine_quantized(module):
        return {"kind": type(module).__name__, "bits": module.bits, "mode": "weight_only",
                "group_size": module.group_size, "format": module.mode}
    return None


def quantized_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The quantized layers of ``model`` by path (ours, and MLX's ``QuantizedLinear`` family)."""
    return {path: module for path, module in _leaves(model).items() if _spec(module) is not None}


def _build(module: nn.Module, spec: dict) -> nn.Module:
    """The quantized layer ``spec`` describes, made from the float ``module`` (lazily: nothing is evaluated)."""
    kind = spec.get("kind")
    if kind == "W8A8Linear":
        return W8A8Linear.from_linear(module)
    if kind in _AFFINE_LINEARS:
        return _AFFINE_LINEARS[kind].from_linear(module, spec["group_size"])
    return module.to_quantized(group_size=spec["group_size"], bits=spec["bits"], mode=spec.get("format", "affine"))


def _leaves(model: nn.Module) -> Dict[str, nn.Module]:
    return dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))


def _replace(model: nn.Module, replacements: Dict[str, nn.Module]) -> None:
    def swap(path, module):
        return replacements.get(path, module)

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))


def _settings(bits, group_size, mode) -> dict:
    """Checked ``{"bits", "group_size", "mode"}`` of :func:`quantize_model` (``mode`` defaulted by ``bits``)."""
    if check_int("bits", bits) not in (4, 8):
        raise ValueError(f"bits must be 4 or 8; got {bits!r}")
    mode = check_choice("mode", mode or ("w8a8" if bits == 8 else "weight_only"), MODES)
    if bits == 4 and mode == "w8a8":
        raise ValueError("mode='w8a8' needs bits=8; 4-bit weights are weight_only")
    check_group_size(group_size)
    return {"bits": bits, "group_size": group_size, "mode": mode}


def _choice(predicate: Optional[Predicate], path: str, module: nn.Module, requested: dict,
            defaults: dict) -> Optional[dict]:
    """The checked settings for one layer (``None``: it stays float): ``defaults`` (the checked arguments of
    :func:`quantize_model`, ``requested`` as given) with what ``predicate`` returns for the layer applied."""
    choice = True if predicate is None else predicate(path, module)
    if isinstance(choice, dict):
        unknown = sorted(set(choice) - set(requested))
        if unknown:
            raise ValueError(f"predicate returned unknown settings {unknown} for {path!r}; "
                             f"it may set {sorted(requested)}")
        return _settings(**{**requested, **choice})
    if not isinstance(choice, (bool, np.bool_)):
        raise TypeError(f"predicate must return a bool or a dict of settings; got {type(choice).__name__} "
                        f"for {path!r}")
    return defaults if choice else None


def _kind(module: nn.Module, settings: dict) -> Optional[str]:
    """The layer class ``quantize_model`` makes of ``module`` (``None``: its own ``to_quantized``)."""
    if not isinstance(module, nn.Linear):
        return None
    return "W8A8Linear" if settings["mode"] == "w8a8" else f"Int{settings['bits']}Linear"


def quantize_model(
    model: nn.Module,
    *,
    bits: int = 8,
    group_size: int = 64,
    mode: Optional[str] = None,
    predicate: Optional[Predicate] = None,
) -> Dict[str, dict]:
    """Swap the model's quantizable layers for quantized ones, in place.

    Every ``nn.Linear`` becomes a :class:`W8A8Linear` (``mode="w8a8"``), :class:`Int8Linear` or
    :class:`Int4Linear`; every other layer with a ``to_quantized`` method (``nn.Embedding``, whose
    ``as_linear`` is a tied output head, or a mixture of experts' ``ExpertLinear``) becomes its MLX
    affine version with ``bits`` and ``group_size`` (weight-only: int8 activations are a Linear's).

    Args:
        model (nn.Module): the float model.
        bits (int): 8 or 4. Default: ``8``.
        group_size (int): weights per scale of the affine format: 32, 64 or 128. Layers whose
            input features are not a multiple of it stay float (W8A8 Linears have no groups).
            Default: ``64``.
        mode (str, optional): ``"w8a8"`` (8-bit weights and per-token 8-bit activations) or
            ``"weight_only"``. Default: ``"w8a8"`` for 8 bits, ``"weight_only"`` for 4.
        predicate (callable, optional): ``predicate(path, module)``, asked about each quantizable
            layer, as ``nn.quantize``'s ``class_predicate``: false keeps it float, true quantizes it
            with the arguments above, a dict overrides some of them (``"bits"``, ``"group_size"``,
            ``"mode"``) for that layer, e.g. ``lambda path, _: {"bits": 8} if "mlp" in path else True``.

    Returns:
        ``{path: {"kind", "bits", "mode", "group_size", ...}}`` of the layers quantized.
    """
    requested = {"bits": bits, "group_size": group_size, "mode": mode}
    defaults = _settings(**requested)
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate must be a callable (path, module) -> bool or dict; got {type(predicate).__name__}")
    replacements = {}
    for path, module in _leaves(model).items():
        if not (isinstance(module, nn.Linear) or hasattr(module, "to_quantized")) or "weight" not in module:
            continue
        settings = _choice(predicate, path, module, requested, defaults)
        if settings is None:
            continue
        kind = _kind(module, settings)
        if kind == "W8A8Linear" or module.weight.shape[-1] % settings["group_size"] == 0:
            replacements[path] = _build(module, {**settings, "kind": kind})
    _replace(model, replacements)
    return {path: _spec(layer) for path, layer in replacements.items()}


def _file(path: Union[str, Path]) -> str:
    """``path`` with the ``.safetensors`` suffix ``mx.save_safetensors`` adds when it is missing."""
    path = str(path)
    return path if path.endswith(SUFFIX) else path + SUFFIX


def _module_classes(model: nn.Module, quantized: Dict[str, object]) -> Dict[str, str]:
    """``{path: class name}`` of every module of ``model`` below the root but the quantized layers."""
    return {path: type(module).__name__ for path, module in model.named_modules() if path and path not in quantized}


def save_quantized(path: Union[str, Path], model: nn.Module) -> None:
    """Write every parameter of ``model`` to the safetensors file ``path`` (``.safetensors`` added when
    missing), with metadata: ``"layers"``: JSON ``{path: spec}`` of the quantized layers (see
    :func:`quantize_model`); ``"architecture"``: the model's class; ``"modules"``: JSON ``{path: class}``
    of its other modules; ``"bits"``, ``"group_size"``, ``"mode"``: the values the layers use,
    comma-separated when they differ.

    Raises:
        ValueError: a layer holds quantization scales but is of a kind this format cannot record.
    """
    specs, unknown = {}, []
    for p, module in _leaves(model).items():
        spec = _spec(module)
        if spec is not None:
            specs[p] = spec
        elif "scales" in module:
            unknown.append(p)
    if unknown:
        raise ValueError(f"save_quantized cannot record these quantized layers: {', '.join(sorted(unknown))}")

    def summary(key):
        return ",".join(sorted({str(s[key]) for s in specs.values()}))

    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "layers": json.dumps(specs, sort_keys=True),
                "architecture": type(model).__name__,
                "modules": json.dumps(_module_classes(model, specs), sort_keys=True),
                "bits": summary("bits"), "group_size": summary("group_size"), "mode": summary("mode")}
    mx.save_safetensors(_file(path), dict(tree_flatten(model.parameters())), metadata=metadata)


def _read_metadata(path: str, metadata: Dict[str, str]) -> Tuple[Dict[str, dict], Dict[str, str]]:
    """The file's ``(layer specs, module classes)``, after checking its format and version."""
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mlx_primitives quantized checkpoint (metadata format "
                         f"{metadata.get('format')!r}, expected {FORMAT!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {metadata.get('format_version')!r}; this version of "
                         f"mlx_primitives reads {FORMAT_VERSION!r}")
    missing = [key for key in ("layers", "architecture", "modules") if key not in metadata]
    if missing:
        raise ValueError(f"{path} is a damaged quantized checkpoint: its metadata lacks {', '.join(missing)}")
    return json.loads(metadata["layers"]), json.loads(metadata["modules"])


def _expected_shapes(module: nn.Module, spec: dict) -> Dict[str, Tuple[int, ...]]:
    """The parameter shapes of the layer ``spec`` describes, made from the float ``module``, computed
    without quantizing: ``weight (..., in)`` becomes int8 ``(..., in)`` with ``scales (out,)`` (W8A8) or
    packed ``(..., in * bits / 32)`` with ``scales`` (and affine ``biases``) ``(..., in / group_size)``."""
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}
    *lead, features = shapes["weight"]
    if spec["mode"] == "w8a8":
        return {**shapes, "scales": tuple(lead)}
    groups = (*lead, features // spec["group_size"])
    shapes.update(weight=(*lead, features * spec["bits"] // 32), scales=groups)
    if spec.get("format", "affine") == "affine":
        shapes["biases"] = groups
    return shapes


def _buildable(module: Optional[nn.Module], spec: dict) -> bool:
    if spec.get("kind") in _LINEAR_KINDS:
        return isinstance(module, nn.Linear)
    return module is not None and hasattr(module, "to_quantized") and "weight" in module


def _mismatch(path: str, model: nn.Module, metadata: Dict[str, str], specs: Dict[str, dict],
              classes: Dict[str, str], found: Dict[str, mx.array]) -> Optional[str]:
    """What keeps the file ``path`` from loading into ``model``, listed; ``None`` when it fits."""
    leaves = _leaves(model)
    bad_layers = sorted(p for p, s in specs.items() if not _buildable(leaves.get(p), s))
    ungrouped = sorted(p for p, s in specs.items() if p not in bad_layers and s["mode"] != "w8a8"
                       and leaves[p].weight.shape[-1] % s["group_size"])
    ours = _module_classes(model, specs)
    other_classes = sorted(f"{p}: file {classes.get(p, '-')}, model {ours.get(p, '-')}"
                           for p in set(classes) | set(ours) if classes.get(p) != ours.get(p))
    if metadata["architecture"] != type(model).__name__:
        other_classes.insert(0, f"(model): file {metadata['architecture']}, model {type(model).__name__}")
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())
                if not any(k.startswith(p + ".") for p in specs)}
    for prefix, spec in specs.items():
        if prefix not in bad_layers:
            expected.update((f"{prefix}.{k}", v) for k, v in _expected_shapes(leaves[prefix], spec).items())
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(f"{k}: file {tuple(found[k].shape)}, model {expected[k]}"
                    for k in set(expected) & set(found) if tuple(found[k].shape) != expected[k])
    parts = [f"{name} ({len(keys)}): {', '.join(keys)}" for name, keys in (
        ("module classes that differ", other_classes),
        ("quantized layers this model cannot make there", bad_layers),
        ("layers whose input features are not a multiple of the file's group_size", ungrouped),
        ("keys missing from the file", missing),
        ("keys in the file but not in the model", unexpected),
        ("shape mismatches", shapes)) if keys]
    return f"{path} was saved from another architecture; " + "; ".join(parts) if parts else None


def load_quantized(path: Union[str, Path], model: nn.Module) -> nn.Module:
    """Quantize ``model`` as the file ``path`` records and load its weights (bit-exact).

    Args:
        path (str): a file written by :func:`save_quantized` (``.safetensors`` added when missing).
        model (nn.Module): the float model built from its config (its weights are replaced).

    Returns:
        ``model``, quantized and loaded in place.

    Raises:
        ValueError: the file is not a quantized checkpoint of this format version, or does not fit
            the model; the message lists the mismatched classes, layers and keys, and the model is
            left as it was.
    """
    path = _file(path)
    arrays, metadata = mx.load(path, return_metadata=True)
    specs, classes = _read_metadata(path, metadata)
    error = _mismatch(path, model, metadata, specs, classes, arrays)
    if error:
        raise ValueError(error)
    leaves = _leaves(model)
    replacements = {p: _build(leaves[p], s) for p, s in specs.items()}
    wrong = sorted(f"{p}: file {s['kind']}, model {type(replacements[p]).__name__}"
                   for p, s in specs.items() if type(replacements[p]).__name__ != s["kind"])
    if wrong:
        raise ValueError(f"{path} was saved from another architecture; quantized layer classes that differ "
                         f"({len(wrong)}): {', '.join(wrong)}")
    _replace(model, replacements)
    model.load_weights(list(arrays.items()), strict=True)
    mx.eval(model.parameters())
    return model
