"""Attention layers: thin ``mlx.nn.Module`` wrappers around :func:`flash_attention`."""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..kernels.decode_heads_first import decode_heads_first
from ..validation import check_int
from .flash import flash_attention
from .sage import _sageattn, check_sage_options
from .spec import check_layout, check_options, normalize_window

KERNELS = {"flash": "auto", "sdpa": "sdpa", "reference": "reference", "sage": "sage"}


class FlashAttention(nn.Module):
    """Attention over given queries, keys and values, routed to the fastest path.

    Args:
        num_heads (int): query heads.
        head_dim (int): size of each head.
        causal (bool): bottom-right aligned causal mask. Default: ``False``.
        window_size (tuple[int, int]): ``(left, right)`` visible keys, ``-1`` unbounded. Default: ``(-1, -1)``.
        softcap (float): ``c`` of ``c * tanh(s / c)``; ``0`` disables. Default: ``0.0``.
        layout (str): ``"BSHD"`` ``(batch, seq, heads, dim)`` or ``"BHSD"``. Default: ``"BSHD"``.
        scale (float, optional): softmax scale. Default: ``1 / sqrt(head_dim)``.
        dropout_p (float): attention dropout, applied in training mode only. Default: ``0.0``.

    Call with ``q``, ``k``, ``v`` in ``layout`` (k and v may have fewer heads, GQA) and an
    optional ``mask`` (``"causal"`` or an array broadcastable to ``(batch, heads, seq_q, seq_k)``).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        causal: bool = False,
        window_size: Tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        layout: str = "BSHD",
        scale: Optional[float] = None,
        dropout_p: float = 0.0,
    ):
        super().__init__()
        check_layout(layout)
        scale, self.causal, _, self.softcap, self.dropout_p = check_options(scale, causal, window_size, softcap,
                                                                            dropout_p)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window_size = normalize_window(window_size, causal=False)
        self.layout = layout
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)

    def _extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, causal={self.causal}, "
            f"window_size={self.window_size}, softcap={self.softcap}, layout={self.layout!r}"
        )

    def _check_heads(self, q: mx.array) -> None:
        heads, dim = (q.shape[2], q.shape[3]) if self.layout == "BSHD" else (q.shape[1], q.shape[3])
        if (heads, dim) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"q must have {self.num_heads} heads of dim {self.head_dim} in layout {self.layout}; "
                f"got shape {q.shape}"
            )

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, mask: Union[None, str, mx.array] = None,
                 **options: Any) -> mx.array:
        if q.ndim == 4:
            self._check_heads(q)
        options.setdefault("window_size", self.window_size)
        options.setdefault("softcap", self.softcap)
        options.setdefault("dropout_p", self.dropout_p if self.training else 0.0)
        return flash_attention(q, k, v, causal=self.causal, layout=self.layout, scale=self.scale, mask=mask,
                               **options)


def sliding_window(window_size: Union[int, Tuple[int, int]], causal: bool) -> Tuple[int, int]:
    """``(left, right)`` of a window given as its total width ``W`` (``W`` keys per query, itself included)
    or as ``(left, right)`` already."""
    if isinstance(window_size, (tuple, list)):
        return normalize_window(window_size, causal=False)
    width = check_int("window_size", window_size)
    if width < 1:
        raise ValueError(f"window_size must be >= 1; got {width}")
    return (width - 1, 0) if causal else ((width - 1) // 2, width // 2)


class SlidingWindowAttention(FlashAttention):
    """Local attention: each query sees a fixed window of keys (Mistral, Gemma-2 local layers).

    Args:
        num_heads (int): query heads.
        head_dim (int): size of each head.
        window_size (int or tuple[int, int]): ``W`` keys per query including itself
            (``(W - 1, 0)`` when causal, centred otherwise) or an explicit ``(left, right)``.
        causal (bool): Default: ``True``.
        softcap, layout, scale, dropout_p: as in :class:`FlashAttention`.
    """

    def __init__(self, num_heads: int, head_dim: int, window_size: Union[int, Tuple[int, int]],
                 causal: bool = True, softcap: float = 0.0, layout: str = "BSHD", scale: Optional[float] = None,
                 dropout_p: float = 0.0):
        super().__init__(num_heads, head_dim, causal, sliding_window(window_size, causal), softcap, layout,
                         scale, dropout_p)


class ChunkedCrossAttention(FlashAttention):
    """Cross-attention over a long key/value sequence with bounded memory.

    Keys are visited ``chunk_size`` at a time with online softmax, so memory stays
    O(seq_q * head_dim + chunk_size^2) per head on every backend (fused kernels on
    GPUs are O(N) already; on the CPU the blockwise reference path is used).

    Args:
        num_heads (int): query heads.
        head_dim (int): size of each head.
        chunk_size (int): keys (and queries) per block. Default: ``1024``.
        layout, scale: as in :class:`FlashAttention`.
    """

    def __init__(self, num_heads: int, head_dim: int, chunk_size: int = 1024, layout: str = "BSHD",
                 scale: Optional[float] = None):
        super().__init__(num_heads, head_dim, layout=layout, scale=scale)
        self.chunk_size = chunk_size

    def _extra_repr(self) -> str:
        return f"{super()._extra_repr()}, chunk_size={self.chunk_size}"

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, mask=None, **options: Any) -> mx.array:
        return super().__call__(q, k, v, mask, chunk_size=self.chunk_size, **options)


class Attention(nn.Module):
    """A full multi-head attention block: projections, RoPE, optional cache, attention, output.

    Args:
        dims (int): model width.
        num_heads (int): query heads.
        num_kv_heads (int, optional): key/value heads (GQA/MQA). Default: ``num_heads``.
        head_dim (int, optional): Default: ``dims // num_heads``.
        bias (bool): biases in the projections. Default: ``False``.
        rope (bool or nn.Module): ``True`` for ``nn.RoPE(head_dim, base=rope_base)``, ``False`` for none,
            or any module called as ``rope(x, offset=...)`` on ``(batch, heads, seq, dim)``. Default: ``True``.
        rope_base (float): RoPE base when ``rope=True``. Default: ``10000``.
        kernel (str): ``"flash"`` (dispatcher picks), ``"sdpa"``, ``"reference"`` or ``"sage"`` (INT8 q and k,
            :func:`~mlx_primitives.attention.sageattn`; no window, softcap or mask arrays). Default: ``"flash"``.
        window_size, softcap, scale: as in :class:`FlashAttention`.
        sage_options (dict, optional): keyword options of :func:`~mlx_primitives.attention.sageattn`
            for ``kernel="sage"`` (``qk_quant_gran``, ``pv_accum_dtype``, ``smooth_k``, ``smooth_v``,
            ``path``), checked here. Default: sageattn's defaults.

    Call with ``x`` ``(batch, seq, dims)``, an optional ``mask`` (``"causal"`` or an array
    broadcastable to ``(batch, heads, seq, seq_k)``) and an optional cache with mlx-lm's
    ``update_and_fetch(keys, values)`` / ``offset`` interface. Returns ``(batch, seq, dims)``.
    """

    def __init__(
        self,
        dims: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        bias: bool = False,
        rope: Union[bool, nn.Module] = True,
        rope_base: float = 10000.0,
        kernel: str = "flash",
        window_size: Tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        scale: Optional[float] = None,
        sage_options: Optional[dict] = None,
    ):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {tuple(KERNELS)}; got {kernel!r}")
        scale, _, window_size, softcap, _ = check_options(scale, window_size=window_size, softcap=softcap)
        if kernel == "sage" and (tuple(window_size) != (-1, -1) or softcap):
            raise ValueError("kernel='sage' takes no window_size or softcap")
        if sage_options is not None and kernel != "sage":
            raise ValueError(f"sage_options need kernel='sage'; got kernel={kernel!r}")
        # A mapping proxy, not a dict: nn.Module would take a dict for a tree of parameters.
        self.sage_options = MappingProxyType(check_sage_options(**(sage_options or {}))) if kernel == "sage" else None
        self.dims, self.num_heads, self.num_kv_heads = dims, num_heads, num_kv_heads
        self.head_dim = head_dim or dims // num_heads
        self.kernel = kernel
        self.window_size = window_size
        self.softcap = softcap
        self.scale = scale if scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(dims, num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dims, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dims, num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dims, bias=bias)
        if rope is True:
            self.rope = nn.RoPE(self.head_dim, base=rope_base)
        elif rope is False:
            self.rope = None
        else:
            self.rope = rope

    def _extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"kernel={self.kernel!r}" + (f", sage_options={dict(self.sage_options)}" if self.sage_options else "")
        )

    def shard(self, group: Optional[mx.distributed.Group] = None) -> "Attention":
        """Split the heads across ``group`` (tensor parallel), in place; returns ``self``.

        See :func:`mlx_primitives.distributed.shard_attention` (GQA, KV cache, gradients).
        """
        from ..distributed.tensor_parallel import shard_attention  # distributed builds on this package

        return shard_attention(self, group)

    def __call__(self, x: mx.array, mask: Union[None, str, mx.array] = None, cache: Any = None) -> mx.array:
        if x.ndim != 3 or x.shape[-1] != self.dims:
            raise ValueError(f"x must have shape (batch, seq, dims={self.dims}); got {tuple(x.shape)}")
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, self.num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, -1).transpose(0, 2, 1, 3)
        if self.rope is not None:
            offset = cache.offset if cache is not None else 0
            q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
            if isinstance(k, tuple):  # a quantized cache (ours or mlx-lm's): (packed, scales, biases)
                from ..cache.quantized import decodes_in_place  # the cache package builds on attention

                if self.kernel == "flash" and decodes_in_place(q, cache, mask):
                    out = decode_heads_first(
                        q, cache.keys, cache.values, cache.offset, softmax_scale=self.scale, causal=mask == "causal",
                        window_size=self.window_size, softcap=self.softcap, quantization=(cache.group_size, cache.bits),
                    )
                    return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))
                k, v = (mx.dequantize(*t, group_size=cache.group_size, bits=cache.bits) for t in (k, v))
        if self.kernel == "sage":
            if mask is not None and not (isinstance(mask, str) and mask == "causal"):
                raise ValueError(f"kernel='sage' takes mask 'causal' or None; got {type(mask).__name__}")
            # The options were checked at construction.
            out = _sageattn(q, k, v, "HND", mask == "causal", self.scale, False, **self.sage_options)
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))
        out = flash_attention(
            q, k, v, layout="BHSD", scale=self.scale, mask=mask, window_size=self.window_size,
            softcap=self.softcap, path=KERNELS[self.kernel],
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))
