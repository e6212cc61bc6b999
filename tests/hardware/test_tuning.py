"""Tuning cache, candidate validation, config choice and the autotuner."""

import json
import multiprocessing
import os
import warnings

import mlx.core as mx
import pytest

from mlx_primitives.hardware import device_profile
from mlx_primitives.hardware import tuning
from mlx_primitives.hardware.tuning import TuningSpace, autotune, choose_config, shape_bucket, tuning_cache


def _smem_check(config, profile, problem):
    if config["TILE"] * problem["D"] * 4 > 48 * 1024:
        return "shared memory over 48 KiB"
    if problem["D"] % config["VEC"]:
        return "VEC does not divide the head dim"
    return None


SPACE = TuningSpace(
    kernel="toy",
    candidates=[{"TILE": 32, "VEC": 4}, {"TILE": 64, "VEC": 8}, {"TILE": 512, "VEC": 8}, {"TILE": 64, "VEC": 3}],
    default={"TILE": 32, "VEC": 4},
    family_defaults={"sm_90": {"TILE": 64, "VEC": 8}},
    invalid=_smem_check,
)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MLX_PRIMITIVES_AUTOTUNE", raising=False)
    yield


def test_invalid_candidates_are_rejected_up_front():
    valid = SPACE.valid_candidates(device_profile(), {"D": 128})
    assert {"TILE": 512, "VEC": 8} not in valid  # 512 * 128 * 4 bytes > 48 KiB
    assert {"TILE": 64, "VEC": 3} not in valid  # 3 does not divide 128
    assert valid == [{"TILE": 32, "VEC": 4}, {"TILE": 64, "VEC": 8}]


def test_shape_bucket_rounds_lengths_up_to_powers_of_two_and_keeps_exact_dims():
    assert shape_bucket({"L": 3000, "D": 80}, exact=("D",)) == "D=80,L=4096"
    assert shape_bucket({"L": 4096, "D": 128}, exact=("D",)) == "D=128,L=4096"
    assert shape_bucket({"L": 4097}) == "L=8192"


def test_family_default_is_used_without_a_cache_entry():
    expected = SPACE.family_defaults.get(device_profile().family, SPACE.default)
    assert choose_config(SPACE, mx.float16, "L=1024") == expected


def _make_call(config):
    size = 64 * config["TILE"]
    x = mx.random.normal((size,))
    return lambda: mx.sum(x * x)


def test_autotune_stores_the_fastest_and_choose_config_reads_it(tmp_path):
    result = autotune(SPACE, _make_call, {"D": 128}, mx.float16, "L=1024", repeats=3)
    assert result.config in SPACE.valid_candidates(device_profile(), {"D": 128})
    assert result.ms <= result.default_ms
    data = json.loads((tmp_path / "tuning.json").read_text())
    assert data["format"] == tuning.FORMAT and len(data["entries"]) == 1
    tuning._CACHE = None  # a new process reads the file
    assert choose_config(SPACE, mx.float16, "L=1024") == result.config


def test_autotune_disabled_forces_the_default(monkeypatch):
    key = tuning.cache_key(SPACE, mx.float16, "L=2048")
    tuning_cache().store({key: {"config": {"TILE": 64, "VEC": 8}, "ms": 1.0, "default_ms": 2.0}})
    monkeypatch.setenv("MLX_PRIMITIVES_AUTOTUNE", "0")
    assert choose_config(SPACE, mx.float16, "L=2048") == SPACE.default_for(device_profile())


def test_cached_config_no_longer_declared_is_ignored():
    key = tuning.cache_key(SPACE, mx.float16, "L=2048")
    tuning_cache().store({key: {"config": {"TILE": 7, "VEC": 1}, "ms": 1.0, "default_ms": 2.0}})
    assert choose_config(SPACE, mx.float16, "L=2048") == SPACE.default_for(device_profile())


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "other", "entries": {}}', b"\xff\xfe", b"",
                                     b"[" * 100_000])
