"""The flash kernel's backward (dq, dk, dv, ALiBi slopes, sinks) and in-kernel dropout.

GPU tests: gradients of the kernel path against the float64 oracle's analytic gradients under the
flash-attention rule (tests/reference.py), for every feature set, head dim, dtype, GQA group size,
odd and unequal lengths and backward tile config; the kernels must really run (no fallback). The
dropout tests read the kernel's keep mask back through one-hot values and compare it bit for bit
with the reference path's. CPU tests check the kernel path's wiring (the launcher falls back).
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention.dropout import draw_seed
from mlx_primitives.attention.reference import attention_probabilities, reference_attention
from mlx_primitives.attention.spec import describe_attention
from mlx_primitives.hardware import device_profile, dynamic_shared_memory
from mlx_primitives.kernels import catalog
from mlx_primitives.kernels import flash_attention as fa
from mlx_primitives.kernels.flash_backward import SHARED_MEMORY
from tests.attention.test_flash_kernel import no_fallback  # noqa: F401 (fixture)
from tests.attention.test_gradients import check_gradients
from tests.reference import (
    FEATURE_SETS,
    as_flash_attention_kwargs,
    assert_within_rule,
    attention64,
    draw_features,
    f64,
    naive_attention,
)


def kernel_fn(kwargs, dropout_seed=None, backward_configs=None):
    """``(q, k, v) -> out`` through the flash kernel (BHSD)."""

    def fn(q, k, v):
        spec = describe_attention(q, k, v, **as_flash_attention_kwargs(kwargs))
        return fa.flash_attention(q, k, v, spec, dropout_seed=dropout_seed, backward_configs=backward_configs)[0]

    return fn


def check(feature="plain", dtype=mx.float16, batch=2, heads=4, kv_heads=2, q_len=70, k_len=133, head_dim=64,
          backward_configs=None):
    q, k, v = (mx.random.normal((batch, h, n, head_dim)).astype(dtype)
               for h, n in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len)))
    kwargs, f = draw_features(FEATURE_SETS[feature], batch, heads)
    return check_gradients(kernel_fn(kwargs, backward_configs=backward_configs), q, k, v, f, layout="BHSD")


# Few distinct kernel templates: each costs a compilation of three kernels on the GPU.
@pytest.mark.gpu
@pytest.mark.parametrize(
    "head_dim,dtype,feature",
    [(64, mx.float16, "everything"), (80, mx.bfloat16, "everything"), (96, mx.float16, "everything"),
     (128, mx.bfloat16, "everything"), (256, mx.float16, "everything"), (128, mx.float16, "plain"),
     (256, mx.bfloat16, "plain")],
    ids=str,
)
def test_every_head_dim_and_dtype(no_fallback, head_dim, dtype, feature):
    check(feature, dtype, head_dim=head_dim)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "feature",
    ["causal", "window", "window_left", "window_right", "softcap", "alibi", "alibi_batch", "sinks",
     "softcap_alibi_window"],
)
def test_feature_sets(no_fallback, feature):
    check(feature)


@pytest.mark.gpu
@pytest.mark.parametrize("q_len,k_len", [(1, 1), (17, 17), (1, 100), (100, 1), (37, 100), (100, 37)])
@pytest.mark.parametrize("feature", ["plain", "causal", "causal_window"])
def test_odd_lengths_both_ways(no_fallback, q_len, k_len, feature):
    check(feature, q_len=q_len, k_len=k_len, head_dim=80)


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
@pytest.mark.parametrize("feature", ["causal", "everything"])
def test_gqa_sums_dk_dv_over_the_group(no_fallback, groups, feature):
    check(feature, heads=8, kv_heads=8 // groups, q_len=65, k_len=130, head_dim=96)


def _configs(kernel, warpgroup_kernel):
    """Every config of a backward kernel (``"WG": 0``) and, on sm_90, of its warpgroup variant."""
    configs = [(kernel.name, {"WG": 0, **c}) for c in kernel.configs()]
    p = device_profile()
    if p.backend == "cuda" and p.family == "sm_90":
        configs += [(warpgroup_kernel.name, {"WG": 1, **c}) for c in warpgroup_kernel.configs()]
    return configs


_DQ_CONFIGS = _configs(catalog.FLASH_BWD_DQ, catalog.FLASH_BWD_DQ_WG)
_DKDV_CONFIGS = _configs(catalog.FLASH_BWD_DKDV, catalog.FLASH_BWD_DKDV_WG)


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(max(len(_DQ_CONFIGS), len(_DKDV_CONFIGS))))
def test_every_backward_config(no_fallback, index):
    """Every config of both kernels at least once (the shorter list cycles), where it fits this device."""
    (dq_name, dq), (dkdv_name, dkdv) = _DQ_CONFIGS[index % len(_DQ_CONFIGS)], _DKDV_CONFIGS[index % len(_DKDV_CONFIGS)]
    limit = dynamic_shared_memory()
    if SHARED_MEMORY[dq_name](64, dq) > limit or SHARED_MEMORY[dkdv_name](64, dkdv) > limit:
        pytest.skip(f"{dq} / {dkdv} need more than the {limit} bytes of shared memory here")
    check("softcap_alibi_window", q_len=50, k_len=77, backward_configs=(dq, dkdv))


def _loss_weights(batch, heads, q_len, head_dim):
    return mx.random.normal((batch, heads, q_len, head_dim)), mx.random.normal((batch, heads, q_len))


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["alibi", "alibi_batch", "everything"])
def test_alibi_slopes_and_sinks_get_the_float64_gradient(no_fallback, feature):
    q, k, v = (mx.random.normal((2, h, n, 64)).astype(mx.float16) for h, n in ((4, 33), (2, 47), (2, 47)))
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, 4)
    w, _ = _loss_weights(2, 4, 33, 64)
    options = as_flash_attention_kwargs(kwargs)

    def loss(slopes, *sinks):
        spec = describe_attention(q, k, v, **{**options, "alibi_slopes": slopes, "sinks": sinks[0] if sinks else None})
        return (fa.flash_attention(q, k, v, spec)[0] * w).astype(mx.float32).sum()

    primals = [options["alibi_slopes"]] + ([options["sinks"]] if "sinks" in options else [])
    grads = mx.grad(loss, argnums=tuple(range(len(primals))))(*primals)
    grads = grads if isinstance(grads, (list, tuple)) else [grads]  # MLX returns a lone gradient bare
    qn, kn, vn, wn = (f64(x) for x in (q, k, v, w))

    def loss64(slopes):
        f.alibi_slopes = slopes
        return float((attention64(qn, kn, vn, f)["out"] * wn).sum())

    slopes, eps = f64(options["alibi_slopes"]), 1e-5
    expected = np.zeros_like(slopes)
    for index in np.ndindex(slopes.shape):
        step = np.zeros_like(slopes)
        step[index] = eps
        expected[index] = (loss64(slopes + step) - loss64(slopes - step)) / (2 * eps)
    f.alibi_slopes = slopes
    np.testing.assert_allclose(f64(grads[0]), expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())
    if f.sinks is not None:
        dsinks = attention64(qn, kn, vn, f, grad_out=wn)["dsinks"]
        np.testing.assert_allclose(f64(grads[1]), dsinks, rtol=2e-2, atol=2e-2 * np.abs(dsinks).max())


@pytest.mark.gpu
@pytest.mark.parametrize("feature", ["causal_window", "everything"])
def test_lse_cotangent_reaches_q_and_k(no_fallback, feature):
    """A loss on lse too: the kernels' gradients match the reference path's (float32 inside)."""
    q, k, v = (mx.random.normal((1, h, n, 64)).astype(mx.float16) for h, n in ((4, 40), (2, 61), (2, 61)))
    kwargs, _ = draw_features(FEATURE_SETS[feature], 1, 4)
    spec = describe_attention(q, k, v, **as_flash_attention_kwargs(kwargs))
    w, u = _loss_weights(1, 4, 40, 64)

    def loss(attend):
        def fn(q, k, v):
            out, lse = attend(q, k, v, spec)
            return (out * w).astype(mx.float32).sum() + (lse * u).sum()

        return mx.grad(fn, argnums=(0, 1, 2))(q, k, v)

    ours, theirs = loss(fa.flash_attention), loss(reference_attention)
    for name, a, b in zip("qkv", ours, theirs):
        scale = float(mx.abs(b.astype(mx.float32)).max())
        error = float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())
        assert error <= 2e-2 * scale, f"d{name}: {error:.3g} vs max {scale:.3g}"


def _dropout_call(dtype, q_len, k_len, groups, feature, p):
    heads, kv_heads = 4, 4 // groups
    q = (0.3 * mx.random.normal((2, heads, q_len, 64))).astype(dtype)
    k = mx.random.normal((2, kv_heads, k_len, 64)).astype(dtype)
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, heads)
    spec = describe_attention(q, k, k, dropout_p=p, **as_flash_attention_kwargs(kwargs))
    return q, k, kwargs, f, spec


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,feature,groups",
    [(mx.float16, "plain", 1), (mx.bfloat16, "causal", 2), (mx.float16, "softcap_alibi_window", 4)],
    ids=str,
)
def test_kernel_keep_mask_equals_the_reference_bit_for_bit(no_fallback, dtype, feature, groups):
    """With one-hot values (v_j = e_j) out[i, j] is weight (i, j) after dropout: zero exactly where dropped."""
    q, k, _, _, spec = _dropout_call(dtype, 45, 57, groups, feature, 0.3)
    seed = draw_seed(mx.random.key(7))
    v = mx.broadcast_to(mx.eye(57, 64, dtype=dtype), k.shape)
    out, _ = fa.flash_attention(q, k, v, spec, dropout_seed=seed)
    probs = attention_probabilities(q, k, spec, seed)  # dropped weights negated
    visible = np.array(probs != 0)
    kept = np.array(probs > 0)
    ours = np.array(out[..., :57] != 0)
    assert visible.sum() > 1000 and 0.6 < kept.sum() / visible.sum() < 0.8
    assert np.array_equal(ours[visible], kept[visible])


@pytest.mark.gpu
@pytest.mark.parametrize("feature,groups", [("plain", 1), ("causal", 2), ("everything", 4)])
def test_dropout_forward_and_gradients_match_float64_with_the_keep_mask(no_fallback, feature, groups):
    p = 0.2
    q, k, kwargs, f, spec = _dropout_call(mx.float16, 50, 71, groups, feature, p)
    v = mx.random.normal(k.shape).astype(mx.float16)
    seed = draw_seed(mx.random.key(3))
    f.keep = np.array(attention_probabilities(q, k, spec, seed) >= 0)
    f.dropout_p = p
    out, _ = fa.flash_attention(q, k, v, spec, dropout_seed=seed)
    ref = attention64(f64(q), f64(k), f64(v), f)
    assert_within_rule(out, ref["out"], naive_attention(q, k, v, f)[0], mx.float16, "out")
    check_gradients(kernel_fn({**kwargs, "dropout_p": p}, dropout_seed=seed), q, k, v, f, layout="BHSD")


def test_kernel_path_gradients_equal_the_reference_path_on_cpu():
    """Without a GPU every launch falls back: the custom VJP's wiring (extras, lse cotangent, sinks)."""
    q, k, v = (mx.random.normal((2, h, n, 32)).astype(mx.float16) for h, n in ((4, 9), (2, 11), (2, 11)))
    kwargs, f = draw_features(FEATURE_SETS["everything"], 2, 4)
    options = as_flash_attention_kwargs(kwargs)
    w, u = _loss_weights(2, 4, 9, 32)
    seed = draw_seed(mx.random.key(1))

    def loss(attend, **extra):
        def fn(q, k, v, slopes, sinks):
            spec = describe_attention(q, k, v, dropout_p=0.25, **{**options, "alibi_slopes": slopes, "sinks": sinks})
            out, lse = attend(q, k, v, spec, seed, **extra)
            return (out * w).astype(mx.float32).sum() + (lse * u).sum()

        return mx.grad(fn, argnums=tuple(range(5)))(q, k, v, options["alibi_slopes"], options["sinks"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ours = loss(lambda q, k, v, spec, seed: fa.flash_attention(q, k, v, spec, dropout_seed=seed))
    theirs = loss(reference_attention)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        scale = float(mx.abs(b.astype(mx.float32)).max())
        assert float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max()) <= 1e-3 * scale
