"""Decode-stage sparsity for one attention layer: what the model integration calls, model-independent.

A layer's attention goes through :func:`decode_aware_attention`, which wraps the layer's ordinary
(prefill) attention function and adds, depending on `seerattn_mode`:

- `sparse` with a KV cache (`generate()`): every forward appends the new tokens' pre-RoPE keys to the
  layer's :class:`~seer_attn.modules.decode_gate.CompressedKeyCache`, which lives on the transformers
  cache object itself (so the caller's code does not change). A step with fewer queries than keys
  (decoding) scores the completed blocks, keeps the top `token_budget // block_size - 1` of them
  (or those above `threshold`) plus the token's own block, and runs the block-sparse decoding kernel.
  Layers below `start_layer`, contexts shorter than `min_context` and padded batches decode densely;
  prefill steps go to the wrapped attention.
  On a preallocated cache (`StaticCache`) the model sends one-token steps to :func:`static_decode_attention`
  instead, which keeps every length on the device so that the step can be replayed as a CUDA graph.
- `decode_eval`: teacher-forced decode mode over a whole sequence: *every* token attends only to its
  selected blocks and its own block, exactly as if it were decoded (the decode-mode PPL protocol).
- `distill`: the wrapped attention runs (training the prefill gate) and the decode gate's loss is
  added to the layer's gate loss: KL from the per-token block target (max-pooled probabilities
  reduced over the GQA group, method-spec §1.4) to the gate's softmax over the completed blocks, on
  the rows from half the sequence onward (upstream's `loss_slice_ratio`).

Block selectors (`seerattn_decode_selector`): `gate` (the trained DecodeGate), `oracle` (the true
per-token attention mass of each block), `quest` (a training-free upper bound of `q . k` over the
block from per-channel min/max of its post-RoPE keys, as Quest), `static` (the sink block, then the
most recent blocks).

The layer object passed in (`module`) must provide `config`, `layer_idx`, `attn_gate` (with an
optional `decode_gate` child, see :func:`attach_decode_gate`), `gate_rotary_emb` and `seer_stats`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from seer_attn.kernels.naive import attn_with_token_pooling_naive, sparse_decode_attn_naive
from seer_attn.modules.decode_gate import (
    Q_POOLINGS,
    CompressedKeyCache,
    DecodeGate,
    StaticCompressedKeyCache,
    parse_decode_gate_type,
    static_state_update,
)
from seer_attn.modules.layer_budget import layer_token_budgets
from seer_attn.modules.seer_attention import GATE_LOSSES, SeerAttentionStats, row_kl, dense_attention, resolve_kernel

__all__ = [
    "DECODE_SELECTORS",
    "DecodeSettings",
    "validate_decode_config",
    "attach_decode_gate",
    "build_decode_gate",
    "decode_aware_attention",
    "select_decode_blocks",
    "sparse_decode_step",
    "static_decode_attention",
    "token_block_scores",
    "decode_gate_loss",
    "decode_states",
    "decode_min_context",
]

logger = logging.getLogger(__name__)
DECODE_SELECTORS = ("gate", "oracle", "quest", "static")
# the decode gate loss covers rows from this fraction of the sequence onward (upstream's loss_slice_ratio)
LOSS_ROW_FRACTION = 0.5
# recompute each decode gate's logits in the backward pass instead of keeping them: they are
# [B, Hq, rows, slots] per layer (k_summaries slots per block) and every layer's stay alive until the backward
# (~12 GB for SmolLM2 at 8 x 8k with one summary); the gate is a few small matmuls, so recomputing costs little
DECODE_LOSS_CHECKPOINT = True
_STATE_ATTR = "_seer_decode_states"
# set on a cache object by a caller that knows its filled length on the host (a CUDA-graph decoding
# loop): the min-context rule of a preallocated cache then needs no device -> host copy
HOST_LENGTH_ATTR = "_seer_host_length"
_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.warning(msg)


@dataclass
class DecodeSettings:
    """The `seerattn_decode_*` knobs of one layer (built from a config)."""

    mode: str = "sparse"
    block_size: int = 64
    selector: str = "gate"
    token_budget: int = 2048
    threshold: float | None = None
    start_layer: int = 0
    min_context: int | str = 0
    keep_sink: bool = False
    keep_recent: int = 0
    kernel: str = "auto"
    loss: str = "kl"
    distill_target: str = "max"
    compile_gate: bool = False

    @classmethod
    def from_config(cls, config, layer_idx: int | None = None) -> "DecodeSettings":
        """The settings of layer `layer_idx`: its token budget follows `seerattn_decode_layer_budget_scale`
        (a multiplier), else `seerattn_decode_layer_budget_curves` (water-filled, the mean stays the request)."""
        budget = int(config.seerattn_decode_token_budget)
        bs = int(config.seerattn_gate_block_size)
        scale = getattr(config, "seerattn_decode_layer_budget_scale", None)
        curves = getattr(config, "seerattn_decode_layer_budget_curves", None)
        if layer_idx is not None and scale is not None and budget > 0:
            budget = max(bs, int(round(budget * float(scale[layer_idx]) / bs)) * bs)
        elif layer_idx is not None and curves is not None and budget > 0:
            budget = layer_token_budgets(curves, budget, bs)[layer_idx]
        return cls(
            mode=config.seerattn_mode,
            block_size=bs,
            selector=config.seerattn_decode_selector,
            token_budget=budget,
            threshold=None if config.seerattn_decode_threshold is None else float(config.seerattn_decode_threshold),
            start_layer=int(config.seerattn_decode_start_layer),
            min_context=config.seerattn_decode_min_context,
            keep_sink=bool(config.seerattn_decode_keep_sink),
            keep_recent=int(config.seerattn_decode_keep_recent),
            kernel=config.seerattn_kernel_implementation,
            loss=config.seerattn_loss,
            distill_target=config.seerattn_distill_target,
            compile_gate=bool(getattr(config, "seerattn_compile_decode_gate", False)),
        )


# `seerattn_decode_min_context="auto"`: the context from which a step decodes sparsely is
# max(AUTO_MIN_CONTEXT, AUTO_MIN_STEP_TOKENS / batch). The gate step costs about the same at any batch (one
# program per sequence and KV head, side by side) while the KV reads it saves grow with batch x context.
# H100, SmolLM2, graphed (benchmarks/RESULTS.md, session 11): batch 8 crosses between 8k and 16k (1.08x at
# 16k); batch 1 is 0.76x at 32k, and its per-step times put the crossover near 112k (extrapolated).
AUTO_MIN_CONTEXT = 16384
AUTO_MIN_STEP_TOKENS = 131072


def decode_min_context(value: int | str, batch: int) -> int:
    """`seerattn_decode_min_context` for a batch of `batch` sequences: an int as it is, `"auto"` by the rule above."""
    if value == "auto":
        return max(AUTO_MIN_CONTEXT, -(-AUTO_MIN_STEP_TOKENS // max(int(batch), 1)))
    return int(value)


def validate_decode_config(config) -> None:
    """Raise ValueError naming the first invalid `seerattn_decode_*` field."""
    if config.seerattn_decode_gate_type is not None:
        parse_decode_gate_type(config.seerattn_decode_gate_type)
    if config.seerattn_decode_q_pooling not in Q_POOLINGS:
        raise ValueError(f"seerattn_decode_q_pooling must be one of {Q_POOLINGS}, got {config.seerattn_decode_q_pooling!r}")
    if config.seerattn_decode_selector not in DECODE_SELECTORS:
        raise ValueError(
            f"seerattn_decode_selector must be one of {DECODE_SELECTORS}, got {config.seerattn_decode_selector!r}"
        )
    for name in ("seerattn_decode_token_budget", "seerattn_decode_start_layer", "seerattn_decode_min_context"):
        value = getattr(config, name)
        auto = name == "seerattn_decode_min_context"  # (also "auto")
        if not (auto and value == "auto") and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be an int >= 0{' or auto' if auto else ''}, got {value!r}")
    threshold = config.seerattn_decode_threshold
    if threshold is not None:
        if float(threshold) < 0:
            raise ValueError(f"seerattn_decode_threshold must be >= 0 or None, got {threshold}")
        if config.seerattn_decode_selector in ("quest", "static"):
            raise ValueError(
                f"seerattn_decode_threshold needs probabilities: use it with the 'gate' or 'oracle' selector, "
                f"not {config.seerattn_decode_selector!r}"
            )


def build_decode_gate(config, hidden_size: int, head_dim: int) -> DecodeGate:
    """A fresh decode gate as `config`'s `seerattn_decode_*` fields describe it (`hidden_size`: the gate width)."""
    return DecodeGate(
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        gate_type=config.seerattn_decode_gate_type,
        hidden_size=hidden_size,
        block_size=config.seerattn_gate_block_size,
        q_pooling=config.seerattn_decode_q_pooling,
        use_norm=config.seerattn_decode_gate_norm,
        k_summaries=getattr(config, "seerattn_decode_k_summaries", 1),
    )