def test_corrupt_or_foreign_file_warns_once_and_is_rewritten(tmp_path, content):
    path = tmp_path / "tuning.json"
    path.write_bytes(content)
    cache = tuning.TuningCache(str(path))
    with pytest.warns(UserWarning, match="ignoring tuning cache"):
        assert cache.get("x") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.get("y") is None  # one warning only
    cache.store({"k": {"config": {"TILE": 32}, "ms": 1.0, "default_ms": 1.0}})
    data = json.loads(path.read_text())
    assert data["format"] == tuning.FORMAT and "k" in data["entries"]


def test_entries_with_non_integer_configs_are_dropped(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"format": tuning.FORMAT, "version": tuning.FORMAT_VERSION, "entries": {
        "good": {"config": {"TILE": 32}}, "bad": {"config": {"TILE": "__import__('os')"}}, "worse": [1, 2]}}))
    cache = tuning.TuningCache(str(path))
    assert cache.get("good") == {"config": {"TILE": 32}}
    assert cache.get("bad") is None and cache.get("worse") is None


def test_entries_with_bool_configs_or_non_numeric_timings_are_dropped(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"format": tuning.FORMAT, "version": tuning.FORMAT_VERSION, "entries": {
        "good": {"config": {"TILE": 32}, "ms": 1, "default_ms": 2.5}, "flag": {"config": {"TILE": True}},
        "slow": {"config": {"TILE": 32}, "ms": "fast"}}}))
    cache = tuning.TuningCache(str(path))
    assert set(cache.entries()) == {"good"}


def test_unwritable_cache_warns_and_keeps_the_result_for_this_process(tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("a file where the cache directory should be")
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", str(tmp_path / "blocker" / "cache"))
    with pytest.warns(UserWarning, match=r"could not write tuning cache .*blocker.*kept for this process only"):
        result = autotune(SPACE, _make_call, {"D": 128}, mx.float16, "L=1024", repeats=1)
    assert choose_config(SPACE, mx.float16, "L=1024") == result.config


def test_read_only_cache_keeps_its_entries_and_the_new_ones(tmp_path, monkeypatch):
    tuning_cache().store({"old": {"config": {"TILE": 32}}})
    cache = tuning.TuningCache(str(tmp_path / "tuning.json"))  # a new process: nothing read yet

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tuning.tempfile, "mkstemp", read_only)
    with pytest.warns(UserWarning, match="could not write tuning cache"):
        cache.store({"new": {"config": {"TILE": 64}}})
    assert set(cache.entries()) == {"old", "new"}


@pytest.mark.parametrize("value", ["OFF", "False", " 0 "])
def test_autotune_switch_ignores_case_and_spaces(monkeypatch, value):
    key = tuning.cache_key(SPACE, mx.float16, "L=2048")
    tuning_cache().store({key: {"config": {"TILE": 64, "VEC": 8}, "ms": 1.0, "default_ms": 2.0}})
    monkeypatch.setenv("MLX_PRIMITIVES_AUTOTUNE", value)
    assert choose_config(SPACE, mx.float16, "L=2048") == SPACE.default_for(device_profile())


def _writer(path, prefix, count):
    cache = tuning.TuningCache(path)
    for i in range(count):
        cache.store({f"{prefix}-{i}": {"config": {"TILE": i}, "ms": 1.0, "default_ms": 1.0}})


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "tuning.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, p, 25)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    entries = json.loads(open(path).read())["entries"]
    assert {f"{p}-{i}" for p in "ab" for i in range(25)} <= set(entries)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tuning-")]  # no temp files left


def test_clear_removes_the_file(tmp_path):
    tuning_cache().store({"k": {"config": {"TILE": 1}}})
    assert (tmp_path / "tuning.json").exists()
    tuning_cache().clear()
    assert not (tmp_path / "tuning.json").exists()
    assert tuning_cache().get("k") is None
