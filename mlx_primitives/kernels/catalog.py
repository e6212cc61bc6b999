"""Every kernel of the package and the template values a tuner may pick for it, in one place.

The sizes that follow from the problem (row length, access width, head counts) are chosen by the
op; the ones listed under ``tunables`` are free choices, and the Metal compile check in CI builds
every combination of them. ``DEFAULTS`` holds the values used until a tuner knows better.
"""

from __future__ import annotations

import dataclasses

from .launcher import ENTRY, Kernel

THREADS_PER_ROW = (32, 64, 128, 256, 512, 1024)


def _norm(name: str, layer_norm: bool, residual: bool) -> Kernel:
    inputs = ("x",) + (("residual",) if residual else ()) + ("weight",) + (("bias",) if layer_norm else ())
    return Kernel(
        name=name,
        body="norm.kern",
        inputs=inputs,
        outputs=("out", "h") if residual else ("out",),
        defines=(("LAYER_NORM", int(layer_norm)), ("RESIDUAL", int(residual))),
        tunables=(("TPR", THREADS_PER_ROW),),
    )


RMS_NORM = _norm("rms_norm", layer_norm=False, residual=False)
RMS_NORM_RESIDUAL = _norm("rms_norm_residual", layer_norm=False, residual=True)
LAYER_NORM = _norm("layer_norm", layer_norm=True, residual=False)
LAYER_NORM_RESIDUAL = _norm("layer_norm_residual", layer_norm=True, residual=True)

ROPE = Kernel(
    name="rope",
    body="rope.kern",
    inputs=("q", "k", "offsets"),
    outputs=("q_out", "k_out"),
    helpers=("rope.inc",),
    tunables=(("HPT", (1, 2, 4, 8, 16)), ("THREADS", (128, 256))),
)

GLU = Kernel(
    name="glu",
    body="glu.kern",
    inputs=("gate", "up"),
    outputs=("out",),
    helpers=("glu.inc",),
    tunables=(("ITEMS", (1, 2, 4)), ("THREADS", (128, 256, 512))),
)

MATMUL = Kernel(
    name="tiled_matmul",
    body="matmul.kern",
    inputs=("a", "b"),
    outputs=("out",),
    mma=True,
    tunables=(("BM", (32, 64, 128)), ("BN", (32, 64, 128)), ("WM", (1, 2)), ("WN", (2, 4))),
)

# W8A8 linear (w8a8.py): int8 x int8 on the s8 matrix unit; block and warp tiling are free.
W8A8 = Kernel(
    name="w8a8_linear",
    body="w8a8.kern",
    inputs=("x", "w", "x_scale", "w_scale", "bias"),
    outputs=("out",),
    helpers=("glu.inc", "w8a8.inc"),
    mma=True,
    tunables=(("BM", (64, 128)), ("BN", (64, 128)), ("WM", (2, 4)), ("WN", (2, 4))),
)

# W8A8 linear on Hopper's warpgroup unit, warp-specialized (w8a8_wg.kern, wgmma_<backend>.inc; cp.async
# copies from flash_<backend>.inc; producer/consumer barriers from pipe_<backend>.inc): output columns per
# threadgroup, K stages in flight and producer warps are free.
W8A8_WG = Kernel(
    name="w8a8_wgmma",
    body="w8a8_wg.kern",
    inputs=W8A8.inputs,
    outputs=W8A8.outputs,
    helpers=("flash_{backend}.inc", "flash.inc", "wgmma_{backend}.inc", "pipe_{backend}.inc") + W8A8.helpers,
    mma=True,
    tunables=(("BN", (128, 256)), ("STAGES", (3, 4)), ("PW", (2, 4))),
    max_threads=384,  # 2 consumer warpgroups and at most 4 producer warps
)

# Per-row symmetric int8 quantization (w8a8.quantize_per_token): threads per row follow the row length.
QUANTIZE_ROWS = Kernel(
    name="quantize_rows",
    body="quantize_rows.kern",
    inputs=("x",),
    outputs=("values", "scales"),
)

