"""`SeerLlamaConfig`: a Llama config plus the `seerattn_*` fields that drive the gates.

The fields, their defaults, meanings and validation are defined once for every family in
`seer_attn.models.configuration_seer` (`SeerAttnConfigMixin`); every field can be overridden as a
keyword of `SeerLlamaForCausalLM.from_pretrained`.
"""

from __future__ import annotations

from transformers import LlamaConfig

from seer_attn.models.configuration_seer import SEERATTN_FIELDS, SeerAttnConfigMixin, apply_yarn

__all__ = ["SeerLlamaConfig", "SEERATTN_FIELDS", "apply_yarn"]


class SeerLlamaConfig(SeerAttnConfigMixin, LlamaConfig):
    model_type = "seer_llama"

    @classmethod
    def from_llama_config(cls, config: LlamaConfig, **overrides) -> "SeerLlamaConfig":
        """A Seer config carrying every field of a plain Llama config, plus `overrides`."""
        return cls.from_base_config(config, **overrides)
