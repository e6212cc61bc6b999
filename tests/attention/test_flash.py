"""flash_attn_func and friends against the float64 oracle, on the reference path and on the dispatcher's choice.

Every comparison uses flash-attention's rule (tests/reference.py): the error against float64 may be
at most twice that of naive attention in the input dtype, plus a small floor.
"""

import logging

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import (
    choose_route,
    describe_attention,
    explain,
    flash_attention,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
)
from tests.reference import (
    DTYPES,
    FEATURE_SETS,
    Features,
    as_flash_attention_kwargs,
    attention64,
    check_against_reference,
    draw_features,
    f64,
    random_qkv,
)

PATHS = ["reference", "auto"]
SHAPES = {"sq<sk": (5, 13), "sq>sk": (13, 5)}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("feature", list(FEATURE_SETS))
def test_each_feature_matches_float64_reference(feature, dtype, shape, path):
    q_len, k_len = SHAPES[shape]
    q, k, v = random_qkv(2, q_len, k_len, 4, 2, 64, DTYPES[dtype])
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, 4)
    out = flash_attn_func(q, k, v, path=path, **kwargs)
    check_against_reference(out, q, k, v, f)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("head_dim", [32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("feature", ["causal", "everything"])
def test_head_dims_match_float64_reference(head_dim, dtype, feature, path):
    q, k, v = random_qkv(1, 7, 11, 2, 1, head_dim, DTYPES[dtype])
    kwargs, f = draw_features(FEATURE_SETS[feature], 1, 2)
    out = flash_attn_func(q, k, v, path=path, **kwargs)
    check_against_reference(out, q, k, v, f)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("feature", ["plain", "causal", "sinks", "everything"])
@pytest.mark.parametrize(
    "heads,kv_heads", [(4, 4), (4, 2), (8, 2), (8, 1), (16, 2)], ids=["mha", "gqa2", "gqa4", "mqa8", "gqa8"]
)
def test_gqa_and_mqa_read_kv_head_h_over_group(heads, kv_heads, feature, dtype, path):
    q, k, v = random_qkv(2, 6, 9, heads, kv_heads, 32, DTYPES[dtype])
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, heads)
    out = flash_attn_func(q, k, v, path=path, **kwargs)
    check_against_reference(out, q, k, v, f)


def test_gqa_query_head_reads_kv_head_h_floordiv_groups():
    """Changing KV head 1 changes exactly the query heads 2 and 3 (Hq=4, Hk=2), on every path."""
    q, k, v = random_qkv(1, 4, 6, 4, 2, 32)
    for path in PATHS:
        base = flash_attn_func(q, k, v, path=path)
        v2 = mx.array(v)
        v2[:, :, 1] = v2[:, :, 1] + 1.0
        changed = mx.abs(flash_attn_func(q, k, v2, path=path) - base).max(axis=(0, 1, 3))
        assert changed.tolist()[:2] == [0.0, 0.0] and min(changed.tolist()[2:]) > 0.5


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "softcap_alibi_window", "everything"])
def test_return_attn_probs_gives_out_lse_and_probabilities(feature, dtype, path):
    q, k, v = random_qkv(2, 9, 6, 4, 2, 64, DTYPES[dtype])
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, 4)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, path=path, **kwargs)
    assert lse.shape == (2, 4, 9) and probs.shape == (2, 4, 9, 6)
    check_against_reference(out, q, k, v, f, lse=lse, probs=probs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "everything"])
def test_lse_matches_float64_logsumexp_of_final_scores(feature, path):
    q, k, v = random_qkv(1, 12, 7, 2, 2, 32)
    kwargs, f = draw_features(FEATURE_SETS[feature], 1, 2)
    _, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, path=path, **kwargs)
    ref = attention64(*(f64(x).swapaxes(1, 2) for x in (q, k, v)), f)
    finite = np.isfinite(ref["lse"])
    np.testing.assert_array_equal(np.isfinite(f64(lse)), finite)
    np.testing.assert_allclose(f64(lse)[finite], ref["lse"][finite], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "q_len,k_len,options",
    [
        (9, 4, {"causal": True}),  # first 5 rows see no key (bottom-right alignment)
        (6, 6, {"window_size": (-1, -1), "causal": False, "softcap": 0.0}),  # control: nothing masked
        (6, 10, {"window_size": (1, -1), "causal": True}),
        (8, 3, {"causal": True, "window_size": (0, 0)}),
    ],
)
def test_rows_without_visible_keys_give_zero_output_and_minus_inf_lse(q_len, k_len, options, dtype, path):
    q, k, v = random_qkv(1, q_len, k_len, 2, 1, 32, DTYPES[dtype])
    out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, path=path, **options)
    f = Features(causal=options.get("causal", False), window=options.get("window_size", (-1, -1)))
    ref = check_against_reference(out, q, k, v, f, lse=lse)
    keyless = np.isneginf(ref["lse"])  # (B, H, Sq)
    assert np.array_equal(np.isneginf(f64(lse)), keyless)
    assert not np.isnan(f64(out)).any()
    assert (f64(out).swapaxes(1, 2)[keyless] == 0).all()
    if options.get("causal") and q_len > k_len:
        assert keyless[..., : q_len - k_len].all() and not keyless[..., q_len - k_len :].any()


