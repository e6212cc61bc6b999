"""Batched generation over a :class:`~mlx_primitives.cache.PagedKVCache` with continuous batching.

Sequences join and finish independently: a waiting prompt is prefilled alone (its own length, no
padding) as soon as a batch slot and pages are free, then decodes with every other running
sequence, one token per step, each at its own length. A finished sequence frees its pages at once.
Prefill runs :func:`~mlx_primitives.models.paged_forward`; decode steps run a
:class:`~mlx_primitives.models.CompiledDecode` (one compiled call a step, traced once per batch
size), or ``paged_forward`` with ``compiled=False``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from numbers import Integral
from typing import FrozenSet, Iterable, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from .compiled import CompiledDecode
from .paged_step import paged_cache_for, paged_forward
from .swap import require_swapped


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise ValueError unless ``temperature >= 0`` and ``0 < top_p <= 1``."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy); got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")


def sample(logits: mx.array, temperature: float = 0.0, top_p: float = 1.0) -> mx.array:
    """Next tokens ``(batch,)`` from last-position ``logits`` ``(batch, vocab)``: greedy at temperature 0,
    otherwise from the smallest set of tokens whose probability reaches ``top_p``."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temperature
    if top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        sorted_logits = mx.where(before < top_p, sorted_logits, -mx.inf)
        return mx.take_along_axis(order, mx.random.categorical(sorted_logits)[:, None], axis=-1)[:, 0]
    return mx.random.categorical(logits)


def _stop_tokens(eos_token_id: Union[None, int, Iterable[int]]) -> FrozenSet[int]:
    """``eos_token_id`` (None, one id, or a collection of ids as mlx-lm tokenizers' ``eos_token_ids``) as a set."""
    if eos_token_id is None:
        return frozenset()
    collection = isinstance(eos_token_id, Iterable) and not isinstance(eos_token_id, (str, bytes))
    ids = tuple(eos_token_id) if collection else (eos_token_id,)
    if not all(isinstance(i, Integral) for i in ids):
        raise TypeError(f"eos_token_id must be None, an int or a collection of ints; got {eos_token_id!r}")
    return frozenset(int(i) for i in ids)


def _token_budgets(max_tokens: Union[int, Sequence[int]], count: int) -> List[int]:
    """``max_tokens`` (one int or one per prompt) as ``count`` positive ints."""
    budgets = [max_tokens] * count if isinstance(max_tokens, int) else list(max_tokens)
    if len(budgets) != count or not all(isinstance(m, int) and m >= 1 for m in budgets):
        raise ValueError(f"max_tokens must be a positive int or {count} positive ints (one per prompt); "
                         f"got {max_tokens!r}")
    return budgets


@dataclass
class Generation:
    """What :func:`generate` produced: ``tokens[i]`` are prompt i's new tokens (its first from prefill)."""

    tokens: List[List[int]]
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    batch_sizes: List[int] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_tokens: Union[int, Sequence[int]] = 32, *,
             max_batch: int = 8, temperature: float = 0.0, top_p: float = 1.0,
             eos_token_id: Union[None, int, Iterable[int]] = None, page_size: int = 16,
             num_pages: Optional[int] = None, compiled: bool = True) -> Generation:
    """Generate up to ``max_tokens`` tokens after each prompt, continuously batched over paged KV.

    A waiting prompt joins only when the pool holds every page it will need to finish on top of
    what the running sequences will still need (so no sequence runs out of pages midway).

    Args:
        model: an mlx-lm model after :func:`swap_attention` (any kernel; the paged cache computes
            attention itself), with ``model.args`` and ``model.layers``.
        prompts: token ids per prompt, of any lengths.
        max_tokens: new tokens per prompt at most (fewer where a stop token comes first): one int,
            or one per prompt.
        max_batch: sequences decoding together at most.
        temperature, top_p: sampling (:func:`sample`); temperature 0 is greedy.
        eos_token_id: a token id, or a collection of them (e.g. an mlx-lm tokenizer's
            ``eos_token_ids``), that finishes its sequence.
        page_size: keys per page (a power of two).
        num_pages: pages per layer pool; default enough for ``max_batch`` of the longest sequences.
        compiled: decode through a :class:`CompiledDecode` (else one :func:`paged_forward` a step).

    Returns:
        A :class:`Generation` with the tokens and the prefill / decode token counts and times.
    """
    require_swapped(model, "generate")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    check_sampling(temperature, top_p)
    stop, budgets = _stop_tokens(eos_token_id), _token_budgets(max_tokens, len(prompts))
    # Pages sequence i holds when it finishes: its last sampled token is never written.
    needs = [-(-(len(p) + m - 1) // page_size) for p, m in zip(prompts, budgets)]
    if num_pages is None:
        num_pages = max_batch * max(needs)
    cache = paged_cache_for(model, num_pages, page_size)
    decode = CompiledDecode(model, cache, max_pages=max(needs)) if compiled else None
    result = Generation(tokens=[[] for _ in prompts])
    waiting = list(range(len(prompts)))
    running: dict = {}  # cache sequence id -> prompt index

    def finished(index: int) -> bool:
        tokens = result.tokens[index]
        return len(tokens) >= budgets[index] or tokens[-1] in stop

    def admissible(index: int) -> bool:
        still_needed = sum(needs[i] - len(cache.pages(s)) for s, i in running.items())
        return cache.allocator.free_pages - still_needed >= needs[index]

    while waiting or running:
        while waiting and len(running) < max_batch and admissible(waiting[0]):
            index = waiting.pop(0)
            seq = cache.add_sequence()
            start = time.perf_counter()
            logits = paged_forward(model, cache, [seq], mx.array(prompts[index])[None])
            token = sample(logits[:, -1], temperature, top_p)
            result.tokens[index].append(token.item())
            result.prefill_seconds += time.perf_counter() - start
            result.prefill_tokens += len(prompts[index])
            if finished(index):
                cache.free(seq)
            else:
                running[seq] = index
        if not running:
            if waiting:
                raise ValueError(f"prompt {waiting[0]} needs {needs[waiting[0]]} pages; the pool holds {num_pages}")
            break
        seqs = list(running)
        last = mx.array([result.tokens[running[s]][-1] for s in seqs])
        start = time.perf_counter()
        logits = decode(seqs, last) if decode else paged_forward(model, cache, seqs, last[:, None])[:, -1]
        tokens = sample(logits, temperature, top_p).tolist()
        result.decode_seconds += time.perf_counter() - start
        result.decode_tokens += len(seqs)
        result.batch_sizes.append(len(seqs))
        for seq, token in zip(seqs, tokens):
            index = running[seq]
            result.tokens[index].append(token)
            if finished(index):
                cache.free(seq)
                del running[seq]
    return result
