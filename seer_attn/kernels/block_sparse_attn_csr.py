"""Block-sparse causal FlashAttention, forward and backward, driven by CSR/CSC block lists.

Why this kernel exists: fine-tuning a SeerAttention model needs gradients through the sparse
attention, and dense attention with a mask wastes the FLOPs the gates saved. Every kept
`(query block, key block)` pair costs one tile product; a dropped one costs nothing.

How it works (FlashAttention-2, written from the Triton fused-attention tutorial's structure):

- forward: one program per `(query block, sequence, query head)` walks the row's CSR list of kept
  key blocks. Off-diagonal blocks are full and unmasked; the diagonal block (the last entry of a
  lower-triangular row) gets the causal mask. The row's base-2 logsumexp is stored for backward.
- backward: `delta = rowsum(dO * O)`; one program per `(key tile, sequence, KV head)` walks one list
  of the kept `(query head, query block)` pairs of the `G = Hq / Hkv` query heads that share the KV
  head, so dK/dV are accumulated in registers with no atomics and K/V are never repeated in memory. dQ comes
  either from the same loop, added with fp32 atomics into a buffer (`"atomic"`: 5 tile products per
  kept block, FA2's count), or from a second pass, one program per query block walking its CSR list
  again (`"separate"`: 7 products, deterministic). A key tile is one gate block (64 keys) or two
  (`KEY_BLOCKS=2`, 128 keys: the union of both blocks' CSC lists, with a per-entry flag saying
  which half keeps the query block; the other half is masked). Which is faster depends on the GPU
  and the mask: `benchmarks/sweep_csr.py` times them, `_CONFIGS` holds the choice.

Varlen: packed sequences as in flash-attn's varlen API (`q [total, Hq, D]`, `cu_seqlens`); each
sequence has its own block grid starting at its first token, and its own `[nb, nb]` block map, see
:func:`block_sparse_attn_csr`.

Compared with upstream SeerAttention's CSR kernel: any batch, GQA without `repeat_kv`, any length
(the last partial block is masked on load), non-contiguous `[B, S, H, D].transpose(1, 2)` views
(strides are passed), packed sequences, and a row that keeps no block gives output 0 and zero
gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from seer_attn.kernels._triton import check_attn_inputs, is_interpreter, use_tma
from seer_attn.kernels.block_mask import causal_block_mask

__all__ = ["block_sparse_attn_csr", "block_sparse_csr_lists", "varlen_block_counts"]

_LOG2E = 1.4426950408889634

# Launch parameters per kernel and head_dim (edit here to switch defaults; benchmarks/sweep_csr.py
# times the alternatives). BLOCK_N / BLOCK_M are sub-tiles of the 64-token gate block.
# - "dq" MODE: "atomic" (dK/dV kernel also adds dQ with fp32 atomics) or "separate" (a dQ pass).
# - "dkdv" KEY_BLOCKS: gate blocks per dK/dV program (1: 64 keys, 2: 128 keys).
# Backward choice (H100, benchmarks/RESULTS.md "Session 7"): the kernel sweep (benchmarks/sweep_csr.py, random
# masks) prefers a separate dQ pass with 4-warp dK/dV at both head dims, but the model's fine-tuning step
# (bench_prefill.py --train --csr-bwd-variants, A/B/A/B in one process, SmolLM2 and 4 Llama-8B layers at 32k)
# agrees only at D=128 (1,231 vs 1,357 ms at d 0.5, 1,055 vs 1,081 at d 0.1); at D=64 the atomic pass is as
# fast or faster (d 0.1: 819 vs 871 ms), so each head dim keeps what its model step preferred.
_CONFIGS = {
    "fwd": {64: dict(BLOCK_N=64, num_warps=4, num_stages=4), 128: dict(BLOCK_N=64, num_warps=4, num_stages=2)},
    "dq": {
        64: dict(MODE="atomic", BLOCK_N=64, num_warps=4, num_stages=3),
        128: dict(MODE="separate", BLOCK_N=64, num_warps=4, num_stages=2),
    },
    "dkdv": {
        64: dict(KEY_BLOCKS=1, BLOCK_M=64, num_warps=4, num_stages=2),
        128: dict(KEY_BLOCKS=1, BLOCK_M=64, num_warps=4, num_stages=2),
    },
}


@triton.jit
def _seq_bounds(cu_seqlens, i_b, S, VARLEN: tl.constexpr):
    # (first token, length) of sequence i_b: packed sequences read cu_seqlens, a batch has S each
    if VARLEN:
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        seqlen = (tl.load(cu_seqlens + i_b + 1) - bos).to(tl.int32)
    else:
        bos = tl.zeros([], dtype=tl.int64)
        seqlen = S
    return bos, seqlen


@triton.jit
def _fwd_step(
    b_q, acc, m_i, l_i, p_kv_k, p_kv_v, desc_k, desc_v, t_b, t_h, t_0, stride_ks, stride_vs, i_m, j,
    qk_scale, S,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DIAG: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    # TMA: K/V tiles through the descriptors at (batch coordinate t_b, KV head t_h, token t_0 + offset);
    # keys past the sequence read 0 or the next packed sequence's, masked below like the plain path's zeros
    o_m = i_m * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    for n0 in tl.static_range(0, BLOCK, BLOCK_N):
        # int64: j * BLOCK * stride overflows int32 at long contexts
        o_n = j.to(tl.int64) * BLOCK + n0 + tl.arange(0, BLOCK_N)
        if TMA:
            tok = (t_0 + j.to(tl.int64) * BLOCK + n0).to(tl.int32)
            b_k = desc_k.load([t_b, t_h, tok, 0]).reshape(BLOCK_N, D)
            b_v = desc_v.load([t_b, t_h, tok, 0]).reshape(BLOCK_N, D)
        elif DIAG:
            m_n = o_n < S
            b_k = tl.load(p_kv_k + o_n[:, None] * stride_ks + o_d[None, :], mask=m_n[:, None], other=0.0)
            b_v = tl.load(p_kv_v + o_n[:, None] * stride_vs + o_d[None, :], mask=m_n[:, None], other=0.0)
        else:
            b_k = tl.load(p_kv_k + o_n[:, None] * stride_ks + o_d[None, :])
            b_v = tl.load(p_kv_v + o_n[:, None] * stride_vs + o_d[None, :])
        # [BLOCK, BLOCK_N]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        if DIAG:
            b_s = tl.where(o_m[:, None] >= o_n[None, :], b_s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(b_p, 1)
        acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["S"])
def block_sparse_attn_csr_fwd_kernel(
    q, k, v, o, lse, crow, col, cu_seqlens, desc_k, desc_v,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    S, HQ, G, NB, MAX_NNZ, qk_scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    # longest rows (largest query block index) are launched first
    i_m = NB - 1 - tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // G
    bos, S = _seq_bounds(cu_seqlens, i_b, S, VARLEN)
    if i_m * BLOCK >= S:
        # past the end of a shorter packed sequence
        return

    o_m = i_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_m = o_m < S
    p_q = q + i_b * stride_qb + i_h * stride_qh + (bos + o_m[:, None]) * stride_qs + o_d[None, :]
    # [BLOCK, D]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    p_k = k + i_b * stride_kb + i_hk * stride_kh + bos * stride_ks
    p_v = v + i_b * stride_vb + i_hk * stride_vh + bos * stride_vs
    # descriptor coordinates: packed sequences share one [1, H, total, D] tensor
    t_b, t_h = (0 * i_b if VARLEN else i_b).to(tl.int32), i_hk.to(tl.int32)

    p_crow = crow + i_bh * (NB + 1) + i_m
    p_col = col + i_bh * MAX_NNZ
    start = tl.load(p_crow)
    end = tl.load(p_crow + 1)
    # the mask is lower-triangular and columns ascend: a kept diagonal block is the last entry
    last = tl.load(p_col + end - 1, mask=end > start, other=-1)
    has_diag = last == i_m
    end_off = end - has_diag.to(tl.int32)

    acc = tl.zeros([BLOCK, D], dtype=tl.float32)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    for idx in range(start, end_off):
        j = tl.load(p_col + idx)
        acc, m_i, l_i = _fwd_step(b_q, acc, m_i, l_i, p_k, p_v, desc_k, desc_v, t_b, t_h, bos, stride_ks, stride_vs,
                                  i_m, j, qk_scale, S, BLOCK, BLOCK_N, D, False, PRECISION, TMA)
    if has_diag:
        acc, m_i, l_i = _fwd_step(b_q, acc, m_i, l_i, p_k, p_v, desc_k, desc_v, t_b, t_h, bos, stride_ks, stride_vs,
                                  i_m, i_m, qk_scale, S, BLOCK, BLOCK_N, D, True, PRECISION, TMA)

    # a row that keeps no block: output 0, logsumexp +inf (backward then sees probability 0)
    empty = l_i == 0.0
    b_o = acc / tl.where(empty, 1.0, l_i)[:, None]
    b_lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    p_o = o + i_b * stride_ob + i_h * stride_oh + (bos + o_m[:, None]) * stride_os + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])
    tl.store(lse + i_b * stride_lb + i_h * stride_lh + bos + o_m, b_lse, mask=m_m)


@triton.jit(do_not_specialize=["S"])
def block_sparse_attn_csr_bwd_kernel_preprocess(
    o, do, delta, cu_seqlens,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    stride_lb, stride_lh,
    S, HQ,
    BLOCK: tl.constexpr, D: tl.constexpr, VARLEN: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    bos, S = _seq_bounds(cu_seqlens, i_b, S, VARLEN)
    if i_m * BLOCK >= S:
        return
    o_m = i_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_m = o_m < S
    b_o = tl.load(o + i_b * stride_ob + i_h * stride_oh + (bos + o_m[:, None]) * stride_os + o_d[None, :],
                  mask=m_m[:, None], other=0.0).to(tl.float32)
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + (bos + o_m[:, None]) * stride_dos + o_d[None, :],
                   mask=m_m[:, None], other=0.0).to(tl.float32)
    tl.store(delta + i_b * stride_lb + i_h * stride_lh + bos + o_m, tl.sum(b_o * b_do, 1), mask=m_m)


@triton.jit
def _dq_step(
    b_q, b_do, b_lse, b_delta, b_dq, p_kv_k, p_kv_v, desc_k, desc_v, t_b, t_h, t_0, stride_ks, stride_vs, i_m, j,
    qk_scale, S,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DIAG: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    o_m = i_m * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    for n0 in tl.static_range(0, BLOCK, BLOCK_N):
        o_n = j.to(tl.int64) * BLOCK + n0 + tl.arange(0, BLOCK_N)
        if TMA:
            # (keys past the sequence: masked by the causal test below, as the plain path's zeros are)
            tok = (t_0 + j.to(tl.int64) * BLOCK + n0).to(tl.int32)
            b_k = desc_k.load([t_b, t_h, tok, 0]).reshape(BLOCK_N, D)
            b_v = desc_v.load([t_b, t_h, tok, 0]).reshape(BLOCK_N, D)
        elif DIAG:
            m_n = o_n < S
            b_k = tl.load(p_kv_k + o_n[:, None] * stride_ks + o_d[None, :], mask=m_n[:, None], other=0.0)
            b_v = tl.load(p_kv_v + o_n[:, None] * stride_vs + o_d[None, :], mask=m_n[:, None], other=0.0)
        else:
            b_k = tl.load(p_kv_k + o_n[:, None] * stride_ks + o_d[None, :])
            b_v = tl.load(p_kv_v + o_n[:, None] * stride_vs + o_d[None, :])
        # [BLOCK, BLOCK_N]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION) * qk_scale
        b_p = tl.exp2(b_s - b_lse[:, None])
        if DIAG:
            b_p = tl.where(o_m[:, None] >= o_n[None, :], b_p, 0.0)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PRECISION)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=PRECISION)
    return b_dq


@triton.jit(do_not_specialize=["S"])
def block_sparse_attn_csr_bwd_kernel_dq(
    q, k, v, do, dq, lse, delta, crow, col, cu_seqlens, desc_k, desc_v,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh,
    S, HQ, G, NB, MAX_NNZ, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, VARLEN: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    i_m = NB - 1 - tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // G
    bos, S = _seq_bounds(cu_seqlens, i_b, S, VARLEN)
    if i_m * BLOCK >= S:
        return

    o_m = i_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_m = o_m < S
    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + (bos + o_m[:, None]) * stride_qs + o_d[None, :],
                  mask=m_m[:, None], other=0.0)
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + (bos + o_m[:, None]) * stride_dos + o_d[None, :],
                   mask=m_m[:, None], other=0.0)
    # padded rows: lse = +inf makes their probabilities 0
    p_stat = i_b * stride_lb + i_h * stride_lh + bos + o_m
    b_lse = tl.load(lse + p_stat, mask=m_m, other=float("inf"))
    b_delta = tl.load(delta + p_stat, mask=m_m, other=0.0)
    p_k = k + i_b * stride_kb + i_hk * stride_kh + bos * stride_ks
    p_v = v + i_b * stride_vb + i_hk * stride_vh + bos * stride_vs
    t_b, t_h = (0 * i_b if VARLEN else i_b).to(tl.int32), i_hk.to(tl.int32)

    p_crow = crow + i_bh * (NB + 1) + i_m
    p_col = col + i_bh * MAX_NNZ
    start = tl.load(p_crow)
    end = tl.load(p_crow + 1)
    last = tl.load(p_col + end - 1, mask=end > start, other=-1)
    has_diag = last == i_m
    end_off = end - has_diag.to(tl.int32)

    b_dq = tl.zeros([BLOCK, D], dtype=tl.float32)
    for idx in range(start, end_off):
        j = tl.load(p_col + idx)
        b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, desc_k, desc_v, t_b, t_h, bos, stride_ks, stride_vs,
                        i_m, j, qk_scale, S, BLOCK, BLOCK_N, D, False, PRECISION, TMA)
    if has_diag:
        b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, desc_k, desc_v, t_b, t_h, bos, stride_ks, stride_vs,
                        i_m, i_m, qk_scale, S, BLOCK, BLOCK_N, D, True, PRECISION, TMA)
    p_dq = dq + i_b * stride_dqb + i_h * stride_dqh + (bos + o_m[:, None]) * stride_dqs + o_d[None, :]
    tl.store(p_dq, (b_dq * sm_scale).to(dq.dtype.element_ty), mask=m_m[:, None])


@triton.jit
def _dkdv_step(
    b_k, b_v, b_dk, b_dv, p_bh_q, p_bh_do, p_bh_dq, p_bh_lse, p_bh_delta, stride_qs, stride_dos, stride_dqs,
    desc_q, desc_do, t_b, t_h, t_0,
    i, flag, o_n, qk_scale, sm_scale, S,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, KB: tl.constexpr, D: tl.constexpr, MASKED: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    # TMA: Q and dO tiles through the descriptors at (batch coordinate t_b, query head t_h, token t_0 +
    # offset); rows past the sequence get lse = +inf below, so they contribute exactly 0
    # one kept query block i against the program's KB * BLOCK keys `o_n`. MASKED: the causal mask
    # and, with KB == 2, the key half that does not keep block i (`flag` bit 1: first half, bit 2:
    # second)
    o_d = tl.arange(0, D)
    for m0 in tl.static_range(0, BLOCK, BLOCK_M):
        o_m = i.to(tl.int64) * BLOCK + m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < S
        if TMA:
            tok = (t_0 + i.to(tl.int64) * BLOCK + m0).to(tl.int32)
            b_qt = tl.trans(desc_q.load([t_b, t_h, tok, 0]).reshape(BLOCK_M, D))
            b_do = desc_do.load([t_b, t_h, tok, 0]).reshape(BLOCK_M, D)
        else:
            # [D, BLOCK_M]
            b_qt = tl.load(p_bh_q + o_m[None, :] * stride_qs + o_d[:, None], mask=m_m[None, :], other=0.0)
            # [BLOCK_M, D]
            b_do = tl.load(p_bh_do + o_m[:, None] * stride_dos + o_d[None, :], mask=m_m[:, None], other=0.0)
        b_lse = tl.load(p_bh_lse + o_m, mask=m_m, other=float("inf"))
        b_delta = tl.load(p_bh_delta + o_m, mask=m_m, other=0.0)
        # [KB * BLOCK, BLOCK_M]: transposed scores, keys on rows
        b_st = tl.dot(b_k, b_qt, input_precision=PRECISION) * qk_scale
        b_pt = tl.exp2(b_st - b_lse[None, :])
        if MASKED:
            keep = o_m[None, :] >= o_n[:, None]
            if KB == 2:
                keep = keep & (((flag >> (tl.arange(0, KB * BLOCK) // BLOCK)) & 1) != 0)[:, None]
            b_pt = tl.where(keep, b_pt, 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
        b_dst = (b_pt * (b_dpt - b_delta[None, :])).to(b_qt.dtype)
        b_dk += tl.dot(b_dst, tl.trans(b_qt), input_precision=PRECISION)
        if DQ_ATOMIC:
            # [BLOCK_M, D]: this key tile's share of dQ, summed over tiles by fp32 atomics
            b_dq = tl.dot(tl.trans(b_dst), b_k, input_precision=PRECISION) * sm_scale
            tl.atomic_add(p_bh_dq + o_m[:, None] * stride_dqs + o_d[None, :], b_dq, mask=m_m[:, None], sem="relaxed")
    return b_dk, b_dv


@triton.jit
def _tile_flag(flags, offset, KB: tl.constexpr):
    # which of a 128-key tile's two blocks keep the query block (64-key tiles: the one block does)
    if KB == 2:
        return tl.load(flags + offset).to(tl.int32)
    else:
        return tl.full([], 1, dtype=tl.int32)


@triton.jit(do_not_specialize=["S"])
def block_sparse_attn_csr_bwd_kernel_dkdv(
    q, k, v, do, dk, dv, dq, lse, delta, ccol, row, flags, cu_seqlens, desc_q, desc_do,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh,
    S, HQ, HKV, G, NT, NBQ, MAX_NNZ, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, KB: tl.constexpr, D: tl.constexpr, VARLEN: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    # the first key tiles have the longest column lists: launched first
    i_c = tl.program_id(0)
    i_bhk = tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bhk // HKV, i_bhk % HKV
    bos, S = _seq_bounds(cu_seqlens, i_b, S, VARLEN)
    if i_c * KB * BLOCK >= S:
        return

    o_n = i_c.to(tl.int64) * KB * BLOCK + tl.arange(0, KB * BLOCK)
    o_d = tl.arange(0, D)
    m_n = o_n < S
    b_k = tl.load(k + i_b * stride_kb + i_hk * stride_kh + (bos + o_n[:, None]) * stride_ks + o_d[None, :],
                  mask=m_n[:, None], other=0.0)
    b_v = tl.load(v + i_b * stride_vb + i_hk * stride_vh + (bos + o_n[:, None]) * stride_vs + o_d[None, :],
                  mask=m_n[:, None], other=0.0)
    b_dk = tl.zeros([KB * BLOCK, D], dtype=tl.float32)
    b_dv = tl.zeros([KB * BLOCK, D], dtype=tl.float32)
    t_b = (0 * i_b if VARLEN else i_b).to(tl.int32)

    # one flat list per (key tile, KV head): entry e is query block e % NBQ of query head
    # i_hk * G + e // NBQ, so the G heads sharing the KV head run as one pipelined loop
    p_ccol = ccol + i_bhk * (NT + 1) + i_c
    start = tl.load(p_ccol)
    end = tl.load(p_ccol + 1)
    for idx in range(start, end):
        e = tl.load(row + i_bhk * MAX_NNZ + idx).to(tl.int32)
        i = e % NBQ
        i_h = i_hk * G + e // NBQ
        p_bh_q = q + i_b * stride_qb + i_h * stride_qh + bos * stride_qs
        p_bh_do = do + i_b * stride_dob + i_h * stride_doh + bos * stride_dos
        p_bh_dq = dq + i_b * stride_dqb + i_h * stride_dqh + bos * stride_dqs
        p_bh_lse = lse + i_b * stride_lb + i_h * stride_lh + bos
        p_bh_delta = delta + i_b * stride_lb + i_h * stride_lh + bos
        flag = _tile_flag(flags, i_bhk * MAX_NNZ + idx, KB)
        # the causal mask is applied on every step (it only bites where the tile meets the
        # diagonal): one loop pipelines better and needs fewer registers than a peeled one
        b_dk, b_dv = _dkdv_step(
            b_k, b_v, b_dk, b_dv, p_bh_q, p_bh_do, p_bh_dq, p_bh_lse, p_bh_delta, stride_qs, stride_dos,
            stride_dqs, desc_q, desc_do, t_b, i_h.to(tl.int32), bos,
            i, flag, o_n, qk_scale, sm_scale, S, BLOCK, BLOCK_M, KB, D, True, DQ_ATOMIC, PRECISION, TMA,
        )

    p_dk = dk + i_b * stride_dkb + i_hk * stride_dkh + (bos + o_n[:, None]) * stride_dks + o_d[None, :]
    p_dv = dv + i_b * stride_dvb + i_hk * stride_dvh + (bos + o_n[:, None]) * stride_dvs + o_d[None, :]
    tl.store(p_dk, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_n[:, None])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def _csr_lists_kernel(
    mask, ptr, idx, cu_seqlens,
    stride_mb, stride_mh, stride_mr,
    HQ, NB, W, BS,
    COUNT: tl.constexpr, VARLEN: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # row i of (sequence b, head h): its kept causal columns, ascending. COUNT: write how many into
    # ptr[.., i + 1] (a cumsum makes the pointers); else write them at idx[.., ptr[i]:]
    i = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    if VARLEN:
        nb = tl.cdiv(tl.load(cu_seqlens + i_b + 1) - tl.load(cu_seqlens + i_b), BS)
    else:
        nb = NB
    p_row = mask + i_b * stride_mb + i_h * stride_mh + i * stride_mr
    n = tl.zeros([], dtype=tl.int32)
    if not COUNT:
        off = tl.load(ptr + i_bh * (NB + 1) + i)
    # rows past a packed sequence's end keep nothing; columns stop at the diagonal
    hi = tl.where(i < nb, i + 1, 0)
    for c0 in range(0, hi, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        keep = tl.load(p_row + o_c, mask=o_c < hi, other=0) != 0
        if not COUNT:
            rank = tl.cumsum(keep.to(tl.int32), 0) - 1
            tl.store(idx + i_bh * W + off + n + rank, o_c.to(idx.dtype.element_ty), mask=keep)
        n += tl.sum(keep.to(tl.int32))
    if COUNT:
        tl.store(ptr + i_bh * (NB + 1) + i + 1, n)


@triton.jit
def _csc_lists_kernel(
    mask, ptr, idx, flags, cu_seqlens,
    stride_mb, stride_mh, stride_mr,
    HQ, HKV, G, NB, NT, W, BS,
    KB: tl.constexpr, COUNT: tl.constexpr, VARLEN: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # key tile c (KB key blocks) of (sequence b, KV head hk): the kept (query head g, query block i)
    # pairs as entries g * NB + i, head-major and ascending; with KB == 2 also flags (1: the tile's
    # first block is kept, 2: the second, 3: both). COUNT: only count them into ptr[.., c + 1]
    c = tl.program_id(0)
    i_bhk = tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bhk // HKV, i_bhk % HKV
    if VARLEN:
        nb = tl.cdiv(tl.load(cu_seqlens + i_b + 1) - tl.load(cu_seqlens + i_b), BS)
    else:
        nb = NB
    j0 = c * KB
    n = tl.zeros([], dtype=tl.int32)
    if not COUNT:
        off = tl.load(ptr + i_bhk * (NT + 1) + c)
    for g in range(0, G):
        p_head = mask + i_b * stride_mb + (i_hk * G + g) * stride_mh
        # causal: only query blocks at or below the tile's first key block can keep it
        for r0 in range(j0, nb, BLOCK_R):
            o_r = r0 + tl.arange(0, BLOCK_R)
            m_r = o_r < nb
            first = tl.load(p_head + o_r * stride_mr + j0, mask=m_r, other=0) != 0
            if KB == 2:
                # the second block is causal for rows past the first (and exists when such rows do)
                second = tl.load(p_head + o_r * stride_mr + j0 + 1, mask=m_r & (o_r > j0), other=0) != 0
                keep = first | second
            else:
                keep = first
            if not COUNT:
                rank = tl.cumsum(keep.to(tl.int32), 0) - 1
                p_out = i_bhk * W + off + n + rank
                tl.store(idx + p_out, (g * NB + o_r).to(idx.dtype.element_ty), mask=keep)
                if KB == 2:
                    tl.store(flags + p_out, (first.to(tl.int8) + 2 * second.to(tl.int8)), mask=keep)
            n += tl.sum(keep.to(tl.int32))
    if COUNT:
        tl.store(ptr + i_bhk * (NT + 1) + c + 1, n)


def _index_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= torch.iinfo(torch.int16).max else torch.int32


def build_csr_lists(block_mask: torch.Tensor, B: int, HQ: int, nb: int, cu_seqlens=None, block_size: int = 64):
    """CSR lists of the causal part of a bool `[B or 1, Hq or 1, nb, nb]` mask, in two kernel launches
    and a cumsum, with no host sync and no copy of the mask (broadcast dimensions are read with
    stride 0); rows past a packed sequence's end keep nothing. Same result as
    `_lists_from_mask(_causal_mask(...))`, its PyTorch twin."""
    m = block_mask.view(torch.uint8) if block_mask.dtype == torch.bool else block_mask
    strides = tuple(0 if m.shape[d] == 1 else m.stride(d) for d in (0, 1)) + (m.stride(2),)
    if m.stride(3) != 1:
        m = m.contiguous()
        strides = tuple(0 if m.shape[d] == 1 else m.stride(d) for d in (0, 1)) + (m.stride(2),)
    W = nb * (nb + 1) // 2 + 1
    ptr = torch.zeros(B, HQ, nb + 1, dtype=torch.int32, device=m.device)
    idx = torch.full((B, HQ, W), -1, dtype=_index_dtype(nb), device=m.device)
    varlen = cu_seqlens is not None
    cu = cu_seqlens if varlen else ptr
    block_c = min(1024, triton.next_power_of_2(nb))
    for count in (True, False):
        _csr_lists_kernel[(nb, B * HQ)](m, ptr, idx, cu, *strides, HQ, nb, W, block_size,
                                       COUNT=count, VARLEN=varlen, BLOCK_C=block_c)
        if count:
            ptr.cumsum_(-1)
    return ptr, idx


def build_csc_lists(block_mask: torch.Tensor, B: int, HQ: int, HKV: int, nb: int, key_blocks: int = 1,
                    cu_seqlens=None, block_size: int = 64):
    """The backward's lists (see :func:`block_sparse_csr_lists`) in two kernel launches and a cumsum;
    PyTorch twin: `_csc_lists(_causal_mask(...))`."""
    m = block_mask.view(torch.uint8) if block_mask.dtype == torch.bool else block_mask
    if m.stride(3) != 1:
        m = m.contiguous()
    strides = tuple(0 if m.shape[d] == 1 else m.stride(d) for d in (0, 1)) + (m.stride(2),)
    G = HQ // HKV
    NT = triton.cdiv(nb, key_blocks)
    W = G * (nb * (nb + 1) // 2) + 1
    ptr = torch.zeros(B, HKV, NT + 1, dtype=torch.int32, device=m.device)
    idx = torch.full((B, HKV, W), -1, dtype=_index_dtype(G * nb), device=m.device)
    flags = torch.zeros(B, HKV, W, dtype=torch.int8, device=m.device) if key_blocks == 2 else idx
    varlen = cu_seqlens is not None
    cu = cu_seqlens if varlen else ptr
    block_r = min(1024, triton.next_power_of_2(nb))
    for count in (True, False):
        _csc_lists_kernel[(NT, B * HKV)](m, ptr, idx, flags, cu, *strides, HQ, HKV, G, nb, NT, W, block_size,
                                        KB=key_blocks, COUNT=count, VARLEN=varlen, BLOCK_R=block_r)
        if count:
            ptr.cumsum_(-1)
    return (ptr, idx, flags) if key_blocks == 2 else (ptr, idx)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests) get full-precision dots instead of TF32
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_cfg(kernel: str, D: int, block_size: int, keys: tuple[str, ...]) -> tuple[dict, dict]:
    """(tile sizes, launch options) of a kernel from `_CONFIGS`; the interpreter gets no launch options."""
    cfg = dict(_CONFIGS[kernel][D])
    tiles = {name: cfg.pop(name) for name in keys if name in cfg}
    cfg.pop("MODE", None)
    if block_size > 64:
        # 128-row tiles keep bigger operands resident: fewer pipeline stages fit in shared memory
        # (3 stages ran out of it on an H200 for dK/dV at D=128)
        cfg["num_stages"] = 1 if kernel == "dkdv" else min(cfg["num_stages"], 2)
    return tiles, ({} if is_interpreter() else cfg)


def _stat_strides(B: int, HQ: int, S: int, varlen: bool) -> tuple[int, int]:
    # lse / delta are [B, Hq, S] fp32, or [Hq, total] for packed sequences
    return (0, S) if varlen else (HQ * S, S)


def block_sparse_attn_csr_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, csr: tuple[torch.Tensor, torch.Tensor], sm_scale: float,
    block_size: int, cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on `[B, H, S, D]` views (packed: `B` = 1 holding all tokens, with
    `cu_seqlens` and lists of `n_seq` rows). Returns `o` (layout of `q`) and the base-2 logsumexp fp32."""
    _, HQ, S, D = q.shape
    HKV = k.shape[1]
    crow, col = csr
    n_seq = crow.shape[0]
    NB = crow.shape[-1] - 1
    varlen = cu_seqlens is not None
    o = torch.empty_like(q)
    lse = torch.empty(HQ, S, dtype=torch.float32, device=q.device) if varlen else torch.empty(
        n_seq, HQ, S, dtype=torch.float32, device=q.device)
    tiles, cfg = _launch_cfg("fwd", D, block_size, ("BLOCK_N",))
    sb = (lambda t: 0) if varlen else (lambda t: t.stride(0))
    bn = min(tiles["BLOCK_N"], block_size)
    tma = CSR_TMA and use_tma(k, v)
    desc_k, desc_v = _descriptors((k, v), bn) if tma else (k, v)
    block_sparse_attn_csr_fwd_kernel[(NB, n_seq * HQ)](
        q, k, v, o, lse, crow, col, cu_seqlens if varlen else crow, desc_k, desc_v,
        sb(q), q.stride(1), q.stride(2),
        sb(k), k.stride(1), k.stride(2),
        sb(v), v.stride(1), v.stride(2),
        sb(o), o.stride(1), o.stride(2),
        *_stat_strides(n_seq, HQ, S, varlen),
        S, HQ, HQ // HKV, NB, col.shape[-1], sm_scale * _LOG2E,
        BLOCK=block_size, BLOCK_N=bn, D=D, VARLEN=varlen,
        PRECISION=_precision(q.dtype), TMA=tma, **cfg,
    )
    return o, lse


