"""Hardware detection: which device runs the kernels and what it can do."""

from .profile import (
    LARGEST_DYNAMIC_SHARED_MEMORY,
    DeviceProfile,
    detect_backend,
    device_profile,
    dynamic_shared_memory,
    profile_from_info,
    static_shared_memory,
)

__all__ = [
    "LARGEST_DYNAMIC_SHARED_MEMORY",
    "DeviceProfile",
    "detect_backend",
    "device_profile",
    "dynamic_shared_memory",
    "profile_from_info",
    "static_shared_memory",
]
