"""seer_attn: learned block-sparse attention (SeerAttention) for Llama models.

Public API:

- `SeerLlamaConfig`, `SeerLlamaForCausalLM`, `load_tokenizer` (HF integration, registered with the Auto classes);
- `AttnGate` (the gate module);
- kernels and their PyTorch twins under `seer_attn.kernels`.
"""

__version__ = "0.1.0"

from seer_attn.modules.attn_gate import AttnGate  # noqa: E402
from seer_attn.models import SeerLlamaConfig, SeerLlamaForCausalLM, load_tokenizer  # noqa: E402

__all__ = ["AttnGate", "SeerLlamaConfig", "SeerLlamaForCausalLM", "load_tokenizer", "__version__"]
