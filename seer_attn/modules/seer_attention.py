"""One layer's SeerAttention on unpadded tensors: dense, distill or sparse.

This is the model-independent core. The HF integration (`seer_attn.models`) handles projections,
RoPE, the KV cache and padding (it calls this once per unpadded sequence) and hands over:

- `q` `[B, Hq, S, D]`, `k`, `v` `[B, Hkv, S, D]`: post-RoPE, what attention really uses;
- `q_pre`, `k_pre`: the same before RoPE, what the gate sees (detached here);
- `cos`, `sin` `[B, nb, Dg]`: RoPE tables at each block's first-token position, for the gate.

Kernels: `"naive"` are the PyTorch twins (any device, autograd through PyTorch); `"TopK"` and
`"CSR"` are the Triton kernels (CUDA, or CPU under `TRITON_INTERPRET=1`). `"auto"` picks TopK for
inference and CSR when gradients must flow on CUDA, and the twins on CPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from seer_attn.kernels.block_mask import (
    causal_block_mask,
    indices_to_mask,
    nz_ratio_to_k,
    select_blocks,
    topk_block_index,
)
from seer_attn.kernels.naive import attn_with_pooling_naive, block_sparse_attn_naive
from seer_attn.modules import fused_gate
from seer_attn.modules.attn_gate import pooled_block_scores
from seer_attn.modules.crossover import resolve_min_sparse_length
from seer_attn.modules.layer_budget import layer_nz_ratios

__all__ = ["SeerAttentionSettings", "SeerAttentionStats", "seer_attention", "dense_attention", "gate_loss"]


@dataclass
class SeerAttentionSettings:
    """The `seerattn_*` knobs one layer needs (built from a config by the integration layer)."""

    mode: str = "sparse"
    block_size: int = 64
    sparsity_method: str = "nz_ratio"
    nz_ratio: float = 0.5
    threshold: float = 5e-3
    top_p: float = 0.9
    adaptive_row_floor: float = 0.0
    keep_sink: bool = False
    keep_diagonal: bool = True
    share_gqa_blocks: bool = False
    dense_last_rows: int = 0
    min_sparse_length: int = 0
    kernel: str = "auto"
    loss: str = "kl"
    distill_target: str = "max"
    selector: str = "gate"
    loss_row_start: float = 0.0
    compile_gate: bool = False
    gate_precision: str = "tf32x3"

    @classmethod
    def from_config(cls, config, layer_idx: int | None = None) -> "SeerAttentionSettings":
        """The settings of layer `layer_idx`: its `nz_ratio` follows `seerattn_layer_density_scale` (a
        multiplier per layer) or else `seerattn_layer_budget_curves` (water-filled, same mean), if set."""
        nz = float(config.seerattn_nz_ratio)
        scale = getattr(config, "seerattn_layer_density_scale", None)
        curves = getattr(config, "seerattn_layer_budget_curves", None)
        if layer_idx is not None and scale is not None:
            nz = min(1.0, nz * float(scale[layer_idx]))
        elif layer_idx is not None and curves is not None and nz < 1.0:
            nz = layer_nz_ratios(curves, nz, float(getattr(config, "seerattn_layer_budget_max_nz", 1.0)))[layer_idx]
        return cls(
            mode=config.seerattn_mode,
            block_size=config.seerattn_gate_block_size,
            sparsity_method=config.seerattn_sparsity_method,
            nz_ratio=nz,
            threshold=float(config.seerattn_threshold),
            top_p=float(getattr(config, "seerattn_top_p", 0.9)),
            adaptive_row_floor=float(getattr(config, "seerattn_adaptive_row_floor", 0.0)),
            keep_sink=config.seerattn_keep_sink,
            keep_diagonal=config.seerattn_keep_diagonal,
            share_gqa_blocks=bool(getattr(config, "seerattn_share_gqa_blocks", False)),
            dense_last_rows=config.seerattn_dense_last_rows,
            min_sparse_length=resolve_min_sparse_length(config),
            kernel=config.seerattn_kernel_implementation,
            loss=config.seerattn_loss,
            distill_target=config.seerattn_distill_target,
            selector=config.seerattn_selector,
            loss_row_start=float(getattr(config, "seerattn_gate_loss_row_start", 0.0)),
            compile_gate=bool(getattr(config, "seerattn_compile_gate", False)),
            gate_precision=str(getattr(config, "seerattn_gate_precision", "tf32x3")),
        )


@dataclass
class SeerAttentionStats:
    """What one layer reports about its last forward."""

    gate_loss: torch.Tensor | None = None  # scalar, unscaled, for this layer
    # kept causal blocks, summed over batch and heads; and the available causal blocks, same sum. Read them
    # through `kept` / `causal`: a static-cache decode step leaves zero-argument functions of its device
    # tensors instead (nothing is reduced inside a replayed CUDA graph unless someone asks)
    kept_blocks: int | torch.Tensor | Callable[[], torch.Tensor] = 0
    causal_blocks: int | torch.Tensor | Callable[[], torch.Tensor] = 0
    sparse: bool = False  # whether the block-sparse path ran
    kept_index: torch.Tensor | None = None  # TopK path: the block indices; counted lazily (see `kept`)
    # diagnostics, filled only when `seer_attention(..., record=True)` (sparse mode), else None:
    mask: torch.Tensor | None = None  # bool [B, H, nb, nb]: the blocks this layer attended to
    mass: torch.Tensor | None = None  # fp32 [B, H, nb, nb]: block mass of its exact attention (rows sum to 1)
    oracle_mask: torch.Tensor | None = None  # bool [B, H, nb, nb]: what `oracle_mass` keeps from `mass`, same settings

    @property
    def kept(self) -> int | torch.Tensor:
        """Kept causal blocks (a device tensor on the sparse path; reading it as a number syncs)."""
        if self.kept_index is not None:
            return indices_to_mask(self.kept_index, self.kept_index.shape[-2]).sum()
        return self.kept_blocks() if callable(self.kept_blocks) else self.kept_blocks

    @property
    def causal(self) -> int | torch.Tensor:
        """Available causal blocks."""
        return self.causal_blocks() if callable(self.causal_blocks) else self.causal_blocks

    @property
    def density(self) -> float:
        causal = self.causal
        return float(self.kept) / float(causal) if causal else 1.0


def in_backward() -> bool:
    """True while autograd runs a backward pass (where activation checkpointing recomputes layers)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_kernel(kernel: str, device: torch.device, needs_grad: bool) -> str:
    """Map `seerattn_kernel_implementation` to the kernel that will run; never silently swap."""
    if kernel == "auto":
        if device.type != "cuda":
            return "naive"
        return "CSR" if needs_grad else "TopK"
    if kernel in ("TopK", "CSR") and not _triton_usable(device):
        raise RuntimeError(
            f"seerattn_kernel_implementation={kernel!r} needs a CUDA device (or TRITON_INTERPRET=1); "
            f"tensors are on {device}. Use 'naive' or 'auto' on CPU."
        )
    if kernel == "TopK" and needs_grad:
        raise RuntimeError("the TopK kernel is forward-only; use 'CSR' (or 'auto') when training through sparse attention")
    return kernel


