"""Tile configurations, the on-disk tuning cache and the autotuner.

A kernel declares its candidate configurations once (:class:`TuningSpace`): a
list of template-parameter dictionaries, a default per device family, and a
validity check (shared memory within the device limit, tiles dividing the head
dimension...). :func:`choose_config` answers "which configuration for this
call?" from, in order: the tuning cache, the family default, the global default.

The cache is one JSON file, ``$MLX_PRIMITIVES_CACHE_DIR/tuning.json`` (default
``~/.cache/mlx_primitives/``), keyed by device, MLX version, kernel, dtype and
shape bucket. It is read once per process; writes merge with the file on disk
under a lock and land atomically (temp file + rename), so two processes tuning at
once lose nothing. A corrupt, truncated or foreign file is ignored with one
warning and rewritten by the next store. Nothing in it is executed or unpickled:
entries are plain integers checked against the declared candidates.
``MLX_PRIMITIVES_AUTOTUNE=0`` makes every kernel use its default.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import mlx.core as mx

from .profile import DeviceProfile, device_profile

Config = Mapping[str, int]
FORMAT = "mlx_primitives.tuning"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TuningSpace:
    """The configurations a kernel may run with.

    Attributes:
        kernel: kernel name, the cache key's kernel part.
        candidates: template-parameter dictionaries, e.g. ``{"THREADS": 256, "VEC": 8}``.
        default: the configuration used when nothing better is known.
        family_defaults: per device family (``"sm_90"``, ``"apple-m3-max"``) defaults.
        invalid: ``invalid(config, profile, problem) -> reason or None``; rejects
            configurations the device or the problem cannot take.
    """

    kernel: str
    candidates: Sequence[Config]
    default: Config
    family_defaults: Mapping[str, Config] = field(default_factory=dict)
    invalid: Optional[Callable[[Config, DeviceProfile, Mapping[str, int]], Optional[str]]] = None

    def default_for(self, profile: DeviceProfile) -> Config:
        return self.family_defaults.get(profile.family, self.default)

    def valid_candidates(self, profile: DeviceProfile, problem: Mapping[str, int]) -> List[Config]:
        """Candidates that pass the validity check for ``problem`` on ``profile``."""
        if self.invalid is None:
            return list(self.candidates)
        return [c for c in self.candidates if self.invalid(c, profile, problem) is None]


def shape_bucket(problem: Mapping[str, int], exact: Sequence[str] = ()) -> str:
    """Cache key part of a problem: powers of two, except the ``exact`` dimensions (head dim)."""
    parts = []
    for name in sorted(problem):
        value = int(problem[name])
        if name not in exact and value > 1:
            value = 1 << (value - 1).bit_length()
        parts.append(f"{name}={value}")
    return ",".join(parts)


def cache_dir() -> str:
    return os.environ.get("MLX_PRIMITIVES_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "mlx_primitives"
    )


def autotune_enabled() -> bool:
    return os.environ.get("MLX_PRIMITIVES_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def write_atomically(path, text: str, mode: Optional[int] = None, prefix: str = "", suffix: str = ".tmp") -> None:
    """``text`` into ``path`` through a temporary file beside it and one rename, so a reader sees the old file
    or the new one, never part of one; ``mode``: the new file's permissions (else mkstemp's 0o600)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class TuningCache:
    """The JSON file of tuned configurations, cached in memory after the first read."""

    def __init__(self, path: Optional[str] = None):
        self.path = path or os.path.join(cache_dir(), "tuning.json")
        self._entries: Optional[Dict[str, dict]] = None
        self._lock = threading.Lock()
        self._warned = False

    def _read_file(self) -> Dict[str, dict]:
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, NotADirectoryError):  # no file (a file in a parent directory's place)
            return {}
        except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
            self._warn(f"unreadable ({error.__class__.__name__})")
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            self._warn("not an mlx_primitives tuning file of this version")
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            self._warn("it has no entries table")
            return {}
        return {k: v for k, v in entries.items() if _valid_entry(v)}

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"ignoring tuning cache {self.path}: {why}; it will be rewritten", stacklevel=3)

    def entries(self) -> Dict[str, dict]:
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    self._entries = self._read_file()
        return self._entries

    def get(self, key: str) -> Optional[dict]:
        return self.entries().get(key)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path + ".lock", "a") as lock:
            try:
                import fcntl

                fcntl.flock(lock, fcntl.LOCK_EX)
            except ImportError:  # no advisory locks (Windows): atomic rename still protects the file
                pass
            yield

    def store(self, updates: Mapping[str, dict]) -> None:
        """Merge ``updates`` into the file (re-read under the lock) and replace it atomically.

        Where the file can't be written (read-only or missing directory, a file in the directory's
        place), ``updates`` are kept for this process only, with one warning naming the path.
        """
        with self._lock:
            try:
                self._entries = self._write(updates)
            except OSError as error:
                warnings.warn(f"could not write tuning cache {self.path} ({error}); tuned configurations are "
                              "kept for this process only (set MLX_PRIMITIVES_CACHE_DIR to a writable directory)",
                              stacklevel=2)
                known = self._entries if self._entries is not None else self._read_file()
                self._entries = {**known, **updates}

    def _write(self, updates: Mapping[str, dict]) -> Dict[str, dict]:
        with self._file_lock():
            merged = self._read_file()
            merged.update(updates)
            payload = {"format": FORMAT, "version": FORMAT_VERSION, "entries": merged}
            write_atomically(self.path, json.dumps(payload, indent=1, sort_keys=True), prefix=".tuning-",
                             suffix=".json")
            return merged

    def clear(self) -> bool:
        """Remove the file (and its lock file); whether there was a file to remove."""
        with self._lock:
            existed = os.path.lexists(self.path)
            for path in (self.path, self.path + ".lock"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            self._entries = {}
            return existed


def _valid_entry(entry) -> bool:
    """A dict with a ``config`` of str -> int (bools are no ints here) and, if present, numeric timings."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("config"), dict)
        and all(isinstance(k, str) and type(v) is int for k, v in entry["config"].items())
        and all(type(entry.get(t, 0.0)) in (int, float) for t in ("ms", "default_ms"))
    )


_CACHE: Optional[TuningCache] = None


def tuning_cache() -> TuningCache:
    """The process-wide cache at :func:`cache_dir` (re-created when the directory changes)."""
    global _CACHE
    path = os.path.join(cache_dir(), "tuning.json")
    if _CACHE is None or _CACHE.path != path:
        _CACHE = TuningCache(path)
    return _CACHE


def dtype_name(dtype: mx.Dtype) -> str:
    """``"float16"`` for ``mx.float16``."""
    return str(dtype).rsplit(".", 1)[-1]


def cache_key(space: TuningSpace, dtype: mx.Dtype, bucket: str, profile: Optional[DeviceProfile] = None) -> str:
    profile = profile or device_profile()
    return f"{profile.name}|{profile.backend}|mlx-{mx.__version__}|{space.kernel}|{dtype_name(dtype)}|{bucket}"


def choose_config(space: TuningSpace, dtype: mx.Dtype, bucket: str) -> Config:
    """The configuration a kernel launch uses: tuned if cached and still declared, else the default."""
    profile = device_profile()
    if autotune_enabled():
        entry = tuning_cache().get(cache_key(space, dtype, bucket, profile))
        if entry is not None and entry["config"] in [dict(c) for c in space.candidates]:
            return entry["config"]
    return space.default_for(profile)


@dataclass
class TuneResult:
    kernel: str
    bucket: str
    dtype: str
    config: Config
    ms: float
    default_ms: float

    @property
    def speedup(self) -> float:
        return self.default_ms / self.ms if self.ms > 0 else float("nan")


def median_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 9) -> float:
    """Median wall time of ``fn()`` evaluated to completion."""
    for _ in range(warmup):
        mx.eval(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def autotune(
    space: TuningSpace,
    make_call: Callable[[Config], Callable[[], object]],
    problem: Mapping[str, int],
    dtype: mx.Dtype,
    bucket: str,
    repeats: int = 9,
    store: bool = True,
) -> TuneResult:
    """Time every valid candidate on ``problem`` and cache the fastest.

    Args:
        space: the kernel's declared configurations.
        make_call: ``make_call(config)`` returns a zero-argument callable running the
            kernel with ``config`` on representative inputs.
        problem: the dimensions the validity check sees (``{"L": 4096, "D": 128}``).
        dtype, bucket: the cache key's dtype and shape bucket.
    """
    profile = device_profile()
    default = dict(space.default_for(profile))
    candidates = [dict(c) for c in space.valid_candidates(profile, problem)]
    if default not in candidates:
        candidates.insert(0, default)
    timings = {}
    for config in candidates:
        timings[json.dumps(config, sort_keys=True)] = median_ms(make_call(config), repeats=repeats)
    best = min(timings, key=timings.get)
    result = TuneResult(space.kernel, bucket, dtype_name(dtype), json.loads(best), timings[best],
                        timings[json.dumps(default, sort_keys=True)])
    if store:
        tuning_cache().store({
            cache_key(space, dtype, bucket, profile): {
                "config": result.config, "ms": result.ms, "default_ms": result.default_ms,
            }
        })
    return result


@dataclass(frozen=True)
class TuningTask:
    """One (kernel, representative problem) the ``tune`` command times.

    ``make_call(config)`` builds inputs of the problem's shape and returns a
    zero-argument callable that runs the kernel with ``config``.
    """

    space: TuningSpace
    problem: Mapping[str, int]
    dtype: mx.Dtype
    bucket: str
    make_call: Callable[[Config], Callable[[], object]]


def run_tasks(tasks: Sequence[TuningTask], repeats: int = 9,
              progress: Optional[Callable[[int, int, TuningTask], None]] = None) -> List[TuneResult]:
    """Autotune each task in turn, storing every winner in the cache."""
    results = []
    for i, task in enumerate(tasks):
        if progress is not None:
            progress(i, len(tasks), task)
        results.append(autotune(task.space, task.make_call, task.problem, task.dtype, task.bucket, repeats))
    if progress is not None and tasks:
        progress(len(tasks), len(tasks), tasks[-1])
    return results
