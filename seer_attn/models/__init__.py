"""HF integration: the only package that imports transformers' model classes."""

from seer_attn.models.configuration_seer_llama import SEERATTN_FIELDS, SeerLlamaConfig, apply_yarn
from seer_attn.models.modeling_seer_llama import (
    SeerCausalLMOutputWithPast,
    SeerLlamaAttention,
    SeerLlamaForCausalLM,
    chunked_causal_lm_loss,
    load_tokenizer,
)

__all__ = [
    "SEERATTN_FIELDS",
    "apply_yarn",
    "SeerLlamaConfig",
    "SeerLlamaForCausalLM",
    "SeerLlamaAttention",
    "SeerCausalLMOutputWithPast",
    "chunked_causal_lm_loss",
    "load_tokenizer",
]
