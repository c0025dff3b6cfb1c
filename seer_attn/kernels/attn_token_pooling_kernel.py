"""Exact attention that also returns, per query token, its attention pooled over each key block (forward only).

This is the decode gate's target (`attn_with_token_pooling_naive` defines it): for query token `r`
and key block `j`, the maximum (or the sum) of the softmax probabilities `P[r, c]`, `c` in block
`j`, reduced over the `G` query heads of a KV head (max, or mean for the sum), each row normalised to
sum to 1. The output is `[B, Hkv, S, nb]`; `P` is never materialised.

It is `attn_with_pooling` with the query side left unpooled, and the same two passes:

1. the flash forward of :mod:`seer_attn.kernels.attn_pooling_kernel` writes `o` and the per-row
   log-sum-exp `lse` (log2 domain);
2. one program per (query block, batch, KV head) walks the causal key blocks; for each it recomputes
   `q k^T` of the `G` heads against the block (the key tile is loaded once for the group) and reduces
   `exp2(s - lse)` over the block's keys and the group into one column of its rows. For the max map
   `max exp2(s - lse) = exp2(max(s - lse))`: one `exp2` per row and block.

Each program owns its rows, so there are no atomics; the row normalisation is one division on the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import check_attn_inputs, dot_precision, prune_configs
from seer_attn.kernels.attn_pooling_kernel import attn_forward_lse

__all__ = ["attn_with_token_pooling"]


@triton.autotune(
    configs=prune_configs([triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)]),
    key=["D", "BS", "G", "MASS"],
)
@triton.jit
def attn_token_pooling_fwd_kernel_pool(
    q,
    k,
    lse,
    pooled,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    qk_scale,
    T,
    NB,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    MASS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # heaviest (last) query blocks first
    i_m = (NB - 1 - tl.program_id(0)).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_hkv = i_bh // HKV, i_bh % HKV

    o_m = i_m * BS + tl.arange(0, BS)
    o_n = tl.arange(0, BS)
    o_d = tl.arange(0, D)
    m_m = o_m < T

    q_base = q + i_b * stride_qb + (i_hkv * G) * stride_qh + o_m[:, None] * stride_qt + o_d[None, :] * stride_qd
    # lse is [B, Hq, T]; padding rows get +inf, so their probabilities are exactly 0
    lse_base = lse + (i_bh * G) * T + o_m
    k_base = k + i_b * stride_kb + i_hkv * stride_kh
    # pooled is [B, Hkv, T, NB]
    p_out = pooled + (i_bh * T + o_m) * NB

    for i_n in range(0, i_m + 1):
        o_k = i_n * BS + o_n
        m_k = o_k < T
        # [D, BS], shared by the G heads
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd, mask=m_k[None, :], other=0.0)
        # only the diagonal block needs the causal part; a where per tile is cheap next to the dots
        m_s = (o_m[:, None] >= o_k[None, :]) & m_k[None, :]
        if MASS:
            b_acc = tl.zeros([BS], dtype=tl.float32)
        else:
            b_acc = tl.full([BS], float("-inf"), dtype=tl.float32)
        for g in tl.static_range(G):
            b_q = tl.load(q_base + g * stride_qh, mask=m_m[:, None], other=0.0)
            b_lse = tl.load(lse_base + g * T, mask=m_m, other=float("inf"))
            # [BS, BS] log2-probabilities
            b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale - b_lse[:, None]
            b_s = tl.where(m_s, b_s, float("-inf"))
            if MASS:
                b_acc += tl.sum(tl.exp2(b_s), 1)
            else:
                b_acc = tl.maximum(b_acc, tl.max(b_s, 1))
        if MASS:
            b_val = b_acc / G
        else:
            b_val = tl.exp2(b_acc)
        tl.store(p_out + i_n, b_val, mask=m_m)
    # blocks after the rows' own block: zero, one [BS, BS] tile at a time
    for i_z in range(i_m + 1, NB, BS):
        o_z = i_z + o_n
        tl.store(p_out[:, None] + o_z[None, :], tl.zeros([BS, BS], dtype=tl.float32), mask=m_m[:, None] & (o_z[None, :] < NB))


def attn_with_token_pooling(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    pooling: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention plus each token's row-normalised attention per key block, reduced over its GQA group.

    Args:
        q (torch.Tensor): `[B, Hq, S, D]`, float16/bfloat16 (float32 accepted for tests); may be a
            strided view.
        k, v (torch.Tensor): `[B, Hkv, S, D]`; `Hkv` divides `Hq`. `D` in {64, 128}.
        sm_scale (float, Optional): logit scale. Default: `1 / sqrt(D)`.
        block_size (int): key block length, one of 16, 32, 64, 128. Default: `64`.
        pooling (str): `"max"`: the token's largest probability in the block, max over the group
            (upstream's decode target); `"mass"`: its summed probability in the block, mean over the
            group. Default: `"max"`.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]` in `q.dtype`, same memory layout as `q`.
        pooled (torch.Tensor): `[B, Hkv, S, nb]` float32, `nb = ceil(S / block_size)`; each row sums
            to 1 and is exactly 0 after the token's own block.
    """
    check_attn_inputs("attn_with_token_pooling", q, k, v, block_size)
    if pooling not in ("max", "mass"):
        raise ValueError(f"attn_with_token_pooling: pooling must be 'max' or 'mass', got {pooling!r}")
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    nb = math.ceil(S / block_size)
    qk_scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)) * 1.4426950408889634
    prec = dot_precision(q.dtype)

    o, lse = attn_forward_lse(q, k, v, True, sm_scale)
    pooled = torch.empty(B, Hkv, S, nb, dtype=torch.float32, device=q.device)
    attn_token_pooling_fwd_kernel_pool[(nb, B * Hkv)](
        q, k, lse, pooled, *q.stride(), *k.stride(), qk_scale, S, nb,
        HKV=Hkv, G=G, D=D, BS=block_size, MASS=pooling == "mass", DOT_PREC=prec,
    )
    pooled /= pooled.sum(-1, keepdim=True)
    return o, pooled
