"""The prefill flash kernel against float64 attention, and the dispatcher's routes to it.

GPU tests compare every feature with a float64 NumPy oracle under the flash-attention rule: the
kernel's max error may be at most twice that of naive attention in the input dtype, plus a floor.
Each asserts that the kernel ran (no fallback warning). The CPU tests check the routes with a
fake GPU profile.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import dispatch
from mlx_primitives.attention.reference import reference_attention
from mlx_primitives.attention.spec import describe_attention
from mlx_primitives.hardware import profile, profile_from_info, static_shared_memory
from mlx_primitives.kernels import catalog
from mlx_primitives.kernels import flash_attention as fa

FLOOR = {mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def _rounded(x: np.ndarray, dtype) -> np.ndarray:
    return np.array(mx.array(x.astype(np.float32)).astype(dtype).astype(mx.float32), dtype=np.float64)


def attention64(q, k, v, spec, dtype=None):
    """Float64 attention of ``spec`` on NumPy BHSD arrays; with ``dtype``, scores and weights rounded to it
    (the naive low-precision computation the tolerance is measured against). Returns (out, lse)."""
    groups = spec.num_heads // spec.num_kv_heads
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    s = q @ k.swapaxes(-1, -2) * spec.scale
    if dtype is not None:
        s = _rounded(s, dtype)
    if spec.softcap > 0:
        s = spec.softcap * np.tanh(s / spec.softcap)
    pos = np.arange(spec.q_len)[:, None] + spec.offset
    key = np.arange(spec.k_len)[None, :]
    if spec.alibi_slopes is not None:
        slopes = np.array(spec.alibi_slopes, dtype=np.float64).reshape(-1, spec.num_heads)[:, :, None, None]
        s = s - slopes * np.abs(pos - key)
    left, right = spec.window
    visible = np.ones((spec.q_len, spec.k_len), bool)
    if right >= 0:
        visible &= key <= pos + right
    if left >= 0:
        visible &= key >= pos - left
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    if spec.sinks is not None:
        m = np.maximum(m, np.array(spec.sinks, dtype=np.float64)[None, :, None, None])
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    denom = p.sum(axis=-1, keepdims=True)
    if spec.sinks is not None:
        denom = denom + np.exp(np.array(spec.sinks, dtype=np.float64)[None, :, None, None] - m_safe)
    if dtype is not None:
        p = _rounded(p, dtype)
    out = p @ v / np.where(denom > 0, denom, 1.0)
    with np.errstate(divide="ignore"):
        lse = np.where(denom > 0, m_safe + np.log(np.where(denom > 0, denom, 1.0)), -np.inf)[..., 0]
    return out, lse


def f64(x):
    return np.array(x.astype(mx.float32), dtype=np.float64)


@pytest.fixture
def no_fallback():
    """Turn the launcher's fallback warning into a failure: the kernel must really run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def check(dtype=mx.float16, batch=2, heads=4, kv_heads=2, q_len=100, k_len=257, head_dim=128, config=None,
          **features):
    q = mx.random.normal((batch, heads, q_len, head_dim)).astype(dtype)
    k = mx.random.normal((batch, kv_heads, k_len, head_dim)).astype(dtype)
    v = mx.random.normal((batch, kv_heads, k_len, head_dim)).astype(dtype)
    spec = describe_attention(q, k, v, **features)
    out, lse = fa.flash_attention(q, k, v, spec, config)
    mx.eval(out, lse)
    qn, kn, vn = f64(q), f64(k), f64(v)
    exact, exact_lse = attention64(qn, kn, vn, spec)
    naive, _ = attention64(qn, kn, vn, spec, dtype)
    assert out.shape == exact.shape and out.dtype == dtype and lse.dtype == mx.float32
    ours, base = np.abs(f64(out) - exact).max(), np.abs(naive - exact).max()
    assert ours <= 2 * base + FLOOR[dtype], f"error {ours:.3g} > 2 x naive {base:.3g} + {FLOOR[dtype]}"
    lse = np.array(lse, dtype=np.float64)
    assert np.array_equal(np.isneginf(lse), np.isneginf(exact_lse))
    finite = np.isfinite(exact_lse)
    np.testing.assert_allclose(lse[finite], exact_lse[finite], rtol=1e-4, atol=1e-4)
    return out, lse


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("head_dim", fa.HEAD_DIMS)
def test_every_head_dim_and_dtype(no_fallback, dtype, head_dim):
    check(dtype, head_dim=head_dim)
    check(dtype, head_dim=head_dim, causal=True, softcap=20.0, alibi_slopes=mx.random.uniform(shape=(4,)) * 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("q_len,k_len", [(1, 1), (17, 17), (1, 257), (257, 1), (100, 37), (37, 100), (257, 257)])
@pytest.mark.parametrize("causal", [False, True])
def test_odd_lengths_both_ways(no_fallback, q_len, k_len, causal):
    check(q_len=q_len, k_len=k_len, head_dim=80, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_gqa_reads_kv_head_of_group(no_fallback, groups):
    check(heads=8, kv_heads=8 // groups, q_len=65, k_len=130, head_dim=64, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize(
    "features",
    [
        {"causal": True},
        {"softcap": 5.0},
        {"alibi_slopes": "heads"},
        {"alibi_slopes": "batch_heads", "causal": True},
        {"sinks": True},
        {"sinks": True, "window_size": (8, 0)},
        {"window_size": (50, 20)},
        {"window_size": (-1, 3)},
        {"window_size": (70, -1), "softcap": 30.0},
        {"causal": True, "window_size": (64, -1), "softcap": 30.0, "alibi_slopes": "heads", "sinks": True},
    ],
    ids=lambda f: "-".join(sorted(f)),
)
def test_features(no_fallback, dtype, features):
    features = dict(features)
    if features.get("alibi_slopes") == "heads":
        features["alibi_slopes"] = mx.random.uniform(shape=(4,)) * 0.2
    elif features.get("alibi_slopes") == "batch_heads":
        features["alibi_slopes"] = mx.random.uniform(shape=(2, 4)) * 0.2
    if features.pop("sinks", False):
        features["sinks"] = mx.random.normal((4,))
    check(dtype, q_len=150, k_len=333, head_dim=64, **features)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [(100, 0), (0, 0), (31, 33), (200, 200)])
def test_window_skips_tiles_and_matches(no_fallback, window):
    """Long sequences, narrow windows: most key tiles are skipped, the rest masked element by element."""
    check(q_len=700, k_len=777, head_dim=128, window_size=window, heads=2, kv_heads=1, batch=1)


@pytest.mark.gpu
def test_rows_without_keys_are_zero_with_lse_minus_inf(no_fallback):
    out, lse = check(q_len=40, k_len=20, head_dim=64, causal=True)
    assert np.all(np.array(out[:, :, :20].astype(mx.float32)) == 0) and np.all(np.isneginf(lse[:, :, :20]))


FITTING_CONFIGS = [{"WG": 0, **c} for c in fa.FLASH_FWD.configs()
                   if fa.shared_memory_bytes(128, c) <= static_shared_memory()]


@pytest.mark.gpu
@pytest.mark.parametrize("config", FITTING_CONFIGS)
def test_every_fitting_tile_config(no_fallback, config):
    check(q_len=200, k_len=300, head_dim=128, causal=True, config=config)


@pytest.mark.gpu
@pytest.mark.skipif(not fa.warpgroup_available(), reason="the warpgroup kernel needs sm_90")
@pytest.mark.parametrize("head_dim", fa.WG_HEAD_DIMS)
@pytest.mark.parametrize("config", fa.FLASH_FWD_WG.configs())
def test_every_warpgroup_tile_config(no_fallback, head_dim, config):
    spec = describe_attention(*(mx.zeros((1, 1, 8, head_dim), mx.float16),) * 3)
    try:
        fa.warpgroup_config_for(spec, config)
    except ValueError:  # beyond shared memory: refused before any launch
        pytest.skip(f"{config} does not fit head_dim {head_dim}")
    check(q_len=200, k_len=333, head_dim=head_dim, causal=True, softcap=20.0, config={"WG": 1, **config})
    check(mx.bfloat16, q_len=77, k_len=77, head_dim=head_dim, window_size=(9, 40), config={"WG": 1, **config})


@pytest.mark.gpu
@pytest.mark.skipif(not fa.warpgroup_available(), reason="the warpgroup kernel needs sm_90")
@pytest.mark.parametrize("head_dim", fa.WG_HEAD_DIMS)
def test_warpgroup_and_matrix_unit_kernels_agree(no_fallback, head_dim):
    q, k, v = (mx.random.normal((2, 4, 150, head_dim)).astype(mx.float16) for _ in range(3))
    spec = describe_attention(q, k, v, causal=True, alibi_slopes=mx.random.uniform(shape=(4,)) * 0.1)
    ours = [fa.flash_attention(q, k, v, spec, {"WG": wg}) for wg in (1, 0)]
    np.testing.assert_allclose(f64(ours[0][0]), f64(ours[1][0]), atol=4e-3)
    np.testing.assert_allclose(np.array(ours[0][1]), np.array(ours[1][1]), rtol=1e-5, atol=1e-5)


def test_warpgroup_kernel_is_asked_for_only_where_it_runs(monkeypatch):
    hopper = profile_from_info("cuda", {"device_name": "NVIDIA H100", "architecture": "sm_90"})
    monkeypatch.setattr(fa, "device_profile", lambda: hopper)
    assert fa.uses_warpgroup(_spec(head_dim=128)) and fa.uses_warpgroup(_spec(head_dim=256))
    assert not fa.uses_warpgroup(_spec(head_dim=96)) and not fa.uses_warpgroup(_spec(head_dim=128), {"WG": 0})
    with pytest.raises(ValueError, match="head_dim"):
        fa.uses_warpgroup(_spec(head_dim=80), {"WG": 1})
    with pytest.raises(ValueError, match="WG"):
        fa.uses_warpgroup(_spec(head_dim=128), {"WG": 2})
    with pytest.raises(ValueError, match="warpgroup kernel takes"):
        fa.warpgroup_config_for(_spec(head_dim=128), {"BK": 32})
    assert fa.warpgroup_config_for(_spec(head_dim=256))["BK"] == 64
    metal = profile_from_info("metal", {"device_name": "Apple M3 Max"})
    monkeypatch.setattr(fa, "device_profile", lambda: metal)
    assert not fa.uses_warpgroup(_spec(head_dim=128))
    with pytest.raises(ValueError, match="sm_90"):
        fa.uses_warpgroup(_spec(head_dim=128), {"WG": 1})


@pytest.mark.gpu
def test_kernel_gradients_match_the_reference_path(no_fallback):
    q, k, v = (mx.random.normal((1, 4, 70, 64)).astype(mx.float16) for _ in range(3))
    slopes = mx.random.uniform(shape=(4,)) * 0.1
    spec = describe_attention(q, k, v, causal=True, softcap=10.0, alibi_slopes=slopes)

    def loss(path):
        return lambda q, k, v: (
            (fa.flash_attention(q, k, v, spec)[0] if path == "kernel" else reference_attention(q, k, v, spec)[0])
            .astype(mx.float32).sum()
        )

    ours = mx.grad(loss("kernel"), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(loss("reference"), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(ours, want):
        np.testing.assert_allclose(f64(g), f64(w), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_dispatcher_runs_the_kernel_for_softcap(no_fallback):
    from mlx_primitives.attention import flash_attn_func

    q, k, v = (mx.random.normal((1, 64, 2, 64)).astype(mx.float16) for _ in range(3))
    out, lse, _ = flash_attn_func(q, k, v, softcap=5.0, causal=True, return_attn_probs=True)
    spec = describe_attention(q, k, v, layout="BSHD", softcap=5.0, causal=True)
    ref_out, ref_lse = reference_attention(*(x.swapaxes(1, 2) for x in (q, k, v)), spec)
    np.testing.assert_allclose(f64(out), f64(ref_out.swapaxes(1, 2)), atol=5e-3)
    np.testing.assert_allclose(np.array(lse), np.array(ref_lse), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_dispatcher_runs_dropout_on_the_kernel_with_the_reference_keep_mask(no_fallback):
    from mlx_primitives.attention import explain, flash_attn_func

    q, k, v = (mx.random.normal((2, 77, h, 64)).astype(mx.float16) for h in (4, 2, 2))
    options = {"dropout_p": 0.2, "causal": True, "softcap": 20.0}
    assert explain(q, k, v, **options).path == "kernel"
    key = mx.random.key(7)
    ours = mx.grad(lambda q: flash_attn_func(q, k, v, dropout_key=key, **options).astype(mx.float32).sum())(q)
    out = flash_attn_func(q, k, v, dropout_key=key, **options)
    q32, k32, v32 = (x.astype(mx.float32) for x in (q, k, v))
    ref = flash_attn_func(q32, k32, v32, dropout_key=key, path="reference", **options)
    ref_dq = mx.grad(lambda q: flash_attn_func(q, k32, v32, dropout_key=key, path="reference", **options).sum())(q32)
    np.testing.assert_allclose(f64(out), f64(ref), atol=1e-2)
    np.testing.assert_allclose(f64(ours), f64(ref_dq), atol=5e-2, rtol=2e-2)


# --- routes (CPU): a fake GPU profile --------------------------------------------------------------

@pytest.fixture
def on_gpu(monkeypatch):
    gpu = profile_from_info("cuda", {"device_name": "NVIDIA H100 80GB HBM3"})
    monkeypatch.setattr(dispatch, "device_profile", lambda: gpu)


def _spec(head_dim=128, dtype=mx.float16, q_len=64, k_len=64, **features):
    q = mx.zeros((1, 4, q_len, head_dim), dtype)
    kv = mx.zeros((1, 2, k_len, head_dim), dtype)
    return describe_attention(q, kv, kv, **features)


@pytest.mark.parametrize(
    "features,need_lse",
    [
        ({"softcap": 30.0}, False),
        ({"alibi_slopes": mx.ones((4,))}, False),
        ({"window_size": (32, 0)}, False),
        ({}, True),
        ({"causal": True, "q_len": 100, "k_len": 50}, False),
        ({"head_dim": 256, "causal": True}, False),
        ({"dropout_p": 0.1}, False),
    ],
)
def test_gpu_routes_features_sdpa_lacks_to_the_kernel(on_gpu, features, need_lse):
    assert dispatch.choose_route(_spec(**features), need_lse).path == "kernel"


@pytest.mark.parametrize("features", [{}, {"causal": True}, {"head_dim": 64, "causal": True}, {"head_dim": 256}])
def test_gpu_keeps_plain_and_causal_on_sdpa(on_gpu, features):
    assert dispatch.choose_route(_spec(**features)).path == "sdpa"


def test_hopper_routes_every_head_dim_256_call_to_the_warpgroup_kernel(monkeypatch):
    hopper = profile_from_info("cuda", {"device_name": "NVIDIA H100 80GB HBM3", "architecture": "sm_90"})
    monkeypatch.setattr(dispatch, "device_profile", lambda: hopper)
    monkeypatch.setattr(fa, "device_profile", lambda: hopper)
    assert dispatch.choose_route(_spec(head_dim=256)).path == "kernel"
    assert dispatch.choose_route(_spec(head_dim=256)).reason.endswith("(warpgroup variant)")
    assert "warpgroup" not in dispatch.choose_route(_spec(head_dim=96, softcap=30.0)).reason
    assert dispatch.choose_route(_spec(head_dim=256, causal=True)).path == "kernel"
    assert dispatch.choose_route(_spec(head_dim=128)).path == "sdpa"
    assert dispatch.choose_route(_spec(head_dim=128, causal=True)).path == "sdpa"


@pytest.mark.parametrize(
    "features",
    [
        {"softcap": 30.0, "dtype": mx.float32},
        {"softcap": 30.0, "head_dim": 48},
        {"softcap": 30.0, "mask": mx.zeros((64, 64))},
    ],
)
def test_gpu_falls_back_to_reference_where_the_kernel_cannot(on_gpu, features):
    route = dispatch.choose_route(_spec(**features))
    assert route.path == "reference"
    with pytest.raises(ValueError, match="path='kernel' cannot run this call"):
        dispatch.choose_route(_spec(**features), path="kernel")


def test_cpu_never_routes_to_the_kernel(monkeypatch):
    cpu = profile_from_info("cpu", {})
    monkeypatch.setattr(dispatch, "device_profile", lambda: cpu)
    assert dispatch.choose_route(_spec(softcap=30.0)).path == "reference"
    with pytest.raises(ValueError, match="GPU backend"):
        dispatch.choose_route(_spec(), path="kernel")


def test_config_of_every_head_dim_fits_shared_memory(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", str(tmp_path))  # no tuned entries
    default = catalog.DEFAULTS[catalog.FLASH_FWD.name]
    for head_dim in fa.HEAD_DIMS:
        chosen = fa.config_for(_spec(head_dim=head_dim))
        assert fa.shared_memory_bytes(head_dim, chosen) <= static_shared_memory("cuda")
        if fa.shared_memory_bytes(head_dim, default) > static_shared_memory("cuda"):
            assert chosen == {"BK": 32, "WARPS": 4}  # the largest tiles that fit
    with pytest.raises(ValueError, match="shared memory"):
        fa.config_for(_spec(head_dim=256), {"BK": 64})


def test_sliding_windows_take_their_own_untuned_tiles(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", str(tmp_path))  # no tuned entries
    assert fa.config_for(_spec(causal=True, window_size=(16, 0))) == fa.SLIDING_WINDOW_TILES
    assert fa.config_for(_spec(causal=True)) == catalog.DEFAULTS[catalog.FLASH_FWD.name]
    assert fa.config_for(_spec(head_dim=256, window_size=(16, 0))) == {"BK": 32, "WARPS": 4}


def test_head_dim_256_stays_off_the_kernel_where_threadgroup_memory_is_32_kib(monkeypatch):
    metal = profile_from_info("metal", {"device_name": "Apple M3 Max"})
    monkeypatch.setattr(profile, "device_profile", lambda: metal)
    assert "shared memory" in fa.unsupported(_spec(head_dim=256))
    assert fa.unsupported(_spec(head_dim=128)) is None
