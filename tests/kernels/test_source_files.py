"""CUDA sources as include files: the same kernels, a few hundred bytes per call."""

import dataclasses

import mlx.core as mx
import pytest

from mlx_primitives.kernels import launcher, source_files

from . import cuda_check
from .test_cuda_compile import needs_nvcc
from .test_metal_compile import PLANS


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", str(tmp_path / "cache"))
    source_files.nvrtc_reads_files.cache_clear()
    yield
    monkeypatch.undo()  # the real probe back, then its result of these tests' fakes dropped
    source_files.nvrtc_reads_files.cache_clear()


def _stubs(kernel):
    return source_files.include_stubs(kernel.source("cuda"), kernel.header("cuda"), kernel.inputs)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_stubs_keep_every_kernels_signature_and_text(name):
    kernel = PLANS[name][0].kernel
    stub_source, stub_header = _stubs(kernel)
    assert len(stub_source) + len(stub_header) < 600
    full = kernel.source("cuda")
    assert source_files.shape_flags(stub_source, kernel.inputs) == source_files.shape_flags(full, kernel.inputs)
    body_path = stub_source.rsplit('#include "', 1)[1].split('"')[0]
    header_path = stub_header.split('"')[1]
    assert open(body_path).read() == full and open(header_path).read() == kernel.header("cuda")


def test_files_are_named_by_content_and_written_once():
    first = source_files.write_source("int x;\n")
    mtime = first.stat().st_mtime_ns
    assert source_files.write_source("int x;\n") == first and first.stat().st_mtime_ns == mtime
    assert source_files.write_source("int y;\n") != first


def test_files_have_absolute_paths_and_are_readable_by_all(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", "relative_cache")
    path = source_files.write_source("int z;\n")
    assert path.is_absolute() and path.parent.parent == tmp_path / "relative_cache"
    assert path.stat().st_mode & 0o444 == 0o444
    assert not list(path.parent.glob("*.tmp"))


def test_no_stubs_where_the_cache_cannot_be_written(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", str(blocker))
    assert _stubs(PLANS["rms_norm"][0].kernel) is None


def test_no_stubs_where_the_path_would_add_a_shape_parameter(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PRIMITIVES_CACHE_DIR", str(tmp_path / "x_shape"))
    assert source_files.include_stubs("  out[0] = x[0];\n", "", ("x",)) is None
    assert source_files.include_stubs("  out[0] = x[x_shape[0] - 1];\n", "", ("x",)) is not None


class _Recorder:
    """Stands in for ``mx.fast.cuda_kernel``: records the source and header it is given."""

    def __init__(self, result=None, error=None):
        self.made, self.result, self.error = [], result, error

    def __call__(self, **kwargs):
        self.made.append(kwargs)
        return self._run

    def _run(self, **kwargs):
        if self.error is not None:
            raise self.error
        return [self.result]


def _made(monkeypatch, backend, reads):
    """The source and header ``launcher.compiled`` hands MLX on ``backend`` when the probe says ``reads``."""
    recorder = _Recorder()
    monkeypatch.setattr(mx.fast, "cuda_kernel", recorder)
    monkeypatch.setattr(mx.fast, "metal_kernel", recorder)
    monkeypatch.setattr(source_files, "nvrtc_reads_files", lambda: reads)
    kernel = PLANS["rms_norm"][0].kernel
    launcher.compiled.__wrapped__(kernel, backend)
    return kernel, (recorder.made[-1]["source"], recorder.made[-1]["header"])


@pytest.mark.parametrize("reads", [True, False])
def test_the_launcher_hands_cuda_the_stubs_only_where_nvrtc_reads_files(monkeypatch, reads):
    kernel, made = _made(monkeypatch, "cuda", reads)
    assert made == (_stubs(kernel) if reads else (kernel.source("cuda"), kernel.header("cuda")))


def test_metal_always_gets_the_text(monkeypatch):
    kernel, made = _made(monkeypatch, "metal", True)
    assert made == (kernel.source("metal"), kernel.header("metal"))


@pytest.mark.parametrize("outcome, expected", [(mx.array([2.0]), True), (mx.array([1.0]), False),
                                                (RuntimeError("nvrtc: cannot open source file"), False)])
def test_the_probe_decides_once(monkeypatch, outcome, expected):
    is_error = isinstance(outcome, Exception)
    recorder = _Recorder(result=None if is_error else outcome, error=outcome if is_error else None)
    monkeypatch.setattr(mx.fast, "cuda_kernel", recorder)
    assert source_files.nvrtc_reads_files() is expected
    assert source_files.nvrtc_reads_files() is expected and len(recorder.made) == 1


@needs_nvcc
@pytest.mark.parametrize("name", ["decode_attention", "flash_attention_fwd"])
def test_stubs_compile_to_the_same_cubin(name):
    plan = cuda_check.representative(PLANS[name])[0]
    stub_source, stub_header = _stubs(plan.kernel)
    text, stubbed = cuda_check.cubins([cuda_check.cuda_source(plan),
                                       cuda_check.cuda_source(plan, stub_source, stub_header)])
    assert text == stubbed


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["rms_norm", "flash_attention_fwd"])
def test_cuda_kernels_run_the_same_from_include_files(name, monkeypatch):
    from mlx_primitives.hardware import device_profile

    if device_profile().backend != "cuda":
        pytest.skip("include files are a CUDA path")
    assert source_files.nvrtc_reads_files()
    plan = PLANS[name][0]
    inputs = [mx.random.uniform(shape=a.shape).astype(a.dtype) if mx.issubdtype(a.dtype, mx.floating) else a
              for a in plan.inputs]
    plan = dataclasses.replace(plan, inputs=inputs)
    stubbed = plan.call(launcher.compiled.__wrapped__(plan.kernel, "cuda", plan.shared_memory))
    monkeypatch.setattr(source_files, "nvrtc_reads_files", lambda: False)
    text = plan.call(launcher.compiled.__wrapped__(plan.kernel, "cuda", plan.shared_memory))
    for a, b in zip(text, stubbed):
        assert mx.array_equal(a, b, equal_nan=True).item()