def attach_decode_gate(attn_gate: torch.nn.Module, config, head_dim: int) -> DecodeGate | None:
    """Give a layer's `attn_gate` a `decode_gate` child when `seerattn_decode_gate_type` is set.

    Living under `attn_gate`, the decode gate's weights are saved, loaded, frozen and initialised with
    the prefill gate's (everything keyed on `.attn_gate.`), in the same gate-only checkpoint.
    """
    if config.seerattn_decode_gate_type is None:
        return None
    gate = build_decode_gate(config, attn_gate.hidden_size, head_dim)
    attn_gate.decode_gate = gate
    return gate


def decode_states(cache) -> dict[int, CompressedKeyCache]:
    """The per-layer decode-gate states attached to a transformers cache object (created on first use).

    The cache's `reorder_cache` (beam search) is wrapped so the states follow its batch reordering.
    """
    states = getattr(cache, _STATE_ATTR, None)
    if states is None:
        states = {}
        setattr(cache, _STATE_ATTR, states)
        reorder = getattr(cache, "reorder_cache", None)
        if reorder is not None:

            def reorder_cache(beam_idx, _reorder=reorder, _states=states):
                _reorder(beam_idx)
                for state in _states.values():
                    state.reorder(beam_idx)

            cache.reorder_cache = reorder_cache
    return states


