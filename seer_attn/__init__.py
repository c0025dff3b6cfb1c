"""seer_attn: learned block-sparse attention (SeerAttention) for Llama, Qwen2/2.5, Qwen3, Mistral and Phi-3/4 models.

Public API:

- `AutoSeerForCausalLM` (picks the family from the model's config), `SeerLlamaConfig`,
  `SeerLlamaForCausalLM` and the other families' `Seer<Family>ForCausalLM`, `load_tokenizer`
  (HF integration, registered with the Auto classes);
- `AttnGate` (the gate module);
- `GraphedDecoder` (decoding on a `StaticCache`, one CUDA graph replay per token);
- kernels and their PyTorch twins under `seer_attn.kernels`.
"""

__version__ = "0.1.0"

from seer_attn.modules.attn_gate import AttnGate  # noqa: E402
from seer_attn.models import (  # noqa: E402
    AutoSeerForCausalLM,
    SeerLlamaConfig,
    SeerLlamaForCausalLM,
    SeerMistralForCausalLM,
    SeerPhi3ForCausalLM,
    SeerQwen2ForCausalLM,
    SeerQwen3ForCausalLM,
    load_tokenizer,
)
from seer_attn.models.cuda_graphs import GraphedDecoder  # noqa: E402

__all__ = [
    "AttnGate",
    "AutoSeerForCausalLM",
    "GraphedDecoder",
    "SeerLlamaConfig",
    "SeerLlamaForCausalLM",
    "SeerQwen2ForCausalLM",
    "SeerQwen3ForCausalLM",
    "SeerMistralForCausalLM",
    "SeerPhi3ForCausalLM",
    "load_tokenizer",
    "__version__",
]
