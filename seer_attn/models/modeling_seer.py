"""The one integration mechanism: every model family is transformers' own classes plus these mixins.

A family is three small subclasses (see `modeling_seer_llama.py` and `families.py`):

- `Seer<F>Config(SeerAttnConfigMixin, <F>Config)`: the family's config plus the `seerattn_*` fields;
- `Seer<F>Attention(SeerAttentionMixin, <F>Attention)`: names the family's RoPE (`rotary_class`,
  `rotary_fn`) and, where the projections differ from separate `q_proj`/`k_proj`/`v_proj`, how to
  get per-head q, k, v before RoPE (`project_qkv`: Qwen3's q/k norms, Phi-3's fused `qkv_proj`);
- `Seer<F>ForCausalLM(SeerForCausalLMMixin, <F>ForCausalLM)`: names the two classes above.

`SeerAttentionMixin.forward` is the only forward that is overridden, and it is shared by all
families. It exists because the gate needs the *pre-RoPE* queries and keys, which the families'
attention `forward` discards before it calls the attention function. The alternative, the registered
attention function alone recovering them by inverting RoPE, was measured and rejected:

- inverting is exact only up to rounding: q and k reach the attention function rounded to the model
  dtype *after* rotation, so the recovered inputs carry that rounding once more. Measured on
  SmolLM2-135M (real weights, 1024 tokens of real text, fresh gates; `benchmarks/rope_inversion_error.py`,
  `benchmarks/results/rope_inversion.json`): recovered vs captured q/k differ by a relative error of
  6e-8 in fp32 but 2.7e-3 in bf16 (3.5e-3 with YaRN x4); the gate logits move by up to 2.5% of
  their std, and per layer up to 0.8% (nz 0.5) and 1.6% (nz 0.1) of the selected blocks change;
- it needs the per-token cos/sin inside the attention function, which does not receive them:
  they would be recomputed per layer from `position_ids` with the rotary module of the model, and
  for rope types that switch tables by length (Phi-3 longrope, dynamic NTK) this must replicate the
  switch; YaRN's attention factor scales cos/sin and must be divided out twice;
- it saves no per-family code: Qwen3's norms and Phi-3's fused projection are upstream of RoPE and
  need nothing either way, but capturing needs a `project_qkv` of 5 lines for them, while
  inverting needs per-family knowledge of partial rotary (Phi-4-mini) inside the inverse.

So the gate sees exactly the tensors the model rotates, in every dtype.

The attention itself is the function `seer_attention_forward`, registered with transformers'
`AttentionInterface` as `"seer_attn"`, with `flash_attention_mask` registered as its mask builder so
padding arrives as a 2-D `[B, S_k]` mask (or `None` when nothing is padded).

- Padding: each sequence of a padded batch runs on its real tokens only (gate blocks start at the
  first real token), so a padded row gives the same result as that sequence alone. The real tokens
  run packed, one `seer_attention_varlen` call per layer, where it supports the settings (else one
  call per sequence; also CUDA inference with the fused gate, see below). A cache-free forward
  (`use_cache=False`, training) goes further under `seerattn_padding_free` (the default): the model
  packs the real tokens into one row before the embeddings, so the projections and MLPs skip the
  padding too, and passes the rows' boundaries to the attention as `cu_seq_lens_q`.
- `seerattn_cross_document=False`: the documents of a row (a token with position id 0 starts one)
  run packed in the same way, each attending only within itself with its own gate blocks; so do
  the sequences of a packed row given as `cu_seq_lens_q` / `cu_seq_lens_k` (transformers'
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`).
- Decoding with a KV cache (fewer queries than keys) is dense: the gate only scores prefill.
- Sliding windows (Mistral, Qwen2 with `use_sliding_window`, Phi-3-mini-4k): `dense` mode applies
  the window exactly as transformers does (a key is visible when `q_idx - kv_idx < window`).
  `sparse` and `distill` do not implement windows (the block-sparse kernels take no token-level
  window mask): a model whose window is shorter than `max_position_embeddings` is refused at load
  in those modes, and an input longer than the window is refused at forward.

`save_pretrained` writes the gate weights and the config (with `base_model`); `from_pretrained`
accepts such a gate-only folder, a full Seer folder, a plain model of the family (folder, hub id,
`.gguf`) or the embedded `smollm2-135m`, and any `seerattn_*` field as a keyword.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from seer_attn.kernels.block_mask import indices_to_mask
from seer_attn.models.configuration_seer import GATE_SHAPE_FIELDS, SEERATTN_FIELDS, SeerAttnConfigMixin, check_seerattn_field
from seer_attn.models.cuda_graphs import GraphedPrefill, graphable
from seer_attn.models.loading import SEER_MODEL_TYPE_PREFIX, resolve_base_model, resolve_model_source
from seer_attn.modules.gt_schedule import gt_active
from seer_attn.modules.attn_gate import AttnGate, MultiHeadLinear
from seer_attn.modules.decode import attach_decode_gate, decode_aware_attention, static_decode_attention
from seer_attn.modules.decode_gate import DecodeGate
from seer_attn.modules.seer_attention import (
    SeerAttentionSettings,
    SeerAttentionStats,
    dense_attention,
    in_backward,
    seer_attention,
    seer_attention_varlen,
    varlen_block_starts,
    varlen_unsupported,
)

__all__ = [
    "SeerAttentionMixin",
    "SeerForCausalLMMixin",
    "SeerCausalLMOutputWithPast",
    "SEER_FAMILIES",
    "register_seer_family",
    "seer_attention_forward",
    "load_tokenizer",
    "chunked_causal_lm_loss",
]

logger = logging.getLogger(__name__)
ATTN_IMPLEMENTATION = "seer_attn"
GATE_WEIGHTS_NAME = "model.safetensors"
_warned_dense: set[str] = set()


def _warn_ran_dense(config, settings: SeerAttentionSettings, Sq: int, Sk: int) -> None:
    """A forward asked to be sparse ran dense: say why, once per reason and process (nothing silent)."""
    if Sq != Sk:
        reason, why = "decode", (
            f"steps with a KV cache ({Sq} new tokens against {Sk} keys) ran dense attention: decode sparsity needs a "
            "decode gate (seerattn_decode_gate_type) or a reference seerattn_decode_selector, a context of at least "
            f"seerattn_decode_min_context={config.seerattn_decode_min_context!r} tokens ('auto': max(16384, 131072 / batch)), layers from "
            f"seerattn_decode_start_layer={config.seerattn_decode_start_layer} on, and an unpadded batch"
        )
    elif settings.sparsity_method in ("nz_ratio", "adaptive") and settings.nz_ratio >= 1.0:
        reason, why = "nz_ratio", "seerattn_nz_ratio=1.0 keeps every block, so sparse mode ran exact dense attention"
    else:
        reason, why = "short", (
            f"the input ({Sk} tokens) is shorter than seerattn_min_sparse_length={settings.min_sparse_length}"
            + (" (auto: the measured crossover for this model shape and nz_ratio)"
               if getattr(config, "seerattn_min_sparse_length", None) == "auto" else "")
            + ", so sparse "
            "mode ran dense attention (below it the sparse path is not faster); set seerattn_min_sparse_length=0 "
            "to run sparse at any length"
        )
    if reason not in _warned_dense:
        _warned_dense.add(reason)
        logger.warning("seer_attn: %s. The output's density is 1.0. (Logged once per process.)", why)


def _visible_blocks(m: int, bs: int) -> int:
    # sum over the tokens t < m of (t // bs + 1): the key blocks up to and including each token's own
    q, r = divmod(m, bs)
    return bs * q * (q + 1) // 2 + r * (q + 1)


def _dense_with_padding(
    q, k, v, key_padding: torch.Tensor | None, scale: float, sliding_window: int | None = None
) -> torch.Tensor:
    """Causal attention where queries are the last `S_q` of `S_k` positions (KV cache aware).

    `sliding_window`: a key is visible to a query when `q_idx - kv_idx < sliding_window` (index
    space, as transformers' `sliding_window_overlay`).
    """
    Sq, Sk = q.shape[2], k.shape[2]
    if sliding_window is not None and Sk <= sliding_window:
        sliding_window = None  # no query is old enough to lose a key
    if key_padding is None and Sq == Sk and sliding_window is None:
        return dense_attention(q, k, v, scale)
    rows = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
    cols = torch.arange(Sk, device=q.device)[None, :]
    allowed = cols <= rows  # [S_q, S_k]
    if sliding_window is not None:
        allowed = allowed & (rows - cols < sliding_window)
    if key_padding is not None:
        allowed = allowed[None, None] & key_padding[:, None, None, :].bool()
    # padding queries see no key: let them see everything so they stay finite (their outputs are unused)
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


_rope_cache: dict = {}


def _block_rope(module: "SeerAttentionMixin", position_ids: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    # each block is rotated at its first token's position, with the model's own rope scaling;
    # every layer of one forward gets the same position_ids object and the same table: reuse it
    # (the cache holds the tensor, so no other tensor can take its address while the entry lives)
    rope = module.gate_rotary_emb
    key = (
        position_ids.data_ptr(), tuple(position_ids.shape), position_ids.stride(), position_ids._version,
        # every layer's gate rotary is built from the same config: key on it, not on its buffers
        id(module.config), module.attn_gate.hidden_size, module.attn_gate.rope_stride,
        rope.rope_type, rope.attention_scaling, str(device),
    )
    hit = _rope_cache.get("entry")
    if hit is not None and hit[1] == key:
        return hit[2]
    # one entry per gate summary start (each block's first token when the gate has one summary per side)
    block_pos = position_ids[:, :: module.attn_gate.rope_stride]
    tables = rope(torch.zeros((), device=device, dtype=torch.float32), block_pos)
    _rope_cache["entry"] = (position_ids, key, tables)
    return tables


def seer_attention_forward(
    module: "SeerAttentionMixin",
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    q_pre: torch.Tensor | None = None,
    k_pre: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `"seer_attn"` attention function.

    Args:
        module: the calling Seer attention layer (its `config`, `attn_gate`, `gate_rotary_emb`).
        query (torch.Tensor): post-RoPE `[B, Hq, S_q, D]`.
        key, value (torch.Tensor): `[B, Hkv, S_k, D]` (cache included).
        attention_mask (torch.Tensor, Optional): 2-D padding mask `[B, S_k]` (True/1 = real token).
        scaling (float): logit scale.
        q_pre, k_pre (torch.Tensor): pre-RoPE queries and keys of this step.
        position_ids (torch.Tensor, Optional): `[B or 1, S_q]`.
        sliding_window (int, Optional): this layer's window (see the module docstring).

    Returns:
        `([B, S_q, Hq, D], None)`. Per-layer statistics are left in `module.seer_stats`.
    """
    if q_pre is None or k_pre is None:
        raise ValueError("seer_attn attention needs the pre-RoPE q_pre/k_pre: call it through a Seer attention layer")
    if dropout:
        raise ValueError("seer_attn attention does not implement attention dropout")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(f"seer_attn expects a 2-D padding mask [B, S_k], got {tuple(attention_mask.shape)}")
    settings = SeerAttentionSettings.from_config(module.config, getattr(module, "layer_idx", None))
    # under autocast RoPE promotes q/k to fp32 while v stays low precision: kernels want one dtype
    dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else value.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    B, Hq, Sq, _ = query.shape
    Sk = key.shape[2]
    # sequence boundaries of a packed row, as transformers' padding-free collator and the model's own
    # padding-free forward pass them (flash-attention's varlen keyword)
    cu_seqlens, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_seqlens is not None and cu_k is not None and cu_k is not cu_seqlens and cu_k.shape != cu_seqlens.shape:
        raise ValueError("seer_attn takes packed sequences with cu_seq_lens_q == cu_seq_lens_k only")
    if cu_seqlens is not None and (B != 1 or Sq != Sk):
        raise ValueError(f"cu_seq_lens_q describes one packed row of a cache-free forward, got B={B}, S_q={Sq}, S_k={Sk}")
    # documents of a row kept apart (cache-free forwards only: a decode step has no documents)
    split = (cu_seqlens is not None or not module.config.seerattn_cross_document) and Sq == Sk
    if (settings.mode == "dense" and not split) or Sq != Sk:
        if settings.mode == "dense":
            module.seer_stats = SeerAttentionStats()
        else:  # every causal key block of every new token is computed: density 1.0
            n = _visible_blocks(Sk, settings.block_size) - _visible_blocks(Sk - Sq, settings.block_size)
            n *= B * key.shape[1]  # counted per KV head, as sparse decode steps count (seer_attn.modules.decode)
            module.seer_stats = SeerAttentionStats(kept_blocks=n, causal_blocks=n)
            if settings.mode == "sparse":
                _warn_ran_dense(module.config, settings, Sq, Sk)
        return _dense_with_padding(query, key, value, attention_mask, scaling, sliding_window).transpose(1, 2), None
    if sliding_window is not None and Sk > sliding_window:
        raise ValueError(
            f"layer {module.layer_idx} has a sliding window of {sliding_window} tokens and the input has {Sk}: "
            f"seerattn_mode={settings.mode!r} does not implement sliding windows (use seerattn_mode='dense', "
            "which applies the window exactly, or inputs no longer than the window)"
        )

    train_gate = (
        settings.mode == "sparse"
        and module.training
        and torch.is_grad_enabled()
        and any(p.requires_grad for p in module.attn_gate.parameters())
        # a cheaper ground truth: this layer may skip it in this forward (seer_attn.modules.gt_schedule)
        and getattr(module, "seer_gt_active", True)
    )
    if position_ids is None:
        position_ids = torch.arange(Sq, device=query.device)[None]
    position_ids = position_ids.expand(B, Sq)
    if train_gate and not in_backward():
        module.seer_target_cache = []
    cache = module.seer_target_cache if train_gate else None
    record = getattr(module, "seer_record_masks", False)  # diagnostics (seer_attn.evaluation.recall): masks and mass maps in seer_stats
    run = lambda q, k, v, qp, kp, pos: seer_attention(  # noqa: E731
        q, k, v, qp, kp, module.attn_gate, *_block_rope(module, pos, q.device), scaling, settings, train_gate, cache, record
    )
    padded = attention_mask is not None and not bool(attention_mask.all())
    if record and (padded or split):
        raise ValueError("recording block masks (seer_record_masks) needs unpadded inputs: pass one sequence at a time")
    # padded batches (and rows of documents kept apart) run packed, in one pass, where the settings allow;
    # CUDA inference with several gate summaries or a layer-wide budget stays per sequence, where the
    # fused gate kernel scores them without the packed path's PyTorch [nb * n_q, nb * n_k] logits
    gate = module.attn_gate
    fused_better = (
        query.is_cuda and settings.mode == "sparse" and not train_gate and settings.selector == "gate"
        and ((getattr(gate, "q_summaries", 1), getattr(gate, "k_summaries", 1)) != (1, 1)
             or settings.sparsity_method in ("adaptive", "top_p"))
    )
    packed = varlen_unsupported(settings, gate) is None and not fused_better
    at_zero = not module.config.seerattn_cross_document  # a position id 0 starts a document
    if not padded and not split:
        o, stats = run(query, key, value, q_pre, k_pre, position_ids)
    elif packed:
        o, stats = _seer_attention_packed(
            module, query, key, value, q_pre, k_pre, attention_mask, position_ids, scaling, settings, train_gate,
            cache, at_zero, cu_seqlens, cu_k,
        )
    else:
        # one call per sequence (a padded row's real tokens, or a document of a row): settings with no
        # packed implementation (see varlen_unsupported), and CUDA inference with the fused gate (above)
        index, cu, seqlens, _ = _packing_plan(attention_mask, position_ids, settings.block_size, at_zero,
                                              cu_seqlens=cu_seqlens, cu_seqlens_k=cu_k)
        # token-major once ([B * S, H, D]), then each sequence is a gather
        flat = [t.transpose(1, 2).reshape(B * Sq, t.shape[1], t.shape[-1]) for t in (query, key, value, q_pre, k_pre)]
        pos_flat = position_ids.reshape(-1)
        o_flat = query.new_zeros(B * Sq, Hq, query.shape[-1])
        stats, losses = SeerAttentionStats(), []
        a = 0
        for n in seqlens:
            idx, a = index[a : a + n], a + n
            ob, sb = run(*(t[idx].transpose(0, 1)[None] for t in flat), pos_flat[idx][None])
            o_flat[idx] = ob[0].transpose(0, 1).to(o_flat.dtype)
            stats.kept_blocks += sb.kept
            stats.causal_blocks += sb.causal
            stats.sparse = stats.sparse or sb.sparse
            if sb.gate_loss is not None:
                losses.append(sb.gate_loss)
        stats.gate_loss = torch.stack(losses).mean() if losses else None
        o = o_flat.view(B, Sq, Hq, -1).transpose(1, 2)
    module.seer_stats = stats
    if settings.mode == "sparse" and not stats.sparse:
        _warn_ran_dense(module.config, settings, Sq, Sk)
    return o.transpose(1, 2), None


_pack_cache: dict = {}


def _packing_plan(attention_mask: torch.Tensor | None, position_ids: torch.Tensor, block_size: int, split_documents: bool,
                  rope_stride: int | None = None, cu_seqlens: torch.Tensor | None = None,
                  cu_seqlens_k: torch.Tensor | None = None):
    """Where the real tokens of a batch go when packed, shared by every layer of one forward.

    A sequence is a batch row's real tokens, split further where `split_documents` (a token with
    position id 0 starts a document) and at the given boundaries `cu_seqlens` (int `[n + 1]`, offsets
    into the one row of a packed batch, as flash-attention's varlen API; `cu_seqlens_k`, if given, must
    equal it: self-attention). Returns `(token_index [total], cu_seqlens [n + 1] int32,
    seqlens (host), block_pos [n, nb * block_size / rope_stride])`: the flat `b * S + t` index of every
    packed token in order, and the position id of the first token of every gate summary of each
    sequence (every `rope_stride` tokens, default `block_size`: the gate's RoPE positions).
    """
    rope_stride = rope_stride or block_size
    B, S = position_ids.shape
    key = (None if attention_mask is None else (attention_mask.data_ptr(), tuple(attention_mask.shape),
                                                attention_mask._version),
           position_ids.data_ptr(), tuple(position_ids.shape), position_ids.stride(), position_ids._version,
           block_size, split_documents, rope_stride,
           None if cu_seqlens is None else (cu_seqlens.data_ptr(), tuple(cu_seqlens.shape), cu_seqlens._version))
    hit = _pack_cache.get("entry")
    if hit is not None and hit[0] == key:
        return hit[2]
    device = position_ids.device
    if attention_mask is None:
        index = torch.arange(B * S, device=device)
    else:
        index = attention_mask.bool().flatten().nonzero().squeeze(-1)
    pos = position_ids.flatten()[index]
    start = torch.ones_like(index, dtype=torch.bool)
    row = index // S
    start[1:] = row[1:] != row[:-1]
    if split_documents:
        start |= pos == 0
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or attention_mask is not None or B != 1:
            raise ValueError("cu_seq_lens_q must be int [n + 1] offsets into one unpadded packed row")
        bounds = cu_seqlens.to(device=device, dtype=torch.long)
        if not bool((bounds[0] == 0) & (bounds[-1] == S) & (bounds[1:] >= bounds[:-1]).all()):
            raise ValueError(f"cu_seq_lens_q must rise from 0 to the row's {S} tokens, got {cu_seqlens.tolist()}")
        if cu_seqlens_k is not None and not torch.equal(cu_seqlens_k.to(bounds), bounds):
            raise ValueError("seer_attn takes packed sequences with cu_seq_lens_q == cu_seq_lens_k only")
        start[bounds[:-1][bounds[:-1] < S]] = True
    cu = torch.cat([start.nonzero().squeeze(-1), index.new_tensor([index.numel()])]).to(torch.int32)
    seqlens = (cu[1:] - cu[:-1]).tolist()  # the one host sync of the packed path
    nb = -(-max(seqlens) // block_size)
    block_pos = pos[varlen_block_starts(cu, nb * (block_size // rope_stride), rope_stride)]
    plan = (index, cu, seqlens, block_pos)
    # the cache holds the tensors, so no other tensor can take their addresses while the entry lives
    _pack_cache["entry"] = (key, (attention_mask, position_ids, cu_seqlens), plan)
    return plan


def _seer_attention_packed(module, query, key, value, q_pre, k_pre, attention_mask, position_ids, scaling, settings,
                           train_gate, cache, split_documents=False, cu_seqlens=None, cu_seqlens_k=None):
    """`seer_attention` of every sequence of a batch (see `_packing_plan`) as one `seer_attention_varlen` call.

    `[B, H, S, D]` inputs, 2-D padding mask or None; returns `([B, H, S, D] output (0 at padding), stats)`.
    """
    B, Hq, S, D = query.shape
    index, cu, seqlens, block_pos = _packing_plan(attention_mask, position_ids, settings.block_size, split_documents,
                                                  getattr(module.attn_gate, "rope_stride", settings.block_size),
                                                  cu_seqlens, cu_seqlens_k)
    pack = lambda t: t.transpose(1, 2).reshape(B * S, t.shape[1], D)[index]  # noqa: E731
    cos, sin = module.gate_rotary_emb(torch.zeros((), device=query.device, dtype=torch.float32), block_pos)
    o, stats = seer_attention_varlen(
        pack(query), pack(key), pack(value), pack(q_pre), pack(k_pre), module.attn_gate, cos, sin, scaling, settings,
        cu, seqlens, train_gate, cache,
    )
    out = query.new_zeros(B * S, Hq, D).index_copy(0, index, o.to(query.dtype))
    return out.view(B, S, Hq, D).transpose(1, 2), stats


AttentionInterface.register(ATTN_IMPLEMENTATION, seer_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


def _partial_rotary_factor(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0))


class SeerAttentionMixin:
    """Mixed in before a family's attention class: adds `attn_gate`, a gate RoPE of the gate's width,
    and the shared `forward` that hands the pre-RoPE q/k to `seer_attention_forward`.

    A family sets `rotary_class` (its RotaryEmbedding: the gate's block RoPE has the model's rope
    type, theta and scaling) and `rotary_fn` (its `apply_rotary_pos_emb`), and overrides
    `project_qkv` when its projections are not separate `q_proj`/`k_proj`/`v_proj`.
    """

    rotary_class: type
    rotary_fn = None  # staticmethod(apply_rotary_pos_emb) of the family

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        if _partial_rotary_factor(config) != 1.0:
            raise ValueError(
                f"partial rotary embeddings (partial_rotary_factor={_partial_rotary_factor(config)}, e.g. Phi-4-mini) "
                "are not supported: the gate's block RoPE rotates its whole width"
            )
        self.attn_gate = AttnGate(
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=self.head_dim,
            gate_type=config.seerattn_gate_type,
            hidden_size=config.seerattn_gate_hidden_size,
            block_size=config.seerattn_gate_block_size,
            q_summaries=config.seerattn_gate_q_summaries,
            k_summaries=config.seerattn_gate_k_summaries,
        )
        rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type == "longrope" and self.attn_gate.hidden_size != self.head_dim:
            raise ValueError(
                f"rope_type 'longrope' has per-dimension factors for head_dim {self.head_dim}: "
                f"seerattn_gate_hidden_size must be None or {self.head_dim}, got {self.attn_gate.hidden_size}"
            )
        # the decode gate (if configured) lives under attn_gate: same checkpoint, freezing and init
        attach_decode_gate(self.attn_gate, config, self.head_dim)
        gate_config = copy.copy(config)
        gate_config.head_dim = self.attn_gate.hidden_size
        self.gate_rotary_emb = self.rotary_class(gate_config)
        self.seer_stats: SeerAttentionStats | None = None
        self.seer_target_cache: list = []
        self.seer_record_masks = False  # set by seer_attn.evaluation.recall to keep masks and mass maps in seer_stats

    @property
    def seer_sliding_window(self) -> int | None:
        """The window this layer passes to its attention function, exactly as the family does:
        Qwen2/Qwen3 keep a per-layer `sliding_window` (None on full-attention layers), Mistral and
        Phi-3 pass `config.sliding_window` for every layer, Llama has none."""
        if "sliding_window" in vars(self):
            return self.sliding_window
        return getattr(self.config, "sliding_window", None)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q `[B, Hq, S, D]`, k and v `[B, Hkv, S, D]`, before RoPE (biases included: Qwen2)."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        return q, k, v

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None, **kwargs):
        past_key_values = _one_cache(cache, past_key_values)
        input_shape = hidden_states.shape[:-1]
        q_pre, k_pre, value_states = self.project_qkv(hidden_states)

        cos, sin = position_embeddings
        query_states, key_states = self.rotary_fn(q_pre, k_pre, cos, sin)
        kv_capacity = None
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
            if getattr(past_key_values, "is_compileable", False):
                kv_capacity = key_states.shape[2]
                if _graph_safe_step(self.config, input_shape[1], attention_mask):
                    # one new token: the whole preallocated buffers, the filled length on the device (no host sync)
                    lengths, t = _step_lengths(self.layer_idx, past_key_values, kwargs.get("position_ids"), input_shape[0])
                    attn_output, attn_weights = static_decode_attention(
                        self, query_states, key_states, value_states, q_pre, k_pre, lengths, self.scaling, past_key_values,
                        token_positions=t,
                    )
                    return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights
                key_states, value_states = _filled_part(key_states, value_states, attention_mask, kwargs.get("position_ids"))

        attn_output, attn_weights = decode_aware_attention(
            self, seer_attention_forward, query_states, key_states, value_states, attention_mask, scaling=self.scaling,
            q_pre=q_pre, k_pre=k_pre, past_key_values=past_key_values, kv_capacity=kv_capacity,
            sliding_window=self.seer_sliding_window, **kwargs,
        )  # fmt: skip
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


@contextlib.contextmanager
def _saved_for_inference(config):
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


# transformers 5.2x renamed the KV cache argument and output field `past_key_values` -> `cache` (the old
# name stays a deprecated alias until 5.40): the Seer forwards take either name and speak the installed one
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def _one_cache(cache, past_key_values):
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


def _graph_safe_step(config, q_len: int, attention_mask) -> bool:
    # one-token steps of an unpadded batch on a preallocated cache go through static_decode_attention;
    # the reference selectors (evaluation) and multi-token steps slice the filled part (a host sync)
    return (
        q_len == 1
        and attention_mask is None
        and config.seerattn_mode in ("sparse", "dense")
        and config.seerattn_decode_selector == "gate"
    )


_STEP_LENGTHS_ATTR = "_seer_step_lengths"


def _step_lengths(layer_idx: int, cache, position_ids: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-token step's filled lengths and token positions (int64 `[B]` each), computed once per forward.

    Layer 0 (the first layer of every forward) computes them and leaves them on the cache object; the
    other layers read the same tensors. Under CUDA-graph capture the replayed step then recomputes them
    once per step rather than once per layer (two small launches per layer fewer).
    """
    if layer_idx == 0 or getattr(cache, _STEP_LENGTHS_ATTR, None) is None:
        lengths = _filled_lengths(position_ids, batch)
        setattr(cache, _STEP_LENGTHS_ATTR, (lengths, lengths - 1))
    return getattr(cache, _STEP_LENGTHS_ATTR)


def _filled_lengths(position_ids: torch.Tensor | None, batch: int) -> torch.Tensor:
    # int64 [B] on the device: the last position + 1 (positions are the slots of an unpadded batch)
    if position_ids is None:
        raise ValueError("a preallocated KV cache needs position_ids to know how many slots are filled")
    return (position_ids[..., -1].reshape(-1) + 1).long().expand(batch).contiguous()


def _filled_part(key: torch.Tensor, value: torch.Tensor, attention_mask, position_ids):
    """The filled slots of a preallocated cache (`StaticCache`: `generate(cache_implementation="static")`).

    Its update returns all `max_cache_len` slots, the empty ones as zeros; the Seer attention paths
    take the keys they are given as the sequence (the dense path would attend to the empty slots).
    For an unpadded batch the filled length is the last position + 1 (one host sync per layer and
    step: this runs eagerly, not under CUDA graphs). Padded batches need the padding mask over the
    slots, which the Seer paths do not take: refused.
    """
    if attention_mask is not None and not bool(attention_mask.all()):
        raise NotImplementedError(
            "a preallocated KV cache (e.g. generate(cache_implementation='static')) with a padded batch is not "
            "supported by the Seer attention: use the default dynamic cache"
        )
    if position_ids is None:
        raise ValueError("a preallocated KV cache needs position_ids to know how many slots are filled")
    n = int(position_ids[..., -1].max()) + 1
    if n > key.shape[2]:
        raise ValueError(f"position {n - 1} is past the cache's {key.shape[2]} slots")
    return key[:, :, :n], value[:, :, :n]


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
    # FSDP2 with fp32 outputs hands over fp32 hidden states while the gathered head weight is bf16;
    # under autocast the cast is a no-op either way (autocast casts both to its own dtype)
    logits = F.linear(h.to(weight.dtype), weight).float()
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
    kept = sum(s.kept for s in stats if s.kept_index is None)
    if indexed and all(t.shape == indexed[0].shape for t in indexed):
        kept = kept + indices_to_mask(torch.stack(indexed), indexed[0].shape[-2]).sum()
    else:
        kept = kept + sum(s.kept for s in stats if s.kept_index is not None)
    return kept


# base model_type (as in a plain checkpoint's config.json) -> Seer ForCausalLM class
SEER_FAMILIES: dict[str, type] = {}
# base model_type -> the models people know it by (for error messages and the README table)
SEER_FAMILY_EXAMPLES: dict[str, str] = {}


def register_seer_family(model_class: type, examples: str) -> type:
    """Register a Seer family with transformers' Auto classes and with `AutoSeerForCausalLM`."""
    config_class = model_class.config_class
    base_type = model_class.base_config_class().model_type
    if config_class.model_type != SEER_MODEL_TYPE_PREFIX + base_type:
        raise ValueError(f"{config_class.__name__}.model_type must be {SEER_MODEL_TYPE_PREFIX + base_type!r}")
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)
    SEER_FAMILIES[base_type] = model_class
    SEER_FAMILY_EXAMPLES[base_type] = examples
    return model_class


def _seer_model_type(folder: str) -> str | None:
    return json.loads((Path(folder) / "config.json").read_text()).get("model_type")


class SeerForCausalLMMixin:
    """Mixed in before a family's `<F>ForCausalLM`: gate-carrying attention layers, gate losses,
    density, gate-only save/load, and `from_pretrained` from every kind of source.

    A family sets `config_class` (its Seer config) and `attention_class` (its Seer attention).
    """

    config_class: type
    attention_class: type
    _keys_to_ignore_on_load_missing = [r"attn_gate"]

    @classmethod
    def base_lm_class(cls) -> type:
        """The family's plain `<F>ForCausalLM` (what GGUF files and plain checkpoints load as)."""
        return next(c for c in cls.__mro__[1:] if issubclass(c, PreTrainedModel) and not issubclass(c, SeerForCausalLMMixin))

    @classmethod
    def base_config_class(cls) -> type:
        """The family's plain config class (`LlamaConfig`, `Qwen2Config`, ...)."""
        return next(c for c in cls.config_class.__mro__[1:] if not issubclass(c, SeerAttnConfigMixin))

    def __init__(self, config):
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = self.attention_class(config, i)
        self._check_sliding_window()
        self._seer_train_forwards = 0
        self._cuda_graph, self._cuda_graph_avail = None, None
        self.post_init()

    def _check_sliding_window(self) -> None:
        if self.config.seerattn_mode == "dense":
            return
        for i, layer in enumerate(self.model.layers):
            window = layer.self_attn.seer_sliding_window
            if window is not None and window < self.config.max_position_embeddings:
                raise ValueError(
                    f"{type(self).__name__}: layer {i} has sliding_window={window} < max_position_embeddings="
                    f"{self.config.max_position_embeddings}, and seerattn_mode={self.config.seerattn_mode!r} does not "
                    "implement sliding windows (the block-sparse kernels take no token-level window). Load with "
                    "seerattn_mode='dense' (the window is then applied exactly), or use a model without a window"
                )

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        if attn_implementation not in (None, ATTN_IMPLEMENTATION):
            raise ValueError(
                f"{type(self).__name__} always uses its own attention ('{ATTN_IMPLEMENTATION}'), got attn_implementation="
                f"{attn_implementation!r}. For plain attention set seerattn_mode='dense'."
            )
        return ATTN_IMPLEMENTATION

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MultiHeadLinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    @torch.no_grad()
    def reset_gates(self, std: float | None = None) -> None:
        """Fresh gate weights: N(0, std) with std = `initializer_range` by default, or with
        `seerattn_gate_init="pooled"` the training-free pooled-attention scores (`AttnGate.init_from_pooled`)."""
        std = self.config.initializer_range if std is None else std
        for module in self.modules():
            if isinstance(module, MultiHeadLinear):
                module.reset_parameters(std)
            elif isinstance(module, DecodeGate):
                module.reset_parameters(std)
        if getattr(self.config, "seerattn_gate_init", "random") == "pooled":
            for gate in self.gate_modules():
                gate.init_from_pooled()
        if getattr(self.config, "seerattn_decode_gate_init", "random") == "pooled":
            for module in self.modules():
                if isinstance(module, DecodeGate):
                    module.init_from_pooled()

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

        All or nothing: a rejected call (a bad value, or a bad combination) leaves the config as it
        was. The fields that shape the gate weights (`GATE_SHAPE_FIELDS`) cannot change after loading.
        """
        unknown = set(fields) - set(SEERATTN_FIELDS)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; valid: {SEERATTN_FIELDS}")
        fixed = sorted(k for k in fields if k in GATE_SHAPE_FIELDS and fields[k] != getattr(self.config, k))
        if fixed:
            raise ValueError(f"{fixed} define the gate weights; pass them to from_pretrained instead of set_seerattn")
        for k, v in fields.items():
            check_seerattn_field(k, v)
        before = {k: getattr(self.config, k) for k in fields}
        try:
            for k, v in fields.items():
                setattr(self.config, k, v)
            self.config.validate_seerattn()  # the combinations
        except Exception:
            for k, v in before.items():
                setattr(self.config, k, v)
            raise

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
        cache=None,
        **kwargs,
    ) -> SeerCausalLMOutputWithPast:
        """As the family's `ForCausalLM.forward`, plus gate losses and realised density.

        The LM loss is a chunked cross-entropy, so `[S, vocab]` logits are never held at once;
        pass `logits_to_keep=1` with `labels` to skip full logits entirely (evaluation, training).
        """
        num_items = kwargs.pop("num_items_in_batch", None)
        past_key_values = _one_cache(cache, past_key_values)
        if self.config.seerattn_cuda_graphs and graphable(
            self, input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, labels, use_cache, kwargs
        ):
            return self._graphed_forward(input_ids, logits_to_keep)
        for layer in self.model.layers:
            layer.self_attn.seer_stats = None
        if self.training and torch.is_grad_enabled() and self.config.seerattn_mode == "sparse":
            self._set_gt_layers()
        keep = self._padding_free_rows(attention_mask, past_key_values, use_cache, kwargs)
        if keep is not None:
            outputs = self._padding_free_model(keep, input_ids, position_ids, inputs_embeds, kwargs)
        else:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **{CACHE_NAME: past_key_values},
                **kwargs,
            )
        hidden = outputs.last_hidden_state
        lm_loss = None
        if labels is not None:
            lm_loss = chunked_causal_lm_loss(hidden, self.lm_head.weight, labels, num_items=num_items)
        slice_ = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        # (FSDP2 with fp32 outputs: fp32 hidden states, bf16 head weight; a no-op otherwise, autocast included)
        logits = self.lm_head(hidden[:, slice_, :].to(self.lm_head.weight.dtype))

        stats = [layer.self_attn.seer_stats for layer in self.model.layers]
        losses = [s.gate_loss for s in stats if s is not None and s.gate_loss is not None]
        gate_losses = torch.stack(losses) if losses else None
        gate_loss = self.config.seerattn_gate_loss_scale * gate_losses.sum() if losses else None
        kept = float(_count_kept(stats))  # the forward's one host sync
        avail = sum(s.causal for s in stats if s is not None)
        avail = float(avail) if isinstance(avail, torch.Tensor) else avail  # a static-cache decode step counts on the device
        if self.config.seerattn_mode == "distill":
            loss = gate_loss
        elif gate_loss is not None and lm_loss is not None:
            loss = lm_loss + gate_loss
        else:
            loss = lm_loss
        return SeerCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            lm_loss=lm_loss,
            gate_loss=gate_loss,
            gate_losses=gate_losses,
            density=kept / avail if avail else None,
        )

    def _padding_free_rows(self, attention_mask, past_key_values, use_cache, kwargs) -> torch.Tensor | None:
        """The `[B, S]` bool mask of real tokens when this forward runs padding-free, else None.

        A padded, cache-free forward (`use_cache=False`, or a training forward) runs padding-free under
        `seerattn_padding_free`: the projections and MLPs then skip the padding too, not only the attention.
        """
        if not self.config.seerattn_padding_free or attention_mask is None or attention_mask.dim() != 2:
            return None
        no_cache = past_key_values is None and (
            not (use_cache if use_cache is not None else self.config.use_cache)
            or (self.training and torch.is_grad_enabled())
        )
        if (
            not no_cache
            or self.config.seerattn_mode == "decode_eval"  # refuses padding with its own message
            or kwargs.get("output_hidden_states") or kwargs.get("output_attentions") or "cu_seq_lens_q" in kwargs
            or any(layer.self_attn.seer_sliding_window is not None for layer in self.model.layers)
        ):
            return None
        keep = attention_mask.bool()
        return None if bool(keep.all()) else keep

    def _padding_free_model(self, keep, input_ids, position_ids, inputs_embeds, kwargs) -> BaseModelOutputWithPast:
        """`self.model` on the real tokens of a padded batch packed into one row (each row one sequence,
        its position ids as in the padded batch), the last hidden states scattered back to `[B, S, hidden]`
        (zeros at the padding). Equal to the padded forward on every real token: the Seer attention runs
        a padded batch on its real tokens only either way."""
        B, S = keep.shape
        lengths = keep.sum(1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        cu = torch.cat([cu[:1], cu[1:][lengths > 0]])  # rows of padding only hold no sequence
        if position_ids is None:
            position_ids = torch.arange(S, device=keep.device)[None]
        outputs = self.model(
            input_ids=None if input_ids is None else input_ids[keep][None],
            inputs_embeds=None if inputs_embeds is None else inputs_embeds[keep][None],
            position_ids=position_ids.expand(B, S)[keep][None],
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            **kwargs,
        )
        packed = outputs.last_hidden_state
        hidden = packed.new_zeros(B, S, packed.shape[-1])
        hidden[keep] = packed[0]
        return BaseModelOutputWithPast(last_hidden_state=hidden)

    def _set_gt_layers(self) -> None:
        # which layers compute the dense ground truth in this training forward (seer_attn.modules.gt_schedule)
        step = self._seer_train_forwards
        self._seer_train_forwards += 1
        n = len(self.model.layers)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.seer_gt_active = gt_active(
                step, i, n, int(self.config.seerattn_gt_every_n_steps), int(self.config.seerattn_gt_layers_per_step)
            )

    def _graphed_forward(self, input_ids: torch.Tensor, logits_to_keep) -> SeerCausalLMOutputWithPast:
        """A cache-free no-grad forward replayed as one CUDA graph (`seerattn_cuda_graphs`)."""
        slice_ = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        avail = []

        def run(ids):
            for layer in self.model.layers:
                layer.self_attn.seer_stats = None
            hidden = self.model(input_ids=ids, use_cache=False).last_hidden_state
            stats = [layer.self_attn.seer_stats for layer in self.model.layers]
            avail[:] = [sum(s.causal for s in stats if s is not None)]
            kept = _count_kept(stats)
            if not isinstance(kept, torch.Tensor):
                # every layer ran dense: still a device tensor (a fill kernel, so it can live in the graph)
                kept = torch.full((), float(kept), device=ids.device)
            return self.lm_head(hidden[:, slice_, :]), kept

        if not isinstance(logits_to_keep, int):
            raise ValueError("seerattn_cuda_graphs replays forwards with an int logits_to_keep only")
        key = (tuple(input_ids.shape), logits_to_keep, tuple(getattr(self.config, f) for f in SEERATTN_FIELDS))
        if self._cuda_graph is None:
            self._cuda_graph = GraphedPrefill()
        if key != self._cuda_graph.key:
            self._cuda_graph_avail = None
        logits, kept = self._cuda_graph(key, input_ids, run)
        if self._cuda_graph_avail is None:
            self._cuda_graph_avail = avail[0]
        avail_blocks = self._cuda_graph_avail
        return SeerCausalLMOutputWithPast(
            logits=logits.clone(), density=float(kept) / avail_blocks if avail_blocks else None
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
    def _seer_config_from_dir(cls, folder: str):
        """The Seer config saved in `folder`, which must be of this family."""
        found = _seer_model_type(folder)
        if found != cls.config_class.model_type:
            raise ValueError(
                f"{folder} holds a {found!r} checkpoint, not {cls.config_class.model_type!r}: load it with "
                f"seer_attn.AutoSeerForCausalLM (it picks the family) or the matching Seer class"
            )
        return cls.config_class.from_pretrained(folder)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """Load from a gate-only folder, a full Seer folder, a plain model of the family or `smollm2-135m`.

        Any `seerattn_*` field (and `base_model`) may be given as a keyword and overrides the saved
        config. Other keywords (`dtype`, `device_map`, ...) go to transformers.
        """
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in SEERATTN_FIELDS}
        if kwargs.get("attn_implementation") not in (None, ATTN_IMPLEMENTATION):
            raise ValueError(f"{cls.__name__} uses attn_implementation='{ATTN_IMPLEMENTATION}' only")
        kwargs.pop("attn_implementation", None)
        source = resolve_model_source(pretrained_model_name_or_path)

        if source.kind in ("seer_gates", "seer_full"):
            if config is None or not isinstance(config, cls.config_class):
                config = cls._seer_config_from_dir(source.path)
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

        if config is not None and isinstance(config, cls.config_class):
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
    def _from_gguf(cls, source, config, **kwargs):
        # transformers' GGUF reader maps tensor names by model_type: read the file as the plain
        # family model, then move its weights into the Seer model with fresh gates
        base = cls.base_lm_class().from_pretrained(source.path, gguf_file=source.gguf_file, **kwargs)
        model = cls(config).to(dtype=base.dtype, device=base.device)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        if unexpected or any(".attn_gate." not in k for k in missing):
            raise RuntimeError(f"GGUF weights do not fit {cls.__name__}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model.generation_config = base.generation_config
        model.reset_gates()
        return model.eval()

    @classmethod
    def config_from(cls, pretrained_model_name_or_path, base_config: PreTrainedConfig | None = None, **overrides):
        """The Seer config that `from_pretrained` would build (edit it, then pass `config=`).

        For a plain model, `base_config` (default: read from the source) supplies the family's fields.
        """
        source = resolve_model_source(pretrained_model_name_or_path)
        if source.kind in ("seer_gates", "seer_full"):
            config = cls._seer_config_from_dir(source.path)
        else:
            base_config = base_config or AutoConfig.from_pretrained(source.path, **source.hf_kwargs())
            family = cls.base_config_class()
            if not isinstance(base_config, family):
                raise ValueError(
                    f"{pretrained_model_name_or_path} is a {type(base_config).__name__}; {cls.__name__} needs a "
                    f"{family.__name__} model (seer_attn.AutoSeerForCausalLM picks the family from the config)"
                )
            name = str(pretrained_model_name_or_path)
            if Path(name).expanduser().exists():
                name = str(Path(name).expanduser().resolve())
            config = cls.config_class.from_base_config(base_config, base_model=name)
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
        base = json.loads((Path(source.path) / "config.json").read_text()).get("base_model")
        if not base:
            raise ValueError(f"{source.path} names no base_model to take the tokenizer from")
        base_source = resolve_base_model(source.path, base)
        if base_source.kind == "seer_gates":
            return load_tokenizer(base_source.path, **kwargs)
        return AutoTokenizer.from_pretrained(base_source.path, **base_source.hf_kwargs(), **kwargs)
    return AutoTokenizer.from_pretrained(source.path, **source.hf_kwargs(), **kwargs)