def _candidates(rows: torch.Tensor, width: int, block_size: int) -> torch.Tensor:
    # bool [n, width]: block j is a candidate for the token at sequence index t iff j < t // block_size
    return torch.arange(width, device=rows.device)[None, :] < (rows // block_size)[:, None]


def select_decode_blocks(
    scores: torch.Tensor,
    block_size: int,
    token_budget: int = 2048,
    threshold: float | None = None,
    probs: bool = False,
    keep_sink: bool = False,
    keep_recent: int = 0,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Blocks each token attends to besides its own, `-1` where nothing is selected.

    Args:
        scores (torch.Tensor): `[B, Hkv, n, nc]`, `-inf` for blocks that are no candidates.
        block_size (int): tokens per block.
        token_budget (int): attended tokens per token, its own block included: the top
            `token_budget // block_size - 1` candidates are kept. Default: `2048`.
        threshold (float, Optional): instead of the budget, keep candidates whose probability exceeds it
            (softmax of `scores` over the candidates, or `scores` renormalised when `probs`).
        probs (bool): `scores` are non-negative masses rather than logits. Default: `False`.
        keep_sink, keep_recent: always keep block 0 / the `keep_recent` candidates just before each token's
            own block (inside the budget; with a threshold, on top of it). They need `rows`.
        rows (torch.Tensor, Optional): int `[n]`, the tokens' positions (their own block is `rows // block_size`).

    Returns:
        int64 `[B, Hkv, n, K]` block indices (unique per row; `-1` = none).
    """
    nc = scores.shape[-1]
    forced = None
    if keep_sink or keep_recent:
        if rows is None:
            raise ValueError("select_decode_blocks: keep_sink / keep_recent need the tokens' positions (rows)")
        j = torch.arange(nc, device=scores.device)
        own = (rows // block_size)[:, None]
        forced = (j < own) & (((j == 0) & keep_sink) | (j >= own - keep_recent))  # [n, nc]
    if threshold is not None:
        if probs:
            p = scores.clamp_min(0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
            p = p / p.sum(-1, keepdim=True)
        else:
            p = torch.softmax(scores, dim=-1)
        # a row without candidates is NaN here and compares False
        keep = p > threshold if forced is None else (p > threshold) | forced
        return torch.where(keep, torch.arange(nc, device=scores.device), -1)
    k = min(max(token_budget // block_size - 1, 0), nc)
    if k == 0:
        return torch.empty(*scores.shape[:-1], 0, dtype=torch.long, device=scores.device)
    scores = scores.float()
    if forced is not None:
        scores = scores.masked_fill(forced, float("inf"))
    vals, idx = scores.topk(k, dim=-1)
    return torch.where(torch.isneginf(vals), -1, idx)


def _quest_scores(q: torch.Tensor, k: torch.Tensor, nc: int, block_size: int, chunk: int = 4096) -> torch.Tensor:
    # max over the block's keys of q . k is at most sum_d max(q_d kmax_d, q_d kmin_d)
    #   = q . (kmax + kmin) / 2 + |q| . (kmax - kmin) / 2: two matmuls
    B, Hq, n, D = q.shape
    Hkv = k.shape[1]
    kb = k[:, :, : nc * block_size].float().view(B, Hkv, nc, block_size, D)
    kmax, kmin = kb.amax(3), kb.amin(3)
    center, radius = (kmax + kmin) / 2, (kmax - kmin) / 2
    out = torch.empty(B, Hkv, n, nc, dtype=torch.float32, device=q.device)
    for r0 in range(0, n, chunk):
        qg = q[:, :, r0 : r0 + chunk].float().view(B, Hkv, Hq // Hkv, -1, D)
        bound = torch.einsum("bhgnd,bhcd->bhgnc", qg, center) + torch.einsum("bhgnd,bhcd->bhgnc", qg.abs(), radius)
        out[:, :, r0 : r0 + chunk] = bound.amax(2)
    return out


def token_block_scores(
    selector: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float,
    block_size: int,
    kernel: str = "naive",
    gate_logits: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scores of the completed blocks for the last `n` of `L` tokens, `-inf` for non-candidates.

    Args:
        selector (str): one of :data:`DECODE_SELECTORS`.
        q (torch.Tensor): post-RoPE queries `[B, Hq, n, D]` (tokens `L - n .. L - 1`).
        k, v (torch.Tensor): post-RoPE keys and values `[B, Hkv, L, D]`.
        gate_logits: for `gate`: `nc -> [B, Hkv, n, nc]` logits of the decode gate, non-candidates `-inf`.
        kernel (str): `naive`, or a Triton kernel name (the oracle then uses `attn_with_token_pooling`
            when it scores a whole sequence).

    Returns:
        `[B, Hkv, n, nc]` fp32 with `nc = L // block_size`; higher = keep first. `oracle` scores are masses.
    """
    B, Hq, n, D = q.shape
    L = k.shape[2]
    nc = L // block_size
    rows = torch.arange(L - n, L, device=q.device)
    if selector == "gate":
        if gate_logits is None:
            raise ValueError("seerattn_decode_selector='gate' needs a decode gate: set seerattn_decode_gate_type")
        # the gate masks its non-candidates itself
        return gate_logits(nc)
    if selector == "oracle":
        with torch.no_grad():
            if kernel != "naive" and n == L and D in (64, 128):
                from seer_attn.kernels.attn_token_pooling_kernel import attn_with_token_pooling

                _, pooled = attn_with_token_pooling(q, k, v, sm_scale, block_size, pooling="mass")
            else:
                _, pooled = attn_with_token_pooling_naive(q, k, v, sm_scale, block_size, pooling="mass")
        scores = pooled[..., :nc].float()
    elif selector == "quest":
        scores = _quest_scores(q, k, nc, block_size)
    elif selector == "static":
        recency = torch.arange(nc, device=q.device, dtype=torch.float32)
        recency[:1] = float("inf")  # the sink block outranks everything
        scores = recency.expand(B, k.shape[1], n, nc)
    else:
        raise ValueError(f"unknown decode selector {selector!r}; choose from {DECODE_SELECTORS}")
    return scores.masked_fill(~_candidates(rows, nc, block_size), float("-inf"))


def _gate_select(gate, q_pre, q_cos, q_sin, kc, rows, block_size: int, token_budget: int, threshold: float | None,
                 keep_sink: bool = False, keep_recent: int = 0):
    """The decode gate's part of a step: its queries, their scores against the compressed keys `kc`
    (`[B, Hkv, nc * k_summaries, Dg]`), and the selection; see :func:`select_decode_blocks`."""
    qg = gate.queries(q_pre, q_cos, q_sin)
    return select_decode_blocks(gate.score(qg, kc, rows), block_size, token_budget, threshold, keep_sink=keep_sink,
                                keep_recent=keep_recent, rows=rows)


# rope types whose tables depend only on the position (not on the call's length): the fused step computes them
_STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")
_fused_decode_gate = {"enabled": os.environ.get("SEER_ATTN_FUSED_DECODE_GATE", "1") not in ("0", "false", "False")}


def set_fused_decode_gate(enabled: bool) -> None:
    """Turn the one-kernel decode-gate step on (default) or off (`SEER_ATTN_FUSED_DECODE_GATE=0`): off,
    preallocated-cache steps run the PyTorch step (:func:`_static_gate_step`, its twin) instead."""
    _fused_decode_gate["enabled"] = bool(enabled)


def _fused_gate_args(module, gate, kernel: str) -> dict | None:
    """The decode gate's tensors for `decode_gate_step`, or None where it does not apply (the PyTorch
    step, the same computation, runs): the PyTorch kernels chosen (`naive`, e.g. on CPU), a query pooling
    other than `heads`, a rope type whose tables depend on the length, head or gate widths that are not
    powers of 2 from 32, GQA groups above 16 heads."""
    if kernel == "naive" or not _fused_decode_gate["enabled"] or gate.q_pooling != "heads":
        return None
    rope = module.gate_rotary_emb
    pow2 = lambda x: x >= 32 and x & (x - 1) == 0  # noqa: E731
    if (getattr(rope, "rope_type", None) not in _STATIC_ROPE_TYPES or not (pow2(gate.hidden_size) and pow2(gate.head_dim))
            or gate.group > 16):
        return None
    norm = lambda n: None if n is None else n.weight  # noqa: E731
    return dict(
        w_k=gate.k_linear.weight, w_q=gate.q_linear.weight, q_norm=norm(gate.q_norm), k_norm=norm(gate.k_norm),
        inv_freq=rope.inv_freq.float(), attention_scaling=float(rope.attention_scaling), k_pools=gate.k_pools,
        k_summaries=gate.k_summaries, eps=gate.q_norm.eps if gate.q_norm is not None else 1e-6,
    )


def _static_gate_step(gate, keys, block, k_pre, q_pre, t, cos, sin, block_size: int, token_budget: int, threshold,
                      keep_sink: bool = False, keep_recent: int = 0):
    # a preallocated cache's one-token step: the state update (cos/sin rows 0..ks-1, the block's summary
    # starts) then the selection over every slot (row ks, the token's own position); fixed shapes
    ks = gate.k_summaries
    static_state_update(gate, keys, block, k_pre, t, cos[:, :ks], sin[:, :ks])
    return _gate_select(gate, q_pre, cos[:, ks:], sin[:, ks:], keys, t[:1], block_size, token_budget, threshold,
                        keep_sink, keep_recent)


_compiled: dict[Callable, Callable] = {}


def _maybe_compiled(fn: Callable, compiled: bool, dynamic: bool) -> Callable:
    # one compilation per function for every layer (the gate is an argument); eagerly a gate step is
    # ~60 small launches per layer (docs/RESULTS.md, "Session 9 (CPU only)")
    if not compiled:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=dynamic)
    return _compiled[fn]


def _attend(q, k, v, index, sm_scale: float, block_size: int, kernel: str, seqlens=None) -> torch.Tensor:
    if kernel == "naive":
        return sparse_decode_attn_naive(q, k, v, index, sm_scale, block_size, seqlens=seqlens)
    from seer_attn.kernels.sparse_decode_attn import sparse_decode_attn

    return sparse_decode_attn(q, k, v, index, sm_scale, block_size, seqlens=seqlens)


def _rope_fn(module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    rope = module.gate_rotary_emb

    def tables(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rope(torch.zeros((), device=positions.device, dtype=torch.float32), positions)

    return tables


def _causal_blocks_before(m: int, bs: int) -> int:
    # sum over tokens t < m of (t // bs + 1): blocks up to and including each token's own block
    q, r = divmod(m, bs)
    return bs * q * (q + 1) // 2 + r * (q + 1)


def sparse_decode_step(
    gate: DecodeGate | None,
    s: DecodeSettings,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    positions: torch.Tensor,
    sm_scale: float,
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    state: CompressedKeyCache | None = None,
) -> tuple[torch.Tensor, SeerAttentionStats]:
    """Block selection + block-sparse attention for the last `n` of `L` tokens (no host sync).

    Args:
        gate: the decode gate (needed by the `gate` selector).
        s (DecodeSettings): selector, budget / threshold, block size, kernel.
        q (torch.Tensor): post-RoPE queries `[B, Hq, n, D]`; k, v: `[B, Hkv, L, D]` (cache included).
        q_pre (torch.Tensor): pre-RoPE queries `[B, Hq, n, D]`.
        k_pre (torch.Tensor): pre-RoPE keys `[B, Hkv, L, D]`; read only without `state` (teacher forcing).
        positions (torch.Tensor): position ids `[B or 1, L]` without `state`, `[B or 1, n]` with it.
        rope: the gate's RoPE tables, `positions [B, m] -> (cos, sin) [B, m, Dg]`.
        state (CompressedKeyCache, Optional): compressed keys of the completed blocks (generation).

    Returns:
        o `[B, Hq, n, D]`, and stats counting attended and causal blocks per KV head.
    """
    B, Hq, n, _ = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    bs = s.block_size
    kernel = resolve_kernel(s.kernel, q.device, needs_grad=False)
    rows = torch.arange(L - n, L, device=q.device)
    if gate is not None and s.selector == "gate":
        nc = L // bs
        with torch.no_grad():
            if state is not None:
                kc = state.keys
            else:  # teacher forcing: the completed blocks of the whole prefix at once
                kc = gate.compress_keys(k_pre[:, :, : nc * bs], *rope(positions.expand(B, -1)[:, : nc * bs : gate.key_stride]))
            if kc is None:  # no completed block yet: the own block only
                index = torch.empty(B, Hkv, n, 0, dtype=torch.long, device=q.device)
            else:
                # the gate's queries, scores and selection in one function (compiled on request)
                index = _maybe_compiled(_gate_select, s.compile_gate, dynamic=True)(
                    gate, q_pre, *rope(positions[:, -n:].expand(B, n)), kc[:, :, : nc * gate.k_summaries], rows, bs,
                    s.token_budget, s.threshold, s.keep_sink, s.keep_recent,
                )  # fmt: skip
    else:
        scores = token_block_scores(s.selector, q, k, v, sm_scale, bs, kernel)
        # (static keeps the sink and the most recent blocks anyway: forcing them changes nothing there)
        index = select_decode_blocks(scores, bs, s.token_budget, s.threshold, probs=s.selector == "oracle",
                                     keep_sink=s.keep_sink, keep_recent=s.keep_recent, rows=rows)
    o = _attend(q, k, v, index, sm_scale, bs, kernel)
    own = rows // bs
    kept = ((index >= 0) & (index < own[:, None])).sum() + B * Hkv * n
    causal = B * Hkv * (_causal_blocks_before(L, bs) - _causal_blocks_before(L - n, bs))
    return o, SeerAttentionStats(kept_blocks=kept, causal_blocks=causal, sparse=True)


# how layers that decode densely attend over a preallocated cache's slots: "sdpa" (masked SDPA over every
# slot, what transformers does with a StaticCache) or "splitk" (the sparse decoding kernel with every
# block listed: flash-decoding over the filled slots only; 2.9x the tokens/s of "sdpa" for SmolLM2 at
# 32k, batch 8, graphed on an H100, benchmarks/RESULTS.md session 11); "auto": "splitk" where the Triton
# kernels run (CUDA, head dim 64 / 128), else "sdpa". bench_decode sets it to time both.
DENSE_SLOTS_KERNEL = "auto"


_BLOCK_RANGES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _block_range(nb: int, device: torch.device) -> torch.Tensor:
    # arange(nb), kept per size and device: a dense step of every layer (and every graph replay) reuses it
    # instead of launching an arange per layer (a tensor made during a capture stays valid after it)
    r = _BLOCK_RANGES.get((nb, device))
    if r is None:
        r = _BLOCK_RANGES[(nb, device)] = torch.arange(nb, device=device)
    return r


def _dense_on_slots(q, k, v, lengths: torch.Tensor, sm_scale: float, block_size: int, kernel: str) -> torch.Tensor:
    # one new token per sequence over the filled slots of a preallocated cache: the G query heads of
    # a KV head are G rows of one SDPA call (no repeated K/V), the empty slots masked out
    B, Hq, _, D = q.shape
    Hkv = k.shape[1]
    how = DENSE_SLOTS_KERNEL
    if how == "auto":
        how = "splitk" if kernel != "naive" and D in (64, 128) else "sdpa"
    if how == "splitk":
        # every block before the token's own; the kernel skips the entries past it without reading K/V
        nb = -(-k.shape[2] // block_size)
        every = _block_range(nb, q.device).expand(B, Hkv, 1, nb)
        return _attend(q, k, v, every, sm_scale, block_size, kernel, seqlens=lengths)
    if how != "sdpa":
        raise ValueError(f"decode.DENSE_SLOTS_KERNEL must be 'auto', 'sdpa' or 'splitk', got {DENSE_SLOTS_KERNEL!r}")
    filled = torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None]
    o = F.scaled_dot_product_attention(
        q.reshape(B, Hkv, Hq // Hkv, D), k, v, attn_mask=filled[:, None, None, :], scale=sm_scale
    )
    return o.reshape(B, Hq, 1, D)


def static_decode_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    kv_lengths: torch.Tensor,
    scaling: float,
    past_key_values,
    token_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """A one-token decoding step over a preallocated cache's whole buffers, with no host sync.

    The CUDA-graph form of decoding (:class:`seer_attn.models.cuda_graphs.GraphedDecoder`, or
    `generate(cache_implementation="static")` eagerly): nothing is sliced to the filled length on the
    host; the filled length is a device tensor that steers the decode gate's state
    (:class:`StaticCompressedKeyCache`), the selection (blocks past it are no candidates, a fixed
    `token_budget // block_size - 1` picks per row) and the sparse kernel (`seqlens`). Layers that
    decode densely (below `seerattn_decode_start_layer`, no decode gate, `seerattn_mode="dense"`, a
    context below `seerattn_decode_min_context`) attend over the filled slots as `DENSE_SLOTS_KERNEL` says.

    Args:
        module: the attention layer (as :func:`decode_aware_attention`).
        query (torch.Tensor): post-RoPE `[B, Hq, 1, D]`; key, value: the cache's `[B, Hkv, capacity, D]`.
        q_pre, k_pre (torch.Tensor): pre-RoPE query `[B, Hq, 1, D]` and key `[B, Hkv, 1, D]` of this token.
        kv_lengths (torch.Tensor): int `[B]` on the device, filled slots including this token (its
            position + 1; an unpadded batch filled from slot 0).
        past_key_values: the cache object (the decode gate's state hangs on it).
        token_positions (torch.Tensor, Optional): int `[B]`, `kv_lengths - 1` when the caller has it (the
            model computes it once per step for every layer).

    Returns:
        `([B, 1, Hq, D], None)`; statistics in `module.seer_stats` (device tensors).
    """
    config = module.config
    s = DecodeSettings.from_config(config, module.layer_idx)
    gate = getattr(module.attn_gate, "decode_gate", None)
    B, Hq, n, _ = query.shape
    if n != 1 or s.selector != "gate" or s.mode not in ("sparse", "dense"):
        raise ValueError("static_decode_attention takes one-token steps of the gate selector in sparse or dense mode")
    dtype = value.dtype
    query, key = query.to(dtype), key.to(dtype)
    sparse = s.mode == "sparse" and gate is not None and module.layer_idx >= s.start_layer
    t = kv_lengths - 1 if token_positions is None else token_positions  # the token's position and slot
    kernel = resolve_kernel(s.kernel, query.device, needs_grad=False)
    index = fused = None
    if sparse:
        state = decode_states(past_key_values).get(module.layer_idx)
        if not isinstance(state, StaticCompressedKeyCache) or state.keys is None:
            raise RuntimeError(
                f"layer {module.layer_idx}: no decode-gate state for this preallocated cache; fill the cache (prefill) "
                "through the model with decode sparsity on first"
            )
        min_context = decode_min_context(s.min_context, B)
        if min_context > 0:
            host = getattr(past_key_values, HOST_LENGTH_ATTR, None)
            sparse = (int(kv_lengths.max()) if host is None else int(host)) >= min_context
        fused = _fused_gate_args(module, gate, kernel)
        with torch.no_grad():
            if fused is not None:
                # the whole gate step as one kernel per layer (seer_attn.kernels.decode_gate_kernel)
                from seer_attn.kernels.decode_gate_kernel import decode_gate_step

                out = decode_gate_step(q_pre, k_pre.to(state.block.dtype), t, state.block, state.keys, **fused,
                                       token_budget=s.token_budget, threshold=s.threshold, select=sparse,
                                       keep_sink=s.keep_sink, keep_recent=s.keep_recent)  # fmt: skip
                if sparse:
                    index, count = out
            else:
                # one RoPE call: the summaries of the token's block (the state update), then the token itself (its query)
                cos, sin = _rope_fn(module)(torch.cat([state.summary_starts(gate, t), t[:, None]], dim=1))
                if sparse:
                    # slots of blocks not yet complete are no candidates (score masks j >= t // bs): fixed shapes
                    index = _maybe_compiled(_static_gate_step, s.compile_gate, dynamic=False)(
                        gate, state.keys, state.block, k_pre, q_pre, t, cos, sin, s.block_size, s.token_budget, s.threshold,
                        s.keep_sink, s.keep_recent,
                    )
                else:  # below min_context: the state must still see every token
                    ks = gate.k_summaries
                    static_state_update(gate, state.keys, state.block, k_pre, t, cos[:, :ks], sin[:, :ks])
    if not sparse:
        module.seer_stats = SeerAttentionStats()
        return _dense_on_slots(query, key, value, kv_lengths, scaling, s.block_size, kernel).transpose(1, 2), None
    Hkv, bs = key.shape[1], s.block_size
    o = _attend(query, key, value, index, scaling, bs, kernel, seqlens=kv_lengths)
    # counted when read (a captured step's replays rewrite these tensors; no reduction runs in the graph)
    if fused is not None:
        kept = lambda: count.sum() + count.numel()  # noqa: E731  (+ each row's own block)
    else:
        kept = lambda: ((index >= 0) & (index < (t // bs).view(B, 1, 1, 1))).sum() + B * Hkv  # noqa: E731
    module.seer_stats = SeerAttentionStats(kept_blocks=kept, causal_blocks=lambda: Hkv * (t // bs + 1).sum(), sparse=True)
    return o.transpose(1, 2), None


def _unpadded(attention_mask) -> bool:
    return attention_mask is None or bool(attention_mask.all())


def decode_gate_loss(
    module, gate: DecodeGate | Sequence[DecodeGate], s: DecodeSettings, q, k, v, q_pre, k_pre, positions, sm_scale
) -> torch.Tensor | None:
    """The decode gate's distillation loss on one unpadded batch (None when no row has a candidate block).

    Rows from `LOSS_ROW_FRACTION` of the sequence onward (and past the first block); the target is
    the per-token block map (`seerattn_distill_target`: max or mass) restricted to the completed
    blocks and renormalised; the loss (`seerattn_loss`) compares it with the gate's softmax.
    Several gates (the layer's decode gate and its study arms, `seer_attn.training.decode_arms`) share
    one target: the sum of their losses (disjoint weights: each gate's gradient is its own loss's).
    """
    B, _, S, _ = q.shape
    bs = s.block_size
    r0 = max(int(S * LOSS_ROW_FRACTION), bs)
    if r0 >= S:
        return None
    kernel = resolve_kernel(s.kernel, q.device, needs_grad=False)
    with torch.no_grad():
        if kernel != "naive" and q.shape[-1] in (64, 128):
            from seer_attn.kernels.attn_token_pooling_kernel import attn_with_token_pooling

            _, target = attn_with_token_pooling(q, k, v, sm_scale, bs, pooling=s.distill_target)
        else:
            _, target = attn_with_token_pooling_naive(q, k, v, sm_scale, bs, pooling=s.distill_target)
        rows = torch.arange(r0, S, device=q.device)
        cand = _candidates(rows, target.shape[-1], bs)
        target = target[:, :, r0:].float() * cand
        target = target / (target.sum(-1, keepdim=True) + 1e-9)
    rope = _rope_fn(module)
    positions = positions.expand(B, S)
    q_rows, k_all = q_pre[:, :, r0:].detach(), k_pre.detach()
    q_cs = rope(positions[:, r0:])

    def gate_loss(g: DecodeGate, q_rows, k_all, q_cos, q_sin, k_cos, k_sin) -> torch.Tensor:
        logits = g(q_rows, k_all, q_cos, q_sin, k_cos, k_sin, rows)
        logp = torch.log_softmax(logits.masked_fill(~cand, -1e9), dim=-1)
        if s.loss in ("kl", "kl_top"):
            return row_kl(logp, target, cand.expand_as(logp), s.loss == "kl_top").mean()
        if s.loss == "mse":
            return F.mse_loss(logp.exp() * cand, target)
        raise ValueError(f"gate loss must be one of {GATE_LOSSES}, got {s.loss!r}")

    total = None
    for g in gate if isinstance(gate, (list, tuple)) else (gate,):
        key_starts = positions[:, : (S // bs) * bs : g.key_stride]  # every compressed key's first token
        args = (g, q_rows, k_all, *q_cs, *rope(key_starts))
        if DECODE_LOSS_CHECKPOINT and torch.is_grad_enabled() and any(p.requires_grad for p in g.parameters()):
            loss = torch.utils.checkpoint.checkpoint(gate_loss, *args, use_reentrant=False)
        else:
            loss = gate_loss(*args)
        total = loss if total is None else total + loss
    return total


def decode_aware_attention(
    module,
    attention_fn: Callable,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    past_key_values=None,
    kv_capacity: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A layer's attention with decode-stage sparsity (see the module docstring).

    Args:
        module: the attention layer (`config`, `layer_idx`, `attn_gate`, `gate_rotary_emb`, `seer_stats`).
        attention_fn: the layer's ordinary attention, called as
            `attention_fn(module, query, key, value, attention_mask, scaling=..., q_pre=..., k_pre=..., **kwargs)`
            for everything this function does not handle itself.
        query (torch.Tensor): post-RoPE `[B, Hq, S_q, D]`.
        key, value (torch.Tensor): `[B, Hkv, S_k, D]`, cache included.
        attention_mask (torch.Tensor, Optional): 2-D padding mask `[B, S_k]`.
        q_pre, k_pre (torch.Tensor): pre-RoPE queries and keys of this step.
        past_key_values: the transformers cache object, if any (decode-gate states are attached to it).
        kv_capacity (int, Optional): the slots of a preallocated cache (`StaticCache`), whose filled part
            `key` / `value` are; its decode-gate state is then a :class:`StaticCompressedKeyCache`.
        kwargs: passed on to `attention_fn` (`position_ids`, ...).

    Returns:
        `([B, S_q, Hq, D], None)`, as `attention_fn`; statistics in `module.seer_stats`.
    """
    config = module.config
    s = DecodeSettings.from_config(config, module.layer_idx)
    gate = getattr(module.attn_gate, "decode_gate", None)
    if (gate is None) != (config.seerattn_decode_gate_type is None):
        raise RuntimeError(
            f"seerattn_decode_gate_type is {config.seerattn_decode_gate_type!r} but the model was built "
            f"{'without' if gate is None else 'with'} decode gates: set it when loading the model, not afterwards"
        )
    layer_on = module.layer_idx >= s.start_layer
    enabled = gate is not None or s.selector != "gate"
    B, Hq, Sq, _ = query.shape
    Sk = key.shape[2]
    position_ids = kwargs.get("position_ids")
    positions = position_ids if position_ids is not None else torch.arange(Sk - Sq, Sk, device=query.device)[None]

    if s.mode == "decode_eval":
        if Sq != Sk:
            raise ValueError(
                "seerattn_mode='decode_eval' scores whole sequences (teacher forcing); "
                "generate with seerattn_mode='sparse'"
            )
        if not _unpadded(attention_mask):
            raise ValueError("seerattn_mode='decode_eval' needs unpadded inputs (no zeros in attention_mask)")
        dtype = value.dtype
        query, key = query.to(dtype), key.to(dtype)
        if not (enabled and layer_on):
            module.seer_stats = SeerAttentionStats()
            return dense_attention(query, key, value, scaling).transpose(1, 2), None
        o, module.seer_stats = sparse_decode_step(
            gate, s, query, key, value, q_pre, k_pre, positions, scaling, _rope_fn(module)
        )
        return o.transpose(1, 2), None

    if s.mode == "sparse" and enabled and layer_on and past_key_values is not None:
        if not _unpadded(attention_mask):
            _log_once("seer_attn: decode sparsity needs unpadded batches; this padded batch decodes densely")
        else:
            state = None
            if gate is not None and s.selector == "gate" and kv_capacity is not None:
                # a preallocated cache: the state later one-token steps update in place (static_decode_attention)
                state = decode_states(past_key_values).setdefault(module.layer_idx, StaticCompressedKeyCache(kv_capacity))
                state.append(gate, k_pre, positions, _rope_fn(module))
            elif gate is not None and s.selector == "gate":
                state = decode_states(past_key_values).setdefault(module.layer_idx, CompressedKeyCache())
                if state.num_tokens != Sk - Sq:
                    raise RuntimeError(
                        f"layer {module.layer_idx}: the decode gate has seen {state.num_tokens} tokens but the KV cache "
                        f"holds {Sk - Sq} before this step (was the cache cropped, or filled with decode sparsity off? "
                        "assisted decoding is not supported)"
                    )
                state.append(gate, k_pre, positions, _rope_fn(module))
            if Sq < Sk and Sk >= decode_min_context(s.min_context, query.shape[0]):
                dtype = value.dtype
                o, module.seer_stats = sparse_decode_step(
                    gate, s, query.to(dtype), key.to(dtype), value, q_pre, k_pre, positions, scaling, _rope_fn(module), state
                )
                return o.transpose(1, 2), None

    out = attention_fn(module, query, key, value, attention_mask, scaling=scaling, q_pre=q_pre, k_pre=k_pre, **kwargs)
    if s.mode == "distill" and gate is not None:
        arms = getattr(module, "decode_arms", None)  # study arms trained beside the decode gate (training.decode_arms)
        gates = [gate, *arms.values()] if arms else gate
        loss = _distill_loss(module, gates, s, query, key, value, q_pre, k_pre, attention_mask, positions, scaling)
        if loss is not None:
            stats = module.seer_stats
            stats.gate_loss = loss if stats.gate_loss is None else stats.gate_loss + loss
    return out


def _distill_loss(module, gate, s, query, key, value, q_pre, k_pre, attention_mask, positions, scaling):
    if query.shape[2] != key.shape[2]:
        raise ValueError("seerattn_mode='distill' takes whole sequences, not cached steps")
    dtype = value.dtype
    query, key = query.to(dtype), key.to(dtype)
    B = query.shape[0]
    positions = positions.expand(B, -1)
    if _unpadded(attention_mask):
        return decode_gate_loss(module, gate, s, query, key, value, q_pre, k_pre, positions, scaling)
    losses = []
    for b in range(B):
        idx = attention_mask[b].nonzero().squeeze(-1)
        pick = lambda t: t[b : b + 1, :, idx]  # noqa: E731
        loss = decode_gate_loss(
            module, gate, s, pick(query), pick(key), pick(value), pick(q_pre), pick(k_pre), positions[b : b + 1, idx], scaling
        )
        if loss is not None:
            losses.append(loss)
    return torch.stack(losses).mean() if losses else None