def _pooling_attention(q, k, v, sm_scale, block_size, target, kernel):
    """Exact attention and the pooled map: the twin for `kernel == "naive"`, Triton for any other kernel."""
    if kernel == "naive":
        return attn_with_pooling_naive(q, k, v, True, sm_scale, block_size, pooling=target)
    from seer_attn.kernels.attn_pooling_kernel import attn_with_pooling

    return attn_with_pooling(q, k, v, True, sm_scale, block_size, pooling=target)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Causal SDPA, `[B, Hq, S, D]`; GQA through SDPA's `enable_gqa` (no repeated K/V copies)."""
    if q.shape[1] != k.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=sm_scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=sm_scale)


def gate_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "kl", row_start: float = 0.0) -> torch.Tensor:
    """Distance between the gate and the pooled ground truth, averaged over batch, heads and rows.

    Args:
        logits (torch.Tensor): gate logits `[B, H, nb, nb]` (anything above the diagonal is ignored).
        target (torch.Tensor): pooled map `[B, H, nb, nb]`, rows summing to 1, zero above the diagonal.
        kind (str): `"kl"`: KL(target || softmax(logits)) per row; `"kl_top"`: the same KL on a
            coarser partition of each row, the target's top blocks (the fewest holding
            `TOP_LOSS_MASS` of its mass) one by one and every other block as one bin, so the gate is
            taught which blocks are on top and how much mass the rest holds, not how the tail is
            ordered (what top-k selection never sees); `"mse"`: mean squared error of the
            probabilities over the whole `nb x nb` map (upstream 2024).
        row_start (float): only rows `i >= floor(row_start * nb)` count (early rows have few blocks
            to choose from and nothing to learn there).
    """
    nb = logits.shape[-1]
    first = min(int(row_start * logits.shape[-2]), logits.shape[-2] - 1)
    if first > 0:
        logits, target = logits[..., first:, :], target[..., first:, :]
        causal = causal_block_mask(logits.shape[-2] + first, nb, logits.device)[first:]
        return _gate_loss(logits, target, kind, causal)
    return _gate_loss(logits, target, kind, causal_block_mask(logits.shape[-2], nb, logits.device))


# kl_top: the target's top blocks of each row, the fewest holding this share of its mass, count one by one
TOP_LOSS_MASS = 0.9
GATE_LOSSES = ("kl", "kl_top", "mse")


def row_kl(logp: torch.Tensor, t: torch.Tensor, causal: torch.Tensor, top: bool) -> torch.Tensor:
    """Per-row KL(t || exp(logp)) `[..., rows]`; with `top`, on the partition {each top block} + {the rest}."""
    kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(t))
    if not top:
        return kl.sum(-1)
    srt, order = t.sort(-1, descending=True)
    in_top = torch.zeros_like(causal.expand_as(t)).scatter(-1, order, (srt.cumsum(-1) - srt) < TOP_LOSS_MASS)
    tail = causal & ~in_top
    t_tail = (t * tail).sum(-1)
    logp_tail = torch.logsumexp(logp.masked_fill(~tail, float("-inf")), -1)
    # a row whose tail holds no target mass (or has no block) contributes nothing for it
    tail_term = torch.where(
        t_tail > 0, t_tail * (torch.log(t_tail.clamp_min(1e-30)) - logp_tail.clamp_min(-1e9)), torch.zeros_like(t_tail)
    )
    return (kl * in_top).sum(-1) + tail_term


def _gate_loss(logits: torch.Tensor, target: torch.Tensor, kind: str, causal: torch.Tensor) -> torch.Tensor:
    # a large finite fill keeps 0 * log(0) terms and their gradients finite
    logp = torch.log_softmax(logits.float().masked_fill(~causal, -1e9), dim=-1)
    t = target.float()
    if kind in ("kl", "kl_top"):
        return row_kl(logp, t, causal, kind == "kl_top").mean()
    if kind == "mse":
        return F.mse_loss(logp.exp(), t)
    raise ValueError(f"gate loss must be one of {GATE_LOSSES}, got {kind!r}")


