"""The `seerattn_*` config fields, defined once for every model family.

`SeerAttnConfigMixin` is a dataclass mixin: a family's Seer config is
`class SeerQwen2Config(SeerAttnConfigMixin, Qwen2Config): model_type = "seer_qwen2"`, and the fields,
their defaults and `validate_seerattn` come from here.

Every field can be overridden as a keyword of `from_pretrained`.

| field | values | default | meaning |
|---|---|---|---|
| `seerattn_mode` | `dense`, `distill`, `sparse` | `sparse` | `dense`: the family's own attention, gates unused. `distill`: exact dense attention that also returns the pooled ground truth; the gates predict it and `loss` is the gate loss. `sparse`: gate -> block selection -> block-sparse attention (in training mode with trainable gates, the gate loss is added to the LM loss: fine-tuning); with a decode gate, `generate()` also decodes sparsely. `decode_eval`: teacher-forced decode mode, every token attends to its selected blocks and its own block (decode-mode PPL). `distill` trains the decode gate too. |
| `seerattn_gate_type` | `Q<pools>_K<pools>` | `Qavg_Kmaxminavg` | pooling recipe (see `seer_attn.modules.attn_gate.valid_gate_types`). |
| `seerattn_gate_block_size` | 64 (or 128) | 64 | tokens per block. |
| `seerattn_gate_hidden_size` | int or None | None = head_dim | gate width. |
| `seerattn_gate_q_summaries` | 1, 2, 4, 8 | 4 | query summaries per block (sub-block averages; block probability = mixture of their softmaxes). |
| `seerattn_gate_k_summaries` | 1, 2, 4, 8 | 2 | key summaries per block (block probability = sum over them). |
| `seerattn_gate_init` | `random`, `pooled` | `pooled` | fresh gates: small random weights, or the training-free pooled-attention scores (avg-pooled Q . K). |
| `seerattn_gate_precision` | `tf32x3`, `tf32`, `bf16`, `ieee` | `tf32x3` | dot precision of the fused inference gate's products on the GPU: `tf32x3` is about fp32 (the PyTorch twin's), `tf32` one tensor-core pass (the mixture scoring 2-2.5x faster; near-ties rank differently from the twin), `bf16` the operands rounded to bf16 (fp32 accumulation; twice tf32's rate), `ieee` exact fp32 FMA. Training (the PyTorch gate) is unaffected. |
| `seerattn_sparsity_method` | `nz_ratio`, `threshold`, `top_p`, `adaptive` | `adaptive` | per-row top-k for a target density; a probability threshold; per-row top-p; or `adaptive`: the per-row top-k budget of `nz_ratio` spent on the highest gate probabilities over all rows and heads of a layer. |
| `seerattn_nz_ratio` | (0, 1] | 0.5 | target density over the causal block triangle (methods `nz_ratio` and `adaptive`); 1.0 is exactly dense. |
| `seerattn_threshold` | float >= 0 | 5e-3 | keep blocks with gate probability above it (method `threshold`). |
| `seerattn_adaptive_row_floor` | [0, 1] | 0.5 | method `adaptive`: each row first keeps this fraction of its top-k budget (0 fully global, 1 = top-k). |
| `seerattn_layer_density_scale` | None or list of floats > 0 | None | per-layer multipliers of the density budget (`nz_ratio`): layer `l` asks for `min(1, nz_ratio * scale[l])`, one entry per layer; e.g. from `python -m seer_attn.evaluation.layer_budgets` (calibrated on calibration text). Takes precedence over the curves below. |
| `seerattn_layer_budget_curves` | None or per layer a list of `[nz_ratio, benefit]` | None | per-layer benefit curves measured with the oracle on calibration text (minus the loss rise with only that layer sparse, or its recall; `python -m seer_attn.evaluation.layer_budgets --write_config`, or `distill --layer_budget_docs n`): every requested `nz_ratio` is then spread over the layers by water-filling these curves, keeping the mean (`seer_attn.modules.layer_budget`). |
| `seerattn_layer_budget_max_nz` | (0, 1] | 0.2 | the curves redistribute requests up to this `nz_ratio`; above it every layer gets the request (there the curves are at noise level and the measured allocation lost PPL). |
| `seerattn_top_p` | (0, 1] | 0.9 | keep each row's most probable blocks up to this cumulative probability (method `top_p`). |
| `seerattn_share_gqa_blocks` | bool | False | every query head of a GQA group attends to the same key blocks, chosen from the group's mean block probability (as NSA): the budget is spent per KV head, and the kernel could load each K/V tile once for the whole group. |
| `seerattn_keep_sink` | bool | False | always keep key block 0. |
| `seerattn_keep_diagonal` | bool | True | always keep each row's diagonal block (no query block is ever empty). |
| `seerattn_dense_last_rows` | int | 0 | make the last n query-block rows dense. |
| `seerattn_min_sparse_length` | int or `auto` | `auto` | inputs shorter than this run dense in `sparse` mode (with a warning): below it the gate and the sparse kernel are not faster than SDPA. `auto`: the crossover measured for this model shape at this `nz_ratio` (`seer_attn.modules.crossover`: SmolLM2 24k, Llama-3-8B shape 12k on an H100; other shapes from a fit over the measured ones); set 0 to measure sparse quality at any length. |
| `seerattn_cuda_graphs` | bool | False | replay cache-free, no-grad prefill forwards (`use_cache=False`) as one CUDA graph per input shape (`seer_attn.models.cuda_graphs`). |
| `seerattn_compile_gate` | bool | False | distillation / fine-tuning: run the trainable gate's scoring and loss as one `torch.compile`d graph per layer shape (eagerly ~120 small launches per layer bind the step to the host). Not yet measured on a GPU. |
| `seerattn_gt_every_n_steps` | int >= 1 | 1 | sparse fine-tuning: compute the dense ground truth (and gate loss) only every n-th training forward. |
| `seerattn_gt_layers_per_step` | int >= 0 | 0 | sparse fine-tuning: only this many layers (rotating) compute the ground truth per forward; 0 = all (`seer_attn.modules.gt_schedule`). |
| `seerattn_kernel_implementation` | `auto`, `TopK`, `CSR`, `naive` | `auto` | `auto`: Triton TopK (inference) / CSR (training) on CUDA, the PyTorch twins (`naive`) on CPU. |
| `seerattn_loss` | `kl`, `kl_top`, `mse` | `kl` | gate loss against the pooled ground truth (KL as upstream 2025; `kl_top`: KL over each row's top blocks one by one and the rest as one bin, `seer_attn.modules.seer_attention.gate_loss`; MSE as upstream 2024). |
| `seerattn_distill_target` | `max`, `mass` | `mass` | ground truth map: 2D max-pool of probabilities (upstream) or block mass (better at low density in the gate study). |
| `seerattn_gate_loss_scale` | float | 10.0 | total gate loss = scale * sum over layers. |
| `seerattn_gate_loss_row_start` | [0, 1) | 0.0 | only query-block rows from this fraction of the sequence on count in the gate loss (upstream 2025 drops the first quarter). |
| `seerattn_selector` | `gate`, `oracle`, `oracle_mass`, `pooled`, `static`, `random` | `gate` | who picks the blocks in `sparse` mode: the trained gate, or a reference selector (true max-pooled map, true block mass, the gate's scoring without learned weights, sink + recent window, random) at the same budget. `pooled` needs `seerattn_gate_hidden_size` = head_dim. |
| `seerattn_decode_gate_type` | None or `K<pools>` | None | decode gate (per-token scores over compressed key blocks, `seer_attn.modules.decode_gate`); None: no decode gate. Upstream's: `Kmaxminavg`. |
| `seerattn_decode_q_pooling` | `proj`, `avg`, `heads` | `heads` | how a GQA group's query heads are scored: one learned query per head with the block scores combined as a mixture of the heads' softmaxes (`heads`, measured best: docs/RESULTS.md), or one gate query from a learned projection (upstream's default) or their mean. |
| `seerattn_decode_k_summaries` | 1, 2, 4, 8 | 1 | compressed keys per block for the decode gate (sub-block pools; a block's probability is the sum of its summaries'). |
| `seerattn_decode_gate_init` | `random`, `pooled` | `pooled` | fresh decode gates: the training-free scores (the query against the avg-pooled keys; needs `avg` in the type and the default width), or small random weights. |
| `seerattn_decode_gate_norm` | bool | True | RMSNorm on the decode gate's queries and keys. |
| `seerattn_decode_selector` | `gate`, `oracle`, `quest`, `static` | `gate` | who picks the blocks while decoding: the decode gate, or a reference (true per-token block mass, Quest's min/max-of-K bound, sink + most recent). Decoding is sparse when there is a decode gate or the selector is not `gate`. |
| `seerattn_decode_token_budget` | int >= 0 | 2048 | tokens each decoded token attends to: its own (partial) block plus the top `budget // block_size - 1` blocks. |
| `seerattn_decode_layer_budget_scale` | None or list of floats > 0 | None | per-layer multipliers of the decode token budget (layer `l` keeps `round(budget * scale[l])` tokens, whole blocks); takes precedence over the curves below. |
| `seerattn_decode_layer_budget_curves` | None or per layer a list of `[token_budget, benefit]` | None | per-layer decode benefit curves (minus the decode-mode loss rise with only that layer sparse, measured with the oracle on calibration text: `python -m seer_attn.evaluation.layer_budgets --stage decode --write_config`): every requested token budget is spread over the layers by water-filling them, keeping the mean (`seer_attn.modules.layer_budget.layer_token_budgets`). |
| `seerattn_decode_threshold` | float or None | None | instead of the budget, keep blocks whose probability exceeds it (`gate`, `oracle`). |
| `seerattn_decode_start_layer` | int >= 0 | 0 | layers below it decode densely. |
| `seerattn_decode_keep_sink`, `seerattn_decode_keep_recent` | bool, int >= 0 | False, 0 | blocks every decoded token keeps whatever the selector scores: the first block (the attention sink) and the `keep_recent` most recent complete blocks, inside the token budget (a budget smaller than them keeps an unspecified subset); the selector picks the rest. For the `gate`, `oracle` and `quest` selectors (`static` keeps them anyway). Not yet measured on the GPU. |
| `seerattn_compile_decode_gate` | bool | False | decoding: run the decode gate's query, scores and block selection as one `torch.compile`d graph (dynamic context length) instead of ~60 eager ops per layer and step (H100, SmolLM2 32k batch 8, graphed: 1140 vs 705 tokens/s eagerly). On a preallocated cache with CUDA kernels the one-kernel gate step (`seer_attn.kernels.decode_gate_kernel`) replaces both where it applies (`q_pooling="heads"`). |
| `seerattn_decode_min_context` | int >= 0 or `auto` | `auto` | decoding steps with a shorter context run dense; 0 forces sparse decoding. `auto`: `max(16384, 131072 / batch)` (`seer_attn.modules.decode.decode_min_context`): sparse decoding pays a gate cost per step that hardly grows with the batch (its programs run side by side) and saves KV reads in proportion to batch x context, so its crossover context falls as the batch grows. Measured (`benchmarks/bench_decode.py --graphed`, H100, SmolLM2, graphed, the one-kernel gate step against split-K dense): batch 8 between 8k and 16k (1.08x at 16k, 1.28x at 32k); batch 1 still slower at 32k (0.76x; 131072 is extrapolated from the per-step times, not measured). |
| `seerattn_cross_document` | bool | True | `False`: in cache-free forwards (training, prefill) every document of a packed row (a token whose position id is 0 starts one) attends within itself only and has its own gate block grid from its first token (no gate block straddles two documents); the row runs as packed sequences. `True`: documents of a row see each other (earlier results). |
| `seerattn_padding_free` | bool | True | a padded batch in a cache-free forward (`use_cache=False`, training) runs padding-free: its real tokens are packed into one row before the embeddings (as transformers' `DataCollatorWithFlattening` does by hand), so projections and MLPs skip the padding too, and the last hidden states are scattered back (zeros at padding). Same results on every real token; `False` runs the padded layout (only the attention skips padding). |
| `base_model` | str or None | None | where the base weights of a gate-only checkpoint come from (hub id, local dir, `.gguf`, or `smollm2-135m`). |
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from numbers import Integral, Real

from transformers import PreTrainedConfig

from seer_attn.kernels.block_mask import SPARSITY_METHODS
from seer_attn.modules.decode import DECODE_SELECTORS, validate_decode_config
from seer_attn.modules.decode_gate import Q_POOLINGS, parse_decode_gate_type
from seer_attn.modules.layer_budget import check_decode_budget_curves, check_layer_budget_curves
from seer_attn.modules.attn_gate import SUMMARY_COUNTS, parse_gate_type

__all__ = ["SeerAttnConfigMixin", "SEERATTN_FIELDS", "GATE_SHAPE_FIELDS", "apply_yarn", "check_seerattn_field"]

_CHOICES = {
    "seerattn_mode": ("dense", "distill", "sparse", "decode_eval"),
    "seerattn_sparsity_method": SPARSITY_METHODS,
    "seerattn_gate_precision": ("tf32x3", "tf32", "bf16", "ieee"),
    "seerattn_gate_init": ("random", "pooled"),
    "seerattn_decode_gate_init": ("random", "pooled"),
    "seerattn_kernel_implementation": ("auto", "TopK", "CSR", "naive"),
    "seerattn_loss": ("kl", "kl_top", "mse"),
    "seerattn_distill_target": ("max", "mass"),
    "seerattn_selector": ("gate", "oracle", "oracle_mass", "pooled", "static", "random"),
    "seerattn_decode_q_pooling": Q_POOLINGS,
    "seerattn_decode_selector": DECODE_SELECTORS,
}
# the fields that shape the (prefill) gate weights: fixed once a model is built
GATE_SHAPE_FIELDS = (
    "seerattn_gate_type", "seerattn_gate_block_size", "seerattn_gate_hidden_size",
    "seerattn_gate_q_summaries", "seerattn_gate_k_summaries",
    # the decode gate's too (its type has its own message, at forward)
    "seerattn_decode_q_pooling", "seerattn_decode_k_summaries", "seerattn_decode_gate_norm",
)
_BOOLS = ("seerattn_keep_sink", "seerattn_keep_diagonal", "seerattn_share_gqa_blocks", "seerattn_cuda_graphs",
          "seerattn_decode_keep_sink",
          "seerattn_cross_document", "seerattn_padding_free",
          "seerattn_decode_gate_norm", "seerattn_compile_gate", "seerattn_compile_decode_gate")
_INTS_GE0 = ("seerattn_dense_last_rows", "seerattn_gt_layers_per_step", "seerattn_decode_token_budget",
             "seerattn_decode_start_layer", "seerattn_decode_keep_recent")
# name -> (low, high, low inclusive, high inclusive)
_RANGES = {
    "seerattn_nz_ratio": (0.0, 1.0, False, True),
    "seerattn_top_p": (0.0, 1.0, False, True),
    "seerattn_layer_budget_max_nz": (0.0, 1.0, False, True),
    "seerattn_adaptive_row_floor": (0.0, 1.0, True, True),
    "seerattn_gate_loss_row_start": (0.0, 1.0, True, False),
    "seerattn_threshold": (0.0, float("inf"), True, True),
    "seerattn_gate_loss_scale": (0.0, float("inf"), True, True),
}


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_seerattn_field(name: str, value) -> None:
    """Raise ValueError when `value` is not valid for the `seerattn_*` field `name` on its own (other names pass).

    Checks that involve two fields (summaries dividing the block size, ...) are in `validate_seerattn`.
    """
    if name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {_CHOICES[name]}, got {value!r}")
    elif name in _RANGES:
        lo, hi, lo_in, hi_in = _RANGES[name]
        ok = isinstance(value, Real) and not isinstance(value, bool)
        ok = ok and (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
        if not ok:
            span = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise ValueError(f"{name} must be a number in {span}, got {value!r}")
    elif name in _BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    elif name in _INTS_GE0:
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    elif name == "seerattn_gate_type":
        parse_gate_type(value)
    elif name == "seerattn_gate_block_size":
        if value not in (16, 32, 64, 128):
            raise ValueError(f"seerattn_gate_block_size must be 16, 32, 64 or 128, got {value!r}")
    elif name == "seerattn_gate_hidden_size":
        if value is not None and (not _is_int(value) or value <= 0 or value % 2):
            raise ValueError(f"seerattn_gate_hidden_size must be None or a positive even int (RoPE), got {value!r}")
    elif name in ("seerattn_gate_q_summaries", "seerattn_gate_k_summaries", "seerattn_decode_k_summaries"):
        if value not in SUMMARY_COUNTS:
            raise ValueError(f"{name} must be one of {SUMMARY_COUNTS} and divide the block size, got {value!r}")
    elif name in ("seerattn_min_sparse_length", "seerattn_decode_min_context"):
        if value != "auto" and (not _is_int(value) or value < 0):
            raise ValueError(f"{name} must be an int >= 0 or 'auto', got {value!r}")
    elif name == "seerattn_gt_every_n_steps":
        if not _is_int(value) or value < 1:
            raise ValueError(f"seerattn_gt_every_n_steps must be an int >= 1, got {value!r}")
    elif name == "seerattn_decode_gate_type":
        if value is not None:
            parse_decode_gate_type(value)
    elif name in ("seerattn_layer_density_scale", "seerattn_decode_layer_budget_scale"):
        if value is not None and (
            not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(x, Real) and not isinstance(x, bool) and x > 0 for x in value)
        ):
            raise ValueError(f"{name} must be None or a non-empty list of numbers > 0, got {value!r}")
    elif name == "seerattn_layer_budget_curves":
        check_layer_budget_curves(value)
    elif name == "seerattn_decode_layer_budget_curves":
        check_decode_budget_curves(value)
    elif name == "seerattn_decode_threshold":
        if value is not None and (not isinstance(value, Real) or isinstance(value, bool) or not value >= 0):
            raise ValueError(f"seerattn_decode_threshold must be >= 0 or None, got {value!r}")


# A dataclass, so that transformers' config dataclass machinery (every PreTrainedConfig subclass is
# made a dataclass) collects these fields into each family's Seer config.
@dataclass(kw_only=True, repr=False)
class SeerAttnConfigMixin:
    """The `seerattn_*` fields and their validation (see the module docstring); mix in before the family config."""

    seerattn_mode: str = "sparse"
    seerattn_gate_type: str = "Qavg_Kmaxminavg"
    seerattn_gate_block_size: int = 64
    seerattn_gate_hidden_size: int | None = None
    # the default recipe is the best of the gate study (docs/RESULTS.md, "Gate quality"): 4 query and
    # 2 key summaries per block, pooled initialisation, mass target, adaptive selection with a row floor
    seerattn_gate_q_summaries: int = 4
    seerattn_gate_k_summaries: int = 2
    seerattn_gate_init: str = "pooled"
    seerattn_gate_precision: str = "tf32x3"
    seerattn_sparsity_method: str = "adaptive"
    seerattn_nz_ratio: float = 0.5
    seerattn_threshold: float = 5e-3
    seerattn_top_p: float = 0.9
    seerattn_adaptive_row_floor: float = 0.5
    seerattn_layer_density_scale: list[float] | None = None
    seerattn_layer_budget_curves: list[list[list[float]]] | None = None
    seerattn_layer_budget_max_nz: float = 0.2
    seerattn_share_gqa_blocks: bool = False
    seerattn_keep_sink: bool = False
    seerattn_keep_diagonal: bool = True
    seerattn_dense_last_rows: int = 0
    seerattn_min_sparse_length: int | str = "auto"
    seerattn_cuda_graphs: bool = False
    seerattn_compile_gate: bool = False
    seerattn_gt_every_n_steps: int = 1
    seerattn_gt_layers_per_step: int = 0
    seerattn_kernel_implementation: str = "auto"
    seerattn_loss: str = "kl"
    seerattn_distill_target: str = "mass"
    seerattn_gate_loss_scale: float = 10.0
    seerattn_gate_loss_row_start: float = 0.0
    seerattn_selector: str = "gate"
    seerattn_decode_gate_type: str | None = None
    seerattn_decode_q_pooling: str = "heads"
    seerattn_decode_gate_norm: bool = True
    seerattn_decode_gate_init: str = "pooled"
    seerattn_decode_k_summaries: int = 1
    seerattn_decode_selector: str = "gate"
    seerattn_decode_token_budget: int = 2048
    seerattn_decode_layer_budget_scale: list[float] | None = None
    seerattn_decode_layer_budget_curves: list[list[list[float]]] | None = None
    seerattn_decode_threshold: float | None = None
    seerattn_decode_start_layer: int = 0
    seerattn_decode_keep_sink: bool = False
    seerattn_decode_keep_recent: int = 0
    seerattn_decode_min_context: int | str = "auto"
    seerattn_compile_decode_gate: bool = False
    seerattn_cross_document: bool = True
    seerattn_padding_free: bool = True
    base_model: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_seerattn()

    def __setattr__(self, name, value):
        # checked on assignment, so `config.seerattn_nz_ratio = 1.5` fails here, not silently at some later forward
        check_seerattn_field(name, value)
        super().__setattr__(name, value)

    def validate_seerattn(self) -> None:
        """Raise ValueError naming the first invalid `seerattn_*` field (each field, then their combinations)."""
        for name in SEERATTN_FIELDS:
            check_seerattn_field(name, getattr(self, name))
        for name in ("seerattn_gate_q_summaries", "seerattn_gate_k_summaries", "seerattn_decode_k_summaries"):
            n = getattr(self, name)
            if self.seerattn_gate_block_size % n:
                raise ValueError(f"{name} must be one of {SUMMARY_COUNTS} and divide the block size, got {n}")
        if not self.seerattn_cross_document and self.seerattn_cuda_graphs:
            # documents are found on the host (one sync per forward): nothing a replayed graph can do
            raise ValueError("seerattn_cross_document=False cannot be combined with seerattn_cuda_graphs")
        n_layers = getattr(self, "num_hidden_layers", None)
        for name in ("seerattn_layer_density_scale", "seerattn_decode_layer_budget_scale"):
            scale = getattr(self, name)
            if scale is not None and n_layers is not None and len(scale) != n_layers:
                raise ValueError(f"{name} has {len(scale)} entries for {n_layers} layers")
        check_layer_budget_curves(self.seerattn_layer_budget_curves, n_layers)
        check_decode_budget_curves(self.seerattn_decode_layer_budget_curves, n_layers)
        validate_decode_config(self)

    @classmethod
    def from_base_config(cls, config: PreTrainedConfig, **overrides):
        """A Seer config carrying every field of a plain config of the same family, plus `overrides`."""
        d = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            d.pop(key, None)
        d.update(overrides)
        return cls(**d)


SEERATTN_FIELDS = tuple(f.name for f in fields(SeerAttnConfigMixin) if f.name.startswith("seerattn_")) + ("base_model",)


def apply_yarn(config: PreTrainedConfig, factor: float, original_max_position_embeddings: int | None = None) -> PreTrainedConfig:
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
