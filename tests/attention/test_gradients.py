"""Gradients of attention w.r.t. q, k and v against the float64 oracle's analytic gradient.

The loss is a random-weighted sum of the outputs, so every output entry contributes. The oracle's
analytic gradient is itself checked against central finite differences in float64.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import flash_attention, flash_attn_func
from tests.reference import (
    DTYPES,
    FEATURE_SETS,
    Features,
    as_flash_attention_kwargs,
    assert_within_rule,
    attention64,
    draw_features,
    f64,
    naive_attention,
    random_qkv,
)

PATHS = ["reference", "auto"]


def check_gradients(fn, q, k, v, f: Features, layout="BSHD"):
    """``fn(q, k, v)`` -> out in ``layout``; its gradients under the rule, against float64 and naive."""
    dtype = q.dtype
    w = mx.random.normal(fn(q, k, v).shape).astype(dtype)
    grads = mx.grad(lambda q, k, v: (fn(q, k, v) * w).astype(mx.float32).sum(), argnums=(0, 1, 2))(q, k, v)
    to_bhsd = (lambda x: x.swapaxes(1, 2)) if layout == "BSHD" else (lambda x: x)
    qh, kh, vh, wh = (to_bhsd(x) for x in (q, k, v, w))
    ref = attention64(f64(qh), f64(kh), f64(vh), f, grad_out=f64(wh))
    naive = mx.grad(
        lambda q, k, v: (naive_attention(q, k, v, f)[0] * wh).astype(mx.float32).sum(), argnums=(0, 1, 2)
    )(qh, kh, vh)
    for name, ours, theirs, expected in zip("qkv", grads, naive, (ref["dq"], ref["dk"], ref["dv"])):
        assert ours.dtype == dtype and ours.shape == (q, k, v)["qkv".index(name)].shape
        assert_within_rule(to_bhsd(ours), expected, theirs, dtype, f"d{name}")
    return grads


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feature", list(FEATURE_SETS))
@pytest.mark.parametrize("shape", [(5, 9), (9, 5)], ids=["sq<sk", "sq>sk"])
def test_gradients_of_each_feature_match_float64(feature, shape, path):
    q, k, v = random_qkv(2, *shape, 4, 2, 32)
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, 4)
    check_gradients(lambda q, k, v: flash_attn_func(q, k, v, path=path, **kwargs), q, k, v, f)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("feature", ["causal", "softcap_alibi_window", "everything"])
def test_low_precision_gradients_within_rule(feature, dtype, path):
    q, k, v = random_qkv(1, 7, 10, 4, 2, 64, DTYPES[dtype])
    kwargs, f = draw_features(FEATURE_SETS[feature], 1, 4)
    check_gradients(lambda q, k, v: flash_attn_func(q, k, v, path=path, **kwargs), q, k, v, f)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1)], ids=["mha", "gqa2", "gqa4", "mqa"])
@pytest.mark.parametrize("feature", ["plain", "causal", "everything"])
def test_gqa_gradients_sum_over_the_query_heads_sharing_a_kv_head(heads, kv_heads, feature, path):
    q, k, v = random_qkv(1, 6, 8, heads, kv_heads, 32)
    kwargs, f = draw_features(FEATURE_SETS[feature], 1, heads)
    check_gradients(lambda q, k, v: flash_attn_func(q, k, v, path=path, **kwargs), q, k, v, f)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "options", [{"causal": True}, {"causal": True, "window_size": (0, 0)}, {"window_size": (1, -1), "causal": True}]
)
def test_rows_without_keys_have_finite_gradients(options, path):
    q, k, v = random_qkv(1, 10, 4, 2, 1, 32)  # causal with Sq > Sk: the first rows see nothing
    f = Features(causal=options["causal"], window=options.get("window_size", (-1, -1)))
    grads = check_gradients(lambda q, k, v: flash_attn_func(q, k, v, path=path, **options), q, k, v, f)
    for g in grads:
        assert not mx.isnan(g).any()
    assert (f64(grads[0])[:, :6] == 0).all()  # keyless rows give no gradient to their queries


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("additive", [False, True])
def test_mask_array_gradients_match_float64_including_fully_masked_rows(additive, path):
    q, k, v = random_qkv(1, 6, 8, 4, 2, 32, layout="BHSD")
    mask = np.asarray(mx.random.bernoulli(0.6, (1, 4, 6, 8)))
    mask[..., 2, :] = False
    mask[..., 4, 5] = True
    arr = mx.array(mask) if not additive else mx.array(np.where(mask, 0.0, -np.inf).astype(np.float32))
    grads = check_gradients(
        lambda q, k, v: flash_attention(q, k, v, layout="BHSD", mask=arr, path=path), q, k, v, Features(mask=mask),
        layout="BHSD",
    )
    for g in grads:
        assert not mx.isnan(g).any()


@pytest.mark.parametrize("path", PATHS)
def test_gradients_through_bhsd_layout_and_chunked_blocks(path):
    q, k, v = random_qkv(1, 21, 34, 4, 2, 32, layout="BHSD")
    kwargs, f = draw_features(FEATURE_SETS["everything"], 1, 4)
    kwargs = as_flash_attention_kwargs(kwargs)
    check_gradients(
        lambda q, k, v: flash_attention(q, k, v, layout="BHSD", chunk_size=8, path=path, **kwargs), q, k, v, f,
        layout="BHSD",
    )


@pytest.mark.parametrize("feature", ["plain", "softcap", "everything"])
def test_float64_analytic_gradient_equals_finite_differences(feature):
    """The oracle's own gradient, checked by central differences in float64 on a tiny problem."""
    rng = np.random.default_rng(sum(map(ord, feature)))
    q, k, v = rng.normal(size=(1, 4, 3, 8)), rng.normal(size=(1, 2, 5, 8)), rng.normal(size=(1, 2, 5, 6))
    spec = FEATURE_SETS[feature]
    f = Features(
        scale=spec.get("scale"), causal=spec.get("causal", False), window=spec.get("window", (-1, -1)),
        softcap=spec.get("softcap", 0.0),
        alibi_slopes=rng.uniform(0.1, 1.0, (1, 4)) if spec.get("alibi") else None,
        sinks=rng.normal(size=4) if spec.get("sinks") else None,
    )
    w = rng.normal(size=(1, 4, 3, 6))
    ref = attention64(q, k, v, f, grad_out=w)
    eps = 1e-6
    for name, x in zip("qkv", (q, k, v)):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            args = {"q": q, "k": k, "v": v}
            plus, minus = x.copy(), x.copy()
            plus[idx] += eps
            minus[idx] -= eps
            args[name] = plus
            hi = (attention64(args["q"], args["k"], args["v"], f)["out"] * w).sum()
            args[name] = minus
            lo = (attention64(args["q"], args["k"], args["v"], f)["out"] * w).sum()
            numeric[idx] = (hi - lo) / (2 * eps)
        np.testing.assert_allclose(ref[f"d{name}"], numeric, atol=1e-7, rtol=1e-6)
    if f.sinks is not None:
        numeric = np.zeros_like(f.sinks)
        for h in range(len(f.sinks)):
            shifted = []
            for delta in (eps, -eps):
                sinks = f.sinks.copy()
                sinks[h] += delta
                g = Features(**{**vars(f), "sinks": sinks})
                shifted.append((attention64(q, k, v, g)["out"] * w).sum())
            numeric[h] = (shifted[0] - shifted[1]) / (2 * eps)
        np.testing.assert_allclose(ref["dsinks"], numeric, atol=1e-7, rtol=1e-6)


