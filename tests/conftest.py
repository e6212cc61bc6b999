"""Shared test configuration: GPU tests skip cleanly where MLX has no GPU backend."""

import zlib

import mlx.core as mx
import pytest

from mlx_primitives.hardware import detect_backend


def pytest_collection_modifyitems(config, items):
    backend = detect_backend()
    if backend in ("metal", "cuda"):
        return
    skip = pytest.mark.skip(reason=f"needs a GPU backend (Metal or CUDA); MLX runs on {backend} here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws fresh random inputs, reproducible from its node id."""
    mx.random.seed(zlib.crc32(request.node.nodeid.encode()))
    yield
