"""Batched generation over a :class:`~mlx_primitives.cache.PagedKVCache` with continuous batching.

Sequences join and finish independently: a waiting prompt is prefilled alone (its own length, no
padding) as soon as a batch slot and pages are free, then decodes with every other running
sequence, one token per step, each at its own length. A finished sequence frees its pages at once.

The model is an mlx-lm model run through :func:`~mlx_primitives.models.swap_attention`: each layer
gets a :class:`PagedLayerCache`, whose ``attend`` writes the new keys into the layer's pages and
attends over them: decode steps with :func:`~mlx_primitives.kernels.decode_attention` (the split-KV
kernel reading pages in place on a GPU, the reference path on the CPU), prefill chunks with
:func:`~mlx_primitives.attention.flash_attn_with_kvcache`. Host work happens once per model call,
not once per layer, and reads no array: lengths and write slots are Python ints kept by the cache,
the device block table is rebuilt only when a sequence's page list changes, and the decode call is
validated and prepared once per step (:func:`~mlx_primitives.kernels.decode.bind_decode`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from ..attention.kvcache import flash_attn_with_kvcache
from ..cache import PagedKVCache
from ..kernels.decode import MAX_Q_LEN, bind_decode
from .swap import model_attention


class PagedStep:
    """What every layer of one model call over a :class:`PagedKVCache` shares, computed once on the host.

    Args:
        cache: the paged cache of every layer.
        seqs: the sequences of the call, in batch order.
        new: tokens each sequence appends.
    """

    def __init__(self, cache: PagedKVCache, seqs: Sequence[int], new: int):
        offsets = [cache.offset(s) for s in seqs]
        self.offset = offsets[0] if len(seqs) == 1 else mx.array(offsets, mx.int32)
        self.cache, self.new = cache, new
        before = cache.reserve_host(seqs, new)
        self.block_table = cache.device_block_table(seqs)
        self.cache_seqlens = mx.array(before, mx.int32)
        self.lengths = mx.array([n + new for n in before], mx.int32)
        self.slots = None
        self._decode: dict = {}  # (scale, softcap) -> bind_decode's call
        if new <= MAX_Q_LEN:
            pages, rows = cache.write_slots(seqs, before, new)
            if len(seqs) == 1 and rows[0] + new <= cache.page_size:  # one page: a slice update, no index arrays
                self.slots = (slice(pages[0], pages[0] + 1), slice(rows[0], rows[0] + new))
            else:
                self.slots = (mx.array(pages, mx.int32), mx.array(rows, mx.int32))

    def write(self, pool: mx.array, new: mx.array) -> None:
        """Write ``new`` ``(batch, self.new, kv_heads, head_dim)`` into ``pool`` in place at the step's slots."""
        if isinstance(self.slots[0], slice):
            pool[self.slots] = new
        else:
            pool[self.slots] = new.reshape(-1, *new.shape[2:])

    def decode(self, queries: mx.array, k_pool: mx.array, v_pool: mx.array, scale: float,
               softcap: float) -> mx.array:
        """The decode kernel over the pages: validated and prepared on the first layer, then reused."""
        call = self._decode.get((scale, softcap))
        if call is None:
            call = self._decode[(scale, softcap)] = bind_decode(
                queries, k_pool, v_pool, self.lengths, block_table=self.block_table, softmax_scale=scale,
                causal=True, softcap=softcap)
        return call(queries, k_pool, v_pool)


