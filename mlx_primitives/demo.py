"""``python -m mlx_primitives demo``: a small random-weight Llama run with mlx-lm's attention and ours.

Each variant prefills the same prompt and then decodes the same tokens (teacher-forced), so the
logits are comparable step by step: mlx-lm as is, :func:`swap_attention` with ``"flash"`` and
``"sage"``, and ``"paged decode"`` (the flash swap over a :class:`PagedKVCache`, decode steps through
the split-KV decode kernel's path). Times are medians of a few runs in turn, and each variant says
what its attention calls ran (the dispatcher's route: on the CPU ``"flash"`` sends plain causal calls
to ``mx.fast.scaled_dot_product_attention``, as mlx-lm does). Then :func:`generate` runs a batch of
prompts of different lengths with continuous batching.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .attention import explain
from .hardware import device_profile
from .models.compiled import kernel_decodes

DEMO_LLAMA = dict(model_type="llama", hidden_size=256, num_hidden_layers=4, intermediate_size=688,
                  num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=1024,
                  tie_word_embeddings=True)
VARIANTS = ("mlx-lm", "flash", "sage", "paged decode")


def _variant_step(model, variant: str, total: int) -> Tuple[Callable, Callable]:
    """Swap ``variant``'s attention into ``model``; return ``step(chunk, state) -> logits`` and ``fresh() -> state``."""
    from mlx_lm.models.cache import make_prompt_cache

    from .models import paged_cache_for, paged_forward, restore_attention, swap_attention

    restore_attention(model)
    if variant != "mlx-lm":
        swap_attention(model, kernel="sage" if variant == "sage" else "flash")
    if variant == "paged decode":
        pages = paged_cache_for(model, num_pages=-(-total // 16) * 2, page_size=16)

        return lambda chunk, seqs: paged_forward(model, pages, seqs, chunk), lambda: [pages.add_sequence()]
    return lambda chunk, cache: model(chunk, cache=cache), lambda: make_prompt_cache(model)


def _run_variant(model, variant: str, tokens: mx.array, prompt_len: int) -> Tuple[float, float, np.ndarray]:
    """(prefill ms, decode tokens/s, logits (steps, vocab)) of one timed run of ``variant`` on ``tokens`` (1, total)."""
    step, fresh = _variant_step(model, variant, tokens.shape[1])
    state = fresh()
    start = time.perf_counter()
    logits = [step(tokens[:, :prompt_len], state)[0, -1]]
    mx.eval(logits)
    prefill_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    for i in range(prompt_len, tokens.shape[1]):
        logits.append(step(tokens[:, i : i + 1], state)[0, -1])
        mx.eval(logits[-1])
    decode_s = time.perf_counter() - start
    out = np.array(mx.stack(logits).astype(mx.float32))
    return prefill_ms, (tokens.shape[1] - prompt_len) / decode_s, out


def _ran(model) -> str:
    """What the model's attention calls ran, from its :class:`SwappedAttention`'s routes."""
    from .models import model_attention

    swapped = model_attention(model)
    if swapped is None:
        return "mx.fast.scaled_dot_product_attention (mlx-lm's own)"
    return ", ".join(f"{route} x{count}" for route, count in sorted(swapped.routes.items()))


def route_names(ran: str) -> List[str]:
    """The route labels of a :func:`model_rows` paths entry (``"flash->sdpa x136, ..."``)."""
    return [part.rsplit(" x", 1)[0] for part in ran.split(", ")]


def model_rows(prompt_len: int = 256, decode_steps: int = 32, seed: int = 0,
               rounds: int = 3) -> Tuple[List[tuple], Dict[str, str]]:
    """Rows (variant, prefill ms, decode tokens/s, max |logit - mlx-lm's|) and what each variant ran.

    Times are medians over ``rounds`` runs of every variant in turn, the order reversed every other
    round (on a GPU after one untimed warm-up prefill each), so that drifts of a shared machine fall on
    all alike.
    """
    from .models import restore_attention
    from .models.configs import random_model

    dtype = mx.float16 if device_profile().is_gpu else mx.float32
    model = random_model(DEMO_LLAMA, dtype=dtype, seed=seed, std=0.05)
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(0, DEMO_LLAMA["vocab_size"], (1, prompt_len + decode_steps)))
    for variant in VARIANTS if device_profile().is_gpu else ():  # warm-up: compile the kernels
        step, fresh = _variant_step(model, variant, tokens.shape[1])
        mx.eval(step(tokens[:, :prompt_len], fresh()))
    runs: Dict[str, list] = {variant: [] for variant in VARIANTS}
    paths: Dict[str, str] = {}
    for r in range(rounds):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
            runs[variant].append(_run_variant(model, variant, tokens, prompt_len))
            paths[variant] = _ran(model)
    restore_attention(model)
    reference = runs[VARIANTS[0]][0][2]
    rows = [(variant, statistics.median(run[0] for run in runs[variant]),
             statistics.median(run[1] for run in runs[variant]),
             max(float(np.abs(run[2] - reference).max()) for run in runs[variant])) for variant in VARIANTS]
    return rows, paths


def dispatcher_paths(prompt_len: int = 256) -> List[str]:
    """Where the dispatcher sends the demo model's prefill and decode attention calls on this device."""
    heads, kv_heads, dim = DEMO_LLAMA["num_attention_heads"], DEMO_LLAMA["num_key_value_heads"], 32
    dtype = mx.float16 if device_profile().is_gpu else mx.float32
    lines = []
    for name, q_len in (("prefill", prompt_len), ("decode", 1)):
        q = mx.zeros((1, heads, q_len, dim), dtype)
        k = mx.zeros((1, kv_heads, prompt_len, dim), dtype)
        route = explain(q, k, k, layout="BHSD", mask="causal" if q_len > 1 else None)
        lines.append(f"  flash {name:<8} -> {route.path} ({route.reason})")
    pool = mx.zeros((2, 16, kv_heads, dim), dtype)
    kernel = kernel_decodes(mx.zeros((1, 1, heads, dim), dtype), pool, dim**-0.5, 0.0)
    paged = "the split-KV decode kernel, reading pages in place" if kernel else "the decode reference ops"
    lines.append(f"  paged decode   -> {paged}")
    return lines


def batch_generation_line(seed: int = 0) -> str:
    """Continuous batching of prompts of different lengths through the paged cache, tokens/s."""
    from .models import generate, swap_attention
    from .models.configs import random_model

    dtype = mx.float16 if device_profile().is_gpu else mx.float32
    model = random_model(DEMO_LLAMA, dtype=dtype, seed=seed, std=0.05)
    swap_attention(model)
    rng = np.random.default_rng(seed)
    lengths = (17, 64, 5, 120, 33, 80)
    prompts = [rng.integers(0, DEMO_LLAMA["vocab_size"], n).tolist() for n in lengths]
    result = generate(model, prompts, max_tokens=16, max_batch=4)
    return (f"continuous batching: {len(prompts)} prompts of lengths {list(lengths)}, at most 4 at once "
            f"(batch sizes seen: {sorted(set(result.batch_sizes))}): prefill {result.prefill_tokens_per_second:.0f} "
            f"tokens/s, decode {result.decode_tokens_per_second:.0f} tokens/s")


def plot_rows(rows: Sequence[tuple], path: str) -> Optional[str]:
    """Bar charts of prefill ms and decode tokens/s per variant as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r[0] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [r[1] for r in rows], color="tab:blue")
    left.set_title("prefill (ms, lower is better)", fontsize=9)
    right.bar(names, [r[2] for r in rows], color="tab:green")
    right.set_title("decode (tokens/s, higher is better)", fontsize=9)
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
        axis.grid(axis="y", alpha=0.3)
    p = device_profile()
    fig.suptitle(f"random-weight Llama ({DEMO_LLAMA['num_hidden_layers']} layers, d={DEMO_LLAMA['hidden_size']}) "
                 f"on {p.name} ({p.backend}), MLX {mx.__version__}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
