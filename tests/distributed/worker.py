"""One rank of the distributed tests: ``python -m tests.distributed.worker {ring,tensor} [ring|nccl]``.

Started by :func:`mlx_primitives.distributed.launch_local` from test_multiprocess.py. Every rank draws the same full inputs from a fixed seed, runs
the distributed computation on its part and checks that part against the float64
oracle (flash-attention's rule, tests/reference.py) or the single-process layer. A
failed check raises, so the rank exits non-zero and prints which case failed.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_primitives import Attention, flash_attention
from mlx_primitives.cache import KVCache
from mlx_primitives.distributed import chunk_ranges, gather_sequence, ring_attention, ring_shift, shard_sequence
from tests.reference import Features, assert_within_rule, attention64, f64, naive_attention

# (transport, causal, split, dtype, layout, softcap)
RING_CASES = [
    ("ring", True, "zigzag", mx.float32, "BSHD", 0.0),
    ("ring", True, "contiguous", mx.float32, "BSHD", 0.0),
    ("ring", False, "zigzag", mx.float32, "BHSD", 0.0),
    ("ring", True, "zigzag", mx.bfloat16, "BSHD", 2.0),
    ("gather", True, "zigzag", mx.float32, "BSHD", 0.0),
    ("gather", True, "contiguous", mx.float32, "BHSD", 0.0),
    ("gather", False, "zigzag", mx.bfloat16, "BSHD", 0.0),
]


def check_ring_case(group, transport, causal, split, dtype, layout, softcap) -> None:
    batch, length, heads, kv_heads, dim, v_dim = 2, 8 * group.size(), 4, 2, 16, 8
    q, k, v, grad_out = (mx.random.normal((batch, h, length, d)).astype(dtype)  # BHSD
                         for h, d in ((heads, dim), (kv_heads, dim), (kv_heads, v_dim), (heads, v_dim)))
    features = Features(causal=causal, softcap=softcap)
    ref = attention64(f64(q), f64(k), f64(v), features, f64(grad_out))
    naive_out, naive_lse, _ = naive_attention(q, k, v, features)
    naive_grads = mx.vjp(lambda *qkv: naive_attention(*qkv, features)[0], [q, k, v], [grad_out])[1]

    def local(x):  # this rank's part of a full (batch, heads, seq, ...) array
        if isinstance(x, np.ndarray):
            ranges = chunk_ranges(length, group.rank(), group.size(), split)
            return np.concatenate([x[:, :, start:stop] for start, stop in ranges], axis=2)
        return shard_sequence(x, group, axis=2, split=split)

    def in_layout(x):
        return x if layout == "BHSD" else x.swapaxes(1, 2)

    def attend(*qkv):
        return ring_attention(*qkv, group, causal=causal, softcap=softcap, layout=layout, split=split,
                              transport=transport, return_lse=True)

    def loss(*qkv):
        return (attend(*qkv)[0] * in_layout(local(grad_out))).sum()

    local_qkv = [in_layout(local(x)) for x in (q, k, v)]
    out, lse = attend(*local_qkv)
    # mx.grad alone evaluates only what this rank's gradient reads: every send another rank waits for must
    # still run (a later block under the contiguous causal split is not attended, but passed on).
    grads = mx.grad(loss, argnums=(0, 1, 2))(*local_qkv)
    name = f"{transport} causal={causal} {split} {dtype} {layout} softcap={softcap} n={group.size()}"
    assert_within_rule(in_layout(out), local(ref["out"]), local(naive_out), dtype, f"{name}: out")
    assert_within_rule(lse, local(ref["lse"]), local(naive_lse), dtype, f"{name}: lse")
    for grad, key, naive in zip(grads, ("dq", "dk", "dv"), naive_grads):
        assert_within_rule(in_layout(grad), local(ref[key]), local(naive), dtype, f"{name}: {key}")
    gathered = in_layout(gather_sequence(out, group, axis=1 if layout == "BSHD" else 2, split=split))
    assert_within_rule(gathered, ref["out"], naive_out, dtype, f"{name}: gathered out")
    single = flash_attention(q, k, v, causal=causal, layout="BHSD", softcap=softcap)
    assert_within_rule(gathered, f64(single), naive_out, dtype, f"{name}: gathered out vs one process")


def check_lse_gradient(group, transport: str, split: str) -> None:
    """Gradients of a loss on the LSE alone (a z-loss) against float64: ``d lse_i / d s_ij = p_ij``."""
    batch, length, heads, kv_heads, dim = 1, 4 * group.size(), 2, 1, 8
    q, k, v = (mx.random.normal((batch, h, length, dim)) for h in (heads, kv_heads, kv_heads))
    weights = mx.random.normal((batch, heads, length))
    ref = attention64(f64(q), f64(k), f64(v), Features(causal=True))
    ds = ref["probs"] * f64(weights)[..., None] / np.sqrt(dim)
    want = (ds @ np.repeat(f64(k), heads // kv_heads, axis=1),
            (ds.swapaxes(-1, -2) @ f64(q)).reshape(batch, kv_heads, -1, length, dim).sum(axis=2), np.zeros(v.shape))

    def local(x):
        return shard_sequence(x, group, axis=2, split=split)

    def z_loss(*qkv):
        lse = ring_attention(*qkv, group, causal=True, layout="BHSD", split=split, transport=transport,
                             return_lse=True)[1]
        return (lse * local(weights)).sum()

    grads = mx.grad(z_loss, argnums=(0, 1, 2))(*(local(x) for x in (q, k, v)))
    for grad, expected, key in zip(grads, want, ("dq", "dk", "dv")):
        _assert_close(grad, local(mx.array(expected.astype(np.float32))), f"{transport} {split} lse-only {key}")


def _assert_close(got: mx.array, want: mx.array, what: str) -> None:
    """Float32 sharded vs unsharded: 1e-4 on the CPU; on a GPU 1e-3 of the outputs' size (MLX's CUDA float32
    matmuls differ by up to 2.3e-4 at outputs of size 1 between the sharded and full shapes, H200, MLX
    0.32.4), which a wrong shard or a missing all_sum still fails."""
    error, size = np.abs(f64(got) - f64(want)).max(), np.abs(f64(want)).max()
    atol = 1e-3 * size if mx.default_device() == mx.gpu else 1e-4
    assert error <= atol, f"{what}: max error {error:.3g} (outputs up to {size:.3g})"


def check_tensor_parallel(group, kv_heads: int) -> None:
    dims, heads, batch, length = 32, 4, 2, 6
    full = Attention(dims, heads, num_kv_heads=kv_heads, bias=True)
    sharded = Attention(dims, heads, num_kv_heads=kv_heads, bias=True)
    sharded.update(full.parameters())
    sharded.shard(group)
    x, step, grad_out = (mx.random.normal((batch, n, dims)) for n in (length, 1, length))
    name = f"tensor parallel heads={heads} kv_heads={kv_heads} n={group.size()}"
    assert sharded.num_heads == heads // group.size(), name

    results = {}
    for key, model in (("full", full), ("sharded", sharded)):
        def loss(x):
            return (model(x, mask="causal") * grad_out).sum()

        value, dparams = nn.value_and_grad(model, loss)(x)
        dx = mx.grad(loss)(x)
        cache = KVCache()
        prefill = model(x, mask="causal", cache=cache)
        results[key] = dict(value=value, dparams=dparams, dx=dx, cache=cache, prefill=prefill,
                            decoded=model(step, cache=cache))
    got, want = results["sharded"], results["full"]
    assert np.allclose(got["value"].item(), want["value"].item(), rtol=1e-4), f"{name}: output"
    for stage in ("dx", "prefill", "decoded"):
        _assert_close(got[stage], want[stage], f"{name}: {stage}")
    rows = slice(group.rank() * dims // group.size(), (group.rank() + 1) * dims // group.size())
    _assert_close(got["dparams"]["q_proj"]["weight"], want["dparams"]["q_proj"]["weight"][rows],
                  f"{name}: q_proj gradient")
    _assert_close(got["dparams"]["o_proj"]["weight"], want["dparams"]["o_proj"]["weight"][:, rows],
                  f"{name}: o_proj gradient")
    local_kv = max(kv_heads // group.size(), 1)
    assert got["cache"].state[0].shape == (batch, local_kv, length + 1, dims // heads), f"{name}: cache heads"


def _dequantized(layer: Attention, dims: int, heads: int, kv_heads: int) -> Attention:
    """A float Attention holding the dequantized weights of ``layer``'s quantized projections."""
    plain = Attention(dims, heads, num_kv_heads=kv_heads)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        quantized = getattr(layer, name)
        weight = mx.dequantize(quantized.weight, quantized.scales, quantized.biases, group_size=quantized.group_size,
                               bits=quantized.bits)
        getattr(plain, name).weight = weight
    return plain


