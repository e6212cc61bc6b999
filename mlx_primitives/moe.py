"""Sparse mixture-of-experts: top-k routing, dispatch sorted by expert with a capacity, expert matmuls
through ``mx.gather_mm`` (``mx.gather_qmm`` once quantized), dense per-expert matmuls or one padded
batched matmul, and the load-balancing loss.

A layer call routes each token to ``top_k`` experts, gives each of the ``tokens * top_k`` assignments its
rank in its expert's queue (choice-major as in Switch Transformer and GShard: every token's first choice
in token order, then every second choice, ...; no sort: a cumulative sum over a one-hot
``(num_experts, tokens * top_k)`` int32 array), runs each expert's SwiGLU MLP on its rows and sums each
token's weighted expert outputs. The expert matmuls take one of three routes:

* ``"gather"``: rows sorted by expert (:func:`build_expert_dispatch`), one gathered matmul per projection
  over all rows; no host synchronisation, so it also runs under ``mx.compile`` / ``mx.vmap``. Rows
  dropped by the capacity still go through the matmuls (with weight 0): the capacity bounds compute on
  the two host-read routes only.
* ``"per_expert"``: the per-expert row counts are read on the host (one small device-to-host read per
  call); one gather puts expert ``e``'s kept rows in one contiguous block and each projection is a dense
  matmul on it (``mx.quantized_matmul`` once quantized).
* ``"batched"``: as ``"per_expert"``, but every expert's block is padded to the largest one, ``(E, width,
  dims)``, and each projection is one batched matmul: 3 matmuls and one SwiGLU launch in all instead of
  ``3 E`` and ``E``. Where padding would add more than ``PAD_LIMIT - 1`` of the rows (unbalanced routing)
  or the weights are quantized, it takes the ``"per_expert"`` blocks.

Both host-read routes combine with one gather of each assignment's output row (no scatter).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .hardware import device_profile
from .kernels import swiglu
from .validation import (check_array, check_bool, check_choice, check_index_range, check_int, check_positive_int,
                         check_real, host_values)

INDEX_DTYPES = (mx.int32, mx.uint32, mx.int64, mx.uint64, mx.int16, mx.uint16, mx.int8, mx.uint8)
MATMUL_ROUTES = ("auto", "gather", "per_expert", "batched")
# "auto" takes the batched route on CUDA from this many assignments per expert on average: MLX 0.32.4's
# CUDA mx.gather_mm must run unsorted (see _gathered_moe), which is slower than the host read of the
# counts plus dense matmuls from ~100 rows per expert on the H100 (benchmarks/results/h100/zoo.md).
BATCHED_MIN_ROWS = 64
# The batched route pads every expert to the largest one while that adds at most a quarter of the rows.
PAD_LIMIT = 1.25


@dataclass
class ExpertDispatch:
    """The ``S = tokens * top_k`` (token, choice) assignments sorted by expert.

    Within an expert, assignments are in queue order: every token's first choice in token order, then
    every second choice, and so on; those past the expert's capacity are dropped (weight 0). First
    choices thus go before any second choice, as in Switch Transformer and GShard.

    Attributes:
        order (array): ``(S,)`` uint32 flat assignment ids ``token * top_k + choice`` in sorted order.
        inverse (array): ``(S,)`` uint32 position of each flat assignment in the sorted order.
        token_indices (array): ``(S,)`` uint32 token of each sorted assignment.
        expert_indices (array): ``(S,)`` uint32 expert of each sorted assignment (non-decreasing).
        weights (array): ``(S,)`` gate weight of each sorted assignment, 0 where dropped.
        kept (array): ``(S,)`` bool, the assignment is within its expert's capacity.
        expert_counts (array): ``(num_experts,)`` int32 assignments routed to each expert.
        capacity (int, optional): assignments each expert takes; ``None`` for no limit.
        top_k (int): choices per token.
    """

    order: mx.array
    inverse: mx.array
    token_indices: mx.array
    expert_indices: mx.array
    weights: mx.array
    kept: mx.array
    expert_counts: mx.array
    capacity: Optional[int]
    top_k: int

    @property
    def num_dropped(self) -> mx.array:
        """Assignments over capacity (int32 scalar)."""
        return (~self.kept).sum().astype(mx.int32)

    @property
    def dropped_tokens(self) -> mx.array:
        """``(tokens,)`` bool: tokens none of whose assignments was kept (their layer output is zero)."""
        return ~self.kept[self.inverse].reshape(-1, self.top_k).any(axis=1)


def build_expert_dispatch(
    expert_indices: mx.array,
    expert_weights: mx.array,
    num_experts: int,
    capacity_factor: Optional[float] = None,
    *,
    check_indices: bool = True,
) -> ExpertDispatch:
    """Sort the routed assignments by expert and apply each expert's capacity.

    Args:
        expert_indices (array): ``(tokens, top_k)`` integer experts in ``[0, num_experts)`` per token.
        expert_weights (array): ``(tokens, top_k)`` float gate weights.
        num_experts (int): number of experts.
        capacity_factor (float, optional): each expert keeps at most
            ``ceil(capacity_factor * tokens * top_k / num_experts)`` assignments. Default: no limit.
        check_indices (bool): check the range of ``expert_indices`` on the host first (one device-to-host
            read; skipped where they are traced, e.g. under ``mx.compile``, where an expert out of range
            is undefined). Default: ``True``.

    Returns:
        :class:`ExpertDispatch`.
    """
    check_array("expert_indices", expert_indices, "(tokens, top_k)", ndim=2, dtypes=INDEX_DTYPES)
    check_array("expert_weights", expert_weights, f"expert_indices' shape {tuple(expert_indices.shape)}",
                shape=expert_indices.shape)
    _check_num_experts(num_experts)
    capacity_factor = _check_capacity_factor(capacity_factor)
    if check_indices:
        check_index_range("expert_indices", expert_indices, num_experts, "num_experts")
    tokens, top_k = expert_indices.shape
    count = tokens * top_k
    capacity = _capacity(capacity_factor, count, num_experts)
    if count == 0:
        return _empty_dispatch(expert_weights.dtype, num_experts, capacity, top_k)
    indices = expert_indices.astype(mx.int32)
    flat = indices.reshape(-1)
    ranks, counts = _expert_ranks(indices, num_experts)
    # An assignment's sorted position: the assignments of earlier experts, then those before it in its queue.
    inverse = (mx.cumsum(counts) - counts)[flat] + ranks
    order = mx.zeros((count,), mx.int32).at[inverse].add(mx.arange(count, dtype=mx.int32)).astype(mx.uint32)
    kept = mx.ones((count,), mx.bool_) if capacity is None else (ranks < capacity)[order]
    weights = mx.where(kept, expert_weights.reshape(-1)[order], 0)
    return ExpertDispatch(
        order=order,
        inverse=inverse.astype(mx.uint32),
        token_indices=order // top_k,
        expert_indices=flat[order].astype(mx.uint32),
        weights=weights,
        kept=kept,
        expert_counts=counts,
        capacity=capacity,
        top_k=top_k,
    )


def _empty_dispatch(dtype: mx.Dtype, num_experts: int, capacity: Optional[int], top_k: int) -> ExpertDispatch:
    """The dispatch of no assignments."""
    none = mx.zeros((0,), mx.uint32)
    return ExpertDispatch(order=none, inverse=none, token_indices=none, expert_indices=none,
                          weights=mx.zeros((0,), dtype), kept=mx.zeros((0,), mx.bool_),
                          expert_counts=mx.zeros((num_experts,), mx.int32), capacity=capacity, top_k=top_k)


def _check_num_experts(num_experts: int) -> None:
    check_positive_int("num_experts", num_experts)


def _check_capacity_factor(capacity_factor: Optional[float]) -> Optional[float]:
    """``capacity_factor`` as a float, or ``None``."""
    if capacity_factor is None:
        return None
    if not check_real("capacity_factor", capacity_factor) > 0:
        raise ValueError(f"capacity_factor must be positive or None; got {capacity_factor!r}")
    return float(capacity_factor)


def _capacity(capacity_factor: Optional[float], count: int, num_experts: int) -> Optional[int]:
    """Assignments each expert keeps out of ``count``; ``None`` for no limit."""
    return None if capacity_factor is None else math.ceil(capacity_factor * count / num_experts)


def _expert_ranks(indices: mx.array, num_experts: int) -> Tuple[mx.array, mx.array]:
    """``indices (tokens, top_k)`` int32 experts, ``tokens * top_k > 0`` -> each assignment's rank in its
    expert's queue, flat ``(tokens * top_k,)`` in the order ``token * top_k + choice``, and the assignments
    per expert ``(num_experts,)``, both int32. The queue is choice-major (every first choice in token
    order, then every second choice, ...); a one-hot cumulative sum: ``num_experts * tokens * top_k``
    int32 of memory, no sort."""
    tokens, top_k = indices.shape
    queue = indices.T.reshape(-1)
    onehot = (mx.arange(num_experts, dtype=mx.int32)[:, None] == queue[None, :]).astype(mx.int32)
    seen = mx.cumsum(onehot, axis=1)
    ranks = mx.take_along_axis(seen, queue[None, :], axis=0)[0] - 1
    return ranks.reshape(top_k, tokens).T.reshape(-1), seen[:, -1]


def compute_load_balancing_loss(
    router_probs: mx.array,
    expert_indices: mx.array,
    mask: Optional[mx.array] = None,
    *,
    check_indices: bool = True,
) -> mx.array:
    """Switch Transformer's auxiliary loss ``num_experts * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the ``tokens * top_k`` assignments routed to expert ``e`` (not
    differentiable), ``P_e`` the mean router probability of ``e``. It is 1 for uniform routing and
    grows as routing concentrates; add ``alpha * loss`` (Switch: ``alpha = 0.01``) to the training loss.
    Hugging Face's Mixtral ``load_balancing_loss_func`` takes ``f`` per choice and so is ``top_k`` times
    this loss: its ``router_aux_loss_coef`` (0.02) is ``alpha = 0.02 * top_k`` here. No tokens: 0.

    Args:
        router_probs (array): ``(..., num_experts)`` softmax of the router logits over all experts.
        expert_indices (array): ``(..., top_k)`` integer experts chosen per token (same leading shape).
        mask (array, optional): ``(...)`` bool, ``False`` for tokens left out of both ``f`` and ``P``
            (padding; Mixtral's ``attention_mask``). Default: every token counts.
        check_indices (bool): check that ``expert_indices`` lie in ``[0, num_experts)`` on the host (as
            :func:`build_expert_dispatch`). Default: ``True``.

    Returns:
        float32 scalar.
    """
    check_array("router_probs", router_probs, "(..., num_experts)", min_ndim=1)
    lead = tuple(router_probs.shape[:-1])
    check_array("expert_indices", expert_indices, f"{lead + ('top_k',)}", min_ndim=1, dtypes=INDEX_DTYPES)
    if tuple(expert_indices.shape[:-1]) != lead:
        raise ValueError(f"expert_indices must have shape {lead + ('top_k',)}; got {tuple(expert_indices.shape)}")
    if mask is not None:
        check_array("mask", mask, f"router_probs' leading shape {lead}", shape=lead, dtypes=(mx.bool_,))
    num_experts, top_k = router_probs.shape[-1], expert_indices.shape[-1]
    if check_indices:
        check_index_range("expert_indices", expert_indices, num_experts, "router_probs.shape[-1]")
    probs = router_probs.reshape(-1, num_experts).astype(mx.float32)
    flat = expert_indices.reshape(-1).astype(mx.int32)
    if mask is None:
        counted, tokens = mx.ones(flat.shape, mx.float32), max(probs.shape[0], 1)
    else:
        keep = mask.reshape(-1, 1).astype(mx.float32)
        counted, tokens = mx.broadcast_to(keep, (probs.shape[0], top_k)).reshape(-1), mx.maximum(keep.sum(), 1)
        probs = probs * keep
    counts = mx.zeros((num_experts,), mx.float32).at[flat].add(counted)
    fraction = mx.stop_gradient(counts / (tokens * max(top_k, 1)))
    return num_experts * (fraction * probs.sum(axis=0) / tokens).sum()


class ExpertLinear(nn.Module):
    """``num_experts`` linear maps without bias applied to rows by expert index (``mx.gather_mm``).

    Args:
        num_experts (int), input_dims (int), output_dims (int). Weight: ``(num_experts, output_dims, input_dims)``.
    """

    def __init__(self, num_experts: int, input_dims: int, output_dims: int):
        super().__init__()
        scale = math.sqrt(1.0 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))

    def __call__(self, x: mx.array, expert_indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """``x (S, 1, input_dims)``, ``expert_indices (S,)`` -> ``(S, 1, output_dims)``."""
        return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=expert_indices, sorted_indices=sorted_indices)

    def per_expert(self, xs: Sequence[mx.array], experts: Sequence[int]) -> List[mx.array]:
        """``xs[i] (rows_i, input_dims)`` -> expert ``experts[i]``'s ``(rows_i, output_dims)``: one dense
        matmul each, on ``mx.split`` views of the weight (their gradient is one concatenation, not a
        scatter per expert)."""
        weights = mx.split(self.weight, self.weight.shape[0], axis=0)
        return [x @ weights[e].squeeze(0).T for x, e in zip(xs, experts)]

    def batched(self, x: mx.array) -> mx.array:
        """``x (num_experts, rows, input_dims)`` -> ``(num_experts, rows, output_dims)``, row block ``e``
        through expert ``e``: one batched matmul."""
        return x @ self.weight.swapaxes(-1, -2)

    def to_quantized(self, group_size: int = None, bits: int = None, mode: str = "affine", **_) -> "QuantizedExpertLinear":
        """The quantized layer ``nn.quantize`` swaps in."""
        return QuantizedExpertLinear(self.weight, group_size, bits, mode)

    def _extra_repr(self) -> str:
        experts, out_dims, in_dims = self.weight.shape
        return f"num_experts={experts}, input_dims={in_dims}, output_dims={out_dims}"


class QuantizedExpertLinear(nn.Module):
    """:class:`ExpertLinear` with quantized weights (``mx.quantize`` per expert; ``mx.gather_qmm``)."""

    def __init__(self, weight: mx.array, group_size: int = None, bits: int = None, mode: str = "affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        parts = mx.quantize(weight, group_size=group_size, bits=bits, mode=mode)
        self.weight, self.scales = parts[0], parts[1]
        self.biases = parts[2] if len(parts) > 2 else None
        self.freeze()

    def __call__(self, x: mx.array, expert_indices: mx.array, sorted_indices: bool = False) -> mx.array:
        return mx.gather_qmm(x, self.weight, self.scales, self.biases, rhs_indices=expert_indices, transpose=True,
                             group_size=self.group_size, bits=self.bits, mode=self.mode,
                             sorted_indices=sorted_indices)

    def per_expert(self, xs: Sequence[mx.array], experts: Sequence[int]) -> List[mx.array]:
        """:meth:`ExpertLinear.per_expert` through ``mx.quantized_matmul``."""
        num_experts = self.weight.shape[0]
        weights, scales = mx.split(self.weight, num_experts, axis=0), mx.split(self.scales, num_experts, axis=0)
        biases = [None] * num_experts if self.biases is None else mx.split(self.biases, num_experts, axis=0)
        return [mx.quantized_matmul(x, weights[e].squeeze(0), scales[e].squeeze(0),
                                    None if biases[e] is None else biases[e].squeeze(0), transpose=True,
                                    group_size=self.group_size, bits=self.bits, mode=self.mode)
                for x, e in zip(xs, experts)]

    def _extra_repr(self) -> str:
        return f"num_experts={self.weight.shape[0]}, group_size={self.group_size}, bits={self.bits}, mode={self.mode}"


class SparseMoELayer(nn.Module):
    """A sparse mixture of SwiGLU experts (Mixtral / Switch style).

    Each token's router logits pick its ``top_k`` experts; the gate weights are the softmax over
    those ``top_k`` logits (Mixtral) or, with ``normalize_weights=False``, the full softmax's
    probabilities of them (Switch). Output: ``sum_k weight_k * down(silu(gate(x)) * up(x))`` over the
    token's kept experts (zero for a token all of whose assignments were dropped). The output dtype is
    that of ``x`` and the weights promoted (float32 weights and bfloat16 ``x`` give float32, as ``nn.Linear``).

    Args:
        dims (int): model width. hidden (int): expert MLP width.
        num_experts (int): number of experts. top_k (int): experts per token. Default: ``2``.
        capacity_factor (float, optional): see :func:`build_expert_dispatch`. Default: no limit.
        normalize_weights (bool, optional): softmax over the chosen logits only. Default (``None``):
            ``top_k > 1`` (one normalised weight is always 1, which leaves the router no gradient).
        matmuls (str): the expert matmuls' route (module docstring): ``"gather"``, ``"per_expert"``,
            ``"batched"`` or ``"auto"``: batched on CUDA from ``BATCHED_MIN_ROWS`` assignments per expert on
            average, gather otherwise. Under ``mx.compile`` / ``mx.vmap`` (no host reads there) every call gathers.
            Default: ``"auto"``.
    """

    def __init__(self, dims: int, hidden: int, num_experts: int, top_k: int = 2,
                 capacity_factor: Optional[float] = None, normalize_weights: Optional[bool] = None,
                 matmuls: str = "auto"):
        super().__init__()
        check_positive_int("dims", dims)
        check_positive_int("hidden", hidden)
        _check_num_experts(num_experts)
        if not 1 <= check_int("top_k", top_k) <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}]; got {top_k}")
        normalize_weights = top_k > 1 if normalize_weights is None else check_bool("normalize_weights",
                                                                                    normalize_weights)
        self.dims, self.hidden, self.num_experts, self.top_k = dims, hidden, num_experts, top_k
        self.capacity_factor = _check_capacity_factor(capacity_factor)
        self.normalize_weights, self.matmuls = normalize_weights, check_choice("matmuls", matmuls, MATMUL_ROUTES)
        self.router = nn.Linear(dims, num_experts, bias=False)
        self.gate_proj = ExpertLinear(num_experts, dims, hidden)
        self.up_proj = ExpertLinear(num_experts, dims, hidden)
        self.down_proj = ExpertLinear(num_experts, hidden, dims)

    def route(self, x: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
        """``x (tokens, dims)`` -> experts ``(tokens, top_k)``, their weights, router probabilities ``(tokens, E)``."""
        logits = self.router(x).astype(mx.float32)
        first = self.num_experts - self.top_k
        experts = mx.stop_gradient(mx.argpartition(logits, kth=first, axis=-1)[:, first:])
        chosen = mx.take_along_axis(logits, experts, axis=-1)
        probs = mx.softmax(logits, axis=-1)
        weights = mx.softmax(chosen, axis=-1) if self.normalize_weights else mx.take_along_axis(probs, experts, -1)
        return experts, weights, probs

    def dispatch(self, x: mx.array) -> ExpertDispatch:
        """The dispatch of ``x (..., dims)`` (for inspecting expert loads and dropped tokens)."""
        experts, weights, _ = self.route(x.reshape(-1, x.shape[-1]))
        return build_expert_dispatch(experts, weights, self.num_experts, self.capacity_factor, check_indices=False)

    def __call__(self, x: mx.array, return_aux_loss: bool = False) -> Union[mx.array, Tuple[mx.array, mx.array]]:
        """``x (..., dims)`` -> ``(..., dims)``; with ``return_aux_loss`` also the load-balancing loss."""
        check_array("x", x, f"(..., {self.dims})", min_ndim=1)
        if x.shape[-1] != self.dims:
            raise ValueError(f"x must have shape (..., {self.dims}); got {tuple(x.shape)}")
        tokens = x.reshape(-1, x.shape[-1])
        experts, weights, probs = self.route(tokens)
        weights = weights.astype(x.dtype)
        route = self.matmul_route(tokens.shape[0])
        y = None if route == "gather" or tokens.shape[0] == 0 else self._blocked_moe(tokens, experts, weights, route)
        if y is None:
            y = self._gathered_moe(tokens, experts, weights)
        y = y.reshape(x.shape)
        return (y, compute_load_balancing_loss(probs, experts, check_indices=False)) if return_aux_loss else y

    def matmul_route(self, tokens: int) -> str:
        """The route of the expert matmuls for a call on ``tokens`` tokens outside ``mx.compile`` / ``mx.vmap``:
        ``"gather"``, ``"per_expert"`` or ``"batched"`` (which takes per-expert blocks where padding is costly)."""
        if self.matmuls != "auto":
            return self.matmuls
        large = tokens * self.top_k >= BATCHED_MIN_ROWS * self.num_experts
        return "batched" if large and device_profile().backend == "cuda" else "gather"

    def _gathered_moe(self, tokens: mx.array, experts: mx.array, weights: mx.array) -> mx.array:
        """The layer on ``tokens (T, dims)`` through rows sorted by expert and gathered matmuls."""
        plan = build_expert_dispatch(experts, weights, self.num_experts, self.capacity_factor, check_indices=False)
        rows = tokens[plan.token_indices][:, None, :]
        index = plan.expert_indices
        # MLX 0.32.4's CUDA gather_mm gives wrong rows with sorted_indices=True on these gathered rows
        # (H100: max error 0.5 against float64; the unsorted kernel is exact), so CUDA takes the unsorted one.
        grouped = device_profile().backend != "cuda"
        hidden = swiglu(self.gate_proj(rows, index, grouped), self.up_proj(rows, index, grouped))
        out = self.down_proj(hidden, index, grouped)[:, 0, :] * plan.weights[:, None]
        return out[plan.inverse].reshape(-1, self.top_k, self.dims).sum(axis=1)

    def _blocked_moe(self, tokens: mx.array, experts: mx.array, weights: mx.array, route: str) -> Optional[mx.array]:
        """The layer on ``tokens (T, dims)`` with each expert's kept rows in one block (the per-expert and
        batched routes); ``None`` under ``mx.compile`` / ``mx.vmap``, where the counts cannot be read."""
        count = experts.size
        indices = experts.astype(mx.int32)
        flat = indices.reshape(-1)
        ranks, counts = _expert_ranks(indices, self.num_experts)
        counts = host_values(counts)
        if counts is None:
            return None
        capacity = _capacity(self.capacity_factor, count, self.num_experts)
        offsets, sizes, width = self._blocks(counts, capacity, route)
        total = sum(sizes) if width is None else self.num_experts * width
        # Row of each assignment in the blocks; dropped assignments point past them (at `total`).
        slots = mx.array(offsets, mx.int32)[flat] + ranks if width is None else flat * width + ranks
        if capacity is not None:
            kept = ranks < capacity
            slots = mx.where(kept, slots, total)
            weights = mx.where(kept.reshape(weights.shape), weights, 0)
        # Token of each block row (padding rows: token 0, never read back): one scatter of unique slots.
        sources = mx.zeros((total + 1,), mx.int32).at[slots].add(mx.arange(count, dtype=mx.int32) // self.top_k)
        rows = tokens[sources[:total]]
        if width is None:
            out = self._per_expert_mlp(rows, offsets, sizes)
        else:
            out = self._batched_mlp(rows.reshape(self.num_experts, width, self.dims)).reshape(total, self.dims)
        if capacity is not None:
            slots = mx.minimum(slots, total - 1)
        picked = out[slots].reshape(weights.shape + (self.dims,))
        return (picked * weights[..., None]).sum(axis=1)

    def _blocks(self, counts: List[int], capacity: Optional[int], route: str) -> Tuple[List[int], List[int], Optional[int]]:
        """First row of each expert's block, the kept rows of each, and the padded block width (``None``:
        unpadded blocks, one after the other). ``count > 0``, so ``capacity >= 1`` and some block is not empty."""
        sizes = [c if capacity is None else min(c, capacity) for c in counts]
        width = max(sizes)
        dense = isinstance(self.gate_proj, ExpertLinear)
        if route == "batched" and dense and self.num_experts * width <= PAD_LIMIT * sum(sizes):
            return [e * width for e in range(self.num_experts)], sizes, width
        return [0, *itertools.accumulate(sizes[:-1])], sizes, None

    def _batched_mlp(self, rows: mx.array) -> mx.array:
        """The experts' MLPs on padded blocks ``rows (E, width, dims)``: one batched matmul per projection."""
        return self.down_proj.batched(swiglu(self.gate_proj.batched(rows), self.up_proj.batched(rows)))

    def _per_expert_mlp(self, rows: mx.array, offsets: List[int], sizes: List[int]) -> mx.array:
        """The experts' MLPs on unpadded blocks ``rows (sum(sizes), dims)`` (expert ``e``: ``sizes[e]`` rows
        from row ``offsets[e]``): dense matmuls per non-empty block."""
        pieces = mx.split(rows, offsets[1:], axis=0)
        experts = [e for e in range(self.num_experts) if sizes[e]]
        kept = [pieces[e] for e in experts]
        gate, up = self.gate_proj.per_expert(kept, experts), self.up_proj.per_expert(kept, experts)
        hidden = [swiglu(g, u) for g, u in zip(gate, up)]
        return mx.concatenate(self.down_proj.per_expert(hidden, experts))

    def _extra_repr(self) -> str:
        return (f"dims={self.dims}, hidden={self.hidden}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, matmuls={self.matmuls!r}")
