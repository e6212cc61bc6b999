"""Saving and loading caches: safetensors arrays plus JSON metadata, exact round trip.

The metadata (one JSON string under the key ``mlx_primitives.cache``) names each cache's class,
how its ``state`` is laid out over the arrays (with its scalars: offsets, sizes, the page layout)
and, for people reading the file, its layout, dtype, lengths, page size and quantization; it also
lists every array's shape and dtype, so a file whose arrays do not match (truncated, edited, or
written by something else) is refused with an error saying what differs, and each cache's
``from_state`` refuses scalars that do not fit its arrays.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence, Union

import mlx.core as mx

from .kv_cache import KVCache
from .paged_cache import PagedKVCache
from .quantized import QuantizedKVCache
from .rotating import RotatingKVCache

FORMAT = "mlx_primitives.cache/2"
READS = (FORMAT, "mlx_primitives.cache/1")  # format 1 kept scalars in a separate ``meta_state``
METADATA_KEY = "mlx_primitives.cache"
CLASSES = {c.__name__: c for c in (KVCache, RotatingKVCache, QuantizedKVCache, PagedKVCache)}

AnyCache = Union[KVCache, RotatingKVCache, QuantizedKVCache, PagedKVCache]


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def _describe(cache: AnyCache) -> Dict[str, object]:
    """What a reader of the file wants to know about ``cache`` (not needed to rebuild it)."""
    if isinstance(cache, PagedKVCache):
        pool = cache.k_pools[0]
        return {"layout": "(num_pages, page_size, num_kv_heads, head_dim)", "dtype": _dtype_name(pool.dtype),
                "page_size": cache.page_size, "lengths": {str(s): cache.length(s) for s in cache.sequences}}
    info: Dict[str, object] = {"layout": "(batch, num_kv_heads, seq, head_dim)", "offset": cache.offset}
    if isinstance(cache, QuantizedKVCache):
        info["quantization"] = {"group_size": cache.group_size, "bits": cache.bits}
        if cache.keys is not None:
            info["dtype"] = _dtype_name(cache.keys[1].dtype)
    elif cache.keys is not None:
        info["dtype"] = _dtype_name(cache.keys.dtype)
    return info


def _file(path) -> str:
    """``path`` with the ``.safetensors`` suffix ``mx.save_safetensors`` adds when it is missing."""
    path = str(path)
    return path if path.endswith(".safetensors") else path + ".safetensors"


def _store(item, key: str, arrays: Dict[str, mx.array]):
    """The structure entry of one ``state`` item, its arrays put in ``arrays`` under ``key.t``."""
    if isinstance(item, mx.array):
        arrays[f"{key}.0"] = item
        return 0
    if isinstance(item, (tuple, list)) and item and all(isinstance(x, mx.array) for x in item):
        arrays.update((f"{key}.{t}", x) for t, x in enumerate(item))
        return len(item)
    return {"value": item}  # offsets, sizes, layout strings; None for an empty cache's arrays


def save_cache(path: str, cache: Union[AnyCache, Sequence[AnyCache]]) -> None:
    """Write one cache, or a list of them (one per layer), to the safetensors file ``path`` (the
    ``.safetensors`` suffix is added when missing, as :func:`load_cache` expects)."""
    caches = list(cache) if isinstance(cache, (list, tuple)) else [cache]
    arrays: Dict[str, mx.array] = {}
    entries: List[Dict[str, object]] = []
    for i, one in enumerate(caches):
        name = type(one).__name__
        if CLASSES.get(name) is not type(one):
            raise TypeError(f"save_cache takes {', '.join(CLASSES)} or a list of them; got {name}")
        structure = [_store(item, f"{i}.{j}", arrays) for j, item in enumerate(one.state)]
        entries.append({"class": name, "structure": structure, **_describe(one)})
    shapes = {key: [list(a.shape), _dtype_name(a.dtype)] for key, a in arrays.items()}
    metadata = {"format": FORMAT, "caches": entries, "arrays": shapes, "list": isinstance(cache, (list, tuple))}
    mx.save_safetensors(_file(path), arrays, {METADATA_KEY: json.dumps(metadata)})


def _legacy_state(name: str, state: list, meta_state: list) -> tuple:
    """The ``state`` of a cache in a format-1 file, which kept the scalars apart in ``meta_state``."""
    if name == "PagedKVCache":
        return tuple(state[0::2]), tuple(state[1::2]), meta_state[0]
    arrays = tuple(state) if state else (None, None)
    if name == "KVCache":
        return (*arrays, arrays[0].shape[2] if state else 0)
    if name == "RotatingKVCache":
        keep, max_size, offset, idx = map(int, meta_state)
        return (*arrays, offset, keep, max_size, idx)
    return (*arrays, *map(int, meta_state))  # QuantizedKVCache: offset, group_size, bits


def _read_state(entry: dict, i: int, arrays: Dict[str, mx.array]) -> tuple:
    """Cache ``i``'s ``state`` from its metadata ``entry`` and the file's arrays."""
    state = []
    for j, parts in enumerate(entry["structure"]):
        if isinstance(parts, dict):
            state.append(parts["value"])
        else:
            items = tuple(arrays[f"{i}.{j}.{t}"] for t in range(max(parts, 1)))
            state.append(items if parts else items[0])
    return _legacy_state(entry["class"], state, entry["meta_state"]) if "meta_state" in entry else tuple(state)


def load_cache(path: str) -> Union[AnyCache, List[AnyCache]]:
    """Read what :func:`save_cache` wrote: the cache, or the list of caches.

    Raises:
        FileNotFoundError: no file at ``path`` (with the ``.safetensors`` suffix added when missing).
        ValueError: the file is not a complete cache file (truncated, not safetensors, no or foreign
            metadata, arrays missing or of another shape or dtype than the metadata says, scalars that
            do not fit the arrays: offsets past the keys, another quantization, page lists that do not
            match the lengths).
    """
    path = _file(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        arrays, metadata = mx.load(path, return_metadata=True)
    except Exception as error:  # MLX raises RuntimeError/ValueError with its own wording
        raise ValueError(f"{path} is not a readable safetensors cache file (truncated or corrupt?): {error}") from None
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: not written by save_cache") from None
    if meta.get("format") not in READS:
        raise ValueError(f"{path} has cache format {meta.get('format')!r}; this version reads {READS}")
    try:
        _check_arrays(path, meta["arrays"], arrays)
        entries = [(entry["class"], _read_state(entry, i, arrays)) for i, entry in enumerate(meta["caches"])]
        listed = meta["list"]
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(f"{path}: malformed {METADATA_KEY!r} metadata: {error!r}") from None
    caches = []
    for i, (name, state) in enumerate(entries):
        if name not in CLASSES:
            raise ValueError(f"{path}: cache {i} has unknown class {name!r}")
        try:
            caches.append(CLASSES[name].from_state(state))
        except ValueError as error:
            raise ValueError(f"{path}: cache {i}: {error}") from None
    return caches if listed else caches[0]


def _check_arrays(path: str, shapes: Dict[str, list], arrays: Dict[str, mx.array]) -> None:
    """Every array the metadata lists is in the file with its shape and dtype, and no other."""
    for key, (shape, dtype) in shapes.items():
        if key not in arrays:
            raise ValueError(f"{path} lacks array {key!r} that its metadata lists")
        got = arrays[key]
        if list(got.shape) != shape or _dtype_name(got.dtype) != dtype:
            raise ValueError(f"{path}: array {key!r} is {tuple(got.shape)} {_dtype_name(got.dtype)}; the metadata "
                             f"says {tuple(shape)} {dtype}")
    extra = set(arrays) - set(shapes)
    if extra:
        raise ValueError(f"{path} holds arrays the metadata does not list: {sorted(extra)}")
