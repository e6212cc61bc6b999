"""The prefill flash kernel against ``mx.fast.scaled_dot_product_attention`` (and the reference path).

Rows: fp16, B=2, H=16, L in {4k, 8k, 16k}, D in {128, 256}. Plain and causal are timed against sdpa
on the same call; softcap and ALiBi (which sdpa can't run) against sdpa's plain attention of the same
shape, the issue-5 target being >= 50% of its TFLOP/s; the sliding window (L=16k, W=1k, causal)
against sdpa with the equivalent additive mask, target >= 10x. TFLOP/s count visible pairs only
(``AttentionSpec.flops``). On sm_90 a table sets the warpgroup variant against the mma.sync one. The
backward table (B=1, D=128) times ours with softcap against sdpa's own backward on plain attention, target
>= 40% of its TFLOP/s.
"""

from __future__ import annotations

from typing import List

import mlx.core as mx

from mlx_primitives.attention.reference import reference_attention
from mlx_primitives.attention.spec import describe_attention
from mlx_primitives.kernels.flash_attention import flash_attention, warpgroup_available

from .common import Table, time_ms

BATCH, HEADS = 2, 16
SLOPES = 2.0 ** (-8.0 * (mx.arange(HEADS) + 1) / HEADS)  # ALiBi's geometric slopes


def _inputs(length: int, head_dim: int):
    q, k, v = (mx.random.normal((BATCH, HEADS, length, head_dim)).astype(mx.float16) for _ in range(3))
    mx.eval(q, k, v)
    return q, k, v


def _window_mask(length: int, window: int) -> mx.array:
    i = mx.arange(length)[:, None]
    j = mx.arange(length)[None, :]
    visible = (j <= i) & (j >= i - window)
    return mx.where(visible, 0.0, -mx.inf).astype(mx.float16)


def run(quick: bool = False) -> List[Table]:
    lengths = (4096,) if quick else (4096, 8192, 16384)
    repeats = 3 if quick else 10
    table = Table(
        title=f"Prefill flash kernel vs sdpa (fp16, B={BATCH}, H={HEADS})",
        columns=("variant", "L", "D", "ours ms", "ours TFLOP/s", "sdpa ms", "sdpa TFLOP/s", "sdpa/ours",
                 "reference ms", "target"),
        note="sdpa column: the same call for plain/causal; sdpa's plain attention of the same shape for "
             "softcap/ALiBi (target: ours >= 50% of its TFLOP/s); sdpa with the equivalent additive mask for "
             "the window (target: >= 10x faster).",
    )
    for head_dim in (128, 256):
        for length in lengths:
            q, k, v = _inputs(length, head_dim)
            plain_spec = describe_attention(q, k, v)
            sdpa_plain = time_ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=plain_spec.scale),
                                 repeats=repeats)
            variants = [
                ("plain", {}, sdpa_plain, ""),
                ("causal", {"causal": True}, time_ms(
                    lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=plain_spec.scale, mask="causal"),
                    repeats=repeats), ""),
                ("softcap 30", {"softcap": 30.0}, sdpa_plain, ">= 50% sdpa plain"),
                ("alibi", {"alibi_slopes": SLOPES}, sdpa_plain, ">= 50% sdpa plain"),
            ]
            for name, features, sdpa_ms, target in variants:
                spec = describe_attention(q, k, v, **features)
                ours = time_ms(lambda: flash_attention(q, k, v, spec)[0], repeats=repeats)
                sdpa_tflops = (plain_spec if target else spec).flops() / sdpa_ms / 1e9
                reference = ""
                if target and length == 4096 and head_dim == 128:
                    reference = time_ms(lambda: reference_attention(q, k, v, spec)[0], warmup=1, repeats=3)
                table.add(name, length, head_dim, ours, spec.flops() / ours / 1e9, sdpa_ms, sdpa_tflops,
                          sdpa_ms / ours, reference, target)
            del q, k, v

    length, window = (4096, 1024) if quick else (16384, 1024)
    for head_dim in (128, 256):
        q, k, v = _inputs(length, head_dim)
        spec = describe_attention(q, k, v, causal=True, window_size=(window, 0))
        mask = _window_mask(length, window)
        mx.eval(mask)
        ours = time_ms(lambda: flash_attention(q, k, v, spec)[0], repeats=repeats)
        sdpa_ms = time_ms(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=spec.scale, mask=mask),
                          repeats=repeats)
        table.add(f"window {window} causal", length, head_dim, ours, spec.flops() / ours / 1e9, sdpa_ms,
                  spec.flops() / sdpa_ms / 1e9, sdpa_ms / ours, "", ">= 10x sdpa+mask")
        del q, k, v, mask
    return [table] + variants_tables(quick) + [backward_table(quick)]