# K/V (forward, dQ) and Q/dO (dK/dV) tiles through Hopper tensor descriptors (TMA) where they apply
# (`use_tma`; the TopK forward went from FA2's rate to 400-460 TFLOP/s with them). False: plain loads.
CSR_TMA = True


def _descriptors(ts, rows: int) -> tuple:
    """Host tensor descriptors of `[B, H, S, D]` views loading `[rows, D]` tiles (packed: the `[1, H, total, D]` view)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[3]]) for t in ts)


def block_sparse_attn_csr_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    csr: tuple[torch.Tensor, torch.Tensor], csc: tuple, sm_scale: float, block_size: int,
    cu_seqlens: torch.Tensor | None = None, dq_mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels. `csc` is `(ptr, idx)` for 64-key tiles or `(ptr, idx, flags)`
    for 128-key tiles (see :func:`block_sparse_csr_lists`). Returns `dq, dk, dv` in the layouts of `q, k, v`."""
    _, HQ, S, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    varlen = cu_seqlens is not None
    if do.stride(-1) != 1:
        do = do.contiguous()
    crow, col = csr
    n_seq = crow.shape[0]
    NB = crow.shape[-1] - 1
    KB = 2 if len(csc) == 3 else 1
    ccol, row = csc[0], csc[1]
    flags = csc[2] if KB == 2 else ccol
    prec = _precision(q.dtype)
    qk_scale = sm_scale * _LOG2E
    cu = cu_seqlens if varlen else crow
    sb = (lambda t: 0) if varlen else (lambda t: t.stride(0))
    stat_strides = _stat_strides(n_seq, HQ, S, varlen)
    dq_mode = dq_mode or _CONFIGS["dq"][D]["MODE"]
    if dq_mode not in ("atomic", "separate"):
        raise ValueError(f"dq_mode must be 'atomic' or 'separate', got {dq_mode!r}")
    atomic = dq_mode == "atomic"

    delta = torch.empty_like(lse)
    block_sparse_attn_csr_bwd_kernel_preprocess[(NB, n_seq * HQ)](
        o, do, delta, cu,
        sb(o), o.stride(1), o.stride(2),
        sb(do), do.stride(1), do.stride(2),
        *stat_strides,
        S, HQ, BLOCK=block_size, D=D, VARLEN=varlen,
    )

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    dq = torch.empty_like(q)
    # fp32 accumulator for the atomic dQ adds (rows of every query head, zero to start)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if atomic else dq
    tiles, cfg = _launch_cfg("dkdv", D, block_size, ("BLOCK_M", "KEY_BLOCKS"))
    NT = ccol.shape[-1] - 1
    bm = min(tiles["BLOCK_M"], block_size)
    tma = CSR_TMA and use_tma(q, do)
    desc_q, desc_do = _descriptors((q, do), bm) if tma else (q, do)
    block_sparse_attn_csr_bwd_kernel_dkdv[(NT, n_seq * HKV)](
        q, k, v, do, dk, dv, dq_acc, lse, delta, ccol, row, flags, cu, desc_q, desc_do,
        sb(q), q.stride(1), q.stride(2),
        sb(k), k.stride(1), k.stride(2),
        sb(v), v.stride(1), v.stride(2),
        sb(do), do.stride(1), do.stride(2),
        sb(dk), dk.stride(1), dk.stride(2),
        sb(dv), dv.stride(1), dv.stride(2),
        sb(dq_acc), dq_acc.stride(1), dq_acc.stride(2),
        *stat_strides,
        S, HQ, HKV, G, NT, NB, row.shape[-1], qk_scale, sm_scale,
        BLOCK=block_size, BLOCK_M=bm, KB=KB, D=D, VARLEN=varlen,
        DQ_ATOMIC=atomic, PRECISION=prec, TMA=tma, **cfg,
    )
    if atomic:
        dq.copy_(dq_acc)
        return dq, dk, dv

    tiles, cfg = _launch_cfg("dq", D, block_size, ("BLOCK_N",))
    bn = min(tiles["BLOCK_N"], block_size)
    tma = CSR_TMA and use_tma(k, v)
    desc_k, desc_v = _descriptors((k, v), bn) if tma else (k, v)
    block_sparse_attn_csr_bwd_kernel_dq[(NB, n_seq * HQ)](
        q, k, v, do, dq, lse, delta, crow, col, cu, desc_k, desc_v,
        sb(q), q.stride(1), q.stride(2),
        sb(k), k.stride(1), k.stride(2),
        sb(v), v.stride(1), v.stride(2),
        sb(do), do.stride(1), do.stride(2),
        sb(dq), dq.stride(1), dq.stride(2),
        *stat_strides,
        S, HQ, G, NB, col.shape[-1], qk_scale, sm_scale,
        BLOCK=block_size, BLOCK_N=bn, D=D, VARLEN=varlen, PRECISION=prec, TMA=tma, **cfg,
    )
    return dq, dk, dv


class BlockSparseAttnCSRFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_mask, csr, csc, sm_scale, block_size, cu_seqlens):
        o, lse = block_sparse_attn_csr_fwd(q, k, v, csr, sm_scale, block_size, cu_seqlens)
        extra = () if cu_seqlens is None else (cu_seqlens,)
        ctx.save_for_backward(q, k, v, o, lse, block_mask, *csr, *(csc if csc is not None else ()), *extra)
        ctx.n_csc = 0 if csc is None else len(csc)
        ctx.varlen = cu_seqlens is not None
        ctx.sm_scale = sm_scale
        ctx.block_size = block_size
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_mask, crow, col, *rest = ctx.saved_tensors
        cu_seqlens = rest.pop() if ctx.varlen else None
        csc = tuple(rest[: ctx.n_csc])
        if not csc:
            # CSC is built only when a backward happens, so inference pays nothing for it
            B, HQ, nb = crow.shape[0], crow.shape[1], crow.shape[2] - 1
            key_blocks = _default_key_blocks(q.shape[-1], ctx.block_size)
            csc = build_csc_lists(block_mask, B, HQ, k.shape[1], nb, key_blocks, cu_seqlens, ctx.block_size)
        dq, dk, dv = block_sparse_attn_csr_bwd(
            q, k, v, o, lse, do, (crow, col), csc, ctx.sm_scale, ctx.block_size, cu_seqlens
        )
        return dq, dk, dv, None, None, None, None, None, None