def _gate_logits_and_loss(gate, q_pre, k_pre, cos, sin, target, kind: str, row_start: float):
    logits = gate(q_pre, k_pre, cos, sin, output="logits")
    return logits, gate_loss(logits, target, kind, row_start)


_compiled_gate_logits_and_loss = None


def gate_logits_and_loss(gate, q_pre, k_pre, cos, sin, target, settings: "SeerAttentionSettings"):
    """The trainable gate's logits `[B, H, nb, nb]` and its loss against `target`, the training path.

    With `settings.compile_gate` (`seerattn_compile_gate`) the two run as one `torch.compile`d graph
    (static shapes; one compilation per input shape, shared by every layer): eagerly they are ~120
    small launches per layer, which is why a distillation step is bound by the host, not the GPU
    (docs/RESULTS.md, "Scale-out").
    """
    global _compiled_gate_logits_and_loss
    args = (gate, q_pre.detach(), k_pre.detach(), cos, sin, target, settings.loss, settings.loss_row_start)
    if not settings.compile_gate:
        return _gate_logits_and_loss(*args)
    if _compiled_gate_logits_and_loss is None:
        _compiled_gate_logits_and_loss = torch.compile(_gate_logits_and_loss, dynamic=False)
    return _compiled_gate_logits_and_loss(*args)


def baseline_scores(
    selector: str, q, k, v, sm_scale: float, block_size: int, kernel: str,
    q_pre=None, k_pre=None, cos=None, sin=None, output: str = "logits",
) -> torch.Tensor:
    """Block scores `[B, Hq, nb, nb]` of the reference selectors (higher = keep first).

    - `oracle`: the model's true 2D max-pooled attention map (a strong selector, not a bound);
    - `oracle_mass`: the block attention mass map;
    - `pooled`: the gate's scoring without learned weights (`pooled_block_scores` of the pre-RoPE
      `q_pre`, `k_pre` with the gate's RoPE tables `cos`, `sin`): the floor a trained gate must clear;
      logits, or their block-causal softmax with `output="probs"`;
    - `static`: the attention-sink block, then the most recent blocks (a sliding window);
    - `random`: uniform random scores.
    Rows are probabilities for the oracles (and `pooled` with `output="probs"`), so a threshold
    also applies to them.
    """
    B, Hq, S, _ = q.shape
    nb = math.ceil(S / block_size)
    if selector in ("oracle", "oracle_mass"):
        target = "max" if selector == "oracle" else "mass"
        return _pooling_attention(q, k, v, sm_scale, block_size, target, kernel)[1]
    if selector == "pooled":
        if any(t is None for t in (q_pre, k_pre, cos, sin)):
            raise ValueError("the pooled selector needs q_pre, k_pre, cos and sin")
        logits = pooled_block_scores(q_pre, k_pre, cos, sin, block_size)
        return torch.softmax(logits, dim=-1) if output == "probs" else logits
    if selector == "static":
        i = torch.arange(nb, device=q.device)
        recency = -(i[:, None] - i[None, :]).float()  # 0 on the diagonal, more negative further back
        recency[:, 0] = 1.0  # the sink outranks everything
        return recency.expand(B, Hq, nb, nb)
    if selector == "random":
        return torch.rand(B, Hq, nb, nb, device=q.device)
    raise ValueError(f"unknown selector {selector!r}")


def _reference_mask(mass: torch.Tensor, settings: SeerAttentionSettings) -> torch.Tensor:
    """The blocks the `oracle_mass` selector keeps from `mass` under `settings` (diagnostics).

    The same call as the selection in :func:`seer_attention` (keep the two in step: the test
    `test_record_oracle_mass_mask_is_reference` compares them).
    """
    return select_blocks(
        mass,
        method=settings.sparsity_method,
        nz_ratio=settings.nz_ratio,
        threshold=settings.threshold,
        keep_sink=settings.keep_sink,
        keep_diagonal=settings.keep_diagonal,
        dense_last_rows=settings.dense_last_rows,
        top_p=settings.top_p,
        adaptive_row_floor=settings.adaptive_row_floor,
    )


@torch.no_grad()
def _record(stats, q, k, v, sm_scale, settings, kernel, mask=None, mass=None) -> None:
    """Fill the diagnostics of `stats`; `mask=None` is the full causal mask, `mass=None` is computed."""
    nb = math.ceil(q.shape[2] / settings.block_size)
    if mass is None:
        kernel = kernel or resolve_kernel(settings.kernel, q.device, needs_grad=False)
        mass = _pooling_attention(q, k, v, sm_scale, settings.block_size, "mass", kernel)[1]
    if mask is None:
        mask = causal_block_mask(nb, nb, q.device).expand(mass.shape)
    stats.mask, stats.mass, stats.oracle_mask = mask, mass, _reference_mask(mass, settings)