class PagedLayerCache:
    """One layer's view of a :class:`PagedStep`, with mlx-lm's cache interface (``offset``,
    ``update_and_fetch``, ``make_mask``) and the ``attend`` that :class:`SwappedAttention` calls."""

    def __init__(self, step: PagedStep, layer: int):
        self.step, self.layer = step, layer
        self.offset = step.offset
        self._new = None

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Keep the new ``(batch, kv_heads, new, head_dim)`` keys/values for :meth:`attend`; return them."""
        self._new = (keys.swapaxes(1, 2), values.swapaxes(1, 2))
        return keys, values

    def make_mask(self, *args: Any, **kwargs: Any) -> None:
        return None  # attend() masks causally per sequence

    def attend(self, queries: mx.array, scale: float, softcap: float = 0.0,
               sinks: Optional[mx.array] = None) -> mx.array:
        """Write the new keys into the pages, then attend ``queries`` ``(batch, heads, new, head_dim)``.

        Decode-sized calls (``new <= 16``) go straight to the split-KV decode kernel over the pages;
        longer ones (prefill) through :func:`flash_attn_with_kvcache`, which gathers the pages.
        """
        if sinks is not None:
            raise ValueError("paged generation takes no attention sinks")
        step, (k_new, v_new) = self.step, self._new
        k_pool, v_pool = step.cache.k_pools[self.layer], step.cache.v_pools[self.layer]
        queries = queries.swapaxes(1, 2)
        if queries.shape[1] > MAX_Q_LEN:
            out = flash_attn_with_kvcache(queries, k_pool, v_pool, k=k_new, v=v_new, cache_seqlens=step.cache_seqlens,
                                          block_table=step.block_table, softmax_scale=scale, causal=True,
                                          softcap=softcap)
        else:
            step.write(k_pool, k_new)
            step.write(v_pool, v_new)
            out = step.decode(queries, k_pool, v_pool, scale, softcap)
        return out.swapaxes(1, 2)


def sample(logits: mx.array, temperature: float = 0.0, top_p: float = 1.0) -> mx.array:
    """Next tokens ``(batch,)`` from last-position ``logits`` ``(batch, vocab)``: greedy at temperature 0,
    otherwise from the smallest set of tokens whose probability reaches ``top_p``."""
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


def paged_forward(model: nn.Module, cache: PagedKVCache, seqs: Sequence[int], tokens: mx.array) -> mx.array:
    """Logits ``(batch, new, vocab)`` of ``tokens`` ``(batch, new)`` appended to ``seqs`` of ``cache``.

    Every sequence gets ``new`` tokens at its own position; ``model`` is swapped (:func:`swap_attention`).
    """
    step = PagedStep(cache, seqs, tokens.shape[1])
    return model(tokens, cache=[PagedLayerCache(step, layer) for layer in range(len(cache.k_pools))])


def paged_cache_for(model: nn.Module, num_pages: int, page_size: int = 16) -> PagedKVCache:
    """An empty :class:`PagedKVCache` shaped for every layer of the mlx-lm ``model``, in its dtype."""
    args = model.args
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads
    dtype = model.layers[0].self_attn.o_proj.weight.dtype
    return PagedKVCache(num_pages, page_size, args.num_key_value_heads, head_dim, num_layers=len(model.layers),
                        dtype=dtype if dtype in (mx.float16, mx.bfloat16, mx.float32) else mx.float16)


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_tokens: int = 32, *, max_batch: int = 8,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: Optional[int] = None,
             page_size: int = 16, num_pages: Optional[int] = None) -> Generation:
    """Generate up to ``max_tokens`` tokens after each prompt, continuously batched over paged KV.

    Args:
        model: an mlx-lm model after :func:`swap_attention` (any kernel; the paged cache computes
            attention itself), with ``model.args`` and ``model.layers``.
        prompts: token ids per prompt, of any lengths.
        max_tokens: new tokens per prompt at most (fewer where ``eos_token_id`` comes first).
        max_batch: sequences decoding together at most.
        temperature, top_p: sampling (:func:`sample`); temperature 0 is greedy.
        eos_token_id: a token that finishes its sequence.
        page_size: keys per page (a power of two).
        num_pages: pages per layer pool; default enough for ``max_batch`` of the longest sequences.

    Returns:
        A :class:`Generation` with the tokens and the prefill / decode token counts and times.
    """
    if model_attention(model) is None:
        raise ValueError("generate runs the model's attention over pages: call swap_attention(model) first")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    longest = max(len(p) for p in prompts) + max_tokens
    if num_pages is None:
        num_pages = max_batch * -(-longest // page_size)
    cache = paged_cache_for(model, num_pages, page_size)
    result = Generation(tokens=[[] for _ in prompts])
    waiting = list(range(len(prompts)))
    running: dict = {}  # cache sequence id -> prompt index

    def finished(index: int) -> bool:
        tokens = result.tokens[index]
        return len(tokens) >= max_tokens or (eos_token_id is not None and tokens[-1] == eos_token_id)

    while waiting or running:
        while waiting and len(running) < max_batch and \
                cache.allocator.free_pages >= -(-(len(prompts[waiting[0]]) + max_tokens) // page_size):
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
                raise ValueError(f"prompt {waiting[0]} needs more pages than the pool of {num_pages} holds")
            break
        seqs = list(running)
        last = mx.array([[result.tokens[running[s]][-1]] for s in seqs])
        start = time.perf_counter()
        logits = paged_forward(model, cache, seqs, last)
        tokens = sample(logits[:, -1], temperature, top_p).tolist()
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
