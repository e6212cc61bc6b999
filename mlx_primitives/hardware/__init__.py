"""Hardware detection: which device runs the kernels and what it can do."""

from .profile import DeviceProfile, detect_backend, device_profile, profile_from_info

__all__ = ["DeviceProfile", "detect_backend", "device_profile", "profile_from_info"]