def _default_key_blocks(D: int, block_size: int) -> int:
    # 128-key tiles are two 64-token blocks; a 128-token gate block is one tile already
    return _CONFIGS["dkdv"][D]["KEY_BLOCKS"] if block_size == 64 else 1


def _lists_from_mask(mask: torch.Tensor, values: torch.Tensor | None = None, width: int | None = None):
    """Bool `[B, H, R, C]` mask -> `(ptr [B, H, R + 1] int32, idx [B, H, W + 1] int16/int32)`: the
    PyTorch twin of the list-building kernels (:func:`build_csr_lists`, :func:`build_csc_lists`).

    The same lists as :func:`seer_attn.kernels.block_mask.mask_to_csr` (ascending, `-1` padded), built
    with a cumsum and a scatter instead of a sort, and sized `W` = `width`, by default `nb (nb + 1) / 2`
    (the most a triangle can keep), so that no device-to-host sync is needed: the whole call stays
    asynchronous. With `values` (int8 `[B, H, R, C]`), also returns the value of every listed entry,
    aligned with `idx`.
    """
    B, H, R, C = mask.shape
    if width is None:
        nb = max(R, C)
        width = nb * (nb + 1) // 2
    idx_dtype = torch.int16 if C <= torch.iinfo(torch.int16).max else torch.int32
    flat = mask.reshape(B * H, R * C)
    ptr = torch.zeros(B, H, R + 1, dtype=torch.int32, device=mask.device)
    ptr[..., 1:] = mask.sum(-1, dtype=torch.int32).cumsum(-1, dtype=torch.int32)
    # row-major rank of each kept entry within its head is its slot; dropped entries go to slot `width`
    slot = torch.where(flat, flat.cumsum(-1, dtype=torch.int32) - 1, width).long()
    idx = torch.full((B * H, width + 1), -1, dtype=idx_dtype, device=mask.device)
    cols = torch.arange(R * C, device=mask.device) % C
    idx.scatter_(1, slot, cols.to(idx_dtype).expand(B * H, -1))
    idx[:, width] = -1
    if values is None:
        return ptr, idx.view(B, H, width + 1)
    vals = torch.zeros((B * H, width + 1), dtype=values.dtype, device=mask.device)
    vals.scatter_(1, slot, values.reshape(B * H, R * C))
    return ptr, idx.view(B, H, width + 1), vals.view(B, H, width + 1)


