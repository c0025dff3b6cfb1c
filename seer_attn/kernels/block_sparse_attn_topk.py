"""Causal block-sparse attention driven by per-row lists of kept key blocks (forward only).

This is the inference kernel: the gate ranks key blocks, ``torch.topk`` returns their indices, and
each query block attends only to the key blocks listed for it. The structure follows the Triton
fused-attention tutorial: kept blocks strictly below the diagonal are full and need no mask, the
diagonal block (when kept) runs last with the causal and length masks.

``torch.topk`` output is messy (score order, entries above the diagonal for early rows, and callers
may pad with ``-1`` or repeat an index). The host only sorts every row (one small launch: host-side
preprocessing was measured to dominate at short lengths); each program reads its sorted row once,
finds the range of kept blocks below the diagonal and whether the diagonal is listed, and walks
K/V in address order. A repeated block (adjacent after the sort) gets a ``-inf`` logit bias, so it
counts once. For D=64 two kept blocks are processed per step (one ``[BS, 2 * BS]`` score tile). Work is
proportional to the number of kept blocks; a row with no kept block gives output 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import check_attn_inputs, dot_precision, prune_configs

__all__ = ["block_sparse_attn_topk"]

# kept key blocks per inner step, by head_dim: 2 gives one [BS, 2 * BS] score tile instead of two
# [BS, BS]; on an H100 at 32k that was 5% faster for D=64 and 20% slower for D=128 (register pressure)
BLOCKS_PER_STEP = {64: 2, 128: 1}


@triton.autotune(
    configs=prune_configs([triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (3, 2, 4)]),
    key=["D", "BS", "NJ"],
)
@triton.jit
def block_sparse_attn_topk_fwd_kernel(
    q,
    k,
    v,
    o,
    block_index,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    qk_scale,
    T,
    NB,
    K,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BK: tl.constexpr,
    NJ: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # heaviest (last) query blocks first, so the tail of the grid is short
    i_m = (NB - 1 - tl.program_id(0)).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hkv = i_h // G

    o_m = i_m * BS + tl.arange(0, BS)
    o_d = tl.arange(0, D)
    m_m = o_m < T

    p_q = q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qt + o_d[None, :] * stride_qd
    # [BS, D]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    k_base = k + i_b * stride_kb + i_hkv * stride_kh
    v_base = v + i_b * stride_vb + i_hkv * stride_vh

    # the sorted row reads [negatives | kept j < i_m | i_m (diagonal) | above the diagonal]
    p_idx = block_index + (i_bh * NB + i_m) * K
    o_t = tl.arange(0, BK)
    b_row = tl.load(p_idx + o_t, mask=o_t < K, other=NB).to(tl.int64)
    t_lo = tl.sum((b_row < 0).to(tl.int32))
    t_hi = t_lo + tl.sum(((b_row >= 0) & (b_row < i_m)).to(tl.int32))
    has_diag = tl.sum((b_row == i_m).to(tl.int32)) > 0

    b_m = tl.full([BS], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BS], dtype=tl.float32)
    b_acc = tl.zeros([BS, D], dtype=tl.float32)
    # keys of one step: NJ * BS, gathered from NJ kept blocks
    o_j = tl.arange(0, NJ * BS)
    i_prev = tl.full([], -1, dtype=tl.int64)
    for i_t in range(t_lo, t_hi, NJ):
        i_n = tl.load(p_idx + i_t).to(tl.int64)
        if NJ == 2:
            # an odd tail re-reads block i_n; it is masked out like a repeat
            i_n2 = tl.load(p_idx + i_t + 1, mask=i_t + 1 < t_hi, other=-1).to(tl.int64)
            i_n2 = tl.where(i_n2 < 0, i_n, i_n2)
            o_k = tl.where(o_j < BS, i_n * BS + o_j, i_n2 * BS + o_j - BS)
            b_bias = tl.where(
                o_j < BS,
                tl.where(i_n == i_prev, float("-inf"), 0.0),
                tl.where(i_n2 == i_n, float("-inf"), 0.0),
            )
            i_prev = i_n2
        else:
            o_k = i_n * BS + o_j
            b_bias = tl.where((o_j < BS) & (i_n == i_prev), float("-inf"), 0.0)
            i_prev = i_n
        # [D, NJ * BS]
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale + b_bias[None, :]
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        # [NJ * BS, D]
        b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_m = b_mn
    if has_diag:
        o_k = i_m * BS + tl.arange(0, BS)
        m_k = o_k < T
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd, mask=m_k[None, :], other=0.0)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale
        b_s = tl.where((o_m[:, None] >= o_k[None, :]) & m_k[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd, mask=m_k[:, None], other=0.0)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_m = b_mn
    # a row with no kept block has b_l == 0 and b_acc == 0: its output is 0
    b_l = tl.where(b_l == 0.0, 1.0, b_l)
    b_o = b_acc / b_l[:, None]
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_ot + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])


def block_sparse_attn_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    sorted_index: bool = False,
) -> torch.Tensor:
    """Causal block-sparse attention over the key blocks listed per query block (forward only).

    Args:
        q (torch.Tensor): `[B, Hq, S, D]`, float16/bfloat16 (float32 accepted for tests); may be a
            strided view (e.g. `[B, S, H, D].transpose(1, 2)`), no copy is made.
        k, v (torch.Tensor): `[B, Hkv, S, D]`; `Hkv` divides `Hq` and query head `h` reads KV head
            `h // (Hq // Hkv)`. `D` in {64, 128}.
        block_index (torch.Tensor): int `[B, Hq, nb, K]` with `nb = ceil(S / block_size)`, e.g. the
            indices of `torch.topk` over the gate scores. Order and repeats do not matter; negative
            entries and entries above the diagonal (index > row) are ignored. The diagonal block is
            attended (with the causal mask) only if it is listed.
        sm_scale (float, Optional): logit scale. Default: `1 / sqrt(D)`.
        block_size (int): block edge in tokens, one of 16, 32, 64, 128. Default: `64`.
        sorted_index (bool): rows of `block_index` are already ascending (as `gate_select` writes
            them): skip the sort. Default: `False`.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]` in `q.dtype`, same memory layout as `q`. Rows whose block
            keeps nothing are 0.
    """
    check_attn_inputs("block_sparse_attn_topk", q, k, v, block_size)
    B, Hq, S, D = q.shape
    nb = math.ceil(S / block_size)
    if not isinstance(block_index, torch.Tensor) or block_index.dtype.is_floating_point or block_index.dtype == torch.bool:
        got = getattr(block_index, "dtype", type(block_index))
        raise TypeError(f"block_sparse_attn_topk: block_index must be an integer tensor, got {got}")
    if block_index.dim() != 4 or tuple(block_index.shape[:3]) != (B, Hq, nb) or block_index.shape[3] == 0:
        raise ValueError(
            f"block_sparse_attn_topk: block_index must be [B, Hq, nb, K] = [{B}, {Hq}, {nb}, K>0] "
            f"for S={S}, block_size={block_size}; got {tuple(block_index.shape)}"
        )
    if block_index.device != q.device:
        raise ValueError(f"block_sparse_attn_topk: block_index on {block_index.device}, q on {q.device}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    # ascending rows let the kernel find its valid range and see repeats side by side
    index = block_index.contiguous() if sorted_index else block_index.sort(dim=-1).values.contiguous()
    o = torch.empty_like(q)
    block_sparse_attn_topk_fwd_kernel[(nb, B * Hq)](
        q,
        k,
        v,
        o,
        index,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        scale * 1.4426950408889634,
        S,
        nb,
        index.shape[-1],
        HQ=Hq,
        G=Hq // k.shape[1],
        D=D,
        BS=block_size,
        BK=triton.next_power_of_2(index.shape[-1]),
        NJ=BLOCKS_PER_STEP[D],
        DOT_PREC=dot_precision(q.dtype),
    )
    return o
