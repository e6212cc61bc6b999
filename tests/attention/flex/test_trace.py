"""The tracer: expressions that compute what MLX computes, captured arrays as inputs, honest refusals."""

import shutil
import subprocess
import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention.flex import Untraceable, create_block_mask, flex_attention, flex_route, mods
from mlx_primitives.attention.flex import api
from mlx_primitives.attention.flex.trace import trace_mods
from mlx_primitives.kernels.flex_attention import flex_kernel
from mlx_primitives.kernels.launcher import SRC
from tests.attention.flex.oracle import flex64, grids
from tests.reference import random_qkv

TABLE = mx.array(np.random.default_rng(0).normal(size=(3, 11)).astype(np.float32))
IDS = mx.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 4], mx.int32)


def _arith_mod(score, b, h, q_idx, kv_idx):
    shifted = (q_idx - 2 * kv_idx) // 3 + (kv_idx - q_idx) % 4 - (-q_idx) // 5
    bias = mx.where((q_idx > kv_idx) | ~(h == 1), mx.abs(shifted) * 0.25, -mx.exp(score / 4))
    return mx.maximum(mx.minimum(score, 2.0), -2.0) * 0.5 + bias + mx.tanh(score) - mx.log(b + 1.5)


def _table_mod(score, b, h, q_idx, kv_idx):
    return score + TABLE[h, mx.clip(kv_idx - q_idx, -5, 5) + 5] * (IDS[q_idx] != IDS[kv_idx])


SCORE_MODS = [_arith_mod, _table_mod, mods.compose(mods.alibi(mx.array([0.5, 0.1, 0.2])), mods.softcap(3.0))]
MASK_MODS = [mods.document(IDS, causal=True), mods.and_masks(mods.prefix_lm(3), mods.sliding_window(4)),
             mods.or_masks(mods.causal(), lambda b, h, q, k: (q ^ k) & 1 == 0)]

_HARNESS = """
#include <cmath>
#include <cstddef>
#include <cstdio>
#define KFN inline
KFN float k_exp(float x) { return std::exp(x); }
KFN float k_tanh(float x) { return std::tanh(x); }
KFN float k_log2(float x) { return std::log2(x); }
KFN float bits_to_float(int bits) { float f; __builtin_memcpy(&f, &bits, 4); return f; }
%(flex_inc)s
int main() {
%(captures)s
  for (int b = 0; b < 2; ++b) for (int h = 0; h < 3; ++h) for (int q_idx = 0; q_idx < 12; ++q_idx)
    for (int kv_idx = 0; kv_idx < 12; ++kv_idx) {
      const float score = 0.37f * (q_idx - kv_idx) + 0.11f * h - 0.5f * b;
      std::printf("%%.7g %%d\\n", double(%(score)s), int(%(mask)s));
    }
}
"""


def _captures_code(arrays):
    lines = []
    for i, array in enumerate(arrays):
        ctype = "float" if mx.issubdtype(array.dtype, mx.floating) else "int"
        values = ", ".join(repr(float(x)) if ctype == "float" else str(int(x)) for x in np.array(array).reshape(-1))
        lines.append(f"  const {ctype} flex_cap{i}[] = {{{values}}};")
        lines.append(f"  const int flex_cap{i}_shape[] = {{{', '.join(map(str, array.shape))}}};")
    return "\n".join(lines)


@pytest.mark.skipif(shutil.which("clang++") is None, reason="needs clang++ to run the generated C")
@pytest.mark.parametrize("which", range(3))
def test_generated_expressions_compute_what_mlx_computes(tmp_path, which):
    score_mod, mask_mod = SCORE_MODS[which], MASK_MODS[which]
    score, mask, captures = trace_mods(score_mod, mask_mod)
    source = _HARNESS % {"flex_inc": (SRC / "flex.inc").read_text(), "captures": _captures_code(captures),
                         "score": score, "mask": mask}
    (tmp_path / "h.cpp").write_text(source)
    subprocess.run(["clang++", "-std=c++17", "-O0", "-o", str(tmp_path / "h"), str(tmp_path / "h.cpp")], check=True)
    printed = np.array([line.split() for line in subprocess.run([str(tmp_path / "h")], capture_output=True,
                                                                  text=True, check=True).stdout.splitlines()], float)
    b, h, q, k = (mx.array(g.astype(np.int32)) for g in grids(2, 3, 12, 12))
    s = 0.37 * (q - k).astype(mx.float32) + 0.11 * h.astype(mx.float32) - 0.5 * b.astype(mx.float32)
    expected_score = np.broadcast_to(np.array(score_mod(s, b, h, q, k)), (2, 3, 12, 12)).reshape(-1)
    expected_mask = np.broadcast_to(np.array(mask_mod(b, h, q, k)), (2, 3, 12, 12)).reshape(-1)
    np.testing.assert_allclose(printed[:, 0], expected_score, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(printed[:, 1].astype(bool), expected_mask)


def test_captured_arrays_become_slots_in_first_use_order():
    slopes = mx.array([0.1, 0.2])
    score, mask, captures = trace_mods(mods.alibi(slopes), mods.document(IDS))
    assert [c is slopes for c in captures] == [True, False] and captures[1] is IDS
    assert "flex_cap0" in score and "flex_cap1" in mask and "flex_cap1_shape[0]" in mask


def test_same_mods_share_one_compiled_kernel():
    first = trace_mods(mods.alibi(mx.array([0.1])), mods.causal())
    second = trace_mods(mods.alibi(mx.array([0.7])), mods.causal())
    assert first[:2] == second[:2]
    assert flex_kernel(first[0], first[1], 1, (128, 128)) is flex_kernel(second[0], second[1], 1, (128, 128))
    assert flex_kernel(first[0], first[1], 1, (128, 128)) is not flex_kernel(first[0], first[1], 1, (64, 128))


def _branching(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return True
    return False


def _unsupported_op(score, b, h, q_idx, kv_idx):
    return mx.sin(score)


def _own_array(score, b, h, q_idx, kv_idx):
    return score + mx.array(1.0) * q_idx


@pytest.mark.parametrize("score_mod, mask_mod, reason", [
    (None, _branching, "data-dependent Python control flow"),
    (_unsupported_op, None, "ValueError|TypeError"),
    (_own_array, None, "ValueError|TypeError|did not capture"),
])
def test_untraceable_mods_say_why(score_mod, mask_mod, reason):
    with pytest.raises(Untraceable, match=reason):
        trace_mods(score_mod, mask_mod)


def test_untraceable_mod_runs_on_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(api, "device_profile", lambda: type("Profile", (), {"backend": "cuda"})())
    q, k, v = random_qkv(1, 64, 64, 2, 2, 64, dtype=mx.float16, layout="BHSD")

    def wavy(score, b, h, q_idx, kv_idx):
        return score + mx.sin(q_idx.astype(mx.float32) - kv_idx)

    route = flex_route(q, k, v, score_mod=wavy)
    assert route.path == "reference" and "do not trace" in route.reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [flex_attention(q, k, v, score_mod=wavy) for _ in range(3)]
    assert len(caught) == 1 and "do not trace" in str(caught[0].message)
    ref = flex64(q, k, v, 0.125, lambda s, b, h, qi, ki: s + np.sin(qi - ki))
    np.testing.assert_allclose(np.array(outs[-1].astype(mx.float32)), ref["out"], atol=5e-3)
