"""Dispatcher routes for decode-sized calls (CPU, with a fake GPU profile) and the decode route's answer."""

import os
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest

from mlx_primitives.attention import describe_attention, dispatch, explain, flash_attention, flash_attn_func
from mlx_primitives.attention.reference import reference_attention
from mlx_primitives.hardware import profile_from_info
from mlx_primitives.kernels import decode

from ..reference import random_qkv


@pytest.fixture
def on_gpu(monkeypatch):
    gpu = profile_from_info("cuda", {"device_name": "NVIDIA H100 80GB HBM3"})
    monkeypatch.setattr(dispatch, "device_profile", lambda: gpu)


def _spec(q_len=1, k_len=4096, head_dim=128, dtype=mx.float16, batch=1, **features):
    q = mx.zeros((batch, 8, q_len, head_dim), dtype)
    kv = mx.zeros((batch, 2, k_len, head_dim), dtype)
    return describe_attention(q, kv, kv, **features)


@pytest.mark.parametrize(
    "features, need_lse",
    [
        ({"softcap": 30.0}, False),
        ({"alibi_slopes": mx.ones((8,))}, False),
        ({"window_size": (1024, 0)}, False),
        ({"causal": True}, True),
        ({"q_len": 16, "softcap": 30.0}, False),
        ({"dtype": mx.float32, "head_dim": 80, "softcap": 30.0}, False),
    ],
)
def test_decode_calls_sdpa_lacks_go_to_the_decode_kernel(on_gpu, features, need_lse):
    route = dispatch.choose_route(_spec(**features), need_lse)
    assert route.path == "decode" and "split-KV" in route.reason


@pytest.mark.parametrize(
    "features, path",
    [
        ({"q_len": 17, "softcap": 30.0}, "kernel"),  # past decode sizes: the prefill kernel
        ({"softcap": 30.0, "head_dim": 48}, "reference"),  # no kernel takes head dim 48
        ({"softcap": 30.0, "dropout_p": 0.1}, "kernel"),  # the decode kernel has no dropout
        ({"softcap": 30.0, "mask": mx.zeros((1, 4096))}, "reference"),
        ({}, "sdpa"),
        ({"causal": True}, "sdpa"),
        ({"q_len": 4, "causal": True, "sinks": mx.zeros((8,))}, "sdpa"),
    ],
)
def test_other_calls_keep_their_routes(on_gpu, features, path):
    assert dispatch.choose_route(_spec(**features)).path == path


def test_plain_decode_follows_the_measured_rule(on_gpu, monkeypatch):
    monkeypatch.setitem(dispatch.DECODE_BEATS_SDPA, "cuda", ((8, 16384),))
    assert dispatch.choose_route(_spec(batch=8, k_len=32768)).path == "decode"
    assert dispatch.choose_route(_spec(batch=8, k_len=4096)).path == "sdpa"
    assert dispatch.choose_route(_spec(batch=1, k_len=32768)).path == "sdpa"
    assert dispatch.choose_route(_spec(batch=8, k_len=32768), path="sdpa").path == "sdpa"


def test_cpu_never_routes_to_the_decode_kernel():
    assert dispatch.choose_route(_spec(softcap=30.0)).path == "reference"


def test_choose_route_stays_cheap_on_the_sdpa_path(on_gpu):
    spec = _spec(q_len=1, causal=True)
    dispatch.choose_route(spec)
    start = time.perf_counter()
    for _ in range(2000):
        dispatch.choose_route(spec)
    assert (time.perf_counter() - start) / 2000 < 50e-6  # a few microseconds; generous for shared CI cores


@pytest.mark.parametrize("options", [{"softcap": 5.0, "causal": True}, {"window_size": (6, 0)},
                                     {"alibi_slopes": "draw", "causal": True}])
