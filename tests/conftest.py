"""Shared test configuration: GPU tests skip cleanly where MLX has no GPU backend; hypothesis is derandomized."""

import zlib

import os

import mlx.core as mx
import pytest
from hypothesis import settings

from mlx_primitives.hardware import detect_backend

# The suite is deterministic (CI must not turn red on a newly drawn example); HYPOTHESIS_PROFILE=explore
# draws new examples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
