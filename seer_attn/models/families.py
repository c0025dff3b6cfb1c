"""SeerAttention for Qwen2 / Qwen2.5, Qwen3, Mistral and Phi-3 / Phi-4: transformers' own classes
plus the shared mixins of `seer_attn.models.modeling_seer` (Llama is in `modeling_seer_llama`).

Per family: a config (the family's config plus the `seerattn_*` fields), an attention layer (the
family's attention; names its RoPE and, where it differs, how q/k/v are projected before RoPE) and
the causal LM. What differs between families, and where it is handled:

- Qwen2: q/k/v biases are inside `q_proj`/`k_proj`/`v_proj` (the shared `project_qkv`); optional
  sliding window on the upper layers (`use_sliding_window`, `max_window_layers`).
- Qwen3: per-head RMSNorm on q and k before RoPE: the gate sees the normalised q/k.
- Mistral: a sliding window on every layer when `sliding_window` is set (v0.1: 4096; v0.3: none).
- Phi-3 / Phi-4: one fused `qkv_proj`; Phi-3-mini-4k has a 2047-token window, the 128k models
  `longrope` (the gate's block RoPE uses the same tables). Partial rotary (Phi-4-mini) is refused.
"""

from __future__ import annotations

import torch
from transformers import MistralConfig, Phi3Config, Qwen2Config, Qwen3Config
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.phi3 import modeling_phi3 as phi3
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen3 import modeling_qwen3 as qwen3

from seer_attn.models.configuration_seer import SeerAttnConfigMixin
from seer_attn.models.modeling_seer import SeerAttentionMixin, SeerForCausalLMMixin, register_seer_family

__all__ = [
    "SeerQwen2Config", "SeerQwen2ForCausalLM",
    "SeerQwen3Config", "SeerQwen3ForCausalLM",
    "SeerMistralConfig", "SeerMistralForCausalLM",
    "SeerPhi3Config", "SeerPhi3ForCausalLM",
]  # fmt: skip


# Qwen2 / Qwen2.5 ----------------------------------------------------------------------------------
class SeerQwen2Config(SeerAttnConfigMixin, Qwen2Config):
    model_type = "seer_qwen2"


class SeerQwen2Attention(SeerAttentionMixin, qwen2.Qwen2Attention):
    rotary_class, rotary_fn = qwen2.Qwen2RotaryEmbedding, staticmethod(qwen2.apply_rotary_pos_emb)


class SeerQwen2ForCausalLM(SeerForCausalLMMixin, qwen2.Qwen2ForCausalLM):
    config_class, attention_class = SeerQwen2Config, SeerQwen2Attention


# Qwen3 --------------------------------------------------------------------------------------------
class SeerQwen3Config(SeerAttnConfigMixin, Qwen3Config):
    model_type = "seer_qwen3"


class SeerQwen3Attention(SeerAttentionMixin, qwen3.Qwen3Attention):
    rotary_class, rotary_fn = qwen3.Qwen3RotaryEmbedding, staticmethod(qwen3.apply_rotary_pos_emb)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # the per-head q/k RMSNorms come before RoPE: the gate sees normalised q/k, as attention does
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
        k = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        return q, k, v


class SeerQwen3ForCausalLM(SeerForCausalLMMixin, qwen3.Qwen3ForCausalLM):
    config_class, attention_class = SeerQwen3Config, SeerQwen3Attention


# Mistral ------------------------------------------------------------------------------------------
class SeerMistralConfig(SeerAttnConfigMixin, MistralConfig):
    model_type = "seer_mistral"


class SeerMistralAttention(SeerAttentionMixin, mistral.MistralAttention):
    rotary_class, rotary_fn = mistral.MistralRotaryEmbedding, staticmethod(mistral.apply_rotary_pos_emb)


class SeerMistralForCausalLM(SeerForCausalLMMixin, mistral.MistralForCausalLM):
    config_class, attention_class = SeerMistralConfig, SeerMistralAttention


# Phi-3 / Phi-4 ------------------------------------------------------------------------------------
class SeerPhi3Config(SeerAttnConfigMixin, Phi3Config):
    model_type = "seer_phi3"


class SeerPhi3Attention(SeerAttentionMixin, phi3.Phi3Attention):
    rotary_class, rotary_fn = phi3.Phi3RotaryEmbedding, staticmethod(phi3.apply_rotary_pos_emb)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # one fused projection, laid out [q heads | k heads | v heads]
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        nq, nkv = self.config.num_attention_heads * self.head_dim, self.config.num_key_value_heads * self.head_dim
        q, k, v = self.qkv_proj(hidden_states).split([nq, nkv, nkv], dim=-1)
        return q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)


class SeerPhi3ForCausalLM(SeerForCausalLMMixin, phi3.Phi3ForCausalLM):
    config_class, attention_class = SeerPhi3Config, SeerPhi3Attention


register_seer_family(SeerQwen2ForCausalLM, "Qwen2, Qwen2.5 (incl. Instruct, Coder, Math)")
register_seer_family(SeerQwen3ForCausalLM, "Qwen3 dense models (0.6B-32B)")
register_seer_family(SeerMistralForCausalLM, "Mistral 7B v0.1-v0.3, Mistral-Nemo")
register_seer_family(SeerPhi3ForCausalLM, "Phi-3 (mini/medium, 4k and 128k), Phi-4 (14B)")
