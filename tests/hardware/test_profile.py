"""Device classification from recorded ``mx.device_info()`` dictionaries."""

import pytest

from mlx_primitives.hardware import device_profile, dynamic_shared_memory, profile_from_info, static_shared_memory

FIXTURES = [
    ("metal", {"device_name": "Apple M3 Max", "architecture": "applegpu_g15s", "memory_size": 128 * 2**30},
     "apple-m3-max", 400.0),
    ("metal", {"device_name": "Apple M1", "architecture": "applegpu_g13g", "memory_size": 16 * 2**30},
     "apple-m1", 68.0),
    ("metal", {"device_name": "Apple M4 Pro", "architecture": "applegpu_g16s", "memory_size": 48 * 2**30},
     "apple-m4-pro", 273.0),
    ("metal", {"device_name": "Apple M2 Ultra", "architecture": "applegpu_g14d", "memory_size": 192 * 2**30},
     "apple-m2-ultra", 800.0),
    ("cuda", {"device_name": "NVIDIA H100 80GB HBM3", "architecture": "sm_90", "total_memory": 85 * 10**9,
              "compute_capability_major": 9, "compute_capability_minor": 0}, "sm_90", 3350.0),
    ("cuda", {"device_name": "NVIDIA A100-SXM4-80GB", "compute_capability_major": 8,
              "compute_capability_minor": 0, "total_memory": 80 * 10**9}, "sm_80", 2039.0),
    ("cuda", {"device_name": "Some Future GPU", "architecture": "sm_120", "total_memory": 10**9}, "sm_120", None),
    ("cpu", {"device_name": "AMD EPYC", "architecture": "x86_64"}, "cpu", None),
]


@pytest.mark.parametrize("backend,info,family,bandwidth", FIXTURES)
def test_profile_classifies_recorded_devices(backend, info, family, bandwidth):
    profile = profile_from_info(backend, info)
    assert profile.family == family
    assert profile.bandwidth_gbs == bandwidth
    assert profile.memory_bytes == info.get("memory_size", info.get("total_memory", 0))
    assert profile.is_gpu == (backend != "cpu")


def test_local_profile_is_cached_and_consistent():
    first = device_profile()
    assert first is device_profile()
    assert first.backend in ("metal", "cuda", "cpu")
    assert first.name


@pytest.mark.parametrize("backend, info, dynamic", [
    ("cuda", {"device_name": "NVIDIA H100 80GB HBM3", "architecture": "sm_90a"}, 227 * 1024),
    ("cuda", {"device_name": "NVIDIA A100-SXM4-80GB", "architecture": "sm_80"}, 163 * 1024),
    ("cuda", {"device_name": "NVIDIA T4", "architecture": "sm_75"}, 64 * 1024),
    ("metal", {"device_name": "Apple M3 Max"}, 32 * 1024),
])
def test_shared_memory_limits_follow_the_profile(backend, info, dynamic):
    profile = profile_from_info(backend, info)
    assert dynamic_shared_memory(profile) == dynamic
    assert static_shared_memory(backend) == {"cuda": 48 * 1024, "metal": 32 * 1024}[backend]