def group_block_scores(scores: torch.Tensor, num_kv_heads: int, probs: bool) -> torch.Tensor:
    """Scores of every query head `[B, Hq, nb, nb]` -> one per GQA group `[B, Hkv, nb, nb]`: the mean of
    the group's block probabilities (`probs`: the rows already are probabilities, else they are logits
    and are softmaxed over their causal blocks first). Selecting on them gives the whole group the
    same blocks (`seerattn_share_gqa_blocks`), as NSA's group-shared selection."""
    B, Hq, nbq, nb = scores.shape
    if Hq % num_kv_heads:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({num_kv_heads})")
    p = scores.float()
    if not probs:
        p = torch.softmax(p.masked_fill(~causal_block_mask(nbq, nb, scores.device), float("-inf")), dim=-1)
    # (rows with no finite score, e.g. past a packed sequence's end, are NaN after the softmax: give them 0)
    return p.nan_to_num(0.0).view(B, num_kv_heads, Hq // num_kv_heads, nbq, nb).mean(2)


def _topk_index(scores: torch.Tensor, settings: SeerAttentionSettings) -> torch.Tensor:
    """Per-row top-k block indices plus the always-kept blocks, `[B, H, nb, K]` (repeats possible).

    The same selection as `select_blocks(method="nz_ratio")` with `dense_last_rows=0`.
    """
    idx = topk_block_index(scores, nz_ratio_to_k(settings.nz_ratio, scores.shape[-1]))
    extra = []
    rows = torch.arange(scores.shape[-2], device=scores.device).expand(*scores.shape[:-1])
    if settings.keep_diagonal:
        extra.append(rows[..., None])
    if settings.keep_sink:
        extra.append(torch.zeros_like(rows)[..., None])
    return torch.cat([idx, *extra], dim=-1) if extra else idx


def seer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    gate,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sm_scale: float,
    settings: SeerAttentionSettings,
    train_gate: bool = False,
    target_cache: list | None = None,
    record: bool = False,
) -> tuple[torch.Tensor, SeerAttentionStats]:
    """SeerAttention for one layer on unpadded, cache-free (prefill) inputs.

    Args:
        q, k, v: post-RoPE `[B, Hq, S, D]`, `[B, Hkv, S, D]`, `[B, Hkv, S, D]`.
        q_pre, k_pre: pre-RoPE queries and keys, same shapes as `q` and `k`.
        gate: an `AttnGate` (called, never type-checked, so wrappers such as PEFT's work).
        cos, sin: gate RoPE tables `[B, nb, Dg]`.
        sm_scale (float): attention logit scale.
        settings (SeerAttentionSettings): mode, sparsity and kernel choices.
        train_gate (bool): in `sparse` mode, also compute the ground truth (no grad) and the gate
            loss, as fine-tuning does.
        target_cache (list, Optional): ground truths of this forward, appended in order; when the
            layer is recomputed inside backward (activation checkpointing) they are popped instead
            of recomputed.
        record (bool): in `sparse` mode, also keep the block mask used, the block mass of the exact
            attention (one more dense attention pass, no gradients) and the `oracle_mass` mask at
            the same settings in `stats.mask`, `stats.mass`, `stats.oracle_mask` (diagnostics:
            `seer_attn.evaluation.recall`). The output is unchanged. Default: `False`.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]`.
        stats (SeerAttentionStats): gate loss (distill / train_gate), kept and available blocks.
    """
    S = q.shape[2]
    nb = math.ceil(S / settings.block_size)
    n_causal = q.shape[0] * q.shape[1] * nb * (nb + 1) // 2
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    stats = SeerAttentionStats(kept_blocks=n_causal, causal_blocks=n_causal)

    if settings.mode == "dense":
        return dense_attention(q, k, v, sm_scale), stats

    if settings.mode == "distill":
        kernel = resolve_kernel(settings.kernel, q.device, needs_grad=False)
        with torch.no_grad():
            o, target = _pooling_attention(q, k, v, sm_scale, settings.block_size, settings.distill_target, kernel)
        _, stats.gate_loss = gate_logits_and_loss(gate, q_pre, k_pre, cos, sin, target, settings)
        return o, stats

    if settings.mode != "sparse":
        raise ValueError(f"unknown seerattn_mode {settings.mode!r}")

    # nz_ratio 1.0 keeps every causal block (top-k and adaptive alike): exactly dense
    dense_by_rule = (settings.sparsity_method in ("nz_ratio", "adaptive") and settings.nz_ratio >= 1.0) or S < settings.min_sparse_length
    if dense_by_rule and not train_gate:
        if record:
            _record(stats, q, k, v, sm_scale, settings, None)
        return dense_attention(q, k, v, sm_scale), stats

    kernel = resolve_kernel(settings.kernel, q.device, needs_grad)
    index = count = None
    output = "logits" if settings.sparsity_method == "nz_ratio" else "probs"
    if settings.selector != "gate":
        with torch.no_grad():
            # the pooled selector scores whole blocks: RoPE at block starts, one table entry in r
            r = settings.block_size // getattr(gate, "rope_stride", settings.block_size)
            scores = baseline_scores(settings.selector, q, k, v, sm_scale, settings.block_size, kernel,
                                     q_pre=q_pre, k_pre=k_pre, cos=cos[:, ::r], sin=sin[:, ::r], output=output)
    elif train_gate:
        if in_backward() and target_cache:
            # activation-checkpoint recomputation: the dense ground truth of this very forward is
            # cached; recomputing it would add a second dense attention pass per layer
            target = target_cache.pop(0)
        else:
            with torch.no_grad():
                _, target = _pooling_attention(q, k, v, sm_scale, settings.block_size, settings.distill_target, kernel)
            if target_cache is not None:
                target_cache.append(target)
        logits, stats.gate_loss = gate_logits_and_loss(gate, q_pre, k_pre, cos, sin, target, settings)
        scores = logits.detach() if output == "logits" else torch.softmax(logits.detach(), dim=-1)
    else:
        with torch.no_grad():
            # fused gate + selection (CUDA, supported designs): sorted indices straight for the TopK kernel
            fused = fused_gate.select_index(gate, q_pre, k_pre, cos, sin, settings, kernel)
            index, count = fused if fused is not None else (None, None)
            scores = gate(q_pre, k_pre, cos, sin, output=output) if index is None else None
    if dense_by_rule:
        if record:
            _record(stats, q, k, v, sm_scale, settings, kernel)
        return dense_attention(q, k, v, sm_scale), stats

    G = q.shape[1] // k.shape[1]
    shared = settings.share_gqa_blocks and G > 1 and index is None
    if shared:
        # one selection per GQA group (the budget is spent per KV head), given to each of its heads below
        probs = output == "probs" or settings.selector in ("oracle", "oracle_mass")
        scores = group_block_scores(scores, k.shape[1], probs)
    if index is None and kernel == "TopK" and settings.sparsity_method == "nz_ratio" and settings.dense_last_rows == 0:
        # the TopK kernel reads top-k indices as they are (order, repeats and entries above the
        # diagonal are fine): skip the mask -> sorted-indices conversion and its host sync
        index = _topk_index(scores, settings)
        if shared:
            index = index.repeat_interleave(G, dim=1)
    elif index is None:
        mask = select_blocks(
            scores,
            method=settings.sparsity_method,
            nz_ratio=settings.nz_ratio,
            threshold=settings.threshold,
            top_p=settings.top_p,
            adaptive_row_floor=settings.adaptive_row_floor,
            keep_sink=settings.keep_sink,
            keep_diagonal=settings.keep_diagonal,
            dense_last_rows=settings.dense_last_rows,
        )
        if shared:
            mask = mask.repeat_interleave(G, dim=1)
    if count is not None:
        # fused gate: canonical lists, entries past each row's count unwritten
        stats.kept_blocks = count.sum()
        if record:
            index = torch.where(torch.arange(index.shape[-1], device=index.device) < count[..., None], index, -1)
    elif index is not None:
        # counted later, once for all layers: no host sync and few launches per layer
        stats.kept_index = index
    else:
        stats.kept_blocks = mask.sum()
    stats.sparse = True
    if record:
        _record(stats, q, k, v, sm_scale, settings, kernel, mask if index is None else indices_to_mask(index, nb),
                scores if settings.selector == "oracle_mass" and not shared else None)
    if kernel == "naive":
        o = block_sparse_attn_naive(q, k, v, mask, sm_scale, settings.block_size)
    elif kernel == "TopK":
        from seer_attn.kernels.block_sparse_attn_topk import block_sparse_attn_topk, kv_blocks_from_mask

        if index is None:
            # variable blocks per row (threshold, top-p, adaptive): the count format, no host sync
            count, idx = kv_blocks_from_mask(mask, causal=True)
            o = block_sparse_attn_topk(q, k, v, idx, sm_scale, settings.block_size, block_count=count, canonical=True)
        else:
            o = block_sparse_attn_topk(q, k, v, index, sm_scale, settings.block_size, block_count=count,
                                       canonical=count is not None)  # fmt: skip
    else:
        from seer_attn.kernels.block_sparse_attn_csr import block_sparse_attn_csr

        o = block_sparse_attn_csr(q, k, v, mask, sm_scale, settings.block_size)
    return o, stats


