"""SeerLlama: transformers' Llama with an AttnGate in every attention layer.

One family of the shared mechanism in `seer_attn.models.modeling_seer` (read its docstring for the
design: pre-RoPE capture, the `"seer_attn"` attention function, padding, sliding windows, gate-only
checkpoints); the other families are in `seer_attn.models.families`.
"""

from __future__ import annotations

from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from seer_attn.models.configuration_seer_llama import SeerLlamaConfig
from seer_attn.models.modeling_seer import (  # noqa: F401  (re-exported: these lived here)
    ATTN_IMPLEMENTATION,
    GATE_WEIGHTS_NAME,
    SeerAttentionMixin,
    SeerCausalLMOutputWithPast,
    SeerForCausalLMMixin,
    chunked_causal_lm_loss,
    load_tokenizer,
    register_seer_family,
    seer_attention_forward,
)

__all__ = [
    "SeerLlamaAttention",
    "SeerLlamaForCausalLM",
    "SeerCausalLMOutputWithPast",
    "seer_attention_forward",
    "load_tokenizer",
    "chunked_causal_lm_loss",
]


class SeerLlamaAttention(SeerAttentionMixin, LlamaAttention):
    """`LlamaAttention` with an `attn_gate` child and a gate RoPE table of the gate's width."""

    rotary_class, rotary_fn = LlamaRotaryEmbedding, staticmethod(apply_rotary_pos_emb)


class SeerLlamaForCausalLM(SeerForCausalLMMixin, LlamaForCausalLM):
    """A `LlamaForCausalLM` whose attention layers carry AttnGates (see `seer_attn.models.modeling_seer`)."""

    config_class, attention_class = SeerLlamaConfig, SeerLlamaAttention


register_seer_family(SeerLlamaForCausalLM, "Llama 2 / 3 / 3.1 / 3.2, SmolLM2 (incl. the embedded smollm2-135m)")