from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.attention.test_flash import attention_calls  # noqa: E402


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attention_calls())
def test_random_feature_combinations_have_float64_gradients(case):
    call, spec = case
    mx.random.seed(call["seed"])
    q, k, v = random_qkv(call["batch"], call["q_len"], call["k_len"], call["heads"], call["kv_heads"],
                         call["head_dim"], DTYPES[call["dtype"]])
    kwargs, f = draw_features(spec, call["batch"], call["heads"])
    check_gradients(lambda q, k, v: flash_attn_func(q, k, v, path=call["path"], **kwargs), q, k, v, f)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feature", ["sinks", "causal_sinks", "everything"])
def test_sink_logits_get_the_float64_gradient(feature, path):
    q, k, v = random_qkv(2, 6, 9, 4, 2, 32)
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, 4)
    w = mx.random.normal((2, 6, 4, 32))
    sinks = kwargs.pop("sinks")
    ours = mx.grad(lambda s: (flash_attn_func(q, k, v, sinks=s, path=path, **kwargs) * w).sum())(sinks)
    ref = attention64(*(f64(x).swapaxes(1, 2) for x in (q, k, v)), f, grad_out=f64(w).swapaxes(1, 2))
    np.testing.assert_allclose(f64(ours), ref["dsinks"], atol=1e-5, rtol=1e-5)