DECODE_COMBINE = Kernel(
    name="decode_attention_combine",
    body="decode_combine.kern",
    inputs=("o_part", "lse_part", "sinks"),
    outputs=("out", "lse"),
)

# The arrival counters of a decode launch that merges its own splits, zeroed for that call.
DECODE_COUNTERS = Kernel(
    name="decode_attention_counters",
    body="decode_counters.kern",
    inputs=("cache_seqlens",),
    outputs=("counters",),
)



@dataclasses.dataclass(frozen=True)
class _AttentionKernel(Kernel):
    """A kernel whose header also takes the attention helpers, in front of its own: ``flash_<backend>.inc``
    (what differs between backends: register-level P, ldmatrix-style loads, asynchronous copies), then
    ``flash.inc``."""

    def helper_files(self):
        return ("flash_{backend}.inc", "flash.inc") + self.helpers


# Prefill attention (flash_attention.py): keys per tile and warps (16 query rows each) per group.
FLASH_FWD = _AttentionKernel(
    name="flash_attention_fwd",
    body="flash_fwd.kern",
    inputs=("q", "k", "v", "window", "slopes", "sinks", "rng"),
    outputs=("out", "lse"),
    mma=True,
    tunables=(("BK", (32, 64)), ("WARPS", (4, 8))),
)


def _warpgroup_variant(kernel: Kernel, tunables) -> Kernel:
    """``kernel``'s body with WG 1: its Hopper variant on the warpgroup unit (``wgmma_<backend>.inc``),
    a kernel of its own (name, tuning space) whose ``tunables`` are instruction widths and warp counts."""
    return dataclasses.replace(kernel, name=f"{kernel.name}_wg", helpers=kernel.helpers + ("wgmma_{backend}.inc",),
                               defines=kernel.defines + (("WG", 1),), tunables=tunables)


# Its warpgroup variant (sm_90): keys per tile and warps (4 per warpgroup of 64 query rows) per group.
FLASH_FWD_WG = _warpgroup_variant(FLASH_FWD, (("BK", (64, 128)), ("WARPS", (4, 8))))


@dataclasses.dataclass(frozen=True)
class FlexKernel(_AttentionKernel):
    """The prefill body compiled with a flex prologue (traced mods, block-sparse walk) in front of it:
    the flash kernel's hooks (``#ifdef FLEX_MODS`` in ``flash_fwd.kern``) plus ``flex.inc``. The
    prologue goes into the source, not the header, so MLX sees the captured arrays' ``_shape`` uses."""

    prologue: str = ""

    def helper_files(self):
        return super().helper_files() + ("flex.inc",)

    def source(self, backend: str) -> str:
        return ENTRY[backend] + self.prologue + (self.src_dir / self.body).read_text()


# Flex attention (flex_attention.py): FLASH_FWD's body, inputs and tile sizes (its tuning entry), plus
# the BlockMask lists; each traced pair of mods derives a kernel of its own from this one.
FLEX_FWD = FlexKernel(
    name="flex_attention_fwd",
    body=FLASH_FWD.body,
    inputs=FLASH_FWD.inputs + ("flex_kv_num", "flex_kv_idx", "flex_full_num", "flex_full_idx", "flex_params"),
    outputs=FLASH_FWD.outputs,
    mma=True,
    tunables=FLASH_FWD.tunables,
)

# Its backward (flash_backward.py): dq walks key tiles of BK keys per query block of 16 * WARPS rows;
# dk/dv walk query tiles of BQ rows per key block of 16 * WARPS keys; STAGES 2 copies the next tile
# while one is computed (dynamic shared memory on CUDA).
_FLASH_BWD_INPUTS = ("q", "k", "v", "dout", "lse", "delta", "window", "slopes", "rng")
FLASH_BWD_DQ = _AttentionKernel(
    name="flash_attention_bwd_dq",
    body="flash_bwd_dq.kern",
    inputs=_FLASH_BWD_INPUTS,
    outputs=("dq", "dslope"),
    mma=True,
    tunables=(("BK", (16, 32, 64)), ("WARPS", (2, 4, 8)), ("STAGES", (1, 2))),
)

