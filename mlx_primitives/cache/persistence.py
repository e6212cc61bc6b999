"""Saving and loading caches: safetensors arrays plus JSON metadata, exact round trip.

The metadata (one JSON string under the key ``mlx_primitives.cache``) names each cache's class,
its ``meta_state`` and, for people reading the file, its layout, dtype, lengths, page size and
quantization; it also lists every array's shape and dtype, so a file whose arrays do not match
(truncated, edited, or written by something else) is refused with an error saying what differs.
"""

from __future__ import annotations

import json
from typing import Dict, List, Sequence, Union

import mlx.core as mx

from .kv_cache import KVCache
from .paged_cache import PagedKVCache
from .quantized import QuantizedKVCache
from .rotating import RotatingKVCache

FORMAT = "mlx_primitives.cache/1"
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


def save_cache(path: str, cache: Union[AnyCache, Sequence[AnyCache]]) -> None:
    """Write one cache, or a list of them (one per layer), to the safetensors file ``path``."""
    caches = list(cache) if isinstance(cache, (list, tuple)) else [cache]
    arrays: Dict[str, mx.array] = {}
    entries: List[Dict[str, object]] = []
    for i, one in enumerate(caches):
        name = type(one).__name__
        if CLASSES.get(name) is not type(one):
            raise TypeError(f"save_cache takes {', '.join(CLASSES)} or a list of them; got {name}")
        structure = []
        for j, item in enumerate(one.state):
            parts = item if isinstance(item, (tuple, list)) else (item,)
            structure.append(len(parts) if isinstance(item, (tuple, list)) else 0)
            for t, array in enumerate(parts):
                arrays[f"{i}.{j}.{t}"] = array
        entries.append({"class": name, "meta_state": list(one.meta_state) if one.meta_state else [],
                        "structure": structure, **_describe(one)})
    shapes = {key: [list(a.shape), _dtype_name(a.dtype)] for key, a in arrays.items()}
    metadata = {"format": FORMAT, "caches": entries, "arrays": shapes, "list": isinstance(cache, (list, tuple))}
    mx.save_safetensors(path, arrays, {METADATA_KEY: json.dumps(metadata)})


def load_cache(path: str) -> Union[AnyCache, List[AnyCache]]:
    """Read what :func:`save_cache` wrote: the cache, or the list of caches.

    Raises:
        ValueError: the file is not a complete cache file (truncated, not safetensors, no or foreign
            metadata, arrays missing or of another shape or dtype than the metadata says).
    """
    try:
        arrays, metadata = mx.load(path, return_metadata=True)
    except Exception as error:  # MLX raises RuntimeError/ValueError with its own wording
        raise ValueError(f"{path} is not a readable safetensors cache file (truncated or corrupt?): {error}") from None
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path} has no {METADATA_KEY!r} metadata: not written by save_cache") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has cache format {meta.get('format')!r}; this version reads {FORMAT!r}")
    for key, (shape, dtype) in meta["arrays"].items():
        if key not in arrays:
            raise ValueError(f"{path} lacks array {key!r} that its metadata lists")
        got = arrays[key]
        if list(got.shape) != shape or _dtype_name(got.dtype) != dtype:
            raise ValueError(f"{path}: array {key!r} is {tuple(got.shape)} {_dtype_name(got.dtype)}; the metadata "
                             f"says {tuple(shape)} {dtype}")
    extra = set(arrays) - set(meta["arrays"])
    if extra:
        raise ValueError(f"{path} holds arrays the metadata does not list: {sorted(extra)}")
    caches = []
    for i, entry in enumerate(meta["caches"]):
        if entry["class"] not in CLASSES:
            raise ValueError(f"{path}: cache {i} has unknown class {entry['class']!r}")
        state = []
        for j, parts in enumerate(entry["structure"]):
            items = [arrays[f"{i}.{j}.{t}"] for t in range(max(parts, 1))]
            state.append(tuple(items) if parts else items[0])
        caches.append(CLASSES[entry["class"]].from_state(state, entry["meta_state"]))
    return caches if meta["list"] else caches[0]
