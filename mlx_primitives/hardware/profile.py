"""What the local accelerator is: backend, name, family, memory and its limits.

``device_profile()`` reads ``mx.device_info()`` once and classifies the device so
that kernels can pick tile sizes and benchmarks can state the physical limit they
are measured against.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import mlx.core as mx

# Peak figures of known chips: (memory bandwidth GB/s, dense fp16 matrix TFLOP/s).
# Apple figures are the vendor's; NVIDIA's are the dense (non-sparse) SXM numbers.
_KNOWN_LIMITS = {
    "Apple M1": (68.0, 2.6),
    "Apple M1 Pro": (200.0, 5.2),
    "Apple M1 Max": (400.0, 10.4),
    "Apple M1 Ultra": (800.0, 20.8),
    "Apple M2": (100.0, 3.6),
    "Apple M2 Pro": (200.0, 6.8),
    "Apple M2 Max": (400.0, 13.6),
    "Apple M2 Ultra": (800.0, 27.2),
    "Apple M3": (100.0, 4.1),
    "Apple M3 Pro": (150.0, 7.4),
    "Apple M3 Max": (400.0, 16.4),
    "Apple M3 Ultra": (819.0, 28.4),
    "Apple M4": (120.0, 4.3),
    "Apple M4 Pro": (273.0, 9.2),
    "Apple M4 Max": (546.0, 18.4),
    "Apple M5": (153.0, 5.7),
    "NVIDIA H100 80GB HBM3": (3350.0, 989.0),
    "NVIDIA H100 PCIe": (2000.0, 756.0),
    "NVIDIA H200": (4800.0, 989.0),
    "NVIDIA A100-SXM4-80GB": (2039.0, 312.0),
    "NVIDIA A100-SXM4-40GB": (1555.0, 312.0),
    "NVIDIA GeForce RTX 4090": (1008.0, 165.0),
}

# Streaming multiprocessors of known NVIDIA chips (MLX's CUDA device info has no count): their gpu_cores.
_KNOWN_SM_COUNTS = {
    "NVIDIA H100 80GB HBM3": 132,
    "NVIDIA H100 PCIe": 114,
    "NVIDIA H200": 132,
    "NVIDIA A100-SXM4-80GB": 108,
    "NVIDIA A100-SXM4-40GB": 108,
    "NVIDIA GeForce RTX 4090": 128,
}


@dataclass(frozen=True)
class DeviceProfile:
    """The local device as the kernels and benchmarks see it.

    Attributes:
        backend: ``"metal"``, ``"cuda"`` or ``"cpu"``.
        name: the device name MLX reports (``"Apple M3 Max"``, ``"NVIDIA H100 80GB HBM3"``).
        family: the tuning family: ``"apple-m3-max"``, ``"sm_90"``, ``"cpu"``.
        memory_bytes: device (or unified) memory size, 0 when unknown.
        bandwidth_gbs: peak memory bandwidth in GB/s, ``None`` when unknown.
        matmul_tflops: peak dense fp16 matrix throughput, ``None`` when unknown.
        gpu_cores: GPU core count where MLX reports it (the SM count of known NVIDIA chips), else ``None``.
        info: the raw ``mx.device_info()`` dictionary.
    """

    backend: str
    name: str
    family: str
    memory_bytes: int
    bandwidth_gbs: Optional[float]
    matmul_tflops: Optional[float]
    gpu_cores: Optional[int] = None
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_gpu(self) -> bool:
        return self.backend in ("metal", "cuda")


def detect_backend() -> str:
    """The backend MLX runs on by default: ``"metal"``, ``"cuda"`` or ``"cpu"``."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    if hasattr(mx, "cuda") and mx.cuda.is_available():
        return "cuda"
    return "cpu"


def _apple_family(name: str) -> str:
    match = re.search(r"M(\d+)(?:\s+(Pro|Max|Ultra))?", name)
    if not match:
        return "apple"
    tier = f"-{match.group(2).lower()}" if match.group(2) else ""
    return f"apple-m{match.group(1)}{tier}"


def profile_from_info(backend: str, info: Mapping[str, Any]) -> DeviceProfile:
    """Classify a device from its ``mx.device_info()`` dictionary.

    Kept separate from the query so that recorded dictionaries of other machines
    can be classified too (tests use fixtures of Apple and NVIDIA devices).
    """
    name = str(info.get("device_name", "unknown"))
    memory = int(info.get("memory_size", info.get("total_memory", 0)) or 0)
    if backend == "cuda":
        arch = info.get("architecture")
        if not arch and "compute_capability_major" in info:
            arch = f"sm_{info['compute_capability_major']}{info['compute_capability_minor']}"
        family = str(arch or "cuda")
    elif backend == "metal":
        family = _apple_family(name)
    else:
        family = "cpu"
    bandwidth, tflops = _KNOWN_LIMITS.get(name, (None, None))
    if bandwidth is None and backend == "cuda":
        for known, limits in _KNOWN_LIMITS.items():
            if known in name or name in known:
                bandwidth, tflops = limits
                break
    cores = info.get("gpu_cores") or info.get("num_gpu_cores")
    if not cores and backend == "cuda":
        cores = _KNOWN_SM_COUNTS.get(name)
    return DeviceProfile(
        backend=backend,
        name=name,
        family=family,
        memory_bytes=memory,
        bandwidth_gbs=bandwidth,
        matmul_tflops=tflops,
        gpu_cores=int(cores) if cores else None,
        info=dict(info),
    )


# Static shared (threadgroup) memory one group may declare: 48 KiB on CUDA, 32 KiB on Apple GPUs.
_STATIC_SHARED_MEMORY = {"cuda": 48 * 1024, "metal": 32 * 1024}

# Dynamic shared memory one block may opt in to, per CUDA compute capability, in KiB (CUDA programming
# guide; 64, that of sm_75, for one not listed). Apple GPUs have no opt-in: their static 32 KiB.
_CUDA_DYNAMIC_SHARED_MEMORY = {"sm_80": 163, "sm_86": 99, "sm_87": 163, "sm_89": 99, "sm_90": 227, "sm_100": 227,
                               "sm_120": 99}
LARGEST_DYNAMIC_SHARED_MEMORY = max(_CUDA_DYNAMIC_SHARED_MEMORY.values()) * 1024


def static_shared_memory(backend: Optional[str] = None) -> int:
    """Bytes of static shared memory a kernel may declare on ``backend`` (default: the current one;
    CUDA's where unknown)."""
    return _STATIC_SHARED_MEMORY.get(backend or device_profile().backend, _STATIC_SHARED_MEMORY["cuda"])


def dynamic_shared_memory(profile: Optional[DeviceProfile] = None) -> int:
    """Bytes of shared memory a kernel taking dynamic shared memory may use on the device of ``profile``
    (default: the current device)."""
    profile = profile or device_profile()
    if profile.backend == "metal":
        return _STATIC_SHARED_MEMORY["metal"]
    family = profile.family.rstrip("af") if profile.backend == "cuda" else ""
    return _CUDA_DYNAMIC_SHARED_MEMORY.get(family, 64) * 1024


@functools.lru_cache(maxsize=1)
def device_profile() -> DeviceProfile:
    """The profile of the default device, computed once per process."""
    backend = detect_backend()
    device = mx.gpu if backend != "cpu" else mx.cpu
    try:
        info = mx.device_info(device)
    except (AttributeError, RuntimeError, ValueError):
        info = mx.metal.device_info() if backend == "metal" else {}
    if backend == "cpu" and "memory_size" not in info and hasattr(os, "sysconf"):
        info = dict(info, memory_size=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return profile_from_info(backend, info)