@pytest.mark.parametrize("path", PATHS)
def test_empty_key_or_query_sequences_give_empty_or_zero_results(path):
    q, k, v = random_qkv(1, 3, 0, 2, 2, 8)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, path=path)
    assert out.shape == (1, 3, 2, 8) and (f64(out) == 0).all()
    assert np.isneginf(f64(lse)).all() and probs.shape == (1, 2, 3, 0)
    dq = mx.grad(lambda q: flash_attn_func(q, k, v, path=path).sum())(q)
    assert (f64(dq) == 0).all()
    q, k, v = random_qkv(1, 0, 4, 2, 2, 8)
    out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, path=path)
    assert out.shape == (1, 0, 2, 8) and lse.shape == (1, 2, 0) and probs.shape == (1, 2, 0, 4)


def test_plain_out_without_probs_on_auto_equals_sdpa_directly():
    q, k, v = random_qkv(2, 8, 8, 4, 2, 64)
    ours = flash_attn_func(q, k, v, causal=True)
    direct = mx.fast.scaled_dot_product_attention(
        *(x.swapaxes(1, 2) for x in (q, k, v)), scale=64**-0.5, mask="causal"
    ).swapaxes(1, 2)
    assert mx.array_equal(ours, direct)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feature", ["plain", "causal", "everything"])
def test_qkvpacked_equals_unpacked(feature, path):
    qkv = mx.random.normal((2, 7, 3, 4, 32))
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, 4)
    kw = {key: val for key, val in kwargs.items() if key != "sinks"}
    packed = flash_attn_qkvpacked_func(qkv, path=path, sinks=kwargs.get("sinks"), **kw)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    assert mx.allclose(packed, flash_attn_func(q, k, v, path=path, **kwargs), atol=1e-6)
    check_against_reference(packed, q, k, v, f)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("feature", ["plain", "causal", "everything"])
def test_kvpacked_equals_unpacked_with_gqa(feature, path):
    q = mx.random.normal((2, 5, 4, 32))
    kv = mx.random.normal((2, 9, 2, 2, 32))
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, 4)
    out, lse, _ = flash_attn_kvpacked_func(q, kv, return_attn_probs=True, path=path, **kwargs)
    check_against_reference(out, q, kv[:, :, 0], kv[:, :, 1], f, lse=lse)


def test_value_head_dim_may_differ_from_query_head_dim():
    q, k, _ = random_qkv(1, 5, 8, 2, 2, 32)
    v = mx.random.normal((1, 8, 2, 48))
    for path in PATHS:
        out = flash_attn_func(q, k, v, causal=True, path=path)
        assert out.shape == (1, 5, 2, 48)
        check_against_reference(out, q, k, v, Features(causal=True))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["BHSD", "BSHD"])