# ----------------------------------------------------------------------------------------------
# Packed sequences (varlen): one launch for a whole batch of sequences of different lengths.
#
# Layout (flash-attn's varlen convention): q, k, v `[total, H, D]` with int32 `cu_seqlens [n + 1]`.
# Every sequence keeps its own block grid, starting at its first token, and its own block map; maps
# are `[n, H, nb, nb]`, `nb = ceil(max_seqlen / block_size)`, sequence `s` in its `[nb_s, nb_s]`
# corner. By definition the result equals `seer_attention` run on each sequence alone.
# ----------------------------------------------------------------------------------------------

_POOL_CHUNK_BLOCKS = 512  # blocks gathered at once when pooling packed sequences (bounds the copy)


def varlen_block_starts(cu_seqlens: torch.Tensor, nb: int, block_size: int) -> torch.Tensor:
    """Packed index of every block's first token, `[n, nb]` int64 (blocks past a sequence's end point
    at its last token, so gathering from them stays in range)."""
    start = cu_seqlens[:-1].long()[:, None] + block_size * torch.arange(nb, device=cu_seqlens.device)
    last = (cu_seqlens[1:].long() - 1).clamp_min(0)[:, None]
    return torch.minimum(start, last)


def pool_blocks_varlen(x: torch.Tensor, cu_seqlens: torch.Tensor, nb: int, block_size: int, kinds) -> torch.Tensor:
    """`pool_blocks` of every packed sequence: `x [total, H, D]` -> fp32 `[n, H, nb, D * len(kinds)]`.

    Block `b` of sequence `s` pools its real tokens only (a partial last block pools what it has);
    blocks past a sequence's end are 0.
    """
    n = cu_seqlens.numel() - 1
    total, H, D = x.shape
    # token index of every (sequence, block, offset), and whether that token belongs to the block
    tok = cu_seqlens[:-1].long()[:, None, None] + block_size * torch.arange(nb, device=x.device)[None, :, None] \
        + torch.arange(block_size, device=x.device)[None, None, :]
    real = tok < cu_seqlens[1:].long()[:, None, None]
    tok = torch.where(real, tok, 0).view(n * nb, block_size)
    real = real.view(n * nb, block_size)
    count = real.sum(-1).clamp_min(1).float()  # [n * nb]
    out = torch.empty(n * nb, H, D * len(kinds), dtype=torch.float32, device=x.device)
    for c0 in range(0, n * nb, _POOL_CHUNK_BLOCKS):
        c1 = min(n * nb, c0 + _POOL_CHUNK_BLOCKS)
        xb = x[tok[c0:c1]]  # [c, block, H, D] in x's dtype (no fp32 copy of all of x)
        keep = real[c0:c1, :, None, None]
        for i, kind in enumerate(kinds):
            if kind == "avg":
                v = torch.where(keep, xb, 0).sum(1, dtype=torch.float32) / count[c0:c1, None, None]
            else:
                fill = float("-inf") if kind == "max" else float("inf")
                xm = torch.where(keep, xb, fill)
                v = (xm.amax(1) if kind == "max" else xm.amin(1)).float()
                v = torch.where(torch.isinf(v), 0.0, v)  # blocks past the end have no token
            out[c0:c1, :, i * D : (i + 1) * D] = v
    return out.view(n, nb, H, -1).transpose(1, 2)


