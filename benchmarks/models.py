"""A 1B-parameter-shaped Llama (random weights, fp16) with mlx-lm's attention and through ``swap_attention``.

Issue 10's targets (H100): prefill at 8k tokens >= 1.0x mlx-lm's, decode at 8k context >= 1.5x
mlx-lm's tokens/s (decode kernel), logits equal within fp16 tolerance.

* Prefill: ``model.model(tokens, cache)`` for one sequence into fresh mlx-lm caches, then the head on
  the last position (what generation needs); mlx-lm as is vs ``swap_attention(kernel="flash")``,
  timed in turn over several rounds (medians): the GPU's speed drifts between runs.
* Decode: after an untimed prefill of ``context`` tokens and one untimed step, teacher-forced steps
  of one token, each queued with ``mx.async_eval`` as mlx-lm's ``generate_step`` does (``time /
  steps``), every variant timed in turn over several rounds (medians):
  - mlx-lm with its ``KVCache``, as shipped;
  - mlx-lm compiled: mlx-lm's model and attention (``mx.fast.scaled_dot_product_attention``) with
    the same ``mx.compile`` treatment as ours, over a fixed-capacity cache (:class:`StaticCache`:
    array offset, keys past it masked), since mlx-lm's ``KVCache`` (Python-int offsets, growing
    buffers) cannot be traced;
  - the flash swap on mlx-lm's ``KVCache`` (the dispatcher's decode route);
  - the flash swap over a ``PagedKVCache``, one ``paged_forward`` a step (split-KV decode kernel
    reading pages in place);
  - the same step compiled (:class:`~mlx_primitives.models.CompiledDecode`).
  'build us/layer': Python time of one step's call (graph building, or the compiled call) per
  layer: host time the GPU cannot hide on a host-bound backend.
* Logits: last-position prefill logits and every decode step's, fp16, against a float32 copy of the
  same weights; ours must stay within 2x mlx-lm's own fp16 error + 1e-2.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Tuple

import mlx.core as mx
import numpy as np

from mlx_primitives.models import CompiledDecode, paged_cache_for, paged_forward, restore_attention, swap_attention
from mlx_primitives.models.configs import LLAMA_1B, TINY_CONFIGS, random_model

from .common import Table, in_turn_ms, time_ms

DECODE_STEPS = 32
PAGE_SIZE = 64
MEMORY_STEPS = 8  # queued compiled steps whose peak memory is measured
VARIANTS = ("mlx-lm", "mlx-lm compiled", "flash", "flash paged", "flash paged compiled")
SWAPPED = {"mlx-lm": False, "mlx-lm compiled": False, "flash": True, "flash paged": True,
           "flash paged compiled": True}


class StaticCache:
    """mlx-lm's cache interface over fixed-capacity buffers ``(1, kv_heads, capacity, head_dim)``
    with an int32 ``(1,)`` array offset: what ``mx.compile`` can trace for mlx-lm's own attention."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        return self.keys, self.values

    def make_mask(self, *args, **kwargs) -> mx.array:
        return (mx.arange(self.keys.shape[2]) <= self.offset)[None, None, None]  # keys up to the new one


def _static_step(model) -> Callable:
    def step(tokens, offset, keys, values):
        caches = [StaticCache(k, v, offset) for k, v in zip(keys, values)]
        logits = model(tokens, cache=caches)[:, -1]
        return logits, [c.keys for c in caches], [c.values for c in caches]

    return mx.compile(step)


def _prefill_fn(model, tokens):
    from mlx_lm.models.cache import make_prompt_cache

    def run():
        hidden = model.model(tokens, cache=make_prompt_cache(model))
        return model.model.embed_tokens.as_linear(hidden[:, -1])

    return run


