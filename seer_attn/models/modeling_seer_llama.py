"""SeerLlama: transformers' Llama with an AttnGate in every attention layer.

Integration by subclassing, not copying:

- `SeerLlamaAttention(LlamaAttention)` overrides `forward` only. The override exists because the
  gate needs the *pre-RoPE* queries and keys, which `LlamaAttention.forward` discards before it calls
  the attention function; everything else (projections, RoPE, KV cache) is Llama's own code path.
- The attention itself is the function `seer_attention_forward`, registered with transformers'
  `AttentionInterface` as `"seer_attn"`, with `flash_attention_mask` registered as its mask builder
  so padding arrives as a 2-D `[B, S_k]` mask (or `None` when nothing is padded).
- Padding: each sequence of a padded batch runs on its real tokens only (gate blocks start at the
  first real token), so a padded row gives the same result as that sequence alone.
- Decoding with a KV cache (fewer queries than keys) is dense: the gate only scores prefill.

`SeerLlamaForCausalLM.save_pretrained` writes the gate weights and the config (with `base_model`);
`from_pretrained` accepts such a gate-only folder, a full SeerLlama folder, a plain Llama (folder,
hub id, `.gguf`) or the embedded `smollm2-135m`, and any `seerattn_*` field as a keyword.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers import initialization as init
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from seer_attn.models.configuration_seer_llama import SEERATTN_FIELDS, SeerLlamaConfig, check_seerattn_field
from seer_attn.kernels.block_mask import indices_to_mask
from seer_attn.models.loading import resolve_base_model, resolve_model_source
from seer_attn.modules.attn_gate import AttnGate, MultiHeadLinear
from seer_attn.modules.seer_attention import (
    SeerAttentionSettings,
    SeerAttentionStats,
    dense_attention,
    in_backward,
    seer_attention,
)

__all__ = [
    "SeerLlamaAttention",
    "SeerLlamaForCausalLM",
    "SeerCausalLMOutputWithPast",
    "seer_attention_forward",
    "load_tokenizer",
    "chunked_causal_lm_loss",
]

logger = logging.getLogger(__name__)
ATTN_IMPLEMENTATION = "seer_attn"
GATE_WEIGHTS_NAME = "model.safetensors"
_warned_dense: set[str] = set()
_GATE_SHAPE_FIELDS = ("seerattn_gate_type", "seerattn_gate_block_size", "seerattn_gate_hidden_size")


def _warn_ran_dense(settings: SeerAttentionSettings, Sq: int, Sk: int) -> None:
    """A forward asked to be sparse ran dense: say why, once per reason and process (nothing silent)."""
    if Sq != Sk:
        reason, why = "decode", f"steps with a KV cache ({Sq} new tokens against {Sk} keys) run dense attention; the gate scores prefill only"
    elif settings.sparsity_method == "nz_ratio" and settings.nz_ratio >= 1.0:
        reason, why = "nz_ratio", "seerattn_nz_ratio=1.0 keeps every block, so sparse mode runs exact dense attention"
    else:
        reason, why = "short", (
            f"the input ({Sk} tokens) is shorter than seerattn_min_sparse_length={settings.min_sparse_length}, so sparse "
            "mode ran dense attention (below it the sparse path is not faster); set seerattn_min_sparse_length=0 "
            "to run sparse at any length"
        )
    if reason not in _warned_dense:
        _warned_dense.add(reason)
        logger.warning("seer_attn: %s. The output's density is 1.0. (Logged once per process.)", why)


def _dense_with_padding(q, k, v, key_padding: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Causal attention where queries are the last `S_q` of `S_k` positions (KV cache aware)."""
    Sq, Sk = q.shape[2], k.shape[2]
    if key_padding is None and Sq == Sk:
        return dense_attention(q, k, v, scale)
    rows = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
    allowed = torch.arange(Sk, device=q.device)[None, :] <= rows  # [S_q, S_k]
    if key_padding is not None:
        allowed = allowed[None, None] & key_padding[:, None, None, :].bool()
    # padding queries see no key: let them see everything so they stay finite (their outputs are unused)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