def variants_tables(quick: bool = False) -> List[Table]:
    """Where the warpgroup variant runs (sm_90): it against the mma.sync variant on the same calls (B=1)."""
    if not warpgroup_available():
        return []
    length = 4096 if quick else 16384
    repeats = 3 if quick else 10
    table = Table(
        title=f"Prefill variants: warpgroup (wgmma) vs mma.sync (fp16, B=1, H={HEADS}, L={length})",
        columns=("variant", "D", "warpgroup ms", "warpgroup TFLOP/s", "mma.sync ms", "mma.sync TFLOP/s",
                 "mma.sync/warpgroup"),
        note='config {"WG": 1} and {"WG": 0} on kernels.flash_attention.flash_attention, default tiles of each.',
    )
    for head_dim in (128, 256):
        q, k, v = (mx.random.normal((1, HEADS, length, head_dim)).astype(mx.float16) for _ in range(3))
        mx.eval(q, k, v)
        for name, features in (("plain", {}), ("causal", {"causal": True}), ("softcap 30", {"softcap": 30.0}),
                               ("alibi", {"alibi_slopes": SLOPES})):
            spec = describe_attention(q, k, v, **features)
            times = [time_ms(lambda: flash_attention(q, k, v, spec, {"WG": wg})[0], repeats=repeats) for wg in (1, 0)]
            table.add(name, head_dim, times[0], spec.flops() / times[0] / 1e9, times[1],
                      spec.flops() / times[1] / 1e9, times[1] / times[0])
        del q, k, v
    return [table]


def _vjp_ms(attend, q, k, v, repeats: int) -> float:
    """Median time of forward plus backward (``mx.vjp`` with a fixed output cotangent)."""
    cotangent = mx.random.normal(q.shape).astype(q.dtype)
    mx.eval(cotangent)
    return time_ms(lambda: mx.vjp(attend, [q, k, v], [cotangent])[1], repeats=repeats)


def backward_table(quick: bool = False) -> Table:
    """Backward: ours with softcap against sdpa's own backward on plain attention of the same shape.

    Backward time = (forward + backward) - forward, each a median; TFLOP/s count 2.5x the forward's FLOPs.
    """
    lengths = (4096,) if quick else (4096, 8192, 16384)
    repeats = 3 if quick else 10
    table = Table(
        title=f"Prefill backward vs sdpa's backward (fp16, B=1, H={HEADS}, D=128)",
        columns=("variant", "L", "ours fwd ms", "ours fwd+bwd ms", "ours bwd TFLOP/s", "sdpa fwd ms",
                 "sdpa fwd+bwd ms", "sdpa bwd TFLOP/s", "ours/sdpa bwd", "target"),
        note="ours: the flash kernel with softcap 30 (forward kernel, then dq and dk/dv kernels); sdpa: "
             "mx.fast.scaled_dot_product_attention on plain attention (its own VJP). Backward TFLOP/s = "
             "2.5 x forward FLOPs / (fwd+bwd - fwd). Target: ours >= 40% of sdpa's.",
    )
    for length in lengths:
        q, k, v = (mx.random.normal((1, HEADS, length, 128)).astype(mx.float16) for _ in range(3))
        mx.eval(q, k, v)
        spec = describe_attention(q, k, v, softcap=30.0)
        plain = describe_attention(q, k, v)

        def ours(q, k, v):
            return flash_attention(q, k, v, spec)[0]

        def sdpa(q, k, v):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=plain.scale)

        rows = []
        for attend in (ours, sdpa):
            forward = time_ms(lambda: attend(q, k, v), repeats=repeats)
            both = _vjp_ms(attend, q, k, v, repeats)
            rows.append((forward, both, 2.5 * plain.flops() / max(both - forward, 1e-6) / 1e9))
        table.add("softcap 30 vs plain sdpa", length, *rows[0], *rows[1], rows[0][2] / rows[1][2], ">= 0.4")
        del q, k, v
    return table
