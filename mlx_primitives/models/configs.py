"""Small mlx-lm model configs and random-weight construction (tests, demo, benchmarks; no downloads)."""

from __future__ import annotations

import importlib
from typing import Dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

_COMMON = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=256)

# Tiny configs of the families swap_attention supports, in Hugging Face config.json keys. Head dim 64
# where the family lets the config set it (the GPU kernels' smallest), 32 otherwise.
TINY_CONFIGS: Dict[str, dict] = {
    "llama": dict(_COMMON, model_type="llama", head_dim=64),
    "llama_sliding": dict(_COMMON, model_type="llama", head_dim=64, layer_types=["sliding_attention", "full_attention"],
                          sliding_window=8),
    "mistral": dict(_COMMON, model_type="mistral", head_dim=64, rope_theta=1e6),
    "qwen2": dict(_COMMON, model_type="qwen2"),
    "qwen3": dict(_COMMON, model_type="qwen3", head_dim=64, max_position_embeddings=4096,
                  tie_word_embeddings=True, rope_theta=1e6),
    "gemma2": dict(_COMMON, model_type="gemma2", head_dim=64, query_pre_attn_scalar=64.0,
                   attn_logit_softcapping=5.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(_COMMON, model_type="gemma3_text", head_dim=64, query_pre_attn_scalar=64,
                        sliding_window=8, sliding_window_pattern=2),
    "phi3": dict(_COMMON, model_type="phi3"),
    # Families whose attention classes are not named "Attention"; DeepSeek-V3's is multi-head latent
    # attention, and Qwen3-Next's linear-attention layers keep mlx-lm's computation.
    "mixtral": dict(_COMMON, model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "phi": dict(_COMMON, model_type="phi", num_key_value_heads=4, partial_rotary_factor=0.5, layer_norm_eps=1e-5),
    "gpt_oss": dict(_COMMON, model_type="gpt_oss", head_dim=64, num_local_experts=4, num_experts_per_tok=2,
                    sliding_window=8, rope_theta=150000, layer_types=["sliding_attention", "full_attention"]),
    "deepseek_v3": dict(_COMMON, model_type="deepseek_v3", num_key_value_heads=4, moe_intermediate_size=64,
                        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32),
    "qwen3_next": dict(_COMMON, model_type="qwen3_next", head_dim=32, linear_num_value_heads=4, linear_num_key_heads=2,
                       linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4, num_experts=4,
                       num_experts_per_tok=2, decoder_sparse_step=1, shared_expert_intermediate_size=64,
                       mlp_only_layers=[], moe_intermediate_size=64, rope_theta=10000.0, partial_rotary_factor=0.5,
                       max_position_embeddings=4096, full_attention_interval=2),
}

# Llama-3.2-1B's shape (1.24B parameters): the benchmark's target model.
LLAMA_1B: dict = dict(model_type="llama", hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                      vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True)


def random_model(config: dict, dtype: mx.Dtype = mx.float32, seed: int = 0, std: float = 0.02) -> nn.Module:
    """An mlx-lm model of ``config`` (``model_type`` and its config.json keys) with random weights.

    Weights are normal with ``std`` (norm weights stay as initialised), cast to ``dtype`` and evaluated.
    Needs ``mlx-lm``.
    """
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = arch.Model(arch.ModelArgs.from_dict(config))
    keys = iter(mx.random.split(mx.random.key(seed), len(tree_flatten(model.parameters()))))
    weights = []
    for name, value in tree_flatten(model.parameters()):
        key = next(keys)
        if "norm" not in name:
            value = std * mx.random.normal(value.shape, key=key)
        weights.append((name, value.astype(dtype)))
    model.update(tree_unflatten(weights))
    mx.eval(model.parameters())
    return model
