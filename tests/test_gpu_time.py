"""benchmarks.gpu_time pairs Nsight Compute's kernel durations with the cases that launched them."""

import random

from benchmarks.gpu_time import RUNS, parse

HEADER = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'


def _row(kernel: str, ns: int, metric: str = "gpu__time_duration.sum") -> str:
    return f'"0","{kernel}","{metric}","ns","{ns:,}"'


def test_durations_go_to_the_case_that_launched_them():
    """sdpa's kernels (two a call, both runs back to back) are one case; a decode case is its last run, with
    its counters' launch before and a combine pass after counted in; other metrics and ncu's own lines are
    ignored."""
    times = [random.randint(1_000, 900_000) for _ in range(16)]
    sdpa = ["cudnn_fprop", "cudnn::lean_reduction"] * RUNS
    log = ["==PROF== Connected to process 1", "CASE B=1 L=4096 sdpa", "CASE B=1 L=4096 fp16 default",
           "CASE B=1 L=4096 fp16 {'SPLIT': 128}", "CASE B=8 L=4096 fp16 default", HEADER]
    log += [_row(kernel, ns) for kernel, ns in zip(sdpa, times[:4])]
    counters, split, combine = ("custom_kernel_decode_attention_" + k for k in ("counters_8", "a", "combine_c"))
    log += [_row(counters, times[4]), _row(split, times[5]), _row(counters, times[6]), _row(split, times[7])]
    log += [_row(split, 7, metric="sm__cycles_elapsed.avg")]
    log += [_row(split, times[8]), _row(combine, times[9]), _row(split, times[10]), _row(combine, times[11])]
    log += [_row(split, times[12]), _row(split, times[13])]
    results = parse("\n".join(log))
    assert [(name, kernels) for name, kernels, _ in results] == [
        ("B=1 L=4096 sdpa", 2), ("B=1 L=4096 fp16 default", 2), ("B=1 L=4096 fp16 {'SPLIT': 128}", 2),
        ("B=8 L=4096 fp16 default", 1)]
    expected = [sum(times[:4]) / RUNS / 1e3, (times[6] + times[7]) / 1e3, (times[10] + times[11]) / 1e3,
                times[13] / 1e3]
    assert [us for _, _, us in results] == expected