FLASH_BWD_DKDV = _AttentionKernel(
    name="flash_attention_bwd_dkdv",
    body="flash_bwd_dkdv.kern",
    inputs=_FLASH_BWD_INPUTS,
    outputs=("dk", "dv"),
    mma=True,
    tunables=(("BQ", (16, 32)), ("WARPS", (2, 4, 8)), ("STAGES", (1, 2))),
)

# The warpgroup variants (sm_90) of both: tiles of wgmma widths, warps (4 per 64 rows or keys), stages.
FLASH_BWD_DQ_WG = _warpgroup_variant(FLASH_BWD_DQ, (("BK", (64, 128)), ("WARPS", (4, 8)), ("STAGES", (1, 2))))
FLASH_BWD_DKDV_WG = _warpgroup_variant(FLASH_BWD_DKDV, (("BQ", (64, 128)), ("WARPS", (4, 8)), ("STAGES", (1, 2))))

# Decode attention (decode.py): the split-KV pass (asynchronous K/V copies from flash_<backend>.inc),
# whose threads per group, minimum keys per split and 16-byte chunks per lane are free, and the pass
# that merges the splits (on CUDA the split-KV pass merges them itself, FUSE: the answer in out and
# lse; its arrival counters come from DECODE_COUNTERS). The split-KV pass also reads mx.quantize caches
# (KV_BITS; the scales and biases are placeholders for a float cache).
DECODE = _AttentionKernel(
    name="decode_attention",
    body="decode.kern",
    inputs=("q", "k_cache", "v_cache", "cache_seqlens", "block_table", "params", "slopes", "k_scales", "k_biases",
            "v_scales", "v_biases", "counters"),
    outputs=("out", "lse", "o_part", "lse_part"),
    helpers=("decode.inc",),
    mma=True,
    tunables=(("THREADS", (64, 128)), ("SPLIT", (128, 256, 512)), ("CHUNKS", (1, 2))),
)

# Scans (scan.py): warps along time and time steps per thread; a threadgroup's chunk is their product.
SELECTIVE_SCAN = Kernel(
    name="selective_scan",
    body="selective_scan.kern",
    inputs=("x", "delta", "A", "B_t", "C_t", "Ds", "z", "delta_bias", "h_init", "params"),
    outputs=("y", "h_last", "dt_sum"),
    tunables=(("WARPS", (2, 4, 8)), ("ITEMS", (4, 8, 16))),
)

LINEAR_SCAN = Kernel(
    name="linear_scan",
    body="linear_scan.kern",
    inputs=("a", "b"),
    outputs=("out",),
    tunables=(("WARPS", (2, 4, 8)), ("ITEMS", (4, 8, 16))),
)

# SageAttention (sage.py): the INT8 quantization pass (its sizes follow from the granularity) and the
# attention kernel with INT8 QK^T, keys per tile and warps (16 query rows each) per group.
SAGE_QUANT = Kernel(
    name="sage_quantize",
    body="sage_quant.kern",
    inputs=("x", "mean"),
    outputs=("values", "scales"),
)

SAGE_ATTN = _AttentionKernel(
    name="sage_attention_fwd",
    body="sage_attn.kern",
    inputs=("q", "q_scale", "k", "k_scale", "v"),
    outputs=("out", "lse"),
    mma=True,
    tunables=(("BK", (32, 64)), ("WARPS", (4, 8))),
)

# Its warpgroup variant (sm_90): keys per tile (wgmma's s8 widths) and warps per group.
SAGE_ATTN_WG = _warpgroup_variant(SAGE_ATTN, (("BK", (64, 128)), ("WARPS", (4, 8))))

