"""The launcher: CPU fallback warns once per kernel, template values, differentiation, compile failures."""

import warnings

import mlx.core as mx
import pytest

from mlx_primitives.hardware import detect_backend
from mlx_primitives.kernels import launcher
from mlx_primitives.kernels.launcher import Kernel, Launch, float_bits, launch, with_reference_vjp


def _doubling(tmp_path, body="out[tid] = T(float(inp[tid]) * 2.0f);\n", name="doubling") -> Kernel:
    (tmp_path / f"{name}.kern").write_text(body)
    return Kernel(name=name, body=f"{name}.kern", inputs=("inp",), outputs=("out",), src_dir=tmp_path)


def _plan(kernel, x):
    return Launch(kernel, [x], [("T", x.dtype)], (x.size, 1, 1), (x.size, 1, 1), [x.shape], [x.dtype])


def _fallback_runs(kernel, x, monkeypatch):
    monkeypatch.setattr(launcher, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = launch(_plan(kernel, x), lambda: [x * 2])[0]
        second = launch(_plan(kernel, x), lambda: [x * 2])[0]
    return first, second, [w for w in caught if "doubling" in str(w.message) or "broken" in str(w.message)]


@pytest.mark.skipif(detect_backend() != "cpu", reason="the CPU fallback path")
def test_cpu_falls_back_to_reference_and_warns_once(tmp_path, monkeypatch):
    x = mx.random.normal((32,))
    first, second, warned = _fallback_runs(_doubling(tmp_path), x, monkeypatch)
    assert mx.array_equal(first, x * 2) and mx.array_equal(second, x * 2)
    assert len(warned) == 1 and "cpu" in str(warned[0].message)


@pytest.mark.gpu
def test_gpu_runs_kernel(tmp_path):
    x = mx.random.normal((32,)).astype(mx.float16)
    assert mx.array_equal(launch(_plan(_doubling(tmp_path), x), lambda: [x * 3])[0], x * 2)


@pytest.mark.gpu
def test_compile_failure_falls_back_and_warns_once(tmp_path, monkeypatch):
    kernel = _doubling(tmp_path, body="out[tid] = this_is_not_a_kernel;\n", name="broken")
    x = mx.random.normal((32,))
    first, second, warned = _fallback_runs(kernel, x, monkeypatch)
    assert mx.array_equal(first, x * 2) and mx.array_equal(second, x * 2)
    assert len(warned) == 1 and "failed" in str(warned[0].message)


def test_configs_cover_the_product_of_tunables():
    kernel = Kernel(name="k", body="k.kern", inputs=("a",), outputs=("b",), tunables=(("X", (1, 2)), ("Y", (8, 16, 32))))
    configs = kernel.configs()
    assert len(configs) == 6 and {"X": 2, "Y": 32} in configs


def test_float_bits_round_trips_through_float32():
    import struct

    for value in (1e-5, 1e-6, 13.287712, 0.5):
        assert struct.unpack("<f", struct.pack("<i", float_bits(value)))[0] == pytest.approx(value, rel=1e-7)


def test_vjp_comes_from_the_reference():
    forward = with_reference_vjp(lambda x: x * 2, lambda x: x * 3)  # deliberately different: shows which runs
    x = mx.array([1.0, 2.0])
    assert mx.array_equal(forward(x), x * 2)
    assert mx.array_equal(mx.grad(lambda x: forward(x).sum())(x), mx.full((2,), 3.0))


def test_bound_launch_checks_its_first_launch_only(tmp_path, monkeypatch):
    """BoundLaunch: the first call is evaluated and recorded; later calls launch with no key lookup."""
    from mlx_primitives.hardware import profile_from_info

    calls = []

    def fake_kernel(inputs, **arguments):
        calls.append(arguments["template"])
        return [inputs[0] * 3]

    monkeypatch.setattr(launcher, "device_profile", lambda: profile_from_info("cuda", {"device_name": "NVIDIA H100"}))
    monkeypatch.setattr(launcher, "compiled", lambda kernel, backend, shared_memory=0: fake_kernel)
    monkeypatch.setattr(launcher, "_verified", {})
    x = mx.random.normal((8,))
    bound = launcher.BoundLaunch(_plan(_doubling(tmp_path), x))
    assert mx.array_equal(bound([x], lambda: [x * 2])[0], x * 3)
    assert list(launcher._verified.values()) == [True]
    monkeypatch.setattr(launcher, "_verified", {})  # a lookup would record the key again
    assert mx.array_equal(bound([x + 1], lambda: [x * 2])[0], (x + 1) * 3)
    assert launcher._verified == {} and len(calls) == 2
