"""HF integration: the only package that imports transformers' model classes."""

from seer_attn.models.configuration_seer import SEERATTN_FIELDS, SeerAttnConfigMixin, apply_yarn
from seer_attn.models.configuration_seer_llama import SeerLlamaConfig
from seer_attn.models.modeling_seer_llama import (
    SeerCausalLMOutputWithPast,
    SeerLlamaAttention,
    SeerLlamaForCausalLM,
    chunked_causal_lm_loss,
    load_tokenizer,
)
from seer_attn.models.families import (
    SeerMistralConfig,
    SeerMistralForCausalLM,
    SeerPhi3Config,
    SeerPhi3ForCausalLM,
    SeerQwen2Config,
    SeerQwen2ForCausalLM,
    SeerQwen3Config,
    SeerQwen3ForCausalLM,
)
from seer_attn.models.auto import AutoSeerForCausalLM, supported_families

__all__ = [
    "SEERATTN_FIELDS",
    "SeerAttnConfigMixin",
    "apply_yarn",
    "AutoSeerForCausalLM",
    "supported_families",
    "SeerLlamaConfig",
    "SeerLlamaForCausalLM",
    "SeerLlamaAttention",
    "SeerQwen2Config",
    "SeerQwen2ForCausalLM",
    "SeerQwen3Config",
    "SeerQwen3ForCausalLM",
    "SeerMistralConfig",
    "SeerMistralForCausalLM",
    "SeerPhi3Config",
    "SeerPhi3ForCausalLM",
    "SeerCausalLMOutputWithPast",
    "chunked_causal_lm_loss",
    "load_tokenizer",
]
