"""Ring and tensor-parallel attention in 2 and 4 local processes over MLX's ring backend (loopback TCP).

Each launch runs every case of tests/distributed/worker.py on every rank; a rank whose part
differs from the float64 oracle (or from the single-process layer) exits non-zero with the case.
"""

import mlx.core as mx
import pytest

from mlx_primitives.distributed import launch_local

pytestmark = pytest.mark.skipif(
    not mx.distributed.is_available("ring"), reason="this MLX build has no ring (TCP) distributed backend"
)


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("case", ["ring", "tensor"])
def test_ranks_match_single_process_attention(case, size):
    ranks = launch_local(size, ["-m", "tests.distributed.worker", case], backend="ring", timeout=120, capture=True)
    failed = [f"rank {r}: {p.stderr.strip()[-2000:]}" for r, p in enumerate(ranks) if p.returncode != 0]
    assert not failed, "\n".join(failed)
    assert all(f"{case}: ok" in p.stdout for p in ranks)