# Defaults: norms pick threads per row from the row length (see norms.py); the rest are the best
# of the H100 sweep in benchmarks/results/h100/kernels.md.
DEFAULTS = {
    "rope": {"HPT": 1, "THREADS": 128},
    "glu": {"ITEMS": 2, "THREADS": 256},
    "tiled_matmul": {"BM": 64, "BN": 64, "WM": 2, "WN": 2},
    "decode_attention": {"THREADS": 128, "SPLIT": 256, "CHUNKS": 2},
    # 64 keys by 128 query rows: of BK {32, 64} x WARPS {4, 8} on the H100 at head dim 128 (fp16, B=2,
    # H=16, L=4k and 16k) the fastest for plain, causal and ALiBi, within 3% for softcap (64 x 64 is
    # faster for a 1k sliding window: 1.41 against 1.42-1.87 ms; head dims 64-96 not measured). Where it
    # exceeds shared memory (head dim 256, Apple GPUs) the kernel takes the largest tiles that fit
    # (flash_attention.config_for).
    "flash_attention_fwd": {"BK": 64, "WARPS": 8},
    # 128 keys by 128 query rows (flash-attention 3's tile at head dim 128); head dim 256 takes 64 keys
    # (flash_attention.config_for: the registers of its 64 x 256 output block).
    "flash_attention_fwd_wg": {"BK": 128, "WARPS": 8},
    # 32 keys by 64 query rows, the next tile copied while one is computed: of 9 configs timed on the H100
    # (fp16, B=1, H=16, L=4k, D=128, softcap) the fastest, 0.89 ms against 1.22 for 32 x 32 single-stage
    # (64 x 64 two-stage within 5%). Where it exceeds shared memory the kernel takes the largest tiles
    # that fit (flash_backward.configs_for). The dk/dv default is not measured against its new tiles.
    "flash_attention_bwd_dq": {"BK": 32, "WARPS": 4, "STAGES": 2},
    "flash_attention_bwd_dkdv": {"BQ": 32, "WARPS": 2, "STAGES": 1},
    # The warpgroup variants: 64-wide tiles, two warpgroups, two stages, chosen by their registers and shared
    # memory (nvcc, sm_90a, D=128: 165 / 243 registers, no spills), not by a sweep; with them the backward with
    # softcap runs at 0.45-0.56x sdpa's own backward on the H100 (L=4k-16k, D=128).
    "flash_attention_bwd_dq_wg": {"BK": 64, "WARPS": 8, "STAGES": 2},
    "flash_attention_bwd_dkdv_wg": {"BQ": 64, "WARPS": 8, "STAGES": 2},
    "w8a8_linear": {"BM": 128, "BN": 128, "WM": 2, "WN": 4},
    # 128 x 256 tiles, 4 stages, 4 producer warps: of three candidates timed in turn on the H100 (4096 x 4096,
    # M = 1024-8192) the fastest: 49 / 86 / 159 / 297 us against 50-300 for 3 stages and 74-493 for 128 x 128
    # tiles with 2 producer warps (one threadgroup per SM once persistent, 168 registers).
    "w8a8_wgmma": {"BN": 256, "STAGES": 4, "PW": 4},
    "selective_scan": {"WARPS": 4, "ITEMS": 8},
    "linear_scan": {"WARPS": 4, "ITEMS": 8},
    # 32 keys by 64 query rows: best of the H100 sweep (fp16, L=8k, D=128, plain and causal; sage.md).
    "sage_attention_fwd": {"BK": 32, "WARPS": 4},
    # 64 keys by 64 query rows (one warpgroup): 128 keys spill registers at head dim 128 without a causal mask
    # (nvcc, sm_90a); 4 warps against 8, H100, B=2, L=4k / 16k, timed in turn: 0.91-0.97x the time
    # without a mask, 0.97-1.00x causal, at head dims 64 and 128.
    "sage_attention_fwd_wg": {"BK": 64, "WARPS": 4},
}

KERNELS = (
    RMS_NORM, RMS_NORM_RESIDUAL, LAYER_NORM, LAYER_NORM_RESIDUAL, ROPE, GLU, MATMUL, DECODE, DECODE_COMBINE,
    DECODE_COUNTERS, FLASH_FWD, FLASH_FWD_WG, FLASH_BWD_DQ, FLASH_BWD_DQ_WG, FLASH_BWD_DKDV, FLASH_BWD_DKDV_WG,
    W8A8, W8A8_WG, QUANTIZE_ROWS, SELECTIVE_SCAN, LINEAR_SCAN, SAGE_QUANT, SAGE_ATTN, SAGE_ATTN_WG,
)
