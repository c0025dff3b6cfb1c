"""`AutoSeerForCausalLM`: the Seer class of whichever supported family a model or checkpoint is.

    model = AutoSeerForCausalLM.from_pretrained("Qwen/Qwen2.5-7B-Instruct", seerattn_mode="distill")
    model = AutoSeerForCausalLM.from_pretrained("outputs/qwen25_gates")   # gate-only: its base's family

The family comes from `model_type`: a plain model's (`llama`, `qwen2`, ...), or a Seer checkpoint's
(`seer_qwen2`, ...). Everything after the pick is the family class's own `from_pretrained` /
`config_from`, so keywords and behaviour are those of `SeerLlamaForCausalLM` and its siblings.
"""

from __future__ import annotations

import os

from transformers import AutoConfig, PreTrainedConfig

import seer_attn.models.families  # noqa: F401  (registers the non-Llama families)
import seer_attn.models.modeling_seer_llama  # noqa: F401  (registers Llama)
from seer_attn.models.configuration_seer import SeerAttnConfigMixin
from seer_attn.models.loading import SEER_MODEL_TYPE_PREFIX, resolve_model_source
from seer_attn.models.modeling_seer import SEER_FAMILIES, SEER_FAMILY_EXAMPLES, _seer_model_type

__all__ = ["AutoSeerForCausalLM", "supported_families"]


def supported_families() -> str:
    """`"llama (Llama 2 / 3 ...), qwen2 (...), ..."`: the model types SeerAttention supports."""
    return ", ".join(f"{t} ({SEER_FAMILY_EXAMPLES[t]})" for t in SEER_FAMILIES)


def _family(model_type: str | None, what: str) -> type:
    base_type = str(model_type)
    if base_type.startswith(SEER_MODEL_TYPE_PREFIX):
        base_type = base_type[len(SEER_MODEL_TYPE_PREFIX) :]
    if base_type not in SEER_FAMILIES:
        raise ValueError(
            f"{what} is a {model_type!r} model, which SeerAttention does not support. "
            f"Supported model types: {supported_families()}"
        )
    return SEER_FAMILIES[base_type]


class AutoSeerForCausalLM:
    """Picks the Seer class from the model type; not instantiable (as transformers' Auto classes)."""

    def __init__(self, *args, **kwargs):
        raise EnvironmentError("use AutoSeerForCausalLM.from_pretrained(...) or .from_config(config)")

    @classmethod
    def family_class(cls, model: str | os.PathLike | PreTrainedConfig) -> type:
        """The Seer `ForCausalLM` class for a model name/path/`.gguf`, a gated checkpoint, or a config."""
        return cls._pick(model)[0]

    @classmethod
    def _pick(cls, model, config: PreTrainedConfig | None = None) -> tuple[type, PreTrainedConfig | None]:
        """`(family class, config to pass on)`: a plain source's config is read once and handed on
        (reading a `.gguf` config costs seconds)."""
        if isinstance(config, PreTrainedConfig):
            return _family(config.model_type, type(config).__name__), config
        if isinstance(model, PreTrainedConfig):
            return _family(model.model_type, type(model).__name__), model
        source = resolve_model_source(model)
        if source.kind in ("seer_gates", "seer_full"):
            return _family(_seer_model_type(source.path), str(model)), config
        base = AutoConfig.from_pretrained(source.path, **source.hf_kwargs())
        return _family(base.model_type, str(model)), base

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """`Seer<Family>ForCausalLM.from_pretrained` of the family of `config` (a Seer config, or a
        plain one of the source's family) or of the source; `seerattn_*` keywords override the config."""
        picked, config = cls._pick(pretrained_model_name_or_path, config)
        return picked.from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    @classmethod
    def config_from(cls, pretrained_model_name_or_path, base_config: PreTrainedConfig | None = None, **overrides):
        """The Seer config `from_pretrained` would build (edit it, then pass `config=`)."""
        picked, base_config = cls._pick(pretrained_model_name_or_path, base_config)
        return picked.config_from(pretrained_model_name_or_path, base_config=base_config, **overrides)

    @classmethod
    def seer_config(cls, config: PreTrainedConfig, **overrides):
        """A plain family config (e.g. a `Qwen2Config`) turned into its Seer config, plus `overrides`."""
        if isinstance(config, SeerAttnConfigMixin):
            config = type(config).from_base_config(config, **overrides)
            config.validate_seerattn()
            return config
        return cls.family_class(config).config_class.from_base_config(config, **overrides)

    @classmethod
    def from_config(cls, config: PreTrainedConfig, **overrides):
        """A model with random weights (benchmarks): a Seer config, or a plain one converted first."""
        if overrides or not isinstance(config, SeerAttnConfigMixin):
            config = cls.seer_config(config, **overrides)
        return cls.family_class(config)(config)