_rope_cache: dict = {}


def _block_rope(module: "SeerLlamaAttention", position_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    # each block is rotated at its first token's position, with the model's own rope scaling;
    # every layer of one forward gets the same position_ids object and the same table: reuse it
    # (the cache holds the tensor, so no other tensor can take its address while the entry lives)
    rope = module.gate_rotary_emb
    key = (
        position_ids.data_ptr(), tuple(position_ids.shape), position_ids.stride(), position_ids._version,
        # every layer's gate rotary is built from the same config: key on it, not on its buffers
        id(module.config), module.attn_gate.hidden_size, module.config.seerattn_gate_block_size,
        rope.rope_type, rope.attention_scaling, str(device),
    )
    hit = _rope_cache.get("entry")
    if hit is not None and hit[1] == key:
        return hit[2]
    block_pos = position_ids[:, :: module.config.seerattn_gate_block_size]
    tables = rope(torch.zeros((), device=device, dtype=torch.float32), block_pos)
    _rope_cache["entry"] = (position_ids, key, tables)
    return tables


def seer_attention_forward(
    module: "SeerLlamaAttention",
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    q_pre: torch.Tensor | None = None,
    k_pre: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `"seer_attn"` attention function.

    Args:
        module: the calling `SeerLlamaAttention` (its `config`, `attn_gate`, `gate_rotary_emb`).
        query (torch.Tensor): post-RoPE `[B, Hq, S_q, D]`.
        key, value (torch.Tensor): `[B, Hkv, S_k, D]` (cache included).
        attention_mask (torch.Tensor, Optional): 2-D padding mask `[B, S_k]` (True/1 = real token).
        scaling (float): logit scale.
        q_pre, k_pre (torch.Tensor): pre-RoPE queries and keys of this step.
        position_ids (torch.Tensor, Optional): `[B or 1, S_q]`.

    Returns:
        `([B, S_q, Hq, D], None)`. Per-layer statistics are left in `module.seer_stats`.
    """
    if q_pre is None or k_pre is None:
        raise ValueError("seer_attn attention needs the pre-RoPE q_pre/k_pre: call it through SeerLlamaAttention")
    if dropout:
        raise ValueError("seer_attn attention does not implement attention dropout")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"seer_attn expects a 2-D padding mask [B, S_k], got {tuple(attention_mask.shape)}")
    settings = SeerAttentionSettings.from_config(module.config)
    # under autocast RoPE promotes q/k to fp32 while v stays low precision: kernels want one dtype
    dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else value.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    B, Hq, Sq, _ = query.shape
    Sk = key.shape[2]
    if settings.mode == "dense" or Sq != Sk:
        if settings.mode == "dense":
            module.seer_stats = SeerAttentionStats()
        else:  # every key block of every new query is computed: density 1.0
            n = B * Hq * math.ceil(Sk / settings.block_size)
            module.seer_stats = SeerAttentionStats(kept_blocks=n, causal_blocks=n)
            _warn_ran_dense(settings, Sq, Sk)
        return _dense_with_padding(query, key, value, attention_mask, scaling).transpose(1, 2), None

    train_gate = (
        settings.mode == "sparse"
        and module.training
        and torch.is_grad_enabled()
        and any(p.requires_grad for p in module.attn_gate.parameters())
    )
    if position_ids is None:
        position_ids = torch.arange(Sq, device=query.device)[None]
    position_ids = position_ids.expand(B, Sq)
    if train_gate and not in_backward():
        module.seer_target_cache = []
    cache = module.seer_target_cache if train_gate else None
    run = lambda q, k, v, qp, kp, pos: seer_attention(  # noqa: E731
        q, k, v, qp, kp, module.attn_gate, *_block_rope(module, pos, q.device), scaling, settings, train_gate, cache
    )
    if attention_mask is None or bool(attention_mask.all()):
        o, stats = run(query, key, value, q_pre, k_pre, position_ids)
    else:
        o = query.new_zeros(query.shape)
        stats, losses = SeerAttentionStats(), []
        for b in range(B):
            idx = attention_mask[b].nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            pick = lambda t: t[b : b + 1, :, idx]  # noqa: E731
            ob, sb = run(pick(query), pick(key), pick(value), pick(q_pre), pick(k_pre), position_ids[b : b + 1, idx])
            o[b, :, idx] = ob[0]
            stats.kept_blocks += sb.kept
            stats.causal_blocks += sb.causal_blocks
            stats.sparse = stats.sparse or sb.sparse
            if sb.gate_loss is not None:
                losses.append(sb.gate_loss)
        stats.gate_loss = torch.stack(losses).mean() if losses else None
    module.seer_stats = stats
    if settings.mode == "sparse" and not stats.sparse:
        _warn_ran_dense(settings, Sq, Sk)
    return o.transpose(1, 2), None


AttentionInterface.register(ATTN_IMPLEMENTATION, seer_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


class SeerLlamaAttention(LlamaAttention):
    """`LlamaAttention` with an `attn_gate` child and a gate RoPE table of the gate's width."""

    def __init__(self, config: SeerLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attn_gate = AttnGate(
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=self.head_dim,
            gate_type=config.seerattn_gate_type,
            hidden_size=config.seerattn_gate_hidden_size,
            block_size=config.seerattn_gate_block_size,
        )
        gate_config = copy.copy(config)
        gate_config.head_dim = self.attn_gate.hidden_size
        self.gate_rotary_emb = LlamaRotaryEmbedding(gate_config)
        self.seer_stats: SeerAttentionStats | None = None
        self.seer_target_cache: list = []

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q_pre = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k_pre = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(q_pre, k_pre, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attn_output, attn_weights = seer_attention_forward(
            self, query_states, key_states, value_states, attention_mask, scaling=self.scaling,
            q_pre=q_pre, k_pre=k_pre, **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


@contextlib.contextmanager
def _saved_for_inference(config: SeerLlamaConfig):
    """Within the block, a `distill` config reads `sparse` and records `seerattn_trained_mode`."""
    if config.seerattn_mode != "distill":
        yield
        return
    before = config.__dict__.get("seerattn_trained_mode")
    config.seerattn_mode, config.seerattn_trained_mode = "sparse", "distill"
    try:
        yield
    finally:
        config.seerattn_mode = "distill"
        if before is None:
            del config.seerattn_trained_mode
        else:
            config.seerattn_trained_mode = before


@dataclass
class SeerCausalLMOutputWithPast(CausalLMOutputWithPast):
    """`loss` is the gate loss in `distill` mode, LM (+ scaled gate) loss otherwise.

    lm_loss: mean next-token cross-entropy (when labels are given).
    gate_loss: `seerattn_gate_loss_scale * sum(gate_losses)`.
    gate_losses: `[num_layers]` unscaled per-layer gate losses.
    density: realised density over the causal block triangle, all layers together.
    """

    lm_loss: torch.Tensor | None = None
    gate_loss: torch.Tensor | None = None
    gate_losses: torch.Tensor | None = None
    density: float | None = None


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 4096, num_items: int | None = None
) -> torch.Tensor:
    """Next-token cross-entropy without holding `[S, vocab]` logits at once.

    Position `t` predicts `labels[t + 1]`; `-100` is ignored. Each chunk's logits are recomputed
    in backward (activation checkpointing), so memory stays at one chunk of logits.

    Args:
        hidden (torch.Tensor): final hidden states `[B, S, H]`.
        weight (torch.Tensor): LM head weight `[vocab, H]`.
        labels (torch.Tensor): `[B, S]`.
        num_items (int, Optional): divide by this instead of the count of valid labels.
    """
    h, y = hidden[:, :-1], labels[:, 1:].to(hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[1], chunk):
        hc, yc = h[:, s : s + chunk], y[:, s : s + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + checkpoint(_chunk_ce, hc, weight, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce(hc, weight, yc)
    n = num_items if num_items is not None else (y != -100).sum()
    return total / torch.as_tensor(n, device=total.device).clamp_min(1)


def _count_kept(stats: list[SeerAttentionStats | None]):
    """Kept blocks of all layers; TopK layers' indices are counted in one batched pass."""
    stats = [s for s in stats if s is not None]
    indexed = [s.kept_index for s in stats if s.kept_index is not None]
    kept = sum(s.kept_blocks for s in stats if s.kept_index is None)
    if indexed and all(t.shape == indexed[0].shape for t in indexed):
        kept = kept + indices_to_mask(torch.stack(indexed), indexed[0].shape[-2]).sum()
    else:
        kept = kept + sum(s.kept for s in stats if s.kept_index is not None)
    return kept


class SeerLlamaForCausalLM(LlamaForCausalLM):
    """A `LlamaForCausalLM` whose attention layers carry AttnGates (see the module docstring)."""

    config_class = SeerLlamaConfig
    _keys_to_ignore_on_load_missing = [r"attn_gate"]

    def __init__(self, config: SeerLlamaConfig):
        if not isinstance(config, SeerLlamaConfig):
            raise TypeError(f"SeerLlamaForCausalLM needs a SeerLlamaConfig, got {type(config).__name__}")
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = SeerLlamaAttention(config, i)
        self.post_init()

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        if attn_implementation not in (None, ATTN_IMPLEMENTATION):
            raise ValueError(
                f"SeerLlama always uses its own attention ('{ATTN_IMPLEMENTATION}'), got attn_implementation="
                f"{attn_implementation!r}. For plain attention set seerattn_mode='dense'."
            )
        return ATTN_IMPLEMENTATION

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MultiHeadLinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    @torch.no_grad()
    def reset_gates(self, std: float | None = None) -> None:
        """Fresh gate weights, N(0, std) with std = `initializer_range` by default."""
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, MultiHeadLinear):
                module.reset_parameters(std)

    def gate_modules(self) -> list[AttnGate]:
        return [layer.self_attn.attn_gate for layer in self.model.layers]

    def gate_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the `*.attn_gate.*` entries of the state dict."""
        return {k: v for k, v in self.state_dict().items() if ".attn_gate." in k}

    def freeze_base(self) -> int:
        """Make only gate weights trainable; returns the number of trainable parameters."""
        n = 0
        for name, p in self.named_parameters():
            p.requires_grad_(".attn_gate." in name)
            n += p.numel() if p.requires_grad else 0
        return n

    def set_seerattn(self, **fields) -> None:
        """Change `seerattn_*` fields at run time, e.g. `set_seerattn(seerattn_nz_ratio=0.3)`.

        All or nothing: every value is validated before any is set, so a rejected call leaves the
        config as it was. The fields that shape the gate weights cannot change after loading.
        """
        unknown = set(fields) - set(SEERATTN_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; valid: {SEERATTN_FIELDS}")
        fixed = sorted(k for k in fields if k in _GATE_SHAPE_FIELDS and fields[k] != getattr(self.config, k))
        if fixed:
            raise ValueError(f"{fixed} define the gate weights; pass them to from_pretrained instead of set_seerattn")
        for k, v in fields.items():
            check_seerattn_field(k, v)
        for k, v in fields.items():
            setattr(self.config, k, v)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SeerCausalLMOutputWithPast:
        """As `LlamaForCausalLM.forward`, plus gate losses and realised density.

        The LM loss is a chunked cross-entropy, so `[S, vocab]` logits are never held at once;
        pass `logits_to_keep=1` with `labels` to skip full logits entirely (evaluation, training).
        """
        num_items = kwargs.pop("num_items_in_batch", None)
        for layer in self.model.layers:
            layer.self_attn.seer_stats = None
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        lm_loss = None
        if labels is not None:
            lm_loss = chunked_causal_lm_loss(hidden, self.lm_head.weight, labels, num_items=num_items)
        slice_ = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_, :])

        stats = [layer.self_attn.seer_stats for layer in self.model.layers]
        losses = [s.gate_loss for s in stats if s is not None and s.gate_loss is not None]
        gate_losses = torch.stack(losses) if losses else None
        gate_loss = self.config.seerattn_gate_loss_scale * gate_losses.sum() if losses else None
        kept = float(_count_kept(stats))  # the forward's one host sync
        avail = sum(s.causal_blocks for s in stats if s is not None)
        if self.config.seerattn_mode == "distill":
            loss = gate_loss
        elif gate_loss is not None and lm_loss is not None:
            loss = lm_loss + gate_loss
        else:
            loss = lm_loss
        return SeerCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            gate_loss=gate_loss,
            gate_losses=gate_losses,
            density=kept / avail if avail else None,
        )

    def save_pretrained(self, save_directory, save_base: bool | None = None, is_main_process: bool = True, **kwargs):
        """Save the gates (and config); with `save_base=True`, or when there is no `base_model`, everything.

        A checkpoint is for inference: a model saved in `distill` mode is written with
        `seerattn_mode="sparse"` and `seerattn_trained_mode="distill"`, so `from_pretrained` gives the
        sparse model (pass `seerattn_mode="distill"` to continue distilling).
        A gate-only folder holds `config.json` (with `base_model`) and `model.safetensors` with the
        `*.attn_gate.*` tensors only: a small fraction of the base model's size.
        """
        if save_base is None:
            save_base = self.config.base_model is None
        if save_base:
            with _saved_for_inference(self.config):
                return super().save_pretrained(save_directory, is_main_process=is_main_process, **kwargs)
        if not is_main_process:
            return None
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        with _saved_for_inference(self.config):
            self.config.save_pretrained(out)
        if self.generation_config is not None:
            self.generation_config.save_pretrained(out)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.gate_state_dict().items()}
        save_file(tensors, str(out / GATE_WEIGHTS_NAME), metadata={"format": "pt"})
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load a SeerLlama from a gate-only folder, a full folder, a plain Llama or `smollm2-135m`.

        Any `seerattn_*` field (and `base_model`) may be given as a keyword and overrides the saved
        config. Other keywords (`dtype`, `device_map`, ...) go to transformers.
        """
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in SEERATTN_FIELDS}
        if kwargs.get("attn_implementation") not in (None, ATTN_IMPLEMENTATION):
            raise ValueError(f"SeerLlama uses attn_implementation='{ATTN_IMPLEMENTATION}' only")
        kwargs.pop("attn_implementation", None)
        source = resolve_model_source(pretrained_model_name_or_path)

        if source.kind in ("seer_gates", "seer_full"):
            if config is None or not isinstance(config, SeerLlamaConfig):
                config = SeerLlamaConfig.from_pretrained(source.path)
            config = copy.deepcopy(config)
            for k, v in overrides.items():
                setattr(config, k, v)
            config.validate_seerattn()
            if source.kind == "seer_full":
                return super().from_pretrained(source.path, *model_args, config=config, **kwargs)
            if not config.base_model:
                raise ValueError(f"{source.path} holds gate weights only but its config names no base_model")
            named_in = "the base_model keyword" if "base_model" in overrides else None
            base = resolve_base_model(source.path, config.base_model, named_in)
            if base.kind == "gguf":
                model = cls._from_gguf(base, config, **kwargs)
            else:
                model = super().from_pretrained(base.path, *model_args, config=config, **base.hf_kwargs(), **kwargs)
            model.load_gates(source.path)
            return model

        if config is not None and isinstance(config, SeerLlamaConfig):
            config = copy.deepcopy(config)
            for k, v in overrides.items():
                setattr(config, k, v)
            config.validate_seerattn()
        else:
            config = cls.config_from(pretrained_model_name_or_path, base_config=config, **overrides)
        if source.kind == "gguf":
            return cls._from_gguf(source, config, **kwargs)
        model = super().from_pretrained(source.path, *model_args, config=config, **source.hf_kwargs(), **kwargs)
        # transformers treats the (ignored) missing gate keys as loaded and skips their init, and
        # upstream's gates stayed uninitialised memory this way: initialise them here, explicitly
        model.reset_gates()
        return model

    @classmethod
    def _from_gguf(cls, source, config: SeerLlamaConfig, **kwargs) -> "SeerLlamaForCausalLM":
        # transformers' GGUF reader maps tensor names by model_type and knows only "llama": read
        # the file as a plain Llama, then move its weights into a SeerLlama with fresh gates
        base = LlamaForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, **kwargs)
        model = cls(config).to(dtype=base.dtype, device=base.device)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        if unexpected or any(".attn_gate." not in k for k in missing):
            raise RuntimeError(f"GGUF weights do not fit SeerLlama: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.generation_config = base.generation_config
        model.reset_gates()
        return model.eval()

    @classmethod
    def config_from(cls, pretrained_model_name_or_path, base_config: LlamaConfig | None = None, **overrides) -> SeerLlamaConfig:
        """The `SeerLlamaConfig` that `from_pretrained` would build (edit it, then pass `config=`).

        For a plain model, `base_config` (default: read from the source) supplies the Llama fields.
        """
        source = resolve_model_source(pretrained_model_name_or_path)
        if source.kind in ("seer_gates", "seer_full"):
            config = SeerLlamaConfig.from_pretrained(source.path)
        else:
            base_config = base_config or AutoConfig.from_pretrained(source.path, **source.hf_kwargs())
            if not isinstance(base_config, LlamaConfig):
                raise ValueError(
                    f"{pretrained_model_name_or_path} is a {type(base_config).__name__}; SeerLlama needs a Llama model"
                )
            name = str(pretrained_model_name_or_path)
            if Path(name).expanduser().exists():
                name = str(Path(name).expanduser().resolve())
            config = SeerLlamaConfig.from_llama_config(base_config, base_model=name)
        for k, v in overrides.items():
            setattr(config, k, v)
        config.validate_seerattn()
        return config

    def load_gates(self, folder: str | os.PathLike) -> None:
        """Load gate weights from a gate-only folder; errors name the layer that is missing or wrong."""
        from safetensors.torch import load_file

        f = Path(folder) / GATE_WEIGHTS_NAME
        if not f.exists():
            raise FileNotFoundError(f"no gate weights at {f}")
        saved = load_file(str(f))
        own = self.gate_state_dict()
        for key, param in own.items():
            if key not in saved:
                raise KeyError(f"gate weight {key} missing from {f} (was it saved for another gate type or model?)")
            if saved[key].shape != param.shape:
                raise ValueError(
                    f"gate weight {key} in {f} has shape {tuple(saved[key].shape)}, the model expects {tuple(param.shape)}"
                )
        extra = set(saved) - set(own)
        if extra:
            raise ValueError(f"{f} has gate weights this model does not: {sorted(extra)[:3]}...")
        with torch.no_grad():
            for key, param in self.state_dict().items():
                if key in saved:
                    param.copy_(saved[key].to(param.dtype))


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs):
    """The tokenizer of a model, a gate-only checkpoint (its base model's) or `smollm2-135m`."""
    source = resolve_model_source(name_or_path)
    if source.kind == "seer_gates":
        base = SeerLlamaConfig.from_pretrained(source.path).base_model
        if not base:
            raise ValueError(f"{source.path} names no base_model to take the tokenizer from")
        base_source = resolve_base_model(source.path, base)
        if base_source.kind == "seer_gates":
            return load_tokenizer(base_source.path, **kwargs)
        return AutoTokenizer.from_pretrained(base_source.path, **base_source.hf_kwargs(), **kwargs)
    return AutoTokenizer.from_pretrained(source.path, **source.hf_kwargs(), **kwargs)


AutoConfig.register(SeerLlamaConfig.model_type, SeerLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(SeerLlamaConfig, SeerLlamaForCausalLM, exist_ok=True)
