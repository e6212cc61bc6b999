"""Timing, tables and plots shared by every benchmark suite.

A suite is a module with ``run(quick: bool) -> list[Table]``. Times are medians
of repeated, synchronised calls after warm-up; a table states the limit each row
is measured against (TFLOP/s or GB/s of the device) where it is known.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, TypeVar, Union

import mlx.core as mx

from mlx_primitives.hardware import device_profile

T = TypeVar("T")


def time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds, each call evaluated to completion."""
    for _ in range(warmup):
        mx.eval(fn())
    samples = []
    start = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        mx.eval(fn())
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 10 * repeats:
            break
    return statistics.median(samples)


def in_turn_ms(items: Sequence[T], measure: Callable[[T], float], rounds: int = 5) -> List[float]:
    """Median over ``rounds`` of ``measure(item)`` (milliseconds) for each of ``items`` (the calls, or
    what selects them), measured in turn, the order reversed every other round, so that drifts of the
    GPU's speed during a run fall on all of them alike (a ratio of two separate timings can be off by 2x)."""
    samples: List[List[float]] = [[] for _ in items]
    order = list(range(len(items)))
    for r in range(rounds):
        for i in (order if r % 2 == 0 else order[::-1]):
            samples[i].append(measure(items[i]))
    return [statistics.median(times) for times in samples]


def time_in_turn_ms(fns: Sequence[Callable[[], object]], rounds: int = 5, repeats: int = 3,
                    warmup: int = 2) -> List[float]:
    """:func:`in_turn_ms` of lone calls: each round times every function ``repeats`` times (each call
    evaluated to completion, medians) after ``warmup`` calls of each."""
    for fn in fns:
        for _ in range(warmup):
            mx.eval(fn())
    return in_turn_ms(fns, lambda fn: time_ms(fn, warmup=0, repeats=repeats), rounds)


def time_per_call_ms(fn: Callable[[], object], calls: int = 20, repeats: int = 5) -> float:
    """Median time per call of ``fn`` when ``calls`` of them are queued and evaluated together.

    Measures what a model sees when attention is one node of a larger lazy graph:
    Python overhead of building each call plus the device time.
    """
    def batch():
        return [fn() for _ in range(calls)]

    return time_ms(batch, warmup=2, repeats=repeats) / calls


def build_us(fn: Callable[[], object], calls: int = 50, rounds: int = 5) -> float:
    """Microseconds of Python per call to build ``fn()``'s graph: the median over ``rounds`` of
    ``calls`` calls each (outputs evaluated after each round, not timed)."""
    mx.eval(fn())
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        outs = [fn() for _ in range(calls)]
        samples.append((time.perf_counter() - start) / calls * 1e6)
        mx.eval(outs)
    return statistics.median(samples)


def eval_us(fn: Callable[[], object], calls: int = 20, rounds: int = 5) -> float:
    """Microseconds per call of evaluating ``calls`` queued calls of ``fn`` whose graphs were built
    beforehand (untimed): the launch cost and device time a call adds once Python is out of the way
    (the median over ``rounds``)."""
    mx.eval(fn())
    samples = []
    for _ in range(rounds):
        outs = [fn() for _ in range(calls)]
        start = time.perf_counter()
        mx.eval(outs)
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


@dataclass
class Table:
    """A titled markdown table; ``series`` names the columns a plot draws against ``x``: one column, or
    several (``("B", "L")``) whose values label each row on a categorical axis. ``limit`` draws the
    device's limit (in the series' unit) as a horizontal line."""

    title: str
    columns: Sequence[str]
    rows: List[Sequence[object]] = field(default_factory=list)
    note: str = ""
    x: Union[None, str, Sequence[str]] = None
    series: Sequence[str] = ()
    ylabel: str = "ms"
    limit: Optional[float] = None

    def add(self, *row: object) -> None:
        self.rows.append(row)

    def markdown(self) -> str:
        def cell(v: object) -> str:
            if isinstance(v, float):
                return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
            return str(v)

        lines = [f"### {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"


def header() -> str:
    """Device, date and MLX version: the first lines of every results file."""
    p = device_profile()
    limits = []
    if p.bandwidth_gbs:
        limits.append(f"{p.bandwidth_gbs:.0f} GB/s")
    if p.matmul_tflops:
        limits.append(f"{p.matmul_tflops:.0f} TFLOP/s fp16 dense")
    return (
        f"- device: {p.name} ({p.backend}, {p.family})\n"
        f"- date: {datetime.date.today().isoformat()}\n"
        f"- MLX: {mx.__version__}\n"
        f"- peak: {', '.join(limits) if limits else 'unknown'}\n"
    )


def plot(table: Table, path: str) -> bool:
    """Write ``table`` as a PNG line plot (one line per series); False without matplotlib."""
    if not table.x or not table.series or not table.rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cols = list(table.columns)
    x_names = (table.x,) if isinstance(table.x, str) else tuple(table.x)
    x_cols = [cols.index(name) for name in x_names]

    def x_of(row):
        if len(x_cols) == 1:
            return row[x_cols[0]]
        return " ".join(f"{name}={row[i]}" for name, i in zip(x_names, x_cols))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in table.series:
        si = cols.index(name)
        points = [(x_of(r), r[si]) for r in table.rows if isinstance(r[si], (int, float))]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if table.limit:
        ax.axhline(table.limit, linestyle="--", color="gray", label=f"device limit ({table.limit:.0f})")
    if len(x_cols) > 1:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.set_xlabel(" x ".join(x_names))
    ax.set_ylabel(table.ylabel)
    ax.set_title(table.title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")[:60]


def write_results(suite: str, tables: Sequence[Table], out_dir: str) -> str:
    """Write ``<suite>.md`` (header + tables) and one PNG per plottable table; return the md path."""
    os.makedirs(out_dir, exist_ok=True)
    body = [f"# {suite} benchmarks", "", header()]
    for table in tables:
        png = f"{suite}_{slug(table.title)}.png"
        if plot(table, os.path.join(out_dir, png)):
            body.append(f"![{table.title}]({png})\n")
        body.append(table.markdown())
    path = os.path.join(out_dir, f"{suite}.md")
    with open(path, "w") as f:
        f.write("\n".join(body))
    return path