def check_quantized_tensor_parallel(group, kv_heads: int) -> None:
    """Quantized projections shard through MLX's quantized sharded layers: the sharded output is as
    close to the dequantized layer in float32 on the CPU as the unsharded output is (2x + floor)."""
    dims, heads = 128, 4
    full = Attention(dims, heads, num_kv_heads=kv_heads)
    nn.quantize(full, group_size=32, bits=8)
    sharded = Attention(dims, heads, num_kv_heads=kv_heads)
    nn.quantize(sharded, group_size=32, bits=8)
    sharded.update(full.parameters())
    sharded.shard(group)
    x = mx.random.normal((1, 5, dims))
    got, want = sharded(x, mask="causal"), full(x, mask="causal")
    with mx.stream(mx.cpu):
        exact = f64(_dequantized(full, dims, heads, kv_heads)(x, mask="causal"))
    # MLX's CUDA quantized matmul at the sharded shapes (H200, MLX 0.32.4: 2.4e-4 at |out| <= 0.4, one kv
    # head per rank) is less precise than at the full ones (3e-6): a relative floor of 1e-3 there, which a
    # wrong shard (errors of the outputs' own size) still fails.
    floor = 1e-3 if mx.default_device() == mx.gpu else 1e-5
    error, allowed = np.abs(f64(got) - exact).max(), 2 * np.abs(f64(want) - exact).max() + floor * np.abs(exact).max()
    assert error <= allowed, f"quantized tensor parallel kv_heads={kv_heads}: error {error:.3g} > {allowed:.3g}"


