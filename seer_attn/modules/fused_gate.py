"""The AttnGate at inference through the fused Triton kernels (`seer_attn.kernels.gate_kernel`).

`AttnGate` (pool -> project -> RoPE -> score) plus `topk_block_index` / `select_blocks` is the twin:
it defines the result and stays the trainable path. When no gradient is needed and the tensors are
on CUDA, `AttnGate.forward` and the sparse branch of `seer_attention` come here instead:

- :func:`gate_logits`: the same `[B, Hq, nb, nb]` logits / probabilities as `AttnGate.forward`;
- :func:`gate_block_index`: gate + selection in four launches, the kept blocks as canonical int32
  lists `[B, Hq, nb, W]` (+ counts) that `block_sparse_attn_topk(canonical=True)` reads as they are.

A design the kernels do not cover (see :func:`unsupported_reason`) runs the twin and says so once in
the log. `set_fused_gate(False)` (or `SEER_ATTN_FUSED_GATE=0`) turns the fused path off, e.g. to
time the twin.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from seer_attn.kernels.block_mask import mask_to_indices, nz_ratio_to_k, select_blocks, topk_block_index, topk_budget

__all__ = [
    "set_fused_gate",
    "fused_gate_enabled",
    "unsupported_reason",
    "use_fused",
    "gate_summaries_fused",
    "gate_logits",
    "gate_block_index",
    "gate_block_index_twin",
    "select_index",
]

logger = logging.getLogger(__name__)
_state = {"enabled": os.environ.get("SEER_ATTN_FUSED_GATE", "1") not in ("0", "false", "False")}
_logged: set[str] = set()
_METHODS = ("nz_ratio", "threshold", "top_p", "adaptive")
# tl.dot input precision of the gate kernels when set (benchmarks compare); else the layer's
# `gate_precision` setting (`seerattn_gate_precision`), else gate_kernel.GATE_DOT_PRECISION
GATE_PRECISION_OVERRIDE: str | None = None


def set_fused_gate(enabled: bool) -> None:
    """Turn the fused inference gate on or off for every layer (on by default)."""
    _state["enabled"] = bool(enabled)


def fused_gate_enabled() -> bool:
    return _state["enabled"]


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.warning(msg)


def unsupported_reason(gate, method: str | None = None) -> str | None:
    """Why the fused kernels cannot run this gate (and selection `method`), or None when they can."""
    for attr in ("q_pools", "k_pools", "mask_linear_k", "head_dim", "hidden_size", "block_size"):
        if not hasattr(gate, attr):
            return f"{type(gate).__name__} is not an AttnGate (no {attr!r})"
    for attr in ("q_summaries", "k_summaries"):
        n = getattr(gate, attr, 1)
        if n not in (1, 2, 4, 8) or gate.block_size // n < 2:
            return f"{attr}={n} with block size {gate.block_size}"
    d, dg = gate.head_dim, gate.hidden_size
    if d < 32 or d & (d - 1):
        return f"head_dim {d} (the kernels need a power of two >= 32)"
    if dg < 32 or dg & (dg - 1):
        return f"gate hidden size {dg} (the kernels need a power of two >= 32)"
    if gate.block_size not in (16, 32, 64, 128):
        return f"block size {gate.block_size}"
    if method is not None and method not in _METHODS:
        return f"sparsity method {method!r} (fused: {', '.join(_METHODS)})"
    return None


def _on_cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def use_fused(gate, q: torch.Tensor, method: str | None = None) -> bool:
    """Whether this call should take the fused path: enabled, CUDA, no autograd needed, design supported."""
    if not _state["enabled"] or not _on_cuda(q):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in gate.parameters()):
        return False
    reason = unsupported_reason(gate, method)
    if reason is not None:
        _log_once(f"fused gate does not support {reason}; running the PyTorch AttnGate (twin) instead")
        return False
    return True


def _weights(gate) -> tuple[torch.Tensor | None, torch.Tensor]:
    w_q = gate.mask_linear_q.weight.detach() if gate.mask_linear_q is not None else None
    return w_q, gate.mask_linear_k.weight.detach()


def gate_summaries_fused(gate, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, precision: str | None = None):
    """Rotated gate vectors: fp32 `[B, Hq, nb, Dg]` and `[B, Hk, nb, Dg]` (`Hk` = Hq for the default gate)."""
    from seer_attn.kernels.gate_kernel import gate_summaries

    if (
        q.dim() != 4
        or k.dim() != 4
        or q.shape[1] != gate.num_heads
        or k.shape[1] != gate.num_kv_heads
        or q.shape[-1] != gate.head_dim
        or k.shape[-1] != gate.head_dim
    ):
        raise ValueError(
            f"gate built for Hq={gate.num_heads}, Hkv={gate.num_kv_heads}, D={gate.head_dim}; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    w_q, w_k = _weights(gate)
    prec = GATE_PRECISION_OVERRIDE or precision
    n_q, n_k = getattr(gate, "q_summaries", 1), getattr(gate, "k_summaries", 1)
    stride = getattr(gate, "rope_stride", gate.block_size)
    S = q.shape[2]

    def tables(n):
        # summary s starts at token s * block_size / n: every r-th entry of the table (a view, no copy)
        sub = gate.block_size // n
        r, count = sub // stride, math.ceil(S / sub)
        return cos[:, ::r][:, :count], sin[:, ::r][:, :count], sub

    cq, sq, sub_q = tables(n_q)
    qg = gate_summaries(q, w_q, cq, sq, gate.q_pools, sub_q, 1, prec)
    g_out = gate.num_heads // gate.num_kv_heads if w_q is None else 1
    ck, sk, sub_k = tables(n_k)
    kg = gate_summaries(k, w_k, ck, sk, gate.k_pools, sub_k, g_out, prec)
    return qg, kg


def _scores(gate, q, k, cos, sin, fill_upper: bool, precision: str | None = None) -> torch.Tensor:
    """Logits (one summary per side) or block log-probabilities (several), fp32 `[B, Hq, nb, nb]`."""
    from seer_attn.kernels.gate_kernel import gate_mixture_scores, gate_scores

    prec = GATE_PRECISION_OVERRIDE or precision
    qg, kg = gate_summaries_fused(gate, q, k, cos, sin, prec)
    n_q, n_k = getattr(gate, "q_summaries", 1), getattr(gate, "k_summaries", 1)
    if n_q == 1 and n_k == 1:
        return gate_scores(qg, kg, fill_upper=fill_upper, precision=prec)
    nb = math.ceil(q.shape[2] / gate.block_size)
    return gate_mixture_scores(qg, kg, n_q, n_k, nb, fill_upper=fill_upper, precision=prec)


def gate_logits(gate, q, k, cos, sin, output: str) -> torch.Tensor:
    """What `AttnGate.forward` returns (`output` "logits" or "probs"), through the kernels."""
    s = _scores(gate, q, k, cos, sin, fill_upper=True)
    if output != "probs":
        return s
    # several summaries: s already holds log-probabilities (as the twin returns them)
    mixture = getattr(gate, "q_summaries", 1) > 1 or getattr(gate, "k_summaries", 1) > 1
    return s.exp() if mixture else torch.softmax(s, dim=-1)


def gate_block_index(gate, q, k, cos, sin, settings, return_count: bool = False):
    """Gate + selection: canonical int32 `[B, Hq, nb, W]` kept key blocks per query block.

    Rows are ascending and `-1` padded; with `return_count`, `(index, count [B, Hq, nb])` with the
    entries past each row's count left unwritten, which `block_sparse_attn_topk(..., block_count=count,
    canonical=True)` reads with no list preparation.

    `settings` carries `sparsity_method`, `nz_ratio`, `threshold`, `keep_sink`, `keep_diagonal`,
    `dense_last_rows` and `gate_precision` (a `SeerAttentionSettings`). Same blocks as :func:`gate_block_index_twin`
    except at near ties (see `seer_attn.kernels.gate_kernel`).
    """
    from seer_attn.kernels.gate_kernel import gate_select

    reason = unsupported_reason(gate, settings.sparsity_method)
    if reason is not None:
        raise ValueError(f"gate_block_index: the fused gate does not support {reason}")
    scores = _scores(gate, q, k, cos, sin, fill_upper=False, precision=getattr(settings, "gate_precision", None))
    G = q.shape[1] // k.shape[1]
    shared = getattr(settings, "share_gqa_blocks", False) and G > 1
    if shared:
        scores = _group_log_probs(scores, k.shape[1], _is_mixture(gate))
    nb, H = scores.shape[-1], scores.shape[1]
    method = settings.sparsity_method
    # adaptive: the per-row top-k budget of all heads (the kernel raises it to the forced count)
    budget = H * topk_budget(settings.nz_ratio, nb) if method == "adaptive" else 0
    floor_k = int(getattr(settings, "adaptive_row_floor", 0.0) * nz_ratio_to_k(settings.nz_ratio, nb))
    out = gate_select(
        scores,
        method,
        nz_ratio_to_k(settings.nz_ratio, nb) if method == "nz_ratio" else 1,
        settings.threshold,
        settings.keep_sink,
        settings.keep_diagonal,
        settings.dense_last_rows,
        top_p=getattr(settings, "top_p", 1.0),
        budget=budget,
        row_floor_k=floor_k if method == "adaptive" else 0,
        return_count=return_count,
    )
    if shared:
        # one list per GQA group, handed to each of its query heads
        out = tuple(t.repeat_interleave(G, dim=1) for t in out) if return_count else out.repeat_interleave(G, dim=1)
    return out


def _is_mixture(gate) -> bool:
    return getattr(gate, "q_summaries", 1) > 1 or getattr(gate, "k_summaries", 1) > 1


def _group_log_probs(scores: torch.Tensor, num_kv_heads: int, log_probs: bool) -> torch.Tensor:
    """Causal lower triangle of `[B, Hq, nb, nb]` logits (or block log-probabilities, `log_probs`) -> the
    log of each GQA group's mean block probability, `[B, Hkv, nb, nb]` (`-inf` above the diagonal):
    `seerattn_share_gqa_blocks` (see `seer_attention.group_block_scores`, the twin in probability space)."""
    from seer_attn.kernels.block_mask import causal_block_mask

    B, Hq, nb, _ = scores.shape
    s = scores.masked_fill(~causal_block_mask(nb, nb, scores.device), float("-inf"))
    if not log_probs:
        s = torch.log_softmax(s, dim=-1)
    return torch.logsumexp(s.view(B, num_kv_heads, Hq // num_kv_heads, nb, nb), dim=2) - math.log(Hq // num_kv_heads)


def select_index(gate, q, k, cos, sin, settings, kernel: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sparse branch's hook: `(index, count)` of :func:`gate_block_index` when the TopK kernel runs
    and the fused path applies (:func:`use_fused`), else None (the caller runs the twin)."""
    if kernel != "TopK" or not use_fused(gate, q, settings.sparsity_method):
        return None
    return gate_block_index(gate, q, k, cos, sin, settings, return_count=True)


def gate_block_index_twin(gate, q, k, cos, sin, settings) -> torch.Tensor:
    """The PyTorch twin of :func:`gate_block_index`: AttnGate scores, then top-k / threshold + keep rules.

    Returns int `[B, Hq, nb, W']` indices (top-k order, repeats and above-diagonal entries possible,
    as the TopK kernel accepts them); compare through `indices_to_mask`.
    """
    with torch.no_grad():
        qb, kb = gate.pool_inputs(q, k)
        method = settings.sparsity_method
        scores = gate.score(qb, kb, cos, sin, output="logits" if method == "nz_ratio" else "probs")
        G = q.shape[1] // k.shape[1]
        if getattr(settings, "share_gqa_blocks", False) and G > 1:
            from seer_attn.modules.seer_attention import group_block_scores

            grouped = group_block_scores(scores, k.shape[1], probs=method != "nz_ratio")
            return _twin_select(grouped, settings).repeat_interleave(G, dim=1)
        return _twin_select(scores, settings)


def _twin_select(scores: torch.Tensor, settings) -> torch.Tensor:
    # the twin's selection on scores of any head count (per query head, or per GQA group)
    method = settings.sparsity_method
    if method == "nz_ratio" and settings.dense_last_rows == 0:
        idx = topk_block_index(scores, nz_ratio_to_k(settings.nz_ratio, scores.shape[-1]))
        rows = torch.arange(scores.shape[-2], device=scores.device).expand(*scores.shape[:-1])[..., None]
        extra = ([torch.zeros_like(rows)] if settings.keep_sink else []) + ([rows] if settings.keep_diagonal else [])
        return torch.cat([idx, *extra], dim=-1)
    mask = select_blocks(
        scores,
        method=method,
        nz_ratio=settings.nz_ratio,
        threshold=settings.threshold,
        top_p=getattr(settings, "top_p", 1.0),
        adaptive_row_floor=getattr(settings, "adaptive_row_floor", 0.0),
        keep_sink=settings.keep_sink,
        keep_diagonal=settings.keep_diagonal,
        dense_last_rows=settings.dense_last_rows,
    )
    return mask_to_indices(mask)