def gate_scores_varlen(gate, q_pre, k_pre, cos, sin, cu_seqlens, nb: int, output: str) -> torch.Tensor:
    """The gate's `[n, Hq, nb, nb]` scores of packed sequences (rows past a sequence's end: garbage).

    `cos`, `sin`: `[n, nb * block_size / gate.rope_stride, Dg]`, every summary start of each sequence
    (one entry per block for one summary per side). With several summaries per block each sequence
    pools its own sub-blocks and the mixture counts only its real summaries.
    """
    n_q, n_k = getattr(gate, "q_summaries", 1), getattr(gate, "k_summaries", 1)
    qb = pool_blocks_varlen(q_pre, cu_seqlens, nb * n_q, gate.block_size // n_q, gate.q_pools)
    kb = pool_blocks_varlen(k_pre, cu_seqlens, nb * n_k, gate.block_size // n_k, gate.k_pools)
    if (n_q, n_k) == (1, 1):
        return gate.score(qb, kb, cos, sin, output)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    real = (-(-lens // (gate.block_size // n_q)), -(-lens // (gate.block_size // n_k)))
    return gate.score(qb, kb, cos, sin, output, real=real)


def _seq_blocks(seqlens: list[int], block_size: int, device) -> tuple[list[int], torch.Tensor]:
    nbs = [math.ceil(s / block_size) for s in seqlens]
    return nbs, torch.tensor(nbs, device=device)


def select_blocks_varlen(
    scores: torch.Tensor, settings: SeerAttentionSettings, nb_seq: torch.Tensor, dense_seq: torch.Tensor | None = None,
    nbs: list[int] | None = None,
) -> torch.Tensor:
    """`select_blocks` per packed sequence on `[n, H, nb, nb]` scores: the top-k budget follows each
    sequence's own block count, `dense_last_rows` counts from each sequence's last block, rows of
    sequences marked in `dense_seq` (bool `[n]`) keep every causal block, rows past a sequence's
    end keep nothing. `top_p` and `adaptive` (a budget over all of a sequence's rows and heads) run
    `select_blocks` on each sequence's `[nb_s, nb_s]` corner (`nbs`: the block counts on the host)."""
    n, H, nb, _ = scores.shape
    causal = causal_block_mask(nb, nb, scores.device)
    rows = torch.arange(nb, device=scores.device)
    if settings.sparsity_method in ("top_p", "adaptive"):
        if nbs is None:
            nbs = nb_seq.tolist()
        mask = torch.zeros(n, H, nb, nb, dtype=torch.bool, device=scores.device)
        for i, m in enumerate(nbs):
            mask[i, :, :m, :m] = select_blocks(
                scores[i : i + 1, :, :m, :m], method=settings.sparsity_method, nz_ratio=settings.nz_ratio,
                threshold=settings.threshold, top_p=settings.top_p, adaptive_row_floor=settings.adaptive_row_floor,
                keep_sink=settings.keep_sink, keep_diagonal=settings.keep_diagonal, dense_last_rows=settings.dense_last_rows,
            )[0]
    elif settings.sparsity_method == "nz_ratio":
        if settings.nz_ratio >= 1.0:
            mask = causal.expand(n, H, nb, nb).clone()
        else:
            # nz_ratio_to_k per sequence, on the device: the same float64 product as the host rule
            frac = 1.0 - math.sqrt(1.0 - settings.nz_ratio)
            k_seq = torch.minimum(torch.floor(frac * nb_seq.double()).long().clamp_min(1), nb_seq)
            idx = topk_block_index(scores, nz_ratio_to_k(settings.nz_ratio, nb))  # sorted by score
            ranked = torch.arange(idx.shape[-1], device=scores.device) < k_seq[:, None, None, None]
            mask = torch.zeros(n, H, nb, nb + 1, dtype=torch.bool, device=scores.device)
            mask.scatter_(-1, torch.where(ranked, idx, nb), True)
            mask = mask[..., :nb] & causal
    elif settings.sparsity_method == "threshold":
        mask = (scores > settings.threshold) & causal
    else:
        raise ValueError(f"unknown sparsity method {settings.sparsity_method!r}")
    from seer_attn.kernels.block_mask import apply_keep_rules

    mask = apply_keep_rules(mask, settings.keep_sink, settings.keep_diagonal, 0)
    full = torch.zeros(n, 1, nb, 1, dtype=torch.bool, device=scores.device)
    if settings.dense_last_rows > 0:
        full |= (rows[None, :] >= nb_seq[:, None] - settings.dense_last_rows)[:, None, :, None]
    if dense_seq is not None:
        full |= dense_seq[:, None, None, None]
    mask = (mask | full) & causal
    return mask & (rows[None, :] < nb_seq[:, None])[:, None, :, None]


def gate_loss_varlen(
    logits: torch.Tensor, target: torch.Tensor, nbs: list[int], kind: str = "kl", row_start: float = 0.0
) -> torch.Tensor:
    """`gate_loss` of every packed sequence on its own `[nb_s, nb_s]` corner, averaged over sequences."""
    n, H, nb, _ = logits.shape
    causal = causal_block_mask(nb, nb, logits.device)
    nb_seq = torch.tensor(nbs, device=logits.device)
    first = torch.tensor([min(int(row_start * m), m - 1) for m in nbs], device=logits.device)
    rows = torch.arange(nb, device=logits.device)[None, :]
    valid = (rows < nb_seq[:, None]) & (rows >= first[:, None])  # [n, nb]: the rows that count
    n_rows = (nb_seq - first).clamp_min(1)
    logp = torch.log_softmax(logits.float().masked_fill(~causal, -1e9), dim=-1)
    t = target.float()
    if kind in ("kl", "kl_top"):
        per_row = row_kl(logp, t, causal, kind == "kl_top")
        per_seq = (per_row * valid[:, None]).sum((1, 2)) / (H * n_rows)
    elif kind == "mse":
        cols = rows < nb_seq[:, None]
        sq = (logp.exp() - t) ** 2 * (valid[:, :, None] & cols[:, None, :])[:, None]
        per_seq = sq.sum((1, 2, 3)) / (H * n_rows * nb_seq)
    else:
        raise ValueError(f"gate loss must be one of {GATE_LOSSES}, got {kind!r}")
    return per_seq.mean()


def dense_attention_varlen(q, k, v, cu_seqlens, seqlens: list[int], sm_scale: float) -> torch.Tensor:
    """Causal attention of every packed sequence (SDPA per sequence: the dense path is not the fast path)."""
    out, a = [], 0
    for s in seqlens:
        one = lambda t: t[a : a + s].transpose(0, 1).unsqueeze(0)  # noqa: E731
        out.append(dense_attention(one(q), one(k), one(v), sm_scale)[0].transpose(0, 1))
        a += s
    return torch.cat(out)


def varlen_unsupported(settings: SeerAttentionSettings, gate) -> str | None:
    """Why `seer_attention_varlen` cannot run these settings (None: it can). The per-sequence path
    (`seer_attention` on each sequence) covers everything."""
    if settings.mode == "sparse" and settings.selector == "pooled":
        return "the pooled selector"
    return None


def resolve_kernel_varlen(kernel: str, device: torch.device, needs_grad: bool) -> str:
    """`resolve_kernel` for packed inputs (every kernel has a `cu_seqlens` path: same choice as for one sequence)."""
    return resolve_kernel(kernel, device, needs_grad)


def _pooling_attention_varlen(q, k, v, cu_seqlens, max_seqlen, sm_scale, block_size, target, kernel):
    if kernel == "naive":
        from seer_attn.kernels.naive import attn_with_pooling_varlen_naive

        return attn_with_pooling_varlen_naive(q, k, v, cu_seqlens, True, sm_scale, block_size, pooling=target)
    from seer_attn.kernels.attn_pooling_kernel import attn_with_pooling

    return attn_with_pooling(q, k, v, True, sm_scale, block_size, pooling=target, cu_seqlens=cu_seqlens,
                             max_seqlen=max_seqlen)


def seer_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    gate,
    cos: torch.Tensor,
    sin: torch.Tensor,
    sm_scale: float,
    settings: SeerAttentionSettings,
    cu_seqlens: torch.Tensor,
    seqlens: list[int] | None = None,
    train_gate: bool = False,
    target_cache: list | None = None,
) -> tuple[torch.Tensor, SeerAttentionStats]:
    """SeerAttention for one layer on packed sequences: `seer_attention` on each sequence alone, in
    one pass (gate, selection and attention batched over the sequences).

    Args:
        q, k, v: post-RoPE `[total, Hq, D]`, `[total, Hkv, D]`, `[total, Hkv, D]`.
        q_pre, k_pre: pre-RoPE queries and keys, same shapes as `q` and `k`.
        gate: an `AttnGate` (its `q_pools`, `k_pools`, `block_size` and `score` are used).
        cos, sin: gate RoPE tables `[n, nb * block_size / gate.rope_stride, Dg]` at every gate
            summary's first-token position (each block's for one summary per side),
            `nb = ceil(max(seqlens) / block_size)` (see :func:`varlen_block_starts`).
        sm_scale (float): attention logit scale.
        settings (SeerAttentionSettings): mode, sparsity and kernel choices, resolved as for one
            sequence (`auto`: TopK for inference on CUDA, CSR when gradients flow). Not covered
            (raises, see :func:`varlen_unsupported`): the pooled selector, recording masks.
        cu_seqlens (torch.Tensor): int32 `[n + 1]` cumulative lengths, on q's device.
        seqlens (list[int], Optional): the `n` lengths on the host (saves a device sync per call).
        train_gate, target_cache: as in :func:`seer_attention` (the cached target is the `[n, H, nb, nb]` map).

    Returns:
        o (torch.Tensor): `[total, Hq, D]`.
        stats (SeerAttentionStats): as the per-sequence calls would sum them; `gate_loss` is the mean
            of the per-sequence losses.
    """
    why = varlen_unsupported(settings, gate)
    if why is not None:
        raise NotImplementedError(f"seer_attention_varlen does not support {why}; run seer_attention per sequence")
    if seqlens is None:
        cu = cu_seqlens.tolist()
        seqlens = [b - a for a, b in zip(cu, cu[1:])]
    bs = settings.block_size
    max_seqlen = max(seqlens)
    nbs, nb_seq = _seq_blocks(seqlens, bs, q.device)
    nb = max(nbs)
    n_causal = q.shape[1] * sum(m * (m + 1) // 2 for m in nbs)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    stats = SeerAttentionStats(kept_blocks=n_causal, causal_blocks=n_causal)

    if settings.mode == "dense":
        return dense_attention_varlen(q, k, v, cu_seqlens, seqlens, sm_scale), stats

    if settings.mode == "distill":
        kernel = resolve_kernel_varlen(settings.kernel, q.device, needs_grad=False)
        with torch.no_grad():
            o, target = _pooling_attention_varlen(q, k, v, cu_seqlens, max_seqlen, sm_scale, bs,
                                                  settings.distill_target, kernel)
        logits = gate_scores_varlen(gate, q_pre.detach(), k_pre.detach(), cos, sin, cu_seqlens, nb, "logits")
        stats.gate_loss = gate_loss_varlen(logits, target, nbs, settings.loss, settings.loss_row_start)
        return o, stats

    if settings.mode != "sparse":
        raise ValueError(f"unknown seerattn_mode {settings.mode!r}")

    all_dense = settings.sparsity_method in ("nz_ratio", "adaptive") and settings.nz_ratio >= 1.0
    short = [s < settings.min_sparse_length for s in seqlens]
    if (all_dense or all(short)) and not train_gate:
        return dense_attention_varlen(q, k, v, cu_seqlens, seqlens, sm_scale), stats

    kernel = resolve_kernel_varlen(settings.kernel, q.device, needs_grad)
    output = "logits" if settings.sparsity_method == "nz_ratio" else "probs"
    if settings.selector in ("oracle", "oracle_mass"):
        with torch.no_grad():
            target = "max" if settings.selector == "oracle" else "mass"
            scores = _pooling_attention_varlen(q, k, v, cu_seqlens, max_seqlen, sm_scale, bs, target, kernel)[1]
    elif settings.selector == "static":
        i = torch.arange(nb, device=q.device)
        recency = -(i[:, None] - i[None, :]).float()  # as baseline_scores: sink first, then most recent
        recency[:, 0] = 1.0
        scores = recency.expand(len(seqlens), q.shape[1], nb, nb)
    elif settings.selector == "random":
        scores = torch.rand(len(seqlens), q.shape[1], nb, nb, device=q.device)
    elif settings.selector != "gate":
        raise ValueError(f"unknown selector {settings.selector!r}")
    elif train_gate:
        if in_backward() and target_cache:
            target = target_cache.pop(0)
        else:
            with torch.no_grad():
                _, target = _pooling_attention_varlen(q, k, v, cu_seqlens, max_seqlen, sm_scale, bs,
                                                      settings.distill_target, kernel)
            if target_cache is not None:
                target_cache.append(target)
        logits = gate_scores_varlen(gate, q_pre.detach(), k_pre.detach(), cos, sin, cu_seqlens, nb, "logits")
        stats.gate_loss = gate_loss_varlen(logits, target, nbs, settings.loss, settings.loss_row_start)
        scores = logits.detach() if output == "logits" else torch.softmax(logits.detach(), dim=-1)
    else:
        with torch.no_grad():
            scores = gate_scores_varlen(gate, q_pre, k_pre, cos, sin, cu_seqlens, nb, output)
    if all_dense or all(short):
        return dense_attention_varlen(q, k, v, cu_seqlens, seqlens, sm_scale), stats

    # sequences under min_sparse_length run dense, here as "every causal block kept" (same result)
    dense_seq = torch.tensor(short, device=q.device) if any(short) else None
    G = q.shape[1] // k.shape[1]
    if settings.share_gqa_blocks and G > 1:
        probs = output == "probs" or settings.selector in ("oracle", "oracle_mass")
        mask = select_blocks_varlen(group_block_scores(scores, k.shape[1], probs), settings, nb_seq, dense_seq, nbs)
        mask = mask.repeat_interleave(G, dim=1)
    else:
        mask = select_blocks_varlen(scores, settings, nb_seq, dense_seq, nbs)
    stats.kept_blocks = mask.sum()
    stats.sparse = True
    if kernel == "naive":
        from seer_attn.kernels.naive import block_sparse_attn_varlen_naive

        o = block_sparse_attn_varlen_naive(q, k, v, mask, cu_seqlens, sm_scale, bs)
    elif kernel == "TopK":
        from seer_attn.kernels.block_sparse_attn_topk import block_sparse_attn_topk, kv_blocks_from_mask

        # one launch; the PyTorch twin (mask_to_kv_blocks) builds int64 [n, H, nb, nb] temporaries
        count, idx = kv_blocks_from_mask(mask, causal=True)
        o = block_sparse_attn_topk(q, k, v, idx, sm_scale, bs, block_count=count, canonical=True, cu_seqlens=cu_seqlens,
                                   max_seqlen=max_seqlen)
    else:
        from seer_attn.kernels.block_sparse_attn_csr import block_sparse_attn_csr

        o = block_sparse_attn_csr(q, k, v, mask, sm_scale, bs, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return o, stats
