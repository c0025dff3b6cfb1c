"""Causal block-sparse attention driven by per-row lists of kept key blocks (forward only).

This is the inference kernel: the gate ranks key blocks, ``torch.topk`` returns their indices, and
each query block attends only to the key blocks listed for it. The structure follows the Triton
fused-attention tutorial: kept blocks strictly below the diagonal are full and need no mask, the
diagonal block (when kept) runs last with the causal and length masks.

``torch.topk`` output is messy (score order, entries above the diagonal for early rows, and callers
may pad with ``-1`` or repeat an index), so the host first turns every row into a compact ascending
list of unique off-diagonal blocks plus a "diagonal kept" bit. That costs a sort over ``[B, H, nb, K]``
ints (microseconds at the usual budgets) and buys the kernel a branch-free inner loop that walks
K/V in address order. Work is proportional to the number of kept blocks; a row with no kept block
gives output 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import check_attn_inputs, dot_precision, prune_configs

__all__ = ["block_sparse_attn_topk", "prepare_block_index"]


@triton.autotune(
    configs=prune_configs(
        [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (3, 2, 4)]
    ),
    key=["D", "BS"],
)
@triton.jit
def block_sparse_attn_topk_fwd_kernel(
    q,
    k,
    v,
    o,
    block_index,
    block_count,
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
    K_MAX,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # heaviest (last) query blocks first, so the tail of the grid is short
    i_m = (NB - 1 - tl.program_id(0)).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hkv = i_h // G

    o_m = i_m * BS + tl.arange(0, BS)
    o_n = tl.arange(0, BS)
    o_d = tl.arange(0, D)
    m_m = o_m < T

    p_q = q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qt + o_d[None, :] * stride_qd
    # [BS, D]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    k_base = k + i_b * stride_kb + i_hkv * stride_kh
    v_base = v + i_b * stride_vb + i_hkv * stride_vh

    p_idx = block_index + (i_bh * NB + i_m) * K_MAX
    # count packs (number of off-diagonal blocks) << 1 | (diagonal kept)
    b_cnt = tl.load(block_count + i_bh * NB + i_m)
    n_off = b_cnt >> 1
    has_diag = (b_cnt & 1) != 0

    b_m = tl.full([BS], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BS], dtype=tl.float32)
    b_acc = tl.zeros([BS, D], dtype=tl.float32)
    for i_t in range(0, n_off):
        i_n = tl.load(p_idx + i_t).to(tl.int64)
        o_k = i_n * BS + o_n
        # [D, BS]
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        # [BS, D]
        b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_m = b_mn
    if has_diag:
        o_k = i_m * BS + o_n
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


def prepare_block_index(block_index: torch.Tensor, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact `torch.topk`-style block lists for the kernel.

    Args:
        block_index (torch.Tensor): int `[B, H, nb, K]`, any order; negative entries, entries above
            the diagonal (index > row) and repeats are dropped.
        nb (int): number of query (= key) blocks.

    Returns:
        index (torch.Tensor): int32 `[B, H, nb, K]`; row `i` starts with its unique kept blocks
            `j < i` in ascending order, the rest is padding.
        count (torch.Tensor): int32 `[B, H, nb]`, `(number of those blocks) << 1 | (diagonal kept)`.
    """
    idx = block_index.to(torch.int32)
    rows = torch.arange(nb, device=idx.device, dtype=torch.int32)[:, None]
    has_diag = (idx == rows).any(-1)
    # off-diagonal candidates ascending, everything else pushed to the end as `nb`
    key = torch.where((idx >= 0) & (idx < rows), idx, nb).sort(-1).values
    keep = key < nb
    keep[..., 1:] &= key[..., 1:] != key[..., :-1]
    K = idx.shape[-1]
    # scatter each first occurrence to its rank; dropped entries land in a spare column K
    pos = torch.where(keep, keep.cumsum(-1, dtype=torch.int32) - 1, K).long()
    index = torch.zeros(*idx.shape[:-1], K + 1, dtype=torch.int32, device=idx.device)
    index.scatter_(-1, pos, key)
    count = (keep.sum(-1, dtype=torch.int32) << 1) | has_diag.to(torch.int32)
    return index[..., :K].contiguous(), count


def block_sparse_attn_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
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
        block_size (int): block edge in tokens. Default: `64`.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]` in `q.dtype`, same memory layout as `q`. Rows whose block
            keeps nothing are 0.
    """
    check_attn_inputs("block_sparse_attn_topk", q, k, v, block_size)
    B, Hq, S, D = q.shape
    nb = math.ceil(S / block_size)
    if not isinstance(block_index, torch.Tensor) or block_index.dtype.is_floating_point or block_index.dtype == torch.bool:
        raise TypeError(f"block_sparse_attn_topk: block_index must be an integer tensor, got {getattr(block_index, 'dtype', type(block_index))}")
    if block_index.dim() != 4 or tuple(block_index.shape[:3]) != (B, Hq, nb) or block_index.shape[3] == 0:
        raise ValueError(
            f"block_sparse_attn_topk: block_index must be [B, Hq, nb, K] = [{B}, {Hq}, {nb}, K>0] "
            f"for S={S}, block_size={block_size}; got {tuple(block_index.shape)}"
        )
    if block_index.device != q.device:
        raise ValueError(f"block_sparse_attn_topk: block_index on {block_index.device}, q on {q.device}")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    index, count = prepare_block_index(block_index, nb)
    o = torch.empty_like(q)
    block_sparse_attn_topk_fwd_kernel[(nb, B * Hq)](
        q,
        k,
        v,
        o,
        index,
        count,
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
        DOT_PREC=dot_precision(q.dtype),
    )
    return o
