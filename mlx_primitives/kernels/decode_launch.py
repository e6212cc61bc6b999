"""Launch plans of the split-KV decode kernels (``src/decode.kern``, ``src/decode_combine.kern``).

How a call maps onto the GPU: lanes per key and their 16-byte chunks, query rows per threadgroup,
the shared-memory stages that fit the backend, the split count that fills the SMs, and the launches:
on CUDA one (the split pass merges its own splits, :func:`fuses`), else the split pass and the
combine pass. :mod:`.decode` validates calls and runs these plans. A quantized cache (``mx.quantize``
words of ``KERNEL_BITS`` bits) is staged in chunks of 16 values (``2 * bits`` bytes) and
dequantized in registers.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Optional, Sequence, Tuple

import mlx.core as mx

from ..attention.spec import AttentionSpec, describe_attention
from ..hardware import device_profile, static_shared_memory
from . import catalog
from .launcher import Launch, float_bits, next_pow2

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)
MAX_ROWS = 8  # query rows one threadgroup keeps in registers; more take several row blocks
WAVES = 4  # split-KV considers up to this many waves of threadgroups
DEFAULT_UNITS = 132  # SMs assumed where the profile knows no count (MLX reports none; profile.py names known chips)
# Occupancy estimate for the split count: a lane keeps 2 * ROWS * CH * VEC floats of q and output
# plus about ADDRESSING_REGISTERS more; the H100's SM has REGISTER_FILE registers and runs at most
# MAX_THREADS_PER_UNIT threads.
ADDRESSING_REGISTERS = 64
REGISTER_FILE = 65536
MAX_THREADS_PER_UNIT = 2048
MAX_STAGES = 6  # K/V steps in shared memory: the one being read and up to five in flight
COMBINE_WARPS = 4
COUNTER_THREADS = 256  # most threads of the launch zeroing a fused call's arrival counters
KERNEL_BITS = (2, 4, 8)  # quantized caches the split-KV kernel reads; others are dequantized first
QUANT_VEC = 16  # values per staged chunk of a quantized cache
MMA_ROWS = 16  # rows of a block on the matrix unit (the M of m16n8k16)
MMA_CONFIG = {"THREADS": 128, "SPLIT": 256, "CHUNKS": 2, "MMA": 1}  # the matrix-unit path, opted into
MMA_REGISTERS = 160  # a lane's registers on the matrix-unit path at D = 128 (ptxas), for the split count
MMA_BITS = (4, 8)  # quantized caches the matrix-unit path reads (by default)
MMA_QUANT_HEAD_DIMS = (64, 128)  # ... at head dims whose half rows hold whole groups
QUANT_MMA_THREADS = 64  # ... with at most two warps a group
SM_SHARED_MEMORY = 227 * 1024  # H100: the shared memory an SM shares among its resident groups
GROUP_SHARED_RESERVE = 1024  # ... of which the system takes this much per group


def uses_mma(spec: AttentionSpec, config: Dict[str, int], backend: str, bits: int = 0) -> bool:
    """Whether the split pass runs QK^T and PV on the matrix unit: config MMA = 1, a CUDA backend,
    fp16/bf16 float caches (float32 has no m16n8k16), head dims up to 128 (the output accumulators of
    D = 256 would spill). Quantized caches of ``MMA_BITS`` with float16 queries at head dims
    ``MMA_QUANT_HEAD_DIMS`` take it unless config MMA = 0: each warp dequantizes its staged packed rows
    into a half tile (the scalar path's per-value unpacking made int8 decode slower than fp16).

    Opt-in, since it measured slower where it matters (H100, MLX 0.32.4, fp16 q_len 1 Hq 32 Hk 8 D 128,
    ms, matrix unit at THREADS 64 / 32 against the scalar default): B=1 L=4k 0.092 / 0.091 vs 0.101,
    B=8 L=32k 0.461 / 0.469 vs 0.420, B=32 L=4k 0.257 / 0.250 vs 0.256, B=32 L=32k 1.58 / 1.73 vs 1.50.
    Its padded K/V rows fit two stages of 32 keys at THREADS 64 in 48 KiB (five of 16 at THREADS 32,
    one warp a group), against the scalar path's five stages. Quantized (same shapes, group 64, B=8
    L=32k): int8 0.366 ms on the matrix unit vs 0.527 scalar (fp16 cache 0.412) with four stages, 0.346
    with three (fp16 0.414); int4 0.339 / 0.364. At B=1 L=32k both int8 paths take 0.14-0.15 ms."""
    if backend != "cuda":
        return False
    if bits:
        return bool(config.get("MMA", 1)) and bits in MMA_BITS and spec.dtype == mx.float16 \
            and spec.head_dim in MMA_QUANT_HEAD_DIMS
    return bool(config.get("MMA", 0)) and spec.dtype in (mx.float16, mx.bfloat16) and spec.head_dim <= 128


def _row_blocks(spec: AttentionSpec, most: int = MAX_ROWS) -> Tuple[int, int]:
    """(row blocks, rows per block) splitting the groups * q_len rows of a kv head evenly."""
    rows = spec.groups * spec.q_len
    blocks = -(-rows // most)
    return blocks, -(-rows // blocks)


def _resident(threads: int, registers: int) -> int:
    """Threadgroups of ``threads`` one SM holds at once, at ``registers`` registers a thread."""
    return max(1, min(MAX_THREADS_PER_UNIT // threads, REGISTER_FILE // (threads * registers)))


def num_splits(spec: AttentionSpec, capacity: int, split: int, threads: int, registers: int) -> int:
    """Chunks per sequence: the fewest that keep the GPU's slots busy (flash-decoding's rule).

    ``groups * splits`` threadgroups run in waves of ``slots`` (SMs x resident groups); a split
    count's efficiency is the filled fraction of its last wave. The first count within 85% of the
    best efficiency wins, since every extra split adds partial outputs for the combine pass to
    merge; chunks stay at least ``split`` keys long.
    """
    groups = spec.batch * spec.num_kv_heads * _row_blocks(spec)[0]
    slots = (device_profile().gpu_cores or DEFAULT_UNITS) * _resident(threads, registers)
    most = max(1, min(-(-capacity // split), -(-WAVES * slots // groups)))
    efficiency = []
    for splits in range(1, most + 1):
        waves = groups * splits / slots
        efficiency.append(waves / math.ceil(waves))
    best = max(efficiency)
    return next(s for s, e in enumerate(efficiency, start=1) if e >= 0.85 * best)


def staging(threads: int, ch: int, head_dim: int, rows: int, backend: str,
            chunk_bytes: int = 16) -> Tuple[int, int, int]:
    """(THREADS, KB, STAGES) whose shared memory fits ``backend``: the K/V stages take what the
    reductions leave; two keys per team and step where three stages fit, else one; THREADS
    halves until two stages fit (only large head dims on Metal's 32 KiB)."""
    limit = static_shared_memory(backend)
    while True:
        reductions = 4 * (threads // 32) * (head_dim + 2 * rows)
        per_key_step = threads * 2 * chunk_bytes * ch  # K and V chunks of one key per team, every lane
        for kb, least in ((2, 3), (1, 2)):
            stages = min(MAX_STAGES, (limit - reductions) // (kb * per_key_step))
            if stages >= least:
                return threads, kb, stages
        threads //= 2


@functools.lru_cache(maxsize=256)
def _int32(values: Tuple[int, ...]) -> mx.array:
    """Small int32 arrays of launch parameters, built once per distinct value."""
    return mx.array(values, dtype=mx.int32)


@functools.lru_cache(maxsize=1)
def no_block_table() -> mx.array:
    """What a contiguous cache passes as ``block_table``: one page (its rows) per sequence (one array
    per process: a decode step would otherwise build and fill it once per layer)."""
    return mx.zeros((1, 1), mx.int32)


def placeholder() -> mx.array:
    return mx.zeros((1,), mx.float32)


@functools.lru_cache(maxsize=1)
def no_affine() -> Tuple[mx.array, ...]:
    """What a float cache passes as the scales and biases of a quantized one."""
    return (mx.zeros((1,), mx.float32),) * 4


def mma_staging(threads: int, chunks: int, head_dim: int, backend: str, bits: int = 0) -> Tuple[int, int]:
    """(THREADS, STAGES) of the matrix-unit path: a stage is 16 keys per warp of K and V rows of
    ``chunks + 1`` chunks (16 bytes; a ``bits``-bit cache: 16 values, ``2 * bits`` bytes); the warps'
    merge reuses the stages, or with a quantized cache the warps' dequantized tiles (16 rows of
    ``head_dim + 8`` halves each), which also take q. THREADS halves until two stages fit; a quantized
    cache takes at most ``QUANT_MMA_THREADS`` (its tiles leave no room for two stages of four warps)."""
    limit = static_shared_memory(backend)
    if bits:
        return _quantized_mma_staging(min(threads, QUANT_MMA_THREADS), chunks, head_dim, limit, bits)
    while True:
        per_stage = 2 * 16 * (threads // 32) * (chunks + 1) * 16
        stages = min(MAX_STAGES, (limit - 8 * (threads // 32) * MMA_ROWS) // per_stage)
        if stages >= 2 or threads == 32:
            return threads, stages
        threads //= 2


def _quantized_mma_staging(threads: int, chunks: int, head_dim: int, limit: int, bits: int) -> Tuple[int, int]:
    """:func:`mma_staging` of a quantized cache: each warp also holds a dequantized tile; of the stage
    counts that fit, the most that keep the most groups on an SM (by its shared memory and registers),
    since a step's latency (copy wait, dequantization, two matrix products) needs resident warps more
    than bytes in flight (H100, int8 D=128: 4 stages leave 4 groups of 2 warps an SM, 3 leave 6)."""
    warps = threads // 32
    per_stage = 2 * 16 * warps * (chunks + 1) * 2 * bits
    fixed = 8 * warps * MMA_ROWS + max(warps * 16 * (head_dim + 8) * 2, 16 * head_dim * 4)
    most = min(MAX_STAGES, (limit - fixed) // per_stage)
    by_registers = REGISTER_FILE // (threads * MMA_REGISTERS)
    resident = {s: min(by_registers, SM_SHARED_MEMORY // (fixed + s * per_stage + GROUP_SHARED_RESERVE))
                for s in range(2, most + 1)}
    return threads, max(resident, key=lambda s: (resident[s], s))


def geometry(spec: AttentionSpec, config: Dict[str, int], backend: str, bits: int = 0) -> Dict[str, int]:
    """Lanes per key and their chunks (16 bytes of a float cache, 16 values of a ``bits``-bit one),
    rows per group, the staging that fits, and the registers a lane needs (an estimate, for the
    split count); MMA: whether the matrix-unit path runs (:func:`uses_mma`)."""
    vec = QUANT_VEC if bits else 16 // spec.dtype.size
    chunks = spec.head_dim // vec
    if uses_mma(spec, config, backend, bits):
        blocks, rows = _row_blocks(spec, MMA_ROWS)
        tpk = next_pow2(chunks)
        threads, stages = mma_staging(config["THREADS"], chunks, spec.head_dim, backend, bits)
        return {"VEC": vec, "TPK": tpk, "CH": 1, "ROWS": rows, "BLOCKS": blocks, "THREADS": threads,
                "KB": tpk // 2, "STAGES": stages, "REGISTERS": MMA_REGISTERS, "MMA": 1,
                "K_STAGE_BYTES": stages * threads // 2 * (chunks + 1) * (2 * bits if bits else 16)}
    blocks, rows = _row_blocks(spec)
    # CHUNKS chunks of a row per lane: 2 repeats less of the per-key work (shuffles, softmax)
    # across a team's lanes, 1 halves the registers of q and the output slice (more threadgroups
    # per SM). Past 4 rows (2 with the 16-value chunks of a quantized cache) only 1 fits the registers.
    per_lane = config["CHUNKS"] if rows <= (2 if bits else 4) else 1
    tpk = min(32, next_pow2(-(-chunks // per_lane)))
    ch = -(-chunks // tpk)
    chunk_bytes = vec * bits // 8 if bits else 16
    threads, kb, stages = staging(config["THREADS"], ch, spec.head_dim, rows, backend, chunk_bytes)
    affine = 2 * rows * ch + 8 * kb * ch if bits else 0  # q sums, bias sums, two steps' scales and biases
    return {"VEC": vec, "TPK": tpk, "CH": ch, "ROWS": rows, "BLOCKS": blocks, "THREADS": threads, "KB": kb,
            "STAGES": stages, "REGISTERS": 2 * rows * ch * vec + affine + ADDRESSING_REGISTERS, "MMA": 0,
            "K_STAGE_BYTES": stages * kb * ch * threads * chunk_bytes}


def fuses(spec: AttentionSpec, shape: Dict[str, int], splits: int, backend: str) -> bool:
    """Whether the split pass merges its splits itself (FUSE = 1: one launch, no combine pass): on
    CUDA (the last split group to finish merges, after a device-wide fence and an atomic count),
    without sinks (the combine pass adds them), where a row block's split weights fit the K stages
    of ``shape`` (:func:`geometry`)."""
    return backend == "cuda" and spec.sinks is None and 4 * shape["ROWS"] * splits <= shape["K_STAGE_BYTES"]


def plan(q, k_cache, v_cache, cache_seqlens, block_table, slopes, spec: AttentionSpec, splits: int,
         config, backend: Optional[str] = None, affine: Optional[Sequence[mx.array]] = None,
         quantization: Optional[Tuple[int, int]] = None, counters: Optional[mx.array] = None) -> Launch:
    """The split-KV launch of ``decode.kern``; ``block_table`` None for a contiguous cache.

    Outputs ``[out, lse, o_part, lse_part]``: where the launch fuses the merge (:func:`fuses`),
    ``out`` and ``lse`` are the answer (``o_part``/``lse_part`` the partials of several splits, which
    count themselves in at ``counters``, zeroed for the call by :func:`counters_plan`); else
    ``o_part``/``lse_part`` are the partials for :func:`combine_plan` and ``out``/``lse`` placeholders.

    A quantized cache: ``k_cache``/``v_cache`` the packed words, ``affine`` ``(k_scales, k_biases,
    v_scales, v_biases)`` and ``quantization`` ``(group_size, bits)`` with bits in ``KERNEL_BITS``.
    """
    group, bits = quantization or (0, 0)
    backend = backend or device_profile().backend
    g = geometry(spec, config, backend, bits)
    fuse = fuses(spec, g, splits, backend)
    alibi = 0 if spec.alibi_slopes is None else spec.alibi_slopes.ndim
    template = (
        ("T", q.dtype),
        ("D", spec.head_dim),
        ("VEC", g["VEC"]),
        ("TPK", g["TPK"]),
        ("CH", g["CH"]),
        ("ROWS", g["ROWS"]),
        ("KB", g["KB"]),
        ("STAGES", g["STAGES"]),
        ("THREADS", g["THREADS"]),
        ("SPLIT", config["SPLIT"]),
        ("CHUNKS", config["CHUNKS"]),
        ("PAGED", int(block_table is not None)),
        ("SCALE", float_bits(spec.scale)),
        ("SOFTCAP", float_bits(spec.softcap) if spec.softcap > 0 else 0),
        ("ALIBI", alibi),
        ("KV_BITS", bits),
        ("GROUP", group),
        ("MMA", g["MMA"]),
        ("FUSE", int(fuse)),
    )
    shift = k_cache.shape[1].bit_length() - 1 if block_table is not None else 0
    params = _int32((spec.window[0], spec.window[1], splits, shift))
    table = no_block_table() if block_table is None else block_table
    return Launch(
        kernel=catalog.DECODE,
        inputs=[q, k_cache, v_cache, cache_seqlens, table, params, slopes] + list(affine or no_affine())
        + [no_counters() if counters is None else counters],
        template=template,
        grid=(splits * g["THREADS"], spec.num_kv_heads * g["BLOCKS"], spec.batch),
        threadgroup=(g["THREADS"], 1, 1),
        output_shapes=_split_outputs(spec, splits, fuse),
        output_dtypes=[q.dtype, mx.float32, mx.float32, mx.float32],
    )


def _split_outputs(spec: AttentionSpec, splits: int, fuse: bool):
    """Shapes of the split pass's ``[out, lse, o_part, lse_part]`` (:func:`plan`)."""
    rows = (spec.batch, spec.num_heads, spec.q_len)
    answer = [(spec.batch, spec.q_len, spec.num_heads, spec.head_dim), rows]
    if fuse and splits == 1:
        return answer + [(1,), (1,)]
    parts = [rows + (splits, spec.head_dim), rows + (splits,)]
    return answer + parts if fuse else [(1,), (1,)] + parts


@functools.lru_cache(maxsize=1)
def no_counters() -> mx.array:
    """What a launch that does not count its splits passes as ``counters``."""
    return mx.zeros((1,), mx.int32)


def counters_plan(cache_seqlens: mx.array, spec: AttentionSpec, blocks: int) -> Launch:
    """The launch of ``decode_counters.kern``: the zeroed arrival counters, one per (batch, kv head, row
    block), of one fused split-KV call (:func:`plan` with several splits; ``blocks`` row blocks a kv head).
    Zeroing them in a launch of their own, not by MLX's ``init_value`` on the split pass (which fills
    every output: four fills a call) is one small launch instead of four."""
    per_seq = spec.num_kv_heads * blocks
    threads = min(COUNTER_THREADS, next_pow2(spec.batch * per_seq))
    return Launch(
        kernel=catalog.DECODE_COUNTERS,
        inputs=[cache_seqlens],
        template=(("PER_SEQ", per_seq), ("THREADS", threads)),
        grid=(threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(spec.batch * per_seq,)],
        output_dtypes=[mx.int32],
    )


def combine_plan(o_part: mx.array, lse_part: mx.array, sinks: mx.array, spec: AttentionSpec) -> Launch:
    """The launch of ``decode_combine.kern`` merging the splits of every query row."""
    rows = spec.batch * spec.num_heads * spec.q_len
    threads = COMBINE_WARPS * 32
    return Launch(
        kernel=catalog.DECODE_COMBINE,
        inputs=[o_part, lse_part, sinks],
        template=(("T", spec.dtype), ("D", spec.head_dim), ("SINKS", int(spec.sinks is not None)),
                  ("WARPS_PER_GROUP", COMBINE_WARPS)),
        grid=(-(-rows // COMBINE_WARPS) * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(spec.batch, spec.q_len, spec.num_heads, spec.head_dim),
                       (spec.batch, spec.num_heads, spec.q_len)],
        output_dtypes=[spec.dtype, mx.float32],
    )


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
                slopes = placeholder() if spec.alibi_slopes is None else spec.alibi_slopes.reshape(-1)
                configs = catalog.DECODE.configs() if (dtype, head_dim, options) == (mx.float16, 128, {}) \
                    else [catalog.DEFAULTS["decode_attention"]]
                for config in configs:
                    yield plan(q, pool, pool, lengths, table, slopes, spec, 3, config, "metal")
                if options is not features[2]:  # one combine launch without and one with sinks
                    parts = (mx.zeros((2, 4, 1, 3, head_dim)), mx.zeros((2, 4, 1, 3)))
                    yield combine_plan(*parts, placeholder(), spec)
            default = catalog.DEFAULTS["decode_attention"]
            for q in (mx.zeros((2, 1, 4, head_dim), dtype), mx.zeros((2, 4, 8, head_dim), dtype)):  # few, many rows
                spec = describe_attention(q, pool[:2], pool[:2], layout="BSHD", causal=True)
                yield plan(q, pool[:2], pool[:2], lengths, None, placeholder(), spec, 3, default, "metal")
    yield from _quantized_examples()
    yield from _quantized_mma_examples()
    yield from _mma_examples()
    yield from _fused_examples()


def _fused_examples():
    """CUDA plans that merge their splits (FUSE; one split or several is a launch parameter): every
    dtype, the scalar and matrix-unit paths, a quantized cache, many rows."""
    lengths, default = mx.zeros((2,), mx.int32), catalog.DEFAULTS["decode_attention"]
    for dtype in DTYPES:
        for head_dim in (64, 128, 256):
            pool = mx.zeros((2, 16, 2, head_dim), dtype)
            for q_shape in ((2, 1, 4, head_dim), (2, 4, 8, head_dim)):
                q = mx.zeros(q_shape, dtype)
                spec = describe_attention(q, pool, pool, layout="BSHD", causal=True, softcap=30.0)
                configs = [default] + ([MMA_CONFIG] if dtype != mx.float32 and head_dim <= 128 else [])
                for config in configs:
                    yield plan(q, pool, pool, lengths, None, placeholder(), spec, 3, config, "cuda")
    yield _quantized_plan(mx.zeros((2, 1, 4, 128), mx.float16), 4, 64, paged=False, backend="cuda")
    spec = describe_attention(mx.zeros((2, 1, 4, 64)), mx.zeros((2, 16, 2, 64)), mx.zeros((2, 16, 2, 64)),
                              layout="BSHD", causal=True)
    yield counters_plan(lengths, spec, blocks=1)


def _mma_examples():
    """The matrix-unit path (CUDA plans): fp16/bf16 at head dims up to 128, paged and contiguous, with
    the score mods, and many rows (two row blocks)."""
    table, lengths = mx.zeros((2, 3), mx.int32), mx.zeros((2,), mx.int32)
    for dtype in (mx.float16, mx.bfloat16):
        for head_dim in (64, 80, 96, 128):
            pool = mx.zeros((5, 16, 2, head_dim), dtype)
            for q_shape, paged in (((2, 1, 4, head_dim), True), ((2, 4, 16, head_dim), False)):
                q = mx.zeros(q_shape, dtype)
                mods = {"softcap": 30.0, "alibi_slopes": mx.zeros((2, q_shape[2])), "window_size": (64, 0)}
                for options in ({}, mods):
                    spec = describe_attention(q, pool[:2], pool[:2], layout="BSHD", causal=True, **options)
                    slopes = placeholder() if spec.alibi_slopes is None else spec.alibi_slopes.reshape(-1)
                    yield plan(q, pool if paged else pool[:2], pool if paged else pool[:2], lengths,
                               table if paged else None, slopes, spec, 3, MMA_CONFIG, "cuda")


def _quantized_mma_examples():
    """Quantized caches on the matrix unit (CUDA plans): 4 and 8 bits, every group size at head dims
    64 and 128, paged and contiguous, few and many rows, the score mods once."""
    for bits in MMA_BITS:
        for head_dim in MMA_QUANT_HEAD_DIMS:
            for group in (32, 64, 128):
                if head_dim % group:
                    continue
                for q_shape, paged in (((2, 1, 4, head_dim), True), ((2, 4, 8, head_dim), False)):
                    q = mx.zeros(q_shape, mx.float16)
                    mods = {"softcap": 30.0, "alibi_slopes": mx.zeros((2, q_shape[2])), "window_size": (64, 0)}
                    for options in ({}, mods) if (bits, head_dim, group, paged) == (8, 128, 64, True) else ({},):
                        yield _quantized_plan(q, bits, group, paged, backend="cuda", **options)


def _quantized_plan(q, bits: int, group: int, paged: bool, config: Optional[dict] = None, backend: str = "metal",
                    **options) -> Launch:
    """A compile example's split-KV plan over a ``bits``-bit cache in groups of ``group`` (paged: a
    pool of 5 pages and a 3-page table), two sequences and two kv heads; the default config if none."""
    head_dim = q.shape[3]
    packed = mx.zeros((5 if paged else 2, 16, 2, head_dim * bits // 32), mx.uint32)
    scales = mx.zeros(packed.shape[:3] + (head_dim // group,), q.dtype)
    view = mx.zeros((2, 16, 2, head_dim), q.dtype)
    spec = describe_attention(q, view, view, layout="BSHD", causal=True, **options)
    slopes = placeholder() if spec.alibi_slopes is None else spec.alibi_slopes.reshape(-1)
    table = mx.zeros((2, 3), mx.int32) if paged else None
    return plan(q, packed, packed, mx.zeros((2,), mx.int32), table, slopes, spec, 3,
                config or catalog.DEFAULTS["decode_attention"], backend, (scales,) * 4, (group, bits))


def _quantized_examples():
    """Quantized caches: every bit width, dtype and row tiling at head dims 64/128/256, paged and
    contiguous; every group size and tunable config at fp16 and head dim 128 (and 96 in groups of 32);
    the score mods once."""
    for dtype in DTYPES:
        for bits in KERNEL_BITS:
            for head_dim in (64, 128, 256):
                for q_shape in ((2, 1, 4, head_dim), (2, 4, 8, head_dim)):  # few, many rows
                    yield _quantized_plan(mx.zeros(q_shape, dtype), bits, 64, paged=q_shape[1] == 1)
    q = mx.zeros((2, 1, 4, 128), mx.float16)
    for bits in (4, 8):
        for group in (32, 64, 128):
            for config in catalog.DECODE.configs():
                yield _quantized_plan(q, bits, group, paged=False, config=config)
    yield _quantized_plan(mx.zeros((2, 2, 4, 96), mx.float16), 8, 32, paged=True)
    yield _quantized_plan(q, 8, 64, paged=True, softcap=30.0, alibi_slopes=mx.zeros((2, 4)), sinks=mx.zeros((4,)),
                          window_size=(64, 0))
