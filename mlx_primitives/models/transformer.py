"""A small pre-norm transformer composed from the library's layers, mlx-lm style.

``TransformerBlock``: ``h = x + attn(norm1(x))``, ``out = h + mlp(norm2(h))``, where the residual add
and the second norm run as one fused kernel (:class:`~mlx_primitives.kernels.RMSNorm` with a
residual). ``Transformer``: embedding, ``num_layers`` blocks, a final norm and the output head
(tied to the embedding by default). Call with int tokens ``(batch, seq)`` and an optional list of
per-layer caches with mlx-lm's ``update_and_fetch`` / ``offset`` interface; returns logits
``(batch, seq, vocab_size)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn

from ..attention.layers import Attention
from ..cache import KVCache
from ..kernels.layers import GeGLU, RMSNorm, SwiGLU


@dataclass
class ModelArgs:
    """Hyper-parameters of :class:`Transformer` (Llama-style names)."""

    vocab_size: int = 1024
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    intermediate_size: int = 688
    mlp: str = "swiglu"  # or "geglu"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    kernel: str = "flash"  # Attention's kernel: "flash", "sdpa", "reference" or "sage"
    tie_word_embeddings: bool = True


class TransformerBlock(nn.Module):
    """Pre-norm block: our :class:`Attention` and a SwiGLU/GeGLU MLP, the residual fused into the norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.mlp not in ("swiglu", "geglu"):
            raise ValueError(f"mlp must be 'swiglu' or 'geglu'; got {args.mlp!r}")
        self.self_attn = Attention(args.hidden_size, args.num_heads, args.num_kv_heads, rope_base=args.rope_base,
                                   kernel=args.kernel)
        mlp = SwiGLU if args.mlp == "swiglu" else GeGLU
        self.mlp = mlp(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.norm_eps)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        normed, h = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache), x)
        return h + self.mlp(normed)


class Transformer(nn.Module):
    """Embedding, :class:`TransformerBlock` s, final RMSNorm and the vocabulary head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_layers)]
        self.norm = RMSNorm(args.hidden_size, args.norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, tokens: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        h = self.embed_tokens(tokens)
        mask = "causal" if tokens.shape[1] > 1 else None
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, mask, layer_cache)
        h = self.norm(h)
        return self.embed_tokens.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)

    def make_cache(self) -> List[KVCache]:
        """One :class:`~mlx_primitives.cache.KVCache` per layer."""
        return [KVCache() for _ in self.layers]