def test_decode_route_computes_what_the_reference_does(monkeypatch, options):
    """The decode route's call of decode_attention (BSHD views, full lengths) equals the reference path."""
    options = dict(options)
    if options.get("alibi_slopes") == "draw":
        options["alibi_slopes"] = mx.random.uniform(0.0, 0.5, (4,))
    q, k, v = random_qkv(2, 3, 20, 4, 2, 64)  # BSHD, q_len 3 against 20 keys
    spec = describe_attention(q, k, v, layout="BSHD", **options)
    qh, kh, vh = (x.swapaxes(1, 2) for x in (q, k, v))
    out, lse = dispatch._decode(qh, kh, vh, spec)
    ref_out, ref_lse = reference_attention(qh, kh, vh, spec)
    np.testing.assert_allclose(np.array(out), np.array(ref_out), atol=1e-5)
    np.testing.assert_allclose(np.array(lse), np.array(ref_lse), atol=1e-5)
    routed = []
    real = decode.decode_attention

    def spy(*args, **kwargs):
        routed.append(kwargs)
        return real(*args, **kwargs)

    gpu = profile_from_info("cuda", {"device_name": "NVIDIA H100 80GB HBM3"})
    monkeypatch.setattr(dispatch, "device_profile", lambda: gpu)
    monkeypatch.setattr(decode, "decode_attention", spy)
    public = flash_attn_func(q, k, v, **options)
    assert routed and routed[0]["return_lse"]
    np.testing.assert_allclose(np.array(public), np.array(ref_out.swapaxes(1, 2)), atol=1e-5)


def test_explain_takes_flash_attentions_arguments_and_agrees_with_its_route(monkeypatch):
    q, k, v = random_qkv(1, 6, 9, 4, 2, 32, layout="BHSD")
    taken = []  # the routes flash_attention's calls take
    real = dispatch.choose_route
    monkeypatch.setattr(dispatch, "choose_route", lambda *a, **kw: taken.append(real(*a, **kw)) or taken[-1])
    calls = [
        ((True, "BHSD", 0.25), {}),
        ((), {"layout": "BHSD", "softcap": 5.0, "dropout_p": 0.1, "dropout_key": mx.random.key(0)}),
        ((), {"layout": "BHSD", "causal": True, "path": "reference"}),
        ((), {"layout": "BHSD", "mask": "causal", "chunk_size": 4}),
    ]
    for args, options in calls:
        flash_attention(q, k, v, *args, **options)
        assert explain(q, k, v, *args, **options) == taken[-1]
    assert [route.path for route in taken] == ["sdpa", "reference", "reference", "reference"]
    assert taken[2].reason == "forced by the caller"
    with pytest.raises(ValueError, match=r"path='sdpa' cannot run this call: softcap is set"):
        explain(q, k, v, layout="BHSD", softcap=5.0, path="sdpa")
    with pytest.raises(TypeError, match=r"explain\(\) got an unexpected keyword argument 'softmax_scale'"):
        explain(q, k, v, layout="BHSD", softmax_scale=0.25)


def test_reference_environment_variable_forces_the_reference_path_of_auto_calls(monkeypatch):
    spec = _spec(q_len=8, k_len=8, dtype=mx.float32)
    assert dispatch.choose_route(spec).path == "sdpa"
    monkeypatch.setattr(dispatch, "FORCE_REFERENCE", True)
    assert dispatch.choose_route(spec) == dispatch.Route("reference", "FLASH_ATTENTION_MLX_REF is set")
    assert dispatch.choose_route(spec, path="sdpa").path == "sdpa"  # an explicit path still wins
    q, k, v = random_qkv(1, 5, 7, 2, 2, 16)
    ref = flash_attn_func(q, k, v, causal=True, path="reference")
    assert mx.array_equal(flash_attn_func(q, k, v, causal=True), ref)


@pytest.mark.parametrize("value, forced", [("1", True), ("0", False)])
def test_reference_environment_variable_is_read_at_import(value, forced):
    code = "from mlx_primitives.attention import dispatch; print(dispatch.FORCE_REFERENCE)"
    env = {**os.environ, "FLASH_ATTENTION_MLX_REF": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(forced)