def check_large_ring_shift(group) -> None:
    """A 32 MB shift and its reverse: far past the socket buffers, where sends on one stream would deadlock."""
    rank, size = group.rank(), group.size()
    x = mx.full((1 << 23,), float(rank))
    (received,), (grad,) = mx.vjp(lambda x: ring_shift(x, group), [x], [mx.full((1 << 23,), float(10 * rank))])
    assert mx.all(received == (rank - 1) % size).item(), "ring_shift: wrong source"
    assert mx.all(grad == 10 * ((rank + 1) % size)).item(), "ring_shift: cotangent did not travel back"


def check_errors(group) -> None:
    """Calls that cannot be split across ``group`` fail before any communication, naming the argument."""
    q = mx.random.normal((1, 3, 2, 8))
    try:
        ring_attention(q, q, q, group, causal=True)
    except ValueError as error:
        assert "local length must be even" in str(error), error
    else:
        raise AssertionError("an odd local length was accepted by the zigzag split")
    try:
        gather_sequence(q, group, split="zigzag")
    except ValueError as error:
        assert "must be even; got x_local.shape[1] = 3" in str(error), error
    else:
        raise AssertionError("gather_sequence took an odd zigzag part (it would drop tokens)")
    try:
        Attention(16, 2 * group.size() + 1).shard(group)
    except ValueError as error:
        assert "num_heads" in str(error), error
    else:
        raise AssertionError("heads that do not split across the group were accepted")
    try:
        Attention(16, 2 * group.size()).shard(group).shard(group)
    except ValueError as error:
        assert "already sharded" in str(error), error
    else:
        raise AssertionError("a sharded layer was sharded again")


def main(case: str, backend: str = "ring") -> None:
    """``backend`` "nccl" (one GPU per rank) has no send/recv: only the gather transport's cases run."""
    group = mx.distributed.init(strict=True, backend=backend)
    mx.random.seed(1234)
    check_errors(group)
    if case == "ring":
        if backend != "nccl":
            check_large_ring_shift(group)
        for args in RING_CASES:
            if backend != "nccl" or args[0] == "gather":
                check_ring_case(group, *args)
        if backend != "nccl":
            check_lse_gradient(group, "ring", "contiguous")
    else:
        for kv_heads in (4, 2, 1):
            if kv_heads % group.size() == 0 or group.size() % kv_heads == 0:
                check_tensor_parallel(group, kv_heads)
                check_quantized_tensor_parallel(group, kv_heads)
    print(f"rank {group.rank()}/{group.size()} {case}: ok", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
