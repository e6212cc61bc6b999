"""Ring and tensor-parallel attention in 2 and 4 local processes over MLX's ring backend (loopback TCP).

Each launch runs every case of tests/distributed/worker.py on every rank; a rank whose part
differs from the float64 oracle (or from the single-process layer) exits non-zero with the case.
"""

import socket
import subprocess

import mlx.core as mx
import pytest

from mlx_primitives.distributed import launch_local


def _loopback_tcp() -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        return True
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(not mx.distributed.is_available("ring"),
                       reason="this MLX build has no ring (TCP) distributed backend"),
    pytest.mark.skipif(not _loopback_tcp(), reason="no TCP on 127.0.0.1 for the ring backend's ranks"),
]


def _launch(size, args, backend, timeout):
    try:
        return launch_local(size, args, backend=backend, timeout=timeout, capture=True)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"ranks still running after {timeout} s, killed:\n{error.output[-2000:]}\n{error.stderr[-4000:]}")


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("case", ["ring", "tensor"])
def test_ranks_match_single_process_attention(case, size):
    ranks = _launch(size, ["-m", "tests.distributed.worker", case], "ring", 120)
    failed = [f"rank {r}: {p.stderr.strip()[-2000:]}" for r, p in enumerate(ranks) if p.returncode != 0]
    assert not failed, "\n".join(failed)
    assert all(f"{case}: ok" in p.stdout for p in ranks)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["ring", "tensor"])
def test_nccl_ranks_match_single_process_attention(case):
    """One GPU per rank over MLX's NCCL backend (2 GPUs; skipped with fewer)."""
    if not mx.distributed.is_available("nccl") or mx.device_count(mx.gpu) < 2:
        pytest.skip("needs MLX's NCCL backend and 2 GPUs")
    ranks = _launch(2, ["-m", "tests.distributed.worker", case, "nccl"], "nccl", 300)
    failed = [f"rank {r}: {p.stderr.strip()[-2000:]}" for r, p in enumerate(ranks) if p.returncode != 0]
    assert not failed, "\n".join(failed)
    assert all(f"{case}: ok" in p.stdout for p in ranks)


def test_ring_benchmark_launches_its_ranks():
    from benchmarks.ring import measure

    config = dict(lengths=(64,), heads=2, kv_heads=1, head_dim=16, dtype="float32", transport="gather")
    (table,) = measure(2, config)
    assert [row[0] for row in table.rows] == [64] and all(ms > 0 for ms in (table.rows[0][1], table.rows[0][3]))