def _csc_lists(mask: torch.Tensor, num_kv_heads: int, key_blocks: int = 1) -> tuple:
    """Backward lists of a causal `[B, Hq, nb, nb]` mask: for every (sequence, KV head, key tile), the
    kept `(query head, query block)` pairs of the `G = Hq / Hkv` query heads sharing the KV head, as
    entries `g * nb + i` (ascending: head-major). Returns `(ptr [B, Hkv, NT + 1], idx)`, `NT = nb`, or
    for tiles of two key blocks `(ptr, idx, flags)` with `NT = ceil(nb / 2)`, listing the pairs that
    keep either block and flags (int8: 1 = first block, 2 = second, 3 = both) saying which.
    """
    B, HQ, nb, _ = mask.shape
    G = HQ // num_kv_heads
    # [B, Hkv, key block, G * nb]: key-major, the group's query heads side by side
    mask_t = mask.transpose(-1, -2).reshape(B, num_kv_heads, G, nb, nb).transpose(2, 3).reshape(
        B, num_kv_heads, nb, G * nb)
    width = G * (nb * (nb + 1) // 2)
    if key_blocks == 1:
        return _lists_from_mask(mask_t, width=width)
    if nb % 2:
        mask_t = F.pad(mask_t, (0, 0, 0, 1))
    first, second = mask_t[..., 0::2, :], mask_t[..., 1::2, :]
    flags = first.to(torch.int8) + 2 * second.to(torch.int8)
    return _lists_from_mask(first | second, flags, width=width)


def varlen_block_counts(cu_seqlens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks of every packed sequence, `ceil(len / block_size)`, int64 `[n_seq]` (on the device, no sync)."""
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return (lens + block_size - 1) // block_size


def _causal_mask(block_mask: torch.Tensor, B: int, HQ: int, nb: int, nb_seq: torch.Tensor | None = None) -> torch.Tensor:
    mask = block_mask.expand(B, HQ, nb, nb) & causal_block_mask(nb, nb, block_mask.device)
    if nb_seq is not None:
        # rows past a packed sequence's last block do not exist: keep them out of the CSC lists
        rows = torch.arange(nb, device=mask.device)
        mask = mask & (rows[None, :] < nb_seq[:, None])[:, None, :, None]
    return mask


def block_sparse_csr_lists(
    block_mask: torch.Tensor, B: int, HQ: int, num_kv_heads: int | None = None, key_blocks: int = 1,
    cu_seqlens: torch.Tensor | None = None, block_size: int = 64,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple]:
    """Build the CSR (rows -> kept key blocks) and CSC (key blocks -> query blocks) lists once.

    Pass the result as `csr=` / `csc=` to :func:`block_sparse_attn_csr` to reuse it across calls (for
    example across layers that share a mask). Blocks above the diagonal are dropped.

    Args:
        block_mask (torch.Tensor): bool `[B, Hq, nb, nb]`, broadcastable over B and H.
        B (int), HQ (int): batch size (packed: number of sequences) and query heads to expand to.
        num_kv_heads (int, Optional): KV heads of the attention these lists are for (the backward
            lists group the query heads that share one). Default: `HQ`.
        key_blocks (int): 1, or 2 for the backward's 128-key tiles (block pairs). Default: `1`.
        cu_seqlens (torch.Tensor, Optional): packed sequences (see :func:`block_sparse_attn_csr`):
            rows past each sequence's last block are dropped. Needs `block_size`.

    Built by Triton kernels (CUDA tensors, or CPU under `TRITON_INTERPRET=1`), without a host sync.

    Returns:
        csr: `(crow [B, Hq, nb + 1] int32, col [B, Hq, W])`, `col` int16 (int32 when nb > 32767),
            ascending within a row, `-1` padded, `W = nb (nb + 1) / 2 + 1`. The int32 lists of
            :func:`seer_attn.kernels.block_mask.mask_to_csr` are accepted as well.
        csc: the backward's lists, per KV head: `(ptr [B, Hkv, nb + 1] int32, idx [B, Hkv, W'])`
            where key block `j` lists `g * nb + i` for every query block `i` of query head
            `h = kv_head * G + g` that keeps it; with `key_blocks=2`, `(ptr [B, Hkv, ceil(nb / 2) + 1],
            idx, flags)` over key block pairs `(2c, 2c + 1)`, flags (int8) 1, 2 or 3 saying which of
            the two blocks the query block keeps.
    """
    if key_blocks not in (1, 2):
        raise ValueError(f"key_blocks must be 1 or 2, got {key_blocks}")
    num_kv_heads = HQ if num_kv_heads is None else num_kv_heads
    if HQ % num_kv_heads:
        raise ValueError(f"query heads ({HQ}) must be a multiple of num_kv_heads ({num_kv_heads})")
    nb = block_mask.shape[-1]
    return (build_csr_lists(block_mask, B, HQ, nb, cu_seqlens, block_size),
            build_csc_lists(block_mask, B, HQ, num_kv_heads, nb, key_blocks, cu_seqlens, block_size))


def _check_mask(block_mask, B: int, HQ: int, nb: int, what: str) -> None:
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be a torch.bool tensor, got {getattr(block_mask, 'dtype', type(block_mask))}")
    if block_mask.dim() != 4 or block_mask.shape[-2:] != (nb, nb):
        raise ValueError(f"block_mask must be [B, Hq, {nb}, {nb}] for {what}; got {tuple(block_mask.shape)}")
    if block_mask.shape[0] not in (1, B) or block_mask.shape[1] not in (1, HQ):
        raise ValueError(f"block_mask {tuple(block_mask.shape)} does not broadcast to [{B}, {HQ}, {nb}, {nb}]")


def _check_lists(name: str, lists, B: int, HQ: int, nb: int) -> None:
    # HQ: heads the lists are per (query heads for csr, KV heads for csc)
    if not (isinstance(lists, (tuple, list)) and len(lists) in (2, 3)):
        raise TypeError(f"{name} must be a (pointers, indices) pair (or, for a paired csc, a triple)")
    ptr, idx = lists[0], lists[1]
    if ptr.dtype != torch.int32 or idx.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"{name} must be (int32, int16 or int32) tensors; got {ptr.dtype}, {idx.dtype}")
    rows = (nb + 1) // 2 if len(lists) == 3 else nb
    if tuple(ptr.shape) != (B, HQ, rows + 1) or idx.dim() != 3 or tuple(idx.shape[:2]) != (B, HQ):
        raise ValueError(
            f"{name} must be ([{B}, {HQ}, {rows + 1}], [{B}, {HQ}, max_nnz]); got {tuple(ptr.shape)}, {tuple(idx.shape)}"
        )
    if len(lists) == 3 and (lists[2].dtype != torch.int8 or lists[2].shape != idx.shape):
        raise ValueError(f"{name} flags must be int8 shaped like the indices")


def _check_varlen(name: str, q, k, v, cu_seqlens, block_size: int):
    """Validate packed `[total, H, D]` inputs; return their `[1, H, total, D]` views."""
    for t_name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: with cu_seqlens, {t_name} must be [total, H, D]; got {getattr(t, 'shape', type(t))}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError(f"{name}: cu_seqlens must be a 1-D int32 tensor, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name}: cu_seqlens needs at least 2 entries (n_seq + 1), got {cu_seqlens.numel()}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"{name}: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    views = tuple(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    check_attn_inputs(name, *views, block_size)
    return views


def resolve_max_seqlen(cu_seqlens: torch.Tensor, max_seqlen: int | None, total: int) -> int:
    """`max_seqlen` as given, or read from `cu_seqlens` (one host sync), checked against the token count."""
    if max_seqlen is None:
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to the token count {total}; got {cu[:4]}...{cu[-2:]}")
        max_seqlen = max(b - a for a, b in zip(cu, cu[1:]))
    if int(max_seqlen) <= 0:
        raise ValueError(f"max_seqlen must be positive, got {max_seqlen}")
    return int(max_seqlen)


def block_sparse_attn_csr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None,
    sm_scale: float | None = None,
    block_size: int = 64,
    csr: tuple[torch.Tensor, torch.Tensor] | None = None,
    csc: tuple | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Causal block-sparse attention with forward and backward; semantics of
    :func:`seer_attn.kernels.naive.block_sparse_attn_naive` (``is_causal=True``), or with
    `cu_seqlens` of :func:`seer_attn.kernels.naive.block_sparse_attn_varlen_naive`.

    Args:
        q (torch.Tensor): `[B, Hq, S, D]`, float16/bfloat16 (float32 accepted, for tests). May be a
            strided view such as `[B, S, Hq, D].transpose(1, 2)`; the last dimension must be unit-stride
            or it is copied. With `cu_seqlens`: `[total, Hq, D]` (flash-attn's varlen layout).
        k, v (torch.Tensor): `[B, Hkv, S, D]` (packed: `[total, Hkv, D]`); `Hkv` divides `Hq` (query
            head `h` reads KV head `h // (Hq // Hkv)`), never repeated in memory.
        block_mask (torch.Tensor, Optional): bool `[B, Hq, nb, nb]` (broadcastable over B and H),
            `nb = ceil(S / block_size)`, True = keep. Blocks above the diagonal are ignored. May be
            `None` when `csr` (and, for backward, `csc`) are given. Packed: `[n_seq, Hq, nb, nb]`
            with `nb = ceil(max_seqlen / block_size)`; sequence `s` uses its top-left
            `[nb_s, nb_s]` corner, block `i` of it covering tokens `cu_seqlens[s] + 64 i ...`.
        sm_scale (float, Optional): Default: `1 / sqrt(D)`.
        block_size (int): gate block edge, 64 or 128. Default: `64`.
        csr (tuple, Optional): precomputed `(crow, col)` of the causal mask, from
            :func:`block_sparse_csr_lists`. Default: built here from `block_mask`.
        csc (tuple, Optional): precomputed lists of the transposed mask (its `key_blocks` picks the
            backward's key tile). Default: built in backward.
        cu_seqlens (torch.Tensor, Optional): int32 `[n_seq + 1]` on q's device, cumulative sequence
            lengths of packed sequences (`0, len_0, len_0 + len_1, ...`). Default: not packed.
        max_seqlen (int, Optional): longest packed sequence; read from `cu_seqlens` (one host sync)
            when not given.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]` (packed: `[total, Hq, D]`) in `q.dtype`, with the strides of
            `q` when `q` is dense. A query row that keeps no key gets 0.
    """
    if block_mask is None and csr is None:
        raise ValueError("give block_mask or csr")
    name = "block_sparse_attn_csr"
    if block_size not in (64, 128):
        raise ValueError(f"{name}: block_size must be 64 or 128, got {block_size}")
    packed = cu_seqlens is not None
    if packed:
        q, k, v = _check_varlen(name, q, k, v, cu_seqlens, block_size)
        max_seqlen = resolve_max_seqlen(cu_seqlens, max_seqlen, q.shape[2])
        B, HQ, D = cu_seqlens.numel() - 1, q.shape[1], q.shape[3]
        nb = triton.cdiv(max_seqlen, block_size)
        what = f"max_seqlen={max_seqlen}, block_size={block_size}"
    else:
        check_attn_inputs(name, q, k, v, block_size)
        B, HQ, S, D = q.shape
        nb = triton.cdiv(S, block_size)
        what = f"S={S}, block_size={block_size}"
    if block_mask is not None:
        _check_mask(block_mask, B, HQ, nb, what)
        if block_mask.device != q.device:
            raise ValueError(f"block_mask is on {block_mask.device}, q on {q.device}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)

    if csr is None:
        csr = build_csr_lists(block_mask, B, HQ, nb, cu_seqlens, block_size)
    else:
        _check_lists("csr", csr, B, HQ, nb)
    if csc is not None:
        _check_lists("csc", csc, B, k.shape[1], nb)
        if len(csc) == 3 and block_size != 64:
            raise ValueError("paired (key_blocks=2) csc lists need block_size 64")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and csc is None and block_mask is None:
        raise ValueError("backward needs block_mask or csc")
    mask = block_mask if block_mask is not None else torch.empty(0, dtype=torch.bool, device=q.device)
    csc = None if csc is None else tuple(csc)
    o = BlockSparseAttnCSRFunction.apply(q, k, v, mask, tuple(csr), csc, sm_scale, block_size, cu_seqlens)
    return o[0].transpose(0, 1) if packed else o
