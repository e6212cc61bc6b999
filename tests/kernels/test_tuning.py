"""Kernel launches take their template values from the tuning cache."""

import mlx.core as mx
import pytest

from mlx_primitives.hardware import tuning
from mlx_primitives.kernels import catalog, glu, matmul
from mlx_primitives.kernels.tuning import SPACES, tuning_tasks


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MLX_PRIMITIVES_AUTOTUNE", raising=False)
    tuning._CACHE = None
    yield
    tuning._CACHE = None


def _template(launch):
    return dict(launch.template)


def test_every_catalog_kernel_has_a_tuning_space_with_its_default():
    assert set(SPACES) == {k.name for k in catalog.KERNELS}
    for kernel in catalog.KERNELS:
        space = SPACES[kernel.name]
        assert space.default == catalog.DEFAULTS.get(kernel.name, {})
        assert list(space.candidates) == kernel.configs()


def test_glu_plan_uses_the_tuned_config_of_its_bucket_and_the_default_elsewhere(monkeypatch):
    gate = mx.zeros((3000,), mx.float16)
    tuned = {"ITEMS": 4, "THREADS": 512}
    key = tuning.cache_key(SPACES["glu"], mx.float16, "N=4096")
    tuning.tuning_cache().store({key: {"config": tuned, "ms": 1.0, "default_ms": 2.0}})
    assert {k: _template(glu.plan(gate, gate, "silu"))[k] for k in tuned} == tuned
    other = mx.zeros((100,), mx.float16)  # bucket N=128: not tuned
    assert {k: _template(glu.plan(other, other, "silu"))[k] for k in tuned} == catalog.DEFAULTS["glu"]
    monkeypatch.setenv("MLX_PRIMITIVES_AUTOTUNE", "0")
    assert {k: _template(glu.plan(gate, gate, "silu"))[k] for k in tuned} == catalog.DEFAULTS["glu"]


def test_explicit_config_overrides_the_tuned_one():
    a = mx.zeros((40, 40), mx.float16)
    key = tuning.cache_key(SPACES["tiled_matmul"], mx.float16, "K=64,M=64,N=64")
    tuning.tuning_cache().store({key: {"config": {"BM": 128, "BN": 128, "WM": 2, "WN": 4}}})
    assert _template(matmul.plan(a, a))["BM"] == 128
    assert _template(matmul.plan(a, a, {"BM": 32, "BN": 32, "WM": 1, "WN": 2}))["BM"] == 32


def test_matmul_space_rejects_warp_tiles_that_do_not_divide_the_block():
    from mlx_primitives.hardware import device_profile

    space = SPACES["tiled_matmul"]
    assert space.invalid({"BM": 16, "BN": 32, "WM": 2, "WN": 2}, device_profile(), {}) is not None
    assert space.invalid({"BM": 32, "BN": 8, "WM": 1, "WN": 2}, device_profile(), {}) is not None
    valid = space.valid_candidates(device_profile(), {})
    assert valid and all(c["BM"] % (c["WM"] * 16) == 0 and c["BN"] % (c["WN"] * 8) == 0 for c in valid)


def test_tuning_tasks_cover_the_requested_kernels():
    tasks = tuning_tasks(quick=True, kernels=["glu", "rope"])
    assert sorted(t.space.kernel for t in tasks) == ["glu", "rope"]
    with pytest.raises(ValueError, match="unknown kernels"):
        tuning_tasks(quick=True, kernels=["nope"])
