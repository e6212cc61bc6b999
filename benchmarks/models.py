"""A 1B-parameter-shaped Llama (random weights, fp16) with mlx-lm's attention and through ``swap_attention``.

Issue 10's targets (H100): prefill at 8k tokens >= 1.0x mlx-lm's, decode at 8k context >= 1.5x
mlx-lm's tokens/s (decode kernel), logits equal within fp16 tolerance.

* Prefill: ``model.model(tokens, cache)`` for one sequence into fresh mlx-lm caches, then the head on
  the last position (what generation needs); mlx-lm as is vs ``swap_attention(kernel="flash")``.
* Decode: after an untimed prefill of ``context`` tokens and one untimed step, teacher-forced steps
  of one token, each queued with ``mx.async_eval`` as mlx-lm's ``generate_step`` does (``time / steps``): mlx-lm with its ``KVCache``; the flash swap on the same ``KVCache`` (the
  dispatcher's decode route); the flash swap over a ``PagedKVCache`` (split-KV decode kernel reading
  pages in place). 'build us/layer': Python time building one step's graph (the model call, up to
  ``mx.async_eval``) per layer: host time the GPU cannot hide on a host-bound backend.
* Logits: last-position prefill logits and every decode step's, fp16, against a float32 copy of the
  same weights; ours must stay within 2x mlx-lm's own fp16 error + 1e-2.
"""

from __future__ import annotations

import time
from typing import List

import mlx.core as mx
import numpy as np

from mlx_primitives.models import paged_cache_for, paged_forward, restore_attention, swap_attention
from mlx_primitives.models.configs import LLAMA_1B, TINY_CONFIGS, random_model

from .common import Table, time_ms

DECODE_STEPS = 32
PAGE_SIZE = 64


def _prefill_fn(model, tokens):
    from mlx_lm.models.cache import make_prompt_cache

    def run():
        hidden = model.model(tokens, cache=make_prompt_cache(model))
        return model.model.embed_tokens.as_linear(hidden[:, -1])

    return run


def _decode(model, tokens: mx.array, steps: int, paged: bool):
    """(ms per token, us building each step's graph, logits (1 + steps, vocab) float32): prefill
    ``tokens[:, :-steps]``, then decode the rest."""
    from mlx_lm.models.cache import make_prompt_cache

    context = tokens.shape[1] - steps
    if paged:
        pages = paged_cache_for(model, num_pages=-(-tokens.shape[1] // PAGE_SIZE) + 1, page_size=PAGE_SIZE)
        seqs = [pages.add_sequence()]

        def step(chunk):
            return paged_forward(model, pages, seqs, chunk)[:, -1]
    else:
        cache = make_prompt_cache(model)

        def step(chunk):
            return model(chunk, cache=cache)[:, -1]

    logits = [step(tokens[:, :context]), step(tokens[:, context : context + 1])]  # the first step compiles
    mx.eval(logits)
    build = 0.0
    start = time.perf_counter()
    for i in range(context + 1, tokens.shape[1]):
        begin = time.perf_counter()
        logits.append(step(tokens[:, i : i + 1]))
        build += time.perf_counter() - begin
        mx.async_eval(logits[-1])  # as mlx-lm's generate_step: build step i + 1 while step i runs
    mx.eval(logits)
    ms = (time.perf_counter() - start) * 1e3 / (steps - 1)
    return ms, build * 1e6 / (steps - 1), np.array(mx.concatenate(logits).astype(mx.float32))


def run(quick: bool = False) -> List[Table]:
    config = TINY_CONFIGS["llama"] if quick else LLAMA_1B
    lengths = (64, 128) if quick else (2048, 4096, 8192)
    contexts = (128,) if quick else (2048, 8192)
    steps = 4 if quick else DECODE_STEPS
    shape = ("tiny Llama" if quick else "Llama-3.2-1B-shaped") + (
        f" ({config['num_hidden_layers']} layers, d={config['hidden_size']}, {config['num_attention_heads']}/"
        f"{config['num_key_value_heads']} heads, vocab {config['vocab_size']}), random weights, fp16, batch 1")
    model = random_model(config, dtype=mx.float16)
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(0, config["vocab_size"], (1, max(max(lengths), max(contexts) + steps))))

    prefill = Table(title=f"Prefill: {shape}", columns=("tokens", "mlx-lm ms", "flash ms", "mlx-lm / flash",
                                                        "flash tokens/s"),
                    note="Target at 8192 tokens: mlx-lm / flash >= 1.0.", x="tokens",
                    series=("mlx-lm ms", "flash ms"))
    for length in lengths:
        restore_attention(model)
        base = time_ms(_prefill_fn(model, tokens[:, :length]), warmup=2, repeats=5)
        swap_attention(model, kernel="flash")
        ours = time_ms(_prefill_fn(model, tokens[:, :length]), warmup=2, repeats=5)
        prefill.add(length, base, ours, base / ours, length / ours * 1e3)

    decode = Table(title=f"Decode: {shape}, {steps} steps after the context",
                   columns=("context", "mlx-lm tokens/s", "flash (mlx-lm cache) tokens/s", "flash paged tokens/s",
                            "flash paged / mlx-lm", "mlx-lm build us/layer", "flash paged build us/layer"),
                   note="Target at 8192 context: flash paged / mlx-lm >= 1.5.", x="context",
                   series=("mlx-lm tokens/s", "flash (mlx-lm cache) tokens/s", "flash paged tokens/s"),
                   ylabel="tokens/s")
    exact = random_model(config, dtype=mx.float32)
    logits = Table(title="Logits: max |logit - float32 model's| over the prefill's last position and each decode step",
                   columns=("context", "mlx-lm fp16", "flash fp16", "flash paged fp16", "bound (2x mlx-lm + 1e-2)",
                            "within"))
    for context in contexts:
        window = tokens[:, : context + steps]
        restore_attention(model)
        base_ms, base_build, base_logits = _decode(model, window, steps, paged=False)
        swap_attention(model, kernel="flash")
        flash_ms, _, flash_logits = _decode(model, window, steps, paged=False)
        paged_ms, paged_build, paged_logits = _decode(model, window, steps, paged=True)
        restore_attention(model)
        layers = config["num_hidden_layers"]
        decode.add(context, 1e3 / base_ms, 1e3 / flash_ms, 1e3 / paged_ms, base_ms / paged_ms, base_build / layers,
                   paged_build / layers)
        _, _, exact_logits = _decode(exact, window, steps, paged=False)
        errors = [float(np.abs(x - exact_logits).max()) for x in (base_logits, flash_logits, paged_logits)]
        bound = 2 * errors[0] + 1e-2
        logits.add(context, *errors, bound, "yes" if max(errors[1:]) <= bound else "NO")
        mx.clear_cache()
    return [prefill, decode, logits]
