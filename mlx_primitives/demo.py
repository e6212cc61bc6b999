"""``python -m mlx_primitives demo``: a small random-weight Llama run with mlx-lm's attention and ours.

Each variant prefills the same prompt and then decodes the same tokens (teacher-forced), so the
logits are comparable step by step: mlx-lm as is, :func:`swap_attention` with ``"flash"`` and
``"sage"``, and ``"paged decode"`` (the flash swap over a :class:`PagedKVCache`, decode steps through
the split-KV decode kernel's path). Then :func:`generate` runs a batch of prompts of different lengths
with continuous batching.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .attention import explain
from .hardware import device_profile

DEMO_LLAMA = dict(model_type="llama", hidden_size=256, num_hidden_layers=4, intermediate_size=688,
                  num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=1024,
                  tie_word_embeddings=True)
VARIANTS = ("mlx-lm", "flash", "sage", "paged decode")


def _run_variant(model, variant: str, tokens: mx.array, prompt_len: int) -> Tuple[float, float, np.ndarray]:
    """(prefill ms, decode tokens/s, logits (steps, vocab)) of one variant on ``tokens`` (1, total)."""
    from mlx_lm.models.cache import make_prompt_cache

    from .models import paged_cache_for, paged_forward, restore_attention, swap_attention

    restore_attention(model)
    if variant != "mlx-lm":
        swap_attention(model, kernel="sage" if variant == "sage" else "flash")
    if variant == "paged decode":
        total = tokens.shape[1]
        pages = paged_cache_for(model, num_pages=-(-total // 16) * 2, page_size=16)

        def step(chunk, state):
            return paged_forward(model, pages, state, chunk)

        def fresh():
            return [pages.add_sequence()]
    else:
        def step(chunk, state):
            return model(chunk, cache=state)

        def fresh():
            return make_prompt_cache(model)

    mx.eval(step(tokens[:, :prompt_len], fresh()))  # warm-up: compile kernels, fill caches of validations
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


def model_rows(prompt_len: int = 256, decode_steps: int = 32, seed: int = 0) -> Tuple[List[tuple], Dict[str, str]]:
    """Rows (variant, prefill ms, decode tokens/s, max |logit - mlx-lm's|) and the paths each variant ran."""
    from .models import model_attention, restore_attention
    from .models.configs import random_model

    dtype = mx.float16 if device_profile().is_gpu else mx.float32
    model = random_model(DEMO_LLAMA, dtype=dtype, seed=seed, std=0.05)
    rng = np.random.default_rng(seed)
    tokens = mx.array(rng.integers(0, DEMO_LLAMA["vocab_size"], (1, prompt_len + decode_steps)))
    rows, paths, reference = [], {}, None
    for variant in VARIANTS:
        prefill_ms, tokens_per_s, logits = _run_variant(model, variant, tokens, prompt_len)
        reference = logits if reference is None else reference
        rows.append((variant, prefill_ms, tokens_per_s, float(np.abs(logits - reference).max())))
        swapped = model_attention(model)
        paths[variant] = ("mx.fast.scaled_dot_product_attention (mlx-lm)" if swapped is None else
                          ", ".join(f"{route} x{count}" for route, count in sorted(swapped.routes.items())))
    restore_attention(model)
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
    paged = "the split-KV decode kernel, reading pages in place" if device_profile().is_gpu else \
        "reference ops (kernels need a GPU backend)"
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