def _stepper(model, variant: str, context_tokens: mx.array, capacity: int, shared: Dict) -> Callable:
    """Prefill ``context_tokens`` for ``variant``; return ``step(chunk (1, 1)) -> logits (1, vocab)``;
    the prefill's logits are ``step.first``. ``shared`` keeps compiled functions and pools across rounds."""
    from mlx_lm.models.cache import make_prompt_cache

    if variant in ("flash paged", "flash paged compiled"):
        if "pages" not in shared:
            shared["pages"] = paged_cache_for(model, num_pages=-(-capacity // PAGE_SIZE) + 1, page_size=PAGE_SIZE)
        pages = shared["pages"]
        for seq in pages.sequences:
            pages.free(seq)
        seqs = [pages.add_sequence()]
        first = paged_forward(model, pages, seqs, context_tokens)[:, -1]
        if variant == "flash paged":
            def step(chunk):
                return paged_forward(model, pages, seqs, chunk)[:, -1]
        else:
            compiled = shared.setdefault("compiled", CompiledDecode(model, pages))

            def step(chunk):
                return compiled(seqs, chunk[:, 0])
    else:
        cache = make_prompt_cache(model)
        first = model(context_tokens, cache=cache)[:, -1]
        if variant in ("mlx-lm", "flash"):
            def step(chunk):
                return model(chunk, cache=cache)[:, -1]
        else:
            compiled = shared.setdefault("static", _static_step(model))
            context = context_tokens.shape[1]
            buffers = []
            for layer in cache:
                full = mx.zeros(layer.keys.shape[:2] + (capacity,) + layer.keys.shape[3:], layer.keys.dtype)
                for name in ("keys", "values"):
                    buffer = mx.array(full)
                    buffer[:, :, :context] = getattr(layer, name)[:, :, :context]
                    buffers.append(buffer)
            keys, values = buffers[0::2], buffers[1::2]
            offset = [context]

            def step(chunk):
                logits, keys[:], values[:] = compiled(chunk, mx.array(offset, mx.int32), keys, values)
                offset[0] += 1
                return logits
    step.first = first
    return step


def _decode_once(model, variant: str, tokens: mx.array, steps: int, shared: Dict, memory: bool = False):
    """(ms per token, us of Python per step, logits (1 + steps, vocab) float32, peak MB or None)."""
    context = tokens.shape[1] - steps
    step = _stepper(model, variant, tokens[:, :context], tokens.shape[1] + MEMORY_STEPS, shared)
    logits = [step.first, step(tokens[:, context : context + 1])]  # the first step compiles
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
    peak = None
    if memory:  # queued steps as above; a step that copied a pool would add a pool's bytes
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        for i in range(MEMORY_STEPS):
            out = step(tokens[:, i : i + 1])
            mx.async_eval(out)
        mx.eval(out)
        peak = (mx.get_peak_memory() - base) / 1e6
    return ms, build * 1e6 / (steps - 1), np.array(mx.concatenate(logits).astype(mx.float32)), peak


def _set_attention(model, swapped: bool) -> None:
    if swapped:
        swap_attention(model, kernel="flash")
    else:
        restore_attention(model)


def run(quick: bool = False) -> List[Table]:
    config = TINY_CONFIGS["llama"] if quick else LLAMA_1B
    lengths = (64, 128) if quick else (2048, 4096, 8192)
    contexts = (128,) if quick else (2048, 8192)
    steps = 4 if quick else DECODE_STEPS
    rounds = 2 if quick else 5
    decode_rounds = 2 if quick else 3
    layers = config["num_hidden_layers"]
    shape = ("tiny Llama" if quick else "Llama-3.2-1B-shaped") + (
        f" ({layers} layers, d={config['hidden_size']}, {config['num_attention_heads']}/"
        f"{config['num_key_value_heads']} heads, vocab {config['vocab_size']}), random weights, fp16, batch 1")
    # The targets are for the 1B shape at 8192; the quick tiny model checks only that it runs.
    target = "" if quick else "Target at 8192 tokens: mlx-lm / flash >= 1.0. "
    decode_target = "" if quick else "Target at 8192 context: flash paged (compiled) / mlx-lm >= 1.5. "
    model = random_model(config, dtype=mx.float16)
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(0, config["vocab_size"], (1, max(max(lengths), max(contexts) + steps))))

    prefill = Table(title=f"Prefill: {shape}", columns=("tokens", "mlx-lm ms", "flash ms", "mlx-lm / flash",
                                                        "flash tokens/s"),
                    note=f"{target}mlx-lm and flash timed in turn (order "
                         f"alternating), {rounds} rounds of 3 calls, medians.", x="tokens",
                    series=("mlx-lm ms", "flash ms"))
    for length in lengths:
        def prefill_ms(swapped: bool) -> float:
            _set_attention(model, swapped)
            return time_ms(_prefill_fn(model, tokens[:, :length]), warmup=1, repeats=3)

        base, ours = in_turn_ms((False, True), prefill_ms, rounds)
        prefill.add(length, base, ours, base / ours, length / ours * 1e3)

    columns = tuple(f"{v} tokens/s" for v in VARIANTS)
    decode = Table(title=f"Decode: {shape}, {steps} steps after the context",
                   columns=("context",) + columns + ("flash paged compiled / mlx-lm",
                                                     "flash paged compiled / mlx-lm compiled"),
                   note=f"{decode_target}Variants timed in turn, "
                        f"{decode_rounds} rounds, medians.", x="context", series=columns, ylabel="tokens/s")
    host = Table(title="Decode host time and memory",
                 columns=("context",) + tuple(f"{v} build us/layer" for v in VARIANTS) + (
                     f"flash paged compiled peak MB over {MEMORY_STEPS} queued steps", "one layer's key pool MB"),
                 note="build us/layer: Python time of one step's call per layer (for the compiled variants the "
                      "whole compiled call, replay included). Peak: memory above the step's start while "
                      f"{MEMORY_STEPS} compiled steps run queued; a step that copied its pools instead of writing "
                      "them in place would add at least one pool.")
    exact = random_model(config, dtype=mx.float32)
    logits = Table(title="Logits: max |logit - float32 model's| over the prefill's last position and each decode step",
                   columns=("context",) + tuple(f"{v} fp16" for v in VARIANTS) + ("bound (2x mlx-lm + 1e-2)",
                                                                                  "within"))
    for context in contexts:
        window = tokens[:, : context + steps]
        shared: Dict[str, Dict] = {v: {} for v in VARIANTS}
        times: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        builds: Dict[str, List[float]] = {v: [] for v in VARIANTS}
        outs: Dict[str, np.ndarray] = {}
        peak = None
        for r in range(decode_rounds):
            for variant in VARIANTS:
                _set_attention(model, SWAPPED[variant])
                memory = r == 0 and variant == "flash paged compiled"
                ms, build, out, measured = _decode_once(model, variant, window, steps, shared[variant], memory)
                times[variant].append(ms)
                builds[variant].append(build)
                outs.setdefault(variant, out)
                peak = measured if memory else peak
        restore_attention(model)
        tps = {v: 1e3 / statistics.median(times[v]) for v in VARIANTS}
        decode.add(context, *(tps[v] for v in VARIANTS), tps["flash paged compiled"] / tps["mlx-lm"],
                   tps["flash paged compiled"] / tps["mlx-lm compiled"])
        pool_mb = shared["flash paged compiled"]["pages"].k_pools[0].nbytes / 1e6
        host.add(context, *(statistics.median(builds[v]) / layers for v in VARIANTS), peak, pool_mb)
        _, _, exact_logits, _ = _decode_once(exact, "mlx-lm", window, steps, {})
        errors = [float(np.abs(outs[v] - exact_logits).max()) for v in VARIANTS]
        bound = 2 * errors[0] + 1e-2
        logits.add(context, *errors, bound, "yes" if max(errors[1:]) <= bound else "NO")
        del shared
        mx.clear_cache()
    return [prefill, decode, host, logits]
