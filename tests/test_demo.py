"""The model demo: every variant runs, ours match mlx-lm's logits, the plot is written."""

import mlx.core as mx
import pytest

pytest.importorskip("mlx_lm")

from mlx_primitives import demo  # noqa: E402


def test_model_rows_compare_with_mlx_lm_and_plot(tmp_path):
    rows, paths = demo.model_rows(prompt_len=32, decode_steps=2, rounds=2)
    by_name = {row[0]: row for row in rows}
    assert list(by_name) == list(demo.VARIANTS)
    assert by_name["flash"][3] < 1e-3 and by_name["paged decode"][3] < 1e-3
    assert 0 < by_name["sage"][3] < 0.5  # INT8 q/k changes the logits a little, never wildly
    assert paths["paged decode"].startswith("paged") and paths["sage"].startswith("sage")
    # "flash" names the dispatcher's route; 4 layers x (1 prefill + 2 decode steps) calls a run.
    routes = dict(part.rsplit(" x", 1) for part in paths["flash"].split(", "))
    assert sum(map(int, routes.values())) == 12 and all(r.startswith("flash->") for r in routes)
    if not mx.default_device() == mx.gpu:
        assert demo.route_names(paths["flash"]) == ["flash->sdpa"]
    assert all(row[1] > 0 and row[2] > 0 for row in rows)
    assert demo.plot_rows(rows, str(tmp_path / "demo.png")) and (tmp_path / "demo.png").stat().st_size > 0
