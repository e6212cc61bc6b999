"""Decode attention: a few new query rows per sequence against a long, contiguous or paged KV cache.

:func:`decode_attention` runs split-KV ("flash-decoding") on the GPU: ``src/decode.kern`` cuts each
sequence's visible keys into chunks, one threadgroup per (batch, kv head, chunk) reducing all the
query rows of the kv head's GQA group to a partial output and its log-sum-exp, and
``src/decode_combine.kern`` merges the chunks, or on CUDA the last chunk of a row block to finish
merges them in the same launch (launch plans: :mod:`.decode_launch`). Paged caches are
read through the block table in place (no gather). :func:`reference_decode` (gather, then the
reference path) computes the same on every backend and is the fallback.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import mlx.core as mx

from ..attention.reference import reference_attention
from ..attention.spec import AttentionSpec, describe_attention, to_bhsd
from ..hardware import device_profile
from ..memo import CallMemo
from ..validation import check_array, check_same_dtype
from . import catalog
from .decode_launch import (DTYPES, HEAD_DIMS, KERNEL_BITS, combine_plan, counters_plan, fuses, geometry,
                            no_affine, no_block_table, no_counters, num_splits, placeholder, plan)
from .decode_launch import compile_examples  # noqa: F401 -- the Metal compile check asks this module
from .launcher import BoundLaunch, with_reference_vjp
from .quantization import MLX_BITS, MLX_GROUP_SIZES
from .tuning import config_for

MAX_Q_LEN = 16  # past this, the prefill kernel's tiles use the matrix unit better
PATHS = ("auto", "kernel", "reference")

Output = Union[mx.array, Tuple[mx.array, mx.array]]
Cache = Union[mx.array, Tuple[mx.array, mx.array, mx.array]]


def reference_decode(
    q: mx.array,
    k_cache: mx.array,
    v_cache: mx.array,
    cache_seqlens: mx.array,
    block_table: Optional[mx.array],
    spec: AttentionSpec,
) -> List[mx.array]:
    """Decode attention in MLX ops: gather each sequence's keys, then the reference path.

    Arguments as :func:`decode_attention`; ``spec`` carries scale, window, softcap, ALiBi and sinks.
    Reads the lengths and the table on the host, so it also checks their values.

    Returns:
        ``[out, lse]``: ``out`` ``(batch, seqlen_q, num_heads, head_dim)``, ``lse`` float32
        ``(batch, num_heads, seqlen_q)``.
    """
    lengths = cache_seqlens.tolist()
    table = None if block_table is None else block_table.tolist()
    page_size = k_cache.shape[1]
    capacity = page_size * (1 if table is None else len(table[0]))
    outs, lses = [], []
    for b, length in enumerate(lengths):
        if not 0 <= length <= capacity:
            raise ValueError(f"cache_seqlens[{b}] = {length} is outside [0, {capacity}], the cache's capacity")
        if table is None:
            k, v = k_cache[b : b + 1, :length], v_cache[b : b + 1, :length]
        else:
            pages = table[b][: -(-length // page_size)]
            bad = [p for p in pages if not 0 <= p < k_cache.shape[0]]
            if bad:
                raise ValueError(
                    f"block_table[{b}] holds page {bad[0]} within the first {length} keys; the pool has "
                    f"pages 0..{k_cache.shape[0] - 1}"
                )
            index = mx.array(pages or [0], dtype=mx.int32)
            k, v = (x[index].reshape(1, -1, *x.shape[2:])[:, :length] for x in (k_cache, v_cache))
        slopes = spec.alibi_slopes
        if slopes is not None and slopes.ndim == 2:
            slopes = slopes[b : b + 1]
        one = describe_attention(
            q[b : b + 1], k, v, layout="BSHD", scale=spec.scale, window_size=spec.window, softcap=spec.softcap,
            alibi_slopes=slopes, sinks=spec.sinks,
        )
        out, lse = reference_attention(to_bhsd(q[b : b + 1], "BSHD"), to_bhsd(k, "BSHD"), to_bhsd(v, "BSHD"), one)
        outs.append(out)
        lses.append(lse)
    return [to_bhsd(mx.concatenate(outs), "BSHD"), mx.concatenate(lses)]


def unsupported(spec: AttentionSpec, page_size: Optional[int] = None) -> Optional[str]:
    """Why the kernel cannot compute ``spec`` (with pages of ``page_size`` keys), or None when it can."""
    if page_size is not None and page_size & (page_size - 1):
        return f"page_size {page_size} is not a power of two"
    if spec.dtype not in DTYPES:
        return f"dtype {spec.dtype} is not float16, bfloat16 or float32"
    if spec.head_dim not in HEAD_DIMS:
        return f"head_dim {spec.head_dim} is not one of {HEAD_DIMS}"
    if not 1 <= spec.q_len <= MAX_Q_LEN:
        return f"seqlen_q {spec.q_len} is not in [1, {MAX_Q_LEN}]"
    return None


def quantized_cache(name: str, cache, quantization, head_dim: int) -> Tuple[mx.array, mx.array, mx.array]:
    """A ``(packed, scales, biases)`` cache, checked against ``quantization = (group_size, bits)``
    and the queries' ``head_dim``."""
    if (not isinstance(quantization, (tuple, list)) or len(quantization) != 2
            or quantization[0] not in MLX_GROUP_SIZES or quantization[1] not in MLX_BITS):
        raise ValueError(
            f"quantization must be (group_size in {MLX_GROUP_SIZES}, bits in {MLX_BITS}) when k_cache/v_cache "
            f"are (packed, scales, biases) tuples; got {quantization!r}"
        )
    group_size, bits = quantization
    if not isinstance(cache, (tuple, list)) or len(cache) != 3:
        raise ValueError(f"{name} must be a (packed, scales, biases) tuple from mx.quantize with quantization set")
    packed, scales, biases = cache
    words = head_dim * bits // 32
    check_array(f"{name}[0]", packed, f"(..., num_kv_heads, head_dim * bits / 32 = {words}) uint32", ndim=4,
                dtypes=(mx.uint32,))
    if head_dim % group_size or packed.shape[3] * 32 != head_dim * bits:
        raise ValueError(
            f"{name}[0] must hold head_dim={head_dim} values of {bits} bits in groups of {group_size} per row "
            f"({words} uint32); got shape {tuple(packed.shape)}"
        )
    groups_shape = tuple(packed.shape[:3]) + (head_dim // group_size,)
    check_array(f"{name}[1]", scales, f"{groups_shape} (scales)", shape=groups_shape)
    check_array(f"{name}[2]", biases, f"{groups_shape} (biases)", shape=groups_shape)
    return packed, scales, biases


def _dequantized(cache: mx.array, scales: mx.array, biases: mx.array, quantization: Tuple[int, int]) -> mx.array:
    return mx.dequantize(cache, scales, biases, group_size=quantization[0], bits=quantization[1])


def _values_view(packed: mx.array, scales: mx.array, head_dim: int) -> mx.array:
    """A lazy ``(..., head_dim)`` stand-in for a quantized cache (never evaluated): what validation
    and the attention spec read of it are its shape and its values' dtype."""
    return mx.broadcast_to(scales[..., :1], tuple(packed.shape[:3]) + (head_dim,))


def _describe(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size, softcap,
              alibi_slopes, sinks) -> AttentionSpec:
    """Check the cache arguments, then describe the call through the one validation path."""
    check_array("q", q, "(batch, seqlen_q, num_heads, head_dim)", ndim=4)
    batch, _, num_heads, head_dim = q.shape
    paged = block_table is not None
    cache_shape = "(num_pages, page_size, num_kv_heads, head_dim)" if paged else \
        "(batch, seqlen_cache, num_kv_heads, head_dim)"
    check_array("k_cache", k_cache, cache_shape, ndim=4)
    check_array("v_cache", v_cache, f"k_cache's shape {tuple(k_cache.shape)}", shape=k_cache.shape)
    check_same_dtype(("q", "k_cache", "v_cache"), (q, k_cache, v_cache))
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_heads % num_kv_heads or (not paged and k_cache.shape[0] != batch):
        lead = "num_pages, page_size" if paged else f"batch={batch}, seqlen_cache"
        raise ValueError(
            f"k_cache must have shape ({lead}, num_kv_heads dividing num_heads={num_heads}, head_dim={head_dim}); "
            f"got {tuple(k_cache.shape)}"
        )
    check_array("cache_seqlens", cache_seqlens, f"({batch},)", shape=(batch,), dtypes=(mx.int32,))
    if paged:
        check_array("block_table", block_table, f"({batch}, max_pages)", ndim=2, dtypes=(mx.int32,))
        if block_table.shape[0] != batch or block_table.shape[1] == 0:
            raise ValueError(f"block_table must have shape ({batch}, max_pages >= 1); got {tuple(block_table.shape)}")
    # The spec describes q against one sequence's worth of cache; lengths are per sequence.
    k_view = k_cache if not paged else mx.broadcast_to(k_cache[:1, :1], (batch, 1) + k_cache.shape[2:])
    return describe_attention(
        q, k_view, k_view, layout="BSHD", scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
    )


def _kernel_config(spec: AttentionSpec, capacity: int, config: Optional[dict]) -> dict:
    problem = {"B": spec.batch, "L": capacity, "D": spec.head_dim, "R": spec.groups * spec.q_len}
    chosen = {**config_for(catalog.DECODE, spec.dtype, problem, exact=("D", "R")), **(config or {})}
    if chosen["THREADS"] % 32 or not 32 <= chosen["THREADS"] <= 1024 or chosen["SPLIT"] < 1 \
            or chosen["CHUNKS"] not in (1, 2):
        raise ValueError(f"config needs THREADS a multiple of 32 in [32, 1024], SPLIT >= 1 and CHUNKS 1 or 2; "
                         f"got {chosen}")
    return chosen


# A decode step of a model repeats one call shape per layer: the validated spec, the launch
# geometry and the differentiable kernel function are kept per array-free call signature.
_CALLS = CallMemo(256)


def _call_key(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size, softcap,
              alibi_slopes, sinks, path, config, quantization, affine) -> Optional[tuple]:
    """What a call's meaning depends on besides array values (the backend included), or None where it
    holds option arrays."""
    if alibi_slopes is not None or sinks is not None:
        return None
    try:
        # One flat tuple (no generator): a decode step builds this key every layer.
        quantized = tuple((type(a), a.shape, a.dtype) for a in affine) if affine else ()
        table = None if block_table is None else (type(block_table), block_table.shape, block_table.dtype)
        options = tuple(sorted(config.items())) if config else config
        key = (type(q), q.shape, q.dtype, type(k_cache), k_cache.shape, k_cache.dtype, type(v_cache), v_cache.shape,
               v_cache.dtype, type(cache_seqlens), cache_seqlens.shape, cache_seqlens.dtype, quantized, table,
               softmax_scale, causal, window_size, softcap, path, options, quantization, device_profile().backend)
        hash(key)
    except (AttributeError, TypeError):  # not arrays or unhashable options: let validation say why
        return None
    return key


def _prepare(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size, softcap,
             alibi_slopes, sinks, path, config, quantization, affine) -> Callable:
    """Validate a call and build ``run(q, k_cache, v_cache, cache_seqlens, table, *affine) -> [out, lse]``.

    ``table`` is the block table, or for a contiguous cache a placeholder the kernel ignores. A
    quantized cache: ``k_cache``/``v_cache`` the packed words, ``affine`` ``(k_scales, k_biases,
    v_scales, v_biases)``, ``quantization`` ``(group_size, bits)`` with bits in ``KERNEL_BITS``.
    """
    if affine:
        k_view, v_view = (_values_view(c, s, q.shape[3]) for c, s in ((k_cache, affine[0]), (v_cache, affine[2])))
    else:
        k_view, v_view = k_cache, v_cache
    spec = _describe(q, k_view, v_view, cache_seqlens, block_table, softmax_scale, causal, window_size, softcap,
                     alibi_slopes, sinks)
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else None
    blocker = "kernels need a GPU backend" if not device_profile().is_gpu else unsupported(spec, page_size)
    if path == "kernel" and blocker:
        raise ValueError(f"path='kernel' cannot run this call: {blocker}")

    def reference(q, k_cache, v_cache, cache_seqlens, table, *affine) -> List[mx.array]:
        if affine:
            k_cache = _dequantized(k_cache, *affine[:2], quantization)
            v_cache = _dequantized(v_cache, *affine[2:], quantization)
        return reference_decode(q, k_cache, v_cache, cache_seqlens, table if paged else None, spec)

    if path == "reference" or blocker:
        return reference

    capacity = k_cache.shape[1] * (block_table.shape[1] if paged else 1)
    chosen = _kernel_config(spec, capacity, config)
    backend = device_profile().backend
    shape = geometry(spec, chosen, backend, quantization[1] if affine else 0)
    splits = num_splits(spec, capacity, chosen["SPLIT"], shape["THREADS"], shape["REGISTERS"])
    slopes = placeholder() if spec.alibi_slopes is None else spec.alibi_slopes.reshape(-1)
    sink_logits = placeholder() if spec.sinks is None else spec.sinks.astype(mx.float32)

    # Launch geometry once; each call only swaps in its arrays.
    split_plan = plan(q, k_cache, v_cache, cache_seqlens, block_table, slopes, spec, splits, chosen, backend,
                      affine or None, quantization)
    split_pass, params, float_cache = BoundLaunch(split_plan), split_plan.inputs[5], no_affine()

    def split_inputs(q, k_cache, v_cache, cache_seqlens, table, affine, counters=None) -> List[mx.array]:
        return [q, k_cache, v_cache, cache_seqlens, table, params, slopes, *(affine or float_cache),
                no_counters() if counters is None else counters]

    fused = fuses(spec, shape, splits, backend)  # one launch: outputs 0, 1 the answer
    count_pass = BoundLaunch(counters_plan(cache_seqlens, spec, shape["BLOCKS"])) if fused and splits > 1 else None
    merge_pass = None if fused else BoundLaunch(combine_plan(placeholder(), placeholder(), sink_logits, spec))

    def forward(q, k_cache, v_cache, cache_seqlens, table, *affine) -> List[mx.array]:
        fell_back = []

        def fallback() -> List[mx.array]:
            fell_back.append(True)
            return reference(q, k_cache, v_cache, cache_seqlens, table, *affine)

        counters = None
        if count_pass is not None:
            zeroed = count_pass([cache_seqlens], fallback)
            if fell_back:  # the counters' launch could not run: zeroed is the reference's answer
                return zeroed
            counters = zeroed[0]
        parts = split_pass(split_inputs(q, k_cache, v_cache, cache_seqlens, table, affine, counters), fallback)
        if fell_back:  # the split pass could not run: parts already is the reference's answer
            return parts
        return parts[:2] if merge_pass is None else merge_pass([parts[2], parts[3], sink_logits], fallback)

    return with_reference_vjp(forward, reference)


def decode_attention(
    q: mx.array,
    k_cache: Cache,
    v_cache: Cache,
    cache_seqlens: mx.array,
    *,
    block_table: Optional[mx.array] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[mx.array] = None,
    sinks: Optional[mx.array] = None,
    return_lse: bool = False,
    path: str = "auto",
    config: Optional[dict] = None,
    quantization: Optional[Tuple[int, int]] = None,
) -> Output:
    """Attention of a few new query rows per sequence over a KV cache (split-KV on the GPU).

    Sequence ``b`` has ``cache_seqlens[b]`` keys; its query row ``i`` sits at key position
    ``cache_seqlens[b] - seqlen_q + i`` (bottom-right alignment per sequence), so with ``causal``
    it sees keys ``j <= cache_seqlens[b] - seqlen_q + i``. Keys at or past the length are never read.

    Args:
        q: ``(batch, seqlen_q, num_heads, head_dim)``, float16, bfloat16 or float32; the kernel
            takes ``seqlen_q <= 16`` and head dims 64, 80, 96, 128, 256.
        k_cache, v_cache: contiguous ``(batch, seqlen_cache, num_kv_heads, head_dim)``, or with
            ``block_table`` a page pool ``(num_pages, page_size, num_kv_heads, head_dim)``;
            ``num_heads`` a multiple of ``num_kv_heads`` (query head h reads kv head h // groups).
        cache_seqlens: int32 ``(batch,)`` keys per sequence, at most the cache's capacity.
        block_table: int32 ``(batch, max_pages)``: key ``j`` of sequence ``b`` is row
            ``j % page_size`` of page ``block_table[b, j // page_size]`` (the kernel takes page sizes
            that are powers of two); slots past the length are
            ignored (-1 is customary). The kernel skips keys whose page id is outside the pool; the
            reference path raises.
        softmax_scale: default ``1 / sqrt(head_dim)``.
        causal: bottom-right causal mask (the right window edge becomes 0).
        window_size: ``(left, right)`` visible keys around the aligned position, -1 unbounded.
        softcap: ``c`` in ``c * tanh(s / c)`` on scaled scores; 0 disables.
        alibi_slopes: float ``(num_heads,)`` or ``(batch, num_heads)``: adds ``-slope * |pos - j|``.
        sinks: float ``(num_heads,)`` logits joining every row's softmax denominator.
        return_lse: also return the log-sum-exp.
        path: ``"auto"`` (kernel on a GPU backend where it supports the call, else reference),
            ``"kernel"`` (ValueError where it can't run) or ``"reference"``.
        config: template values overriding the tuned ones, e.g. ``{"THREADS": 128, "SPLIT": 256}``.
        quantization: ``(group_size, bits)`` when ``k_cache`` and ``v_cache`` are ``mx.quantize``
            outputs ``(packed uint32 (..., head_dim * bits / 32), scales, biases (..., head_dim /
            group_size))`` in the layouts above (mlx-lm's QuantizedKVCache tuples), attended as their
            dequantized values. The kernel reads 2-, 4- and 8-bit caches in place (dequantizing in
            registers); other widths are dequantized with ``mx.dequantize`` first.

    Returns:
        ``out`` ``(batch, seqlen_q, num_heads, head_dim)`` in q's dtype, and with ``return_lse``
        ``(out, lse)``, ``lse`` float32 ``(batch, num_heads, seqlen_q)`` (natural log; ``-inf`` and
        ``out = 0`` for a row that sees no key). Gradients go through the reference path.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    affine: Tuple[mx.array, ...] = ()
    if quantization is not None or isinstance(k_cache, (tuple, list)) or isinstance(v_cache, (tuple, list)):
        head_dim = check_array("q", q, "(batch, seqlen_q, num_heads, head_dim)", ndim=4).shape[3]
        (k_cache, *k_affine), (v_cache, *v_affine) = (quantized_cache(name, cache, quantization, head_dim)
                                                      for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)))
        if quantization[1] in KERNEL_BITS:
            affine, quantization = (*k_affine, *v_affine), tuple(quantization)
        else:  # the kernel reads 2-, 4- and 8-bit words; others are attended as their float values
            k_cache, v_cache = _dequantized(k_cache, *k_affine, quantization), _dequantized(v_cache, *v_affine,
                                                                                            quantization)
            quantization = None
    run = _memoized(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size, softcap,
                    alibi_slopes, sinks, path, config, quantization, affine)
    table = no_block_table() if block_table is None else block_table
    out, lse = run(q, k_cache, v_cache, cache_seqlens, table, *affine)
    return (out, lse) if return_lse else out


def _memoized(*args) -> Callable:
    """The prepared call of ``args`` (:func:`_prepare`'s), from the memo where its key is there."""
    return _CALLS.get(_call_key(*args), lambda: _prepare(*args))


def bind_decode(
    q: mx.array,
    k_cache: mx.array,
    v_cache: mx.array,
    cache_seqlens: mx.array,
    *,
    block_table: Optional[mx.array] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> Callable[[mx.array, mx.array, mx.array], mx.array]:
    """:func:`decode_attention` with the lengths, block table and options of one model step fixed.

    Every layer of a decode step attends with the same lengths and table and arrays of the same
    shapes: the call is validated and prepared once, here (from ``q``, ``k_cache`` and ``v_cache``
    of one layer), and ``call(q, k_cache, v_cache)`` runs it for each layer without doing so again.
    Arrays of other shapes or dtypes than the bound ones go through :func:`decode_attention`.

    Returns:
        ``call(q, k_cache, v_cache) -> out`` ``(batch, seqlen_q, num_heads, head_dim)``.
    """
    run = _memoized(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size, softcap,
                    None, None, "auto", None, None, ())
    table = no_block_table() if block_table is None else block_table
    bound = (q.shape, q.dtype, k_cache.shape, k_cache.dtype, v_cache.shape, v_cache.dtype)

    def call(q: mx.array, k_cache: mx.array, v_cache: mx.array) -> mx.array:
        if (q.shape, q.dtype, k_cache.shape, k_cache.dtype, v_cache.shape, v_cache.dtype) != bound:
            return decode_attention(q, k_cache, v_cache, cache_seqlens, block_table=block_table,
                                    softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                                    softcap=softcap)
        return run(q, k_cache, v_cache, cache_seqlens, table)[0]

    return call


