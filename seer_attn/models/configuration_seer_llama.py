"""`SeerLlamaConfig`: a Llama config plus the `seerattn_*` fields that drive the gates.

Every field can be overridden as a keyword of `SeerLlamaForCausalLM.from_pretrained`.

| field | values | default | meaning |
|---|---|---|---|
| `seerattn_mode` | `dense`, `distill`, `sparse` | `sparse` | `dense`: plain Llama attention, gates unused. `distill`: exact dense attention that also returns the pooled ground truth; the gates predict it and `loss` is the gate loss. `sparse`: gate -> block selection -> block-sparse attention (in training mode with trainable gates, the gate loss is added to the LM loss: fine-tuning). |
| `seerattn_gate_type` | `Q<pools>_K<pools>` | `Qavg_Kmaxminavg` | pooling recipe (see `seer_attn.modules.attn_gate.valid_gate_types`). |
| `seerattn_gate_block_size` | 64 (or 128) | 64 | tokens per block. |
| `seerattn_gate_hidden_size` | int or None | None = head_dim | gate width. |
| `seerattn_sparsity_method` | `nz_ratio`, `threshold` | `nz_ratio` | per-row top-k for a target density, or a probability threshold. |
| `seerattn_nz_ratio` | (0, 1] | 0.5 | target density over the causal block triangle; 1.0 is exactly dense. |
| `seerattn_threshold` | float >= 0 | 5e-3 | keep blocks with gate probability above it (method `threshold`). |
| `seerattn_keep_sink` | bool | False | always keep key block 0. |
| `seerattn_keep_diagonal` | bool | True | always keep each row's diagonal block (no query block is ever empty). |
| `seerattn_dense_last_rows` | int | 0 | make the last n query-block rows dense. |
| `seerattn_min_sparse_length` | int | 16384 | inputs shorter than this run dense in `sparse` mode: below about 16k tokens the gate and the sparse kernel are not faster than SDPA (benchmarks/RESULTS.md); set 0 to measure sparse quality at any length. |
| `seerattn_kernel_implementation` | `auto`, `TopK`, `CSR`, `naive` | `auto` | `auto`: Triton TopK (inference) / CSR (training) on CUDA, the PyTorch twins (`naive`) on CPU. |
| `seerattn_loss` | `kl`, `mse` | `kl` | gate loss against the pooled ground truth (KL as upstream 2025, MSE as upstream 2024). |
| `seerattn_distill_target` | `max`, `mass` | `max` | ground truth map: 2D max-pool of probabilities (upstream) or block mass. |
| `seerattn_gate_loss_scale` | float | 10.0 | total gate loss = scale * sum over layers. |
| `seerattn_selector` | `gate`, `oracle`, `oracle_mass`, `static`, `random` | `gate` | who picks the blocks in `sparse` mode: the trained gate, or a reference selector (true max-pooled map, true block mass, sink + recent window, random) at the same budget. |
| `base_model` | str or None | None | where the base weights of a gate-only checkpoint come from (hub id, local dir, `.gguf`, or `smollm2-135m`). |
"""

from __future__ import annotations

from numbers import Integral, Real

from transformers import LlamaConfig

from seer_attn.modules.attn_gate import parse_gate_type

__all__ = ["SeerLlamaConfig", "SEERATTN_FIELDS", "apply_yarn", "check_seerattn_field"]

_CHOICES = {
    "seerattn_mode": ("dense", "distill", "sparse"),
    "seerattn_sparsity_method": ("nz_ratio", "threshold"),
    "seerattn_kernel_implementation": ("auto", "TopK", "CSR", "naive"),
    "seerattn_loss": ("kl", "mse"),
    "seerattn_distill_target": ("max", "mass"),
    "seerattn_selector": ("gate", "oracle", "oracle_mass", "static", "random"),
}


