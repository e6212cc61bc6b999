"""Decode attention: a few new query rows per sequence against a long, contiguous or paged KV cache.

:func:`decode_attention` runs split-KV ("flash-decoding") on the GPU: ``src/decode.kern`` cuts each
sequence's visible keys into chunks, one threadgroup per (batch, kv head, chunk) reducing all the
query rows of the kv head's GQA group to a partial output and its log-sum-exp, and
``src/decode_combine.kern`` merges the chunks. Paged caches are read through the block table in
place (no gather). :func:`reference_decode` (gather, then the reference path) computes the same on
every backend and is the fallback.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple, Union

import mlx.core as mx

from ..attention.reference import reference_attention
from ..attention.spec import AttentionSpec, describe_attention, to_bhsd
from ..hardware import device_profile
from ..validation import check_array, check_same_dtype
from . import catalog
from .launcher import Launch, float_bits, launch, next_pow2, with_reference_vjp
from .tuning import config_for

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
MAX_Q_LEN = 16  # past this, the prefill kernel's tiles use the matrix unit better
MAX_ROWS = 8  # query rows one threadgroup keeps in registers; more take several row blocks
WAVES = 4  # split-KV aims for this many threadgroups per GPU core (SM)
DEFAULT_UNITS = 132  # H100 SMs: MLX's CUDA device_info reports no SM count
COMBINE_WARPS = 4
PATHS = ("auto", "kernel", "reference")

Output = Union[mx.array, Tuple[mx.array, mx.array]]


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


def _row_blocks(spec: AttentionSpec) -> Tuple[int, int]:
    """(row blocks, rows per block) splitting the groups * q_len rows of a kv head evenly."""
    rows = spec.groups * spec.q_len
    blocks = -(-rows // MAX_ROWS)
    return blocks, -(-rows // blocks)


def num_splits(spec: AttentionSpec, capacity: int, split: int) -> int:
    """Chunks per sequence: enough threadgroups to fill the GPU, each of at least ``split`` keys."""
    groups = spec.batch * spec.num_kv_heads * _row_blocks(spec)[0]
    wanted = -(-WAVES * (device_profile().gpu_cores or DEFAULT_UNITS) // groups)
    return max(1, min(wanted, -(-capacity // split)))


@functools.lru_cache(maxsize=256)
def _int32(values: Tuple[int, ...]) -> mx.array:
    """Small int32 arrays of launch parameters, built once per distinct value."""
    return mx.array(values, dtype=mx.int32)


@functools.lru_cache(maxsize=1)
def _no_block_table() -> mx.array:
    """What a contiguous cache passes as ``block_table``: one page (its rows) per sequence."""
    return mx.zeros((1, 1), mx.int32)


def _placeholder() -> mx.array:
    return mx.zeros((1,), mx.float32)


def plan(q, k_cache, v_cache, cache_seqlens, block_table, slopes, spec: AttentionSpec, splits: int,
         config) -> Launch:
    """The split-KV launch of ``decode.kern``; ``block_table`` None for a contiguous cache."""
    vec = 16 // q.dtype.size
    chunks = spec.head_dim // vec
    blocks, rows = _row_blocks(spec)
    # Fewer lanes per key (two 16-byte chunks each) where q and the output slice still fit in
    # registers: less of the per-key work (shuffles, softmax) is repeated across a team's lanes.
    per_lane = 2 if rows <= 4 else 1
    tpk = min(32, next_pow2(-(-chunks // per_lane)))
    ch = -(-chunks // tpk)
    threads = config["THREADS"]
    alibi = 0 if spec.alibi_slopes is None else spec.alibi_slopes.ndim
    template = [
        ("T", q.dtype),
        ("D", spec.head_dim),
        ("VEC", vec),
        ("TPK", tpk),
        ("CH", ch),
        ("ROWS", rows),
        ("KB", 4 if ch * rows <= 4 else 2),
        ("THREADS", threads),
        ("SPLIT", config["SPLIT"]),
        ("PAGED", int(block_table is not None)),
        ("SCALE", float_bits(spec.scale)),
        ("SOFTCAP", float_bits(spec.softcap) if spec.softcap > 0 else 0),
        ("ALIBI", alibi),
    ]
    shift = k_cache.shape[1].bit_length() - 1 if block_table is not None else 0
    params = _int32((spec.window[0], spec.window[1], splits, shift))
    table = _no_block_table() if block_table is None else block_table
    return Launch(
        kernel=catalog.DECODE,
        inputs=[q, k_cache, v_cache, cache_seqlens, table, params, slopes],
        template=template,
        grid=(splits * threads, spec.num_kv_heads * blocks, spec.batch),
        threadgroup=(threads, 1, 1),
        output_shapes=[(spec.batch, spec.num_heads, spec.q_len, splits, spec.head_dim),
                       (spec.batch, spec.num_heads, spec.q_len, splits)],
        output_dtypes=[mx.float32, mx.float32],
    )


def combine_plan(o_part: mx.array, lse_part: mx.array, sinks: mx.array, spec: AttentionSpec) -> Launch:
    """The launch of ``decode_combine.kern`` merging the splits of every query row."""
    rows = spec.batch * spec.num_heads * spec.q_len
    threads = COMBINE_WARPS * 32
    return Launch(
        kernel=catalog.DECODE_COMBINE,
        inputs=[o_part, lse_part, sinks],
        template=[("T", spec.dtype), ("D", spec.head_dim), ("SINKS", int(spec.sinks is not None)),
                  ("WARPS_PER_GROUP", COMBINE_WARPS)],
        grid=(-(-rows // COMBINE_WARPS) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(spec.batch, spec.q_len, spec.num_heads, spec.head_dim), (spec.batch, spec.num_heads, spec.q_len)],
        output_dtypes=[spec.dtype, mx.float32],
    )


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
    if chosen["THREADS"] % 32 or not 32 <= chosen["THREADS"] <= 1024 or chosen["SPLIT"] < 1:
        raise ValueError(f"config needs THREADS a multiple of 32 in [32, 1024] and SPLIT >= 1; got {chosen}")
    return chosen


def decode_attention(
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
    alibi_slopes: Optional[mx.array] = None,
    sinks: Optional[mx.array] = None,
    return_lse: bool = False,
    path: str = "auto",
    config: Optional[dict] = None,
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

    Returns:
        ``out`` ``(batch, seqlen_q, num_heads, head_dim)`` in q's dtype, and with ``return_lse``
        ``(out, lse)``, ``lse`` float32 ``(batch, num_heads, seqlen_q)`` (natural log; ``-inf`` and
        ``out = 0`` for a row that sees no key). Gradients go through the reference path.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}; got {path!r}")
    spec = _describe(q, k_cache, v_cache, cache_seqlens, block_table, softmax_scale, causal, window_size, softcap,
                     alibi_slopes, sinks)
    page_size = None if block_table is None else k_cache.shape[1]
    blocker = "kernels need a GPU backend" if not device_profile().is_gpu else unsupported(spec, page_size)
    if path == "kernel" and blocker:
        raise ValueError(f"path='kernel' cannot run this call: {blocker}")

    def reference(q, k_cache, v_cache) -> List[mx.array]:
        return reference_decode(q, k_cache, v_cache, cache_seqlens, block_table, spec)

    if path == "reference" or blocker:
        out, lse = reference(q, k_cache, v_cache)
    else:
        capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])
        chosen = _kernel_config(spec, capacity, config)
        splits = num_splits(spec, capacity, chosen["SPLIT"])
        slopes = _placeholder() if spec.alibi_slopes is None else spec.alibi_slopes.reshape(-1)
        sink_logits = _placeholder() if spec.sinks is None else spec.sinks.astype(mx.float32)

        def forward(q, k_cache, v_cache) -> List[mx.array]:
            fell_back = []

            def fallback() -> List[mx.array]:
                fell_back.append(True)
                return reference(q, k_cache, v_cache)

            parts = launch(plan(q, k_cache, v_cache, cache_seqlens, block_table, slopes, spec, splits, chosen),
                           fallback)
            if fell_back:  # the split pass could not run: parts already is the reference's answer
                return parts
            return launch(combine_plan(parts[0], parts[1], sink_logits, spec), fallback)

        out, lse = with_reference_vjp(forward, reference)(q, k_cache, v_cache)
    return (out, lse) if return_lse else out


def compile_examples():
    """Launches covering every dtype, head dim, feature flag, row tiling, paging and tunable config
    (for the Metal compile check)."""
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            pool = mx.zeros((5, 16, 2, head_dim), dtype)
            table = mx.zeros((2, 3), mx.int32)
            lengths = mx.zeros((2,), mx.int32)
            features = [
                {},
                {"softcap": 30.0, "alibi_slopes": mx.zeros((4,)), "sinks": mx.zeros((4,)), "window_size": (64, 0)},
                {"alibi_slopes": mx.zeros((2, 4))},
            ]
            for options in features:
                q = mx.zeros((2, 1, 4, head_dim), dtype)
                spec = describe_attention(q, pool[:2], pool[:2], layout="BSHD", causal=True, **options)
                slopes = _placeholder() if spec.alibi_slopes is None else spec.alibi_slopes.reshape(-1)
                configs = catalog.DECODE.configs() if (dtype, head_dim, options) == (mx.float16, 128, {}) \
                    else [catalog.DEFAULTS["decode_attention"]]
                for config in configs:
                    yield plan(q, pool, pool, lengths, table, slopes, spec, 3, config)
                if options is not features[2]:  # one combine launch without and one with sinks
                    parts = (mx.zeros((2, 4, 1, 3, head_dim)), mx.zeros((2, 4, 1, 3)))
                    yield combine_plan(*parts, _placeholder(), spec)
            default = catalog.DEFAULTS["decode_attention"]
            for q in (mx.zeros((2, 1, 4, head_dim), dtype), mx.zeros((2, 4, 8, head_dim), dtype)):  # few, many rows
                spec = describe_attention(q, pool[:2], pool[:2], layout="BSHD", causal=True)
                yield plan(q, pool[:2], pool[:2], lengths, None, _placeholder(), spec, 3, default)