@pytest.mark.parametrize("feature", ["plain", "causal", "window", "everything"])
def test_flash_attention_layouts_match_reference(layout, feature, path):
    q, k, v = random_qkv(2, 6, 10, 4, 2, 32, layout=layout)
    kwargs, f = draw_features(FEATURE_SETS[feature], 2, 4)
    out = flash_attention(q, k, v, layout=layout, path=path, **as_flash_attention_kwargs(kwargs))
    assert out.shape == q.shape
    check_against_reference(out, q, k, v, f, layout=layout)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["bool", "additive", "bool_2d", "key_padding", "additive_neg_inf_rows"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_flash_attention_mask_arrays_match_reference(kind, dtype, path):
    q, k, v = random_qkv(2, 6, 9, 4, 2, 32, DTYPES[dtype], layout="BHSD")
    if kind == "bool":
        mask = np.asarray(mx.random.bernoulli(0.6, (2, 4, 6, 9)))
        mask[:, :, :, 0] = True
    elif kind == "bool_2d":
        mask = np.asarray(mx.random.bernoulli(0.6, (6, 9)))
        mask[:, -1] = True
    elif kind == "key_padding":
        mask = np.ones((2, 1, 1, 9), bool)
        mask[1, ..., 6:] = False  # the second sequence is 6 keys long
    elif kind == "additive":
        mask = np.asarray(mx.random.normal((2, 1, 6, 9)))
    else:
        mask = np.asarray(mx.random.normal((1, 4, 6, 9)))
        mask[..., 2:4, :] = -np.inf  # rows 2 and 3 see no key
    out = flash_attention(q, k, v, layout="BHSD", mask=mx.array(mask), path=path)
    check_against_reference(out, q, k, v, Features(mask=mask), layout="BHSD")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("additive", [False, True])
def test_mask_hiding_every_key_of_a_row_gives_zeros(additive, path):
    q, k, v = random_qkv(1, 5, 7, 2, 2, 32, layout="BHSD")
    mask = np.ones((1, 1, 5, 7), bool)
    mask[..., 1, :] = False
    mask[..., 3, :4] = False
    arr = mx.array(mask) if not additive else mx.array(np.where(mask, 0.0, -np.inf).astype(np.float32))
    out = flash_attention(q, k, v, layout="BHSD", mask=arr, path=path)
    assert not mx.isnan(out).any()
    assert (f64(out)[:, :, 1] == 0).all()
    check_against_reference(out, q, k, v, Features(mask=mask), layout="BHSD")


@pytest.mark.parametrize("path", PATHS)
def test_causal_mask_string_equals_causal_flag_and_combines_with_mask_array(path):
    q, k, v = random_qkv(1, 6, 9, 2, 1, 32, layout="BHSD")
    a = flash_attention(q, k, v, layout="BHSD", mask="causal", path=path)
    b = flash_attention(q, k, v, layout="BHSD", causal=True, path=path)
    assert mx.allclose(a, b, atol=1e-6)
    mask = np.asarray(mx.random.bernoulli(0.7, (6, 9)))
    out = flash_attention(q, k, v, layout="BHSD", causal=True, mask=mx.array(mask), path=path)
    check_against_reference(out, q, k, v, Features(causal=True, mask=mask), layout="BHSD")


@pytest.mark.parametrize("path", PATHS)
def test_nan_in_gives_nan_out_without_crash(path):
    q, k, v = random_qkv(1, 4, 6, 2, 2, 32)
    q[0, 1, 0, 3] = mx.nan
    for options in ({}, {"causal": True}, {"softcap": 2.0, "window_size": (2, 0)}):
        out = flash_attn_func(q, k, v, path=path, **options)
        assert mx.isnan(out[0, 1, 0]).all()
        assert not mx.isnan(out[0, 1, 1]).any() and not mx.isnan(out[0, 0]).any()


def test_chunk_size_does_not_change_the_result():
    q, k, v = random_qkv(1, 37, 53, 2, 1, 32)
    kwargs, f = draw_features(FEATURE_SETS["everything"], 1, 2)
    kwargs = as_flash_attention_kwargs(kwargs)
    outs = [flash_attention(q, k, v, chunk_size=c, path="reference", **kwargs) for c in (1, 4, 16, 256)]
    for out in outs[1:]:
        assert mx.allclose(out, outs[0], atol=1e-5)
    check_against_reference(outs[1], q, k, v, f)


# ---- routing -----------------------------------------------------------------------------------------


def _spec(q_len=8, k_len=8, **options):
    q, k, v = random_qkv(1, q_len, k_len, 4, 2, 32, layout="BHSD")
    return describe_attention(q, k, v, **options)


@pytest.mark.parametrize(
    "options,q_len,k_len",
    [({}, 8, 8), ({"causal": True}, 8, 8), ({"causal": True}, 4, 8), ({"scale": 0.2}, 8, 12),
     ({"sinks": "draw"}, 8, 8), ({"mask": "array"}, 8, 8)],
)
def test_features_sdpa_has_route_to_sdpa(options, q_len, k_len):
    options = dict(options)
    if options.get("sinks") == "draw":
        options["sinks"] = mx.random.normal((4,))
    if options.get("mask") == "array":
        options["mask"] = mx.random.bernoulli(0.5, (q_len, k_len))
    assert choose_route(_spec(q_len, k_len, **options)).path == "sdpa"


@pytest.mark.parametrize(
    "options,q_len,k_len,need_lse,reason",
    [
        ({}, 8, 8, True, "log-sum-exp"),
        ({"window_size": (2, 2)}, 8, 8, False, "window"),
        ({"causal": True, "window_size": (3, 0)}, 8, 8, False, "window"),
        ({"softcap": 5.0}, 8, 8, False, "softcap"),
        ({"alibi_slopes": "draw"}, 8, 8, False, "ALiBi"),
        ({"dropout_p": 0.1}, 8, 8, False, "dropout"),
        ({"causal": True}, 12, 8, False, "q_len > k_len"),
        ({"causal": True, "mask": "array"}, 8, 8, False, "mask"),
        ({"chunk_size": 64}, 8, 8, False, "bounded memory"),
    ],
)
def test_features_sdpa_lacks_route_to_reference_on_cpu_with_reason(options, q_len, k_len, need_lse, reason):
    options = dict(options)
    if options.get("alibi_slopes") == "draw":
        options["alibi_slopes"] = mx.random.uniform(shape=(4,))
    if options.get("mask") == "array":
        options["mask"] = mx.random.bernoulli(0.5, (q_len, k_len))
    route = choose_route(_spec(q_len, k_len, **options), need_lse=need_lse)
    assert route.path == "reference"
    assert reason in route.reason


def test_forced_paths_are_honoured_or_refused():
    spec = _spec(softcap=3.0)
    assert choose_route(spec, path="reference").path == "reference"
    with pytest.raises(ValueError, match="path='sdpa'.*softcap"):
        choose_route(spec, path="sdpa")
    with pytest.raises(ValueError, match="path='kernel'"):
        choose_route(_spec(), path="kernel")  # no GPU backend here
    with pytest.raises(ValueError, match="path must be one of"):
        choose_route(_spec(), path="fast")
    q, k, v = random_qkv(1, 4, 4, 2, 2, 32)
    with pytest.raises(ValueError, match="path='sdpa'"):
        flash_attn_func(q, k, v, return_attn_probs=True, path="sdpa")


def test_explain_reports_the_route_a_call_takes():
    q, k, v = random_qkv(1, 6, 6, 2, 2, 32)
    assert explain(q, k, v, causal=True).path == "sdpa"
    assert explain(q, k, v, causal=True, return_lse=True).path == "reference"
    route = explain(q, k, v, softcap=1.0)
    assert route.path == "reference" and "softcap" in route.reason


def test_dispatch_logs_its_choice_at_debug_level(caplog):
    q, k, v = random_qkv(1, 6, 6, 2, 2, 32)
    with caplog.at_level(logging.DEBUG, logger="mlx_primitives.dispatch"):
        flash_attn_func(q, k, v, softcap=2.0)
    assert any("-> reference" in r.getMessage() and "softcap" in r.getMessage() for r in caplog.records)


def test_reference_path_works_under_compile_and_vmap():
    q, k, v = random_qkv(3, 19, 23, 2, 1, 16, layout="BHSD")

    def fn(q, k, v):
        return flash_attention(q, k, v, layout="BHSD", causal=True, softcap=3.0, chunk_size=8, path="reference")

    plain = fn(q, k, v)
    assert mx.allclose(mx.compile(fn)(q, k, v), plain, atol=1e-6)
    assert mx.allclose(mx.vmap(fn)(q[:, None], k[:, None], v[:, None])[:, 0], plain, atol=1e-6)
    check_against_reference(plain, q, k, v, Features(causal=True, softcap=3.0), layout="BHSD")


# ---- property tests over random shape/feature combinations -----------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def attention_calls(draw):
    """A random call: shapes, dtype, path and any combination of features."""
    kv_heads = draw(st.sampled_from([1, 2]))
    call = {
        "batch": draw(st.integers(1, 2)),
        "q_len": draw(st.integers(1, 12)),
        "k_len": draw(st.integers(1, 12)),
        "heads": kv_heads * draw(st.sampled_from([1, 2, 4])),
        "kv_heads": kv_heads,
        "head_dim": draw(st.sampled_from([8, 16, 32, 64])),
        "dtype": draw(st.sampled_from(list(DTYPES))),
        "path": draw(st.sampled_from(PATHS)),
        "lse": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }
    spec = {}
    if draw(st.booleans()):
        spec["causal"] = True
    if draw(st.booleans()):
        spec["window"] = (draw(st.integers(-1, 6)), draw(st.integers(-1, 3)))
    if draw(st.booleans()):
        spec["softcap"] = draw(st.floats(0.5, 5.0))
    alibi = draw(st.sampled_from([None, "H", "BH"]))
    if alibi:
        spec["alibi"] = alibi
    if draw(st.booleans()):
        spec["sinks"] = True
    if draw(st.booleans()):
        spec["scale"] = draw(st.floats(0.05, 1.0))
    return call, spec


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attention_calls())
def test_random_feature_combinations_match_float64_reference(case):
    call, spec = case
    mx.random.seed(call["seed"])
    q, k, v = random_qkv(call["batch"], call["q_len"], call["k_len"], call["heads"], call["kv_heads"],
                         call["head_dim"], DTYPES[call["dtype"]])
    kwargs, f = draw_features(spec, call["batch"], call["heads"])
    if call["lse"]:
        out, lse, probs = flash_attn_func(q, k, v, return_attn_probs=True, path=call["path"], **kwargs)
        check_against_reference(out, q, k, v, f, lse=lse, probs=probs)
    else:
        check_against_reference(flash_attn_func(q, k, v, path=call["path"], **kwargs), q, k, v, f)