def check_seerattn_field(name: str, value) -> None:
    """Raise ValueError when `value` is not valid for the `seerattn_*` field `name` (other names pass)."""
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")
    elif name == "seerattn_gate_type":
        parse_gate_type(value)
    elif name == "seerattn_gate_block_size":
        if value not in (16, 32, 64, 128):
            raise ValueError(f"seerattn_gate_block_size must be 16, 32, 64 or 128, got {value!r}")
    elif name == "seerattn_nz_ratio":
        if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value <= 1.0:
            raise ValueError(f"seerattn_nz_ratio must be a number in (0, 1], got {value!r}")
    elif name == "seerattn_threshold":
        if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
            raise ValueError(f"seerattn_threshold must be a number >= 0, got {value!r}")
    elif name == "seerattn_gate_hidden_size":
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral) or value <= 0 or value % 2):
            raise ValueError(f"seerattn_gate_hidden_size must be None or a positive even int (RoPE), got {value!r}")
    elif name in ("seerattn_dense_last_rows", "seerattn_min_sparse_length"):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    elif name in ("seerattn_keep_sink", "seerattn_keep_diagonal"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    elif name == "seerattn_gate_loss_scale":
        if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
            raise ValueError(f"seerattn_gate_loss_scale must be a number >= 0, got {value!r}")


class SeerLlamaConfig(LlamaConfig):
    model_type = "seer_llama"

    seerattn_mode: str = "sparse"
    seerattn_gate_type: str = "Qavg_Kmaxminavg"
    seerattn_gate_block_size: int = 64
    seerattn_gate_hidden_size: int | None = None
    seerattn_sparsity_method: str = "nz_ratio"
    seerattn_nz_ratio: float = 0.5
    seerattn_threshold: float = 5e-3
    seerattn_keep_sink: bool = False
    seerattn_keep_diagonal: bool = True
    seerattn_dense_last_rows: int = 0
    seerattn_min_sparse_length: int = 16384
    seerattn_kernel_implementation: str = "auto"
    seerattn_loss: str = "kl"
    seerattn_distill_target: str = "max"
    seerattn_gate_loss_scale: float = 10.0
    seerattn_selector: str = "gate"
    base_model: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_seerattn()

    def __setattr__(self, name, value):
        # validated on assignment, so `config.seerattn_nz_ratio = 1.5` fails here, not at some later forward
        check_seerattn_field(name, value)
        super().__setattr__(name, value)

    def validate_seerattn(self) -> None:
        """Raise ValueError naming the first invalid `seerattn_*` field."""
        for name in SEERATTN_FIELDS:
            check_seerattn_field(name, getattr(self, name))

    @classmethod
    def from_llama_config(cls, config: LlamaConfig, **overrides) -> "SeerLlamaConfig":
        """A Seer config carrying every field of a plain Llama config, plus `overrides`."""
        d = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            d.pop(key, None)
        d.update(overrides)
        return cls(**d)


SEERATTN_FIELDS = tuple(name for name in SeerLlamaConfig.__dataclass_fields__ if name.startswith("seerattn_")) + (
    "base_model",
)


def apply_yarn(config: LlamaConfig, factor: float, original_max_position_embeddings: int | None = None) -> LlamaConfig:
    """Extend the context `factor`-fold with YaRN, in place; returns `config`.

    Sets `rope_parameters` to YaRN with `original_max_position_embeddings` (default: the current
    `max_position_embeddings`) and multiplies `max_position_embeddings`. transformers >= 5 computes
    YaRN's correction range from the *original* length, as the paper does (upstream's 4.44 used the
    extended one). The gates' block RoPE follows automatically: it is built from the same config.
    """
    if factor <= 1:
        raise ValueError(f"YaRN factor must be > 1, got {factor}")
    params = dict(config.rope_parameters or {})
    if params.get("rope_type", "default") not in ("default", "yarn"):
        raise ValueError(f"cannot stack YaRN on rope_type {params['rope_type']!r}")
    original = original_max_position_embeddings or params.get("original_max_position_embeddings") or config.max_position_embeddings
    params.update(rope_type="yarn", factor=float(factor), original_max_position_embeddings=int(original))
    config.rope_parameters = params
    config.max_position_embeddings = int(original * factor)
    return config
