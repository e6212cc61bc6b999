"""``python -m mlx_primitives tune`` as a user runs them (in process, CPU)."""

import json

import pytest

from mlx_primitives import cli
from mlx_primitives.hardware import tuning


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", str(tmp_path))
    yield


def test_unknown_kernel_is_a_usage_error_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", "--quick", "--kernels", "rms_norm", "nope"])
    assert exit_info.value.code == 2
    assert "unknown kernels ['nope']" in capsys.readouterr().err


def test_show_lists_entries_whose_key_is_not_ours_instead_of_crashing(tmp_path, capsys):
    (tmp_path / "tuning.json").write_text(json.dumps({"format": tuning.FORMAT, "version": tuning.FORMAT_VERSION,
                                                      "entries": {"hand-edited": {"config": {"TPR": 64}}}}))
    assert cli.main(["tune", "--show"]) == 0
    assert "hand-edited" in capsys.readouterr().out


def test_clear_says_whether_there_was_a_cache_and_reports_what_it_cannot_remove(tmp_path, capsys):
    tuning.tuning_cache().store({"k": {"config": {"TPR": 64}}})
    assert cli.main(["tune", "--clear"]) == 0
    assert capsys.readouterr().out.startswith("removed ")
    assert cli.main(["tune", "--clear"]) == 0
    assert capsys.readouterr().out.startswith("no tuning cache at ")
    (tmp_path / "tuning.json").mkdir()
    assert cli.main(["tune", "--clear"]) == 1
    assert "could not remove the tuning cache" in capsys.readouterr().err


def test_info_names_the_tuning_cache_and_whether_tuned_configs_are_used(tmp_path, monkeypatch, capsys):
    tuning.tuning_cache().store({"k": {"config": {"TPR": 64}}})
    monkeypatch.setenv("MLX_PRIMITIVES_AUTOTUNE", "0")
    assert cli.main(["info"]) == 0
    line = [row for row in capsys.readouterr().out.splitlines() if row.startswith("tuning")][0]
    assert f"1 cached configs in {tmp_path / 'tuning.json'}" in line and "off" in line


def test_bench_passes_its_options_to_the_benchmark_runner(monkeypatch):
    run = pytest.importorskip("benchmarks.run")
    seen = []
    monkeypatch.setattr(run, "main", seen.append)
    assert cli.main(["bench", "--suite", "kernels", "--quick"]) == 0
    assert seen == [["--suite", "kernels", "--quick"]]
    with pytest.raises(SystemExit):
        cli.main(["info", "--suite", "kernels"])


def test_tune_names_requested_kernels_it_has_no_task_for(monkeypatch, capsys):
    from mlx_primitives.hardware import profile_from_info
    from mlx_primitives.kernels import tuning as kernel_tuning

    gpu = profile_from_info("cuda", {"device_name": "NVIDIA H100 80GB HBM3", "architecture": "sm_90"})
    monkeypatch.setattr(cli, "device_profile", lambda: gpu)
    monkeypatch.setattr(kernel_tuning, "tuning_tasks", lambda quick, kernels: [])  # no GPU to time on here
    assert cli.main(["tune", "--kernels", "decode_attention"]) == 0
    assert "no tuning task for decode_attention: they run their default configuration" in capsys.readouterr().out
