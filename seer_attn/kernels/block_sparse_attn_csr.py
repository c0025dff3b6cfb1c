"""Block-sparse causal FlashAttention, forward and backward, driven by CSR/CSC block lists.

Why this kernel exists: fine-tuning a SeerAttention model needs gradients through the sparse
attention, and dense attention with a mask wastes the FLOPs the gates saved. Every kept
`(query block, key block)` pair costs one tile product; a dropped one costs nothing.

How it works (FlashAttention-2, written from the Triton fused-attention tutorial's structure):

- forward: one program per `(query block, batch, query head)` walks the row's CSR list of kept key
  blocks. Off-diagonal blocks are full and unmasked; the diagonal block (the last entry of a
  lower-triangular row) gets the causal mask. The row's base-2 logsumexp is stored for backward.
- backward: `delta = rowsum(dO * O)`; one program per `(key block, batch, KV head)` walks the CSC
  lists (key block -> query blocks) of the `G = Hq / Hkv` query heads that share the KV head, so
  dK/dV are accumulated in registers with no atomics and K/V are never repeated in memory; one
  program per `(query block, batch, query head)` walks the CSR list again for dQ.

Compared with upstream SeerAttention's CSR kernel: any batch, GQA without `repeat_kv`, any length
(the last partial block is masked on load), non-contiguous `[B, S, H, D].transpose(1, 2)` views
(strides are passed), and a row that keeps no block gives output 0 and zero gradients.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import check_attn_inputs
from seer_attn.kernels.block_mask import causal_block_mask

__all__ = ["block_sparse_attn_csr", "block_sparse_csr_lists"]

_LOG2E = 1.4426950408889634

# launch parameters per kernel and head_dim; {BLOCK_M, BLOCK_N} are sub-tiles of the gate block,
# chosen on an H100 with benchmarks/bench_csr.py
_CONFIGS = {
    "fwd": {64: dict(BLOCK_N=64, num_warps=4, num_stages=4), 128: dict(BLOCK_N=64, num_warps=4, num_stages=2)},
    "dq": {64: dict(BLOCK_N=64, num_warps=4, num_stages=3), 128: dict(BLOCK_N=64, num_warps=4, num_stages=2)},
    "dkdv": {64: dict(BLOCK_M=64, num_warps=4, num_stages=2), 128: dict(BLOCK_M=64, num_warps=4, num_stages=3)},
}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _fwd_step(
    b_q, acc, m_i, l_i, p_kv_k, p_kv_v, stride_ks, stride_vs, i_m, j,
    qk_scale, S,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    o_m = i_m * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    for n0 in tl.static_range(0, BLOCK, BLOCK_N):
        # int64: j * BLOCK * stride overflows int32 at long contexts
        o_n = j.to(tl.int64) * BLOCK + n0 + tl.arange(0, BLOCK_N)
        if DIAG:
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
    q, k, v, o, lse, crow, col,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    S, HQ, G, NB, MAX_NNZ, qk_scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
):
    # longest rows (largest query block index) are launched first
    i_m = NB - 1 - tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // G

    o_m = i_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_m = o_m < S
    p_q = q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs + o_d[None, :]
    # [BLOCK, D]
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh

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
        acc, m_i, l_i = _fwd_step(b_q, acc, m_i, l_i, p_k, p_v, stride_ks, stride_vs, i_m, j, qk_scale, S,
                                  BLOCK, BLOCK_N, D, False, PRECISION)
    if has_diag:
        acc, m_i, l_i = _fwd_step(b_q, acc, m_i, l_i, p_k, p_v, stride_ks, stride_vs, i_m, i_m, qk_scale, S,
                                  BLOCK, BLOCK_N, D, True, PRECISION)

    # a row that keeps no block: output 0, logsumexp +inf (backward then sees probability 0)
    empty = l_i == 0.0
    b_o = acc / tl.where(empty, 1.0, l_i)[:, None]
    b_lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_os + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])
    tl.store(lse + i_bh * S + o_m, b_lse, mask=m_m)


@triton.jit(do_not_specialize=["S"])
def block_sparse_attn_csr_bwd_kernel_preprocess(
    o, do, delta,
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    S, HQ,
    BLOCK: tl.constexpr, D: tl.constexpr,
):
    i_m = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_m = i_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_m = o_m < S
    b_o = tl.load(o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_os + o_d[None, :],
                  mask=m_m[:, None], other=0.0).to(tl.float32)
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dos + o_d[None, :],
                   mask=m_m[:, None], other=0.0).to(tl.float32)
    tl.store(delta + i_bh * S + o_m, tl.sum(b_o * b_do, 1), mask=m_m)


@triton.jit
def _dq_step(
    b_q, b_do, b_lse, b_delta, b_dq, p_kv_k, p_kv_v, stride_ks, stride_vs, i_m, j,
    qk_scale, S,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    o_m = i_m * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    for n0 in tl.static_range(0, BLOCK, BLOCK_N):
        o_n = j.to(tl.int64) * BLOCK + n0 + tl.arange(0, BLOCK_N)
        if DIAG:
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
    q, k, v, do, dq, lse, delta, crow, col,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    S, HQ, G, NB, MAX_NNZ, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
):
    i_m = NB - 1 - tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hk = i_h // G

    o_m = i_m.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_m = o_m < S
    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qs + o_d[None, :],
                  mask=m_m[:, None], other=0.0)
    b_do = tl.load(do + i_b * stride_dob + i_h * stride_doh + o_m[:, None] * stride_dos + o_d[None, :],
                   mask=m_m[:, None], other=0.0)
    # padded rows: lse = +inf makes their probabilities 0
    b_lse = tl.load(lse + i_bh * S + o_m, mask=m_m, other=float("inf"))
    b_delta = tl.load(delta + i_bh * S + o_m, mask=m_m, other=0.0)
    p_k = k + i_b * stride_kb + i_hk * stride_kh
    p_v = v + i_b * stride_vb + i_hk * stride_vh

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
        b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, stride_ks, stride_vs, i_m, j, qk_scale, S,
                        BLOCK, BLOCK_N, D, False, PRECISION)
    if has_diag:
        b_dq = _dq_step(b_q, b_do, b_lse, b_delta, b_dq, p_k, p_v, stride_ks, stride_vs, i_m, i_m, qk_scale, S,
                        BLOCK, BLOCK_N, D, True, PRECISION)
    p_dq = dq + i_b * stride_dqb + i_h * stride_dqh + o_m[:, None] * stride_dqs + o_d[None, :]
    tl.store(p_dq, (b_dq * sm_scale).to(dq.dtype.element_ty), mask=m_m[:, None])


@triton.jit
def _dkdv_step(
    b_k, b_v, b_dk, b_dv, p_bh_q, p_bh_do, p_bh_lse, p_bh_delta, stride_qs, stride_dos, i, i_n,
    qk_scale, S,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, DIAG: tl.constexpr, PRECISION: tl.constexpr,
):
    o_n = i_n * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    for m0 in tl.static_range(0, BLOCK, BLOCK_M):
        o_m = i.to(tl.int64) * BLOCK + m0 + tl.arange(0, BLOCK_M)
        m_m = o_m < S
        # [D, BLOCK_M]
        b_qt = tl.load(p_bh_q + o_m[None, :] * stride_qs + o_d[:, None], mask=m_m[None, :], other=0.0)
        # [BLOCK_M, D]
        b_do = tl.load(p_bh_do + o_m[:, None] * stride_dos + o_d[None, :], mask=m_m[:, None], other=0.0)
        b_lse = tl.load(p_bh_lse + o_m, mask=m_m, other=float("inf"))
        b_delta = tl.load(p_bh_delta + o_m, mask=m_m, other=0.0)
        # [BLOCK, BLOCK_M]: transposed scores, keys on rows
        b_st = tl.dot(b_k, b_qt, input_precision=PRECISION) * qk_scale
        b_pt = tl.exp2(b_st - b_lse[None, :])
        if DIAG:
            b_pt = tl.where(o_m[None, :] >= o_n[:, None], b_pt, 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do, input_precision=PRECISION)
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PRECISION)
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_qt.dtype), tl.trans(b_qt), input_precision=PRECISION)
    return b_dk, b_dv


@triton.jit(do_not_specialize=["S"])
def block_sparse_attn_csr_bwd_kernel_dkdv(
    q, k, v, do, dk, dv, lse, delta, ccol, row,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    S, HQ, HKV, G, NB, MAX_NNZ, qk_scale, sm_scale,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr,
):
    # the first key blocks have the longest column lists: launched first
    i_n = tl.program_id(0)
    i_bhk = tl.program_id(1).to(tl.int64)
    i_b, i_hk = i_bhk // HKV, i_bhk % HKV

    o_n = i_n.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    o_d = tl.arange(0, D)
    m_n = o_n < S
    b_k = tl.load(k + i_b * stride_kb + i_hk * stride_kh + o_n[:, None] * stride_ks + o_d[None, :],
                  mask=m_n[:, None], other=0.0)
    b_v = tl.load(v + i_b * stride_vb + i_hk * stride_vh + o_n[:, None] * stride_vs + o_d[None, :],
                  mask=m_n[:, None], other=0.0)
    b_dk = tl.zeros([BLOCK, D], dtype=tl.float32)
    b_dv = tl.zeros([BLOCK, D], dtype=tl.float32)

    for g in range(0, G):
        i_h = i_hk * G + g
        i_bh = i_b * HQ + i_h
        p_bh_q = q + i_b * stride_qb + i_h * stride_qh
        p_bh_do = do + i_b * stride_dob + i_h * stride_doh
        p_bh_lse = lse + i_bh * S
        p_bh_delta = delta + i_bh * S
        p_ccol = ccol + i_bh * (NB + 1) + i_n
        p_row = row + i_bh * MAX_NNZ
        start = tl.load(p_ccol)
        end = tl.load(p_ccol + 1)
        # rows ascend and are >= i_n: a kept diagonal block is the first entry
        first = tl.load(p_row + start, mask=end > start, other=-1)
        has_diag = first == i_n
        if has_diag:
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, p_bh_q, p_bh_do, p_bh_lse, p_bh_delta, stride_qs,
                                    stride_dos, i_n, i_n, qk_scale, S, BLOCK, BLOCK_M, D, True, PRECISION)
        for idx in range(start + has_diag.to(tl.int32), end):
            i = tl.load(p_row + idx)
            b_dk, b_dv = _dkdv_step(b_k, b_v, b_dk, b_dv, p_bh_q, p_bh_do, p_bh_lse, p_bh_delta, stride_qs,
                                    stride_dos, i, i_n, qk_scale, S, BLOCK, BLOCK_M, D, False, PRECISION)

    p_dk = dk + i_b * stride_dkb + i_hk * stride_dkh + o_n[:, None] * stride_dks + o_d[None, :]
    p_dv = dv + i_b * stride_dvb + i_hk * stride_dvh + o_n[:, None] * stride_dvs + o_d[None, :]
    tl.store(p_dk, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_n[:, None])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None])


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests) get full-precision dots instead of TF32
    return "ieee" if dtype == torch.float32 else "tf32"


def _csr_args(csr: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    crow, col = csr
    return crow.contiguous(), col.contiguous(), col.shape[-1]


def block_sparse_attn_csr_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, csr: tuple[torch.Tensor, torch.Tensor], sm_scale: float,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns `o` (same layout as `q`) and the base-2 logsumexp `[B, Hq, S]` fp32."""
    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    NB = triton.cdiv(S, block_size)
    crow, col, max_nnz = _csr_args(csr)
    o = torch.empty_like(q)
    lse = torch.empty(B, HQ, S, dtype=torch.float32, device=q.device)
    cfg = dict(_CONFIGS["fwd"][D])
    block_n = min(cfg.pop("BLOCK_N"), block_size)
    if block_size > 64:
        cfg["num_stages"] = min(cfg["num_stages"], 2)  # 128-row tiles: less shared memory per stage
    if _interpreting():
        cfg = {}
    block_sparse_attn_csr_fwd_kernel[(NB, B * HQ)](
        q, k, v, o, lse, crow, col,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        S, HQ, HQ // HKV, NB, max_nnz, sm_scale * _LOG2E,
        BLOCK=block_size, BLOCK_N=block_n, D=D, PRECISION=_precision(q.dtype), **cfg,
    )
    return o, lse


def block_sparse_attn_csr_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
    csr: tuple[torch.Tensor, torch.Tensor], csc: tuple[torch.Tensor, torch.Tensor], sm_scale: float, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels. Returns `dq, dk, dv` in the layouts of `q, k, v`."""
    B, HQ, S, D = q.shape
    HKV = k.shape[1]
    G = HQ // HKV
    NB = triton.cdiv(S, block_size)
    if do.stride(-1) != 1:
        do = do.contiguous()
    crow, col, max_nnz = _csr_args(csr)
    ccol, row, max_nnz_t = _csr_args(csc)
    prec = _precision(q.dtype)
    qk_scale = sm_scale * _LOG2E
    interp = _interpreting()

    delta = torch.empty(B, HQ, S, dtype=torch.float32, device=q.device)
    block_sparse_attn_csr_bwd_kernel_preprocess[(NB, B * HQ)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        S, HQ, BLOCK=block_size, D=D,
    )

    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    cfg = dict(_CONFIGS["dkdv"][D])
    block_m = min(cfg.pop("BLOCK_M"), block_size)
    if block_size > 64:
        # a 128-key tile with D=128 keeps K, V, dK and dV tiles resident: fewer pipeline stages
        # fit in shared memory (3 stages ran out of it on an H200)
        cfg["num_stages"] = 1
    if interp:
        cfg = {}
    block_sparse_attn_csr_bwd_kernel_dkdv[(NB, B * HKV)](
        q, k, v, do, dk, dv, lse, delta, ccol, row,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        S, HQ, HKV, G, NB, max_nnz_t, qk_scale, sm_scale,
        BLOCK=block_size, BLOCK_M=block_m, D=D, PRECISION=prec, **cfg,
    )

    dq = torch.empty_like(q)
    cfg = dict(_CONFIGS["dq"][D])
    block_n = min(cfg.pop("BLOCK_N"), block_size)
    if block_size > 64:
        cfg["num_stages"] = min(cfg["num_stages"], 2)  # 128-row tiles: less shared memory per stage
    if interp:
        cfg = {}
    block_sparse_attn_csr_bwd_kernel_dq[(NB, B * HQ)](
        q, k, v, do, dq, lse, delta, crow, col,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        S, HQ, G, NB, max_nnz, qk_scale, sm_scale,
        BLOCK=block_size, BLOCK_N=block_n, D=D, PRECISION=prec, **cfg,
    )
    return dq, dk, dv


class BlockSparseAttnCSRFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_mask, csr, csc, sm_scale, block_size):
        o, lse = block_sparse_attn_csr_fwd(q, k, v, csr, sm_scale, block_size)
        ctx.save_for_backward(q, k, v, o, lse, block_mask, *csr, *(csc if csc is not None else ()))
        ctx.has_csc = csc is not None
        ctx.sm_scale = sm_scale
        ctx.block_size = block_size
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_mask, crow, col, *csc = ctx.saved_tensors
        if not ctx.has_csc:
            # CSC is built only when a backward happens, so inference pays nothing for it
            csc = _lists_from_mask(block_mask.transpose(-1, -2))
        dq, dk, dv = block_sparse_attn_csr_bwd(
            q, k, v, o, lse, do, (crow, col), tuple(csc), ctx.sm_scale, ctx.block_size
        )
        return dq, dk, dv, None, None, None, None, None


def _lists_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool `[B, H, R, C]` triangular mask -> `(ptr [B, H, R + 1] int32, idx [B, H, W] int16/int32)`.

    The same lists as :func:`seer_attn.kernels.block_mask.mask_to_csr` (ascending, `-1` padded), built
    with a cumsum and a scatter instead of a sort, and sized `W = nb (nb + 1) / 2 + 1` (the most a
    triangle can keep) so that no device-to-host sync is needed: the whole call stays asynchronous.
    """
    B, H, R, C = mask.shape
    nb = max(R, C)
    width = nb * (nb + 1) // 2
    idx_dtype = torch.int16 if nb <= torch.iinfo(torch.int16).max else torch.int32
    flat = mask.reshape(B * H, R * C)
    ptr = torch.zeros(B, H, R + 1, dtype=torch.int32, device=mask.device)
    ptr[..., 1:] = mask.sum(-1, dtype=torch.int32).cumsum(-1, dtype=torch.int32)
    # row-major rank of each kept entry within its head is its slot; dropped entries go to slot `width`
    slot = torch.where(flat, flat.cumsum(-1, dtype=torch.int32) - 1, width).long()
    idx = torch.full((B * H, width + 1), -1, dtype=idx_dtype, device=mask.device)
    cols = torch.arange(R * C, device=mask.device) % C
    idx.scatter_(1, slot, cols.to(idx_dtype).expand(B * H, -1))
    idx[:, width] = -1
    return ptr, idx.view(B, H, width + 1)


def _causal_mask(block_mask: torch.Tensor, B: int, HQ: int, nb: int) -> torch.Tensor:
    return block_mask.expand(B, HQ, nb, nb) & causal_block_mask(nb, nb, block_mask.device)


def block_sparse_csr_lists(
    block_mask: torch.Tensor, B: int, HQ: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Build the CSR (rows -> kept key blocks) and CSC (key blocks -> query blocks) lists once.

    Pass the result as `csr=` / `csc=` to :func:`block_sparse_attn_csr` to reuse it across calls (for
    example across layers that share a mask). Blocks above the diagonal are dropped.

    Args:
        block_mask (torch.Tensor): bool `[B, Hq, nb, nb]`, broadcastable over B and H.
        B (int), HQ (int): batch size and query heads to expand to.

    Returns:
        csr: `(crow [B, Hq, nb + 1] int32, col [B, Hq, W])`, `col` int16 (int32 when nb > 32767),
            ascending within a row, `-1` padded, `W = nb (nb + 1) / 2 + 1`. The int32 lists of
            :func:`seer_attn.kernels.block_mask.mask_to_csr` are accepted as well.
        csc: the same for the transposed mask.
    """
    nb = block_mask.shape[-1]
    mask = _causal_mask(block_mask, B, HQ, nb)
    return _lists_from_mask(mask), _lists_from_mask(mask.transpose(-1, -2))


def _check_inputs(q, k, v, block_mask, block_size, nb) -> None:
    check_attn_inputs("block_sparse_attn_csr", q, k, v, block_size)
    B, HQ, S, _ = q.shape
    if block_size not in (64, 128):
        raise ValueError(f"block_sparse_attn_csr: block_size must be 64 or 128, got {block_size}")
    if block_mask is not None:
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise TypeError(f"block_mask must be a torch.bool tensor, got {getattr(block_mask, 'dtype', type(block_mask))}")
        if block_mask.dim() != 4 or block_mask.shape[-2:] != (nb, nb):
            raise ValueError(
                f"block_mask must be [B, Hq, {nb}, {nb}] for S={S}, block_size={block_size}; got {tuple(block_mask.shape)}"
            )
        if block_mask.shape[0] not in (1, B) or block_mask.shape[1] not in (1, HQ):
            raise ValueError(f"block_mask {tuple(block_mask.shape)} does not broadcast to [{B}, {HQ}, {nb}, {nb}]")
        if block_mask.device != q.device:
            raise ValueError(f"block_mask is on {block_mask.device}, q on {q.device}")


def _check_lists(name: str, lists, B: int, HQ: int, nb: int) -> None:
    if not (isinstance(lists, (tuple, list)) and len(lists) == 2):
        raise TypeError(f"{name} must be a (pointers, indices) pair")
    ptr, idx = lists
    if ptr.dtype != torch.int32 or idx.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"{name} must be (int32, int16 or int32) tensors; got {ptr.dtype}, {idx.dtype}")
    if tuple(ptr.shape) != (B, HQ, nb + 1) or idx.dim() != 3 or tuple(idx.shape[:2]) != (B, HQ):
        raise ValueError(
            f"{name} must be ([{B}, {HQ}, {nb + 1}], [{B}, {HQ}, max_nnz]); got {tuple(ptr.shape)}, {tuple(idx.shape)}"
        )


def block_sparse_attn_csr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None,
    sm_scale: float | None = None,
    block_size: int = 64,
    csr: tuple[torch.Tensor, torch.Tensor] | None = None,
    csc: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal block-sparse attention with forward and backward; semantics of
    :func:`seer_attn.kernels.naive.block_sparse_attn_naive` (``is_causal=True``).

    Args:
        q (torch.Tensor): `[B, Hq, S, D]`, float16/bfloat16 (float32 accepted, for tests). May be a
            strided view such as `[B, S, Hq, D].transpose(1, 2)`; the last dimension must be unit-stride
            or it is copied.
        k, v (torch.Tensor): `[B, Hkv, S, D]`; `Hkv` divides `Hq` (query head `h` reads KV head
            `h // (Hq // Hkv)`), never repeated in memory.
        block_mask (torch.Tensor, Optional): bool `[B, Hq, nb, nb]` (broadcastable over B and H),
            `nb = ceil(S / block_size)`, True = keep. Blocks above the diagonal are ignored. May be
            `None` when `csr` (and, for backward, `csc`) are given.
        sm_scale (float, Optional): Default: `1 / sqrt(D)`.
        block_size (int): gate block edge, 64 or 128. Default: `64`.
        csr (tuple, Optional): precomputed `(crow, col)` of the causal mask, from
            :func:`block_sparse_csr_lists`. Default: built here from `block_mask`.
        csc (tuple, Optional): precomputed lists of the transposed mask. Default: built in backward.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]` in `q.dtype`, with the strides of `q` when `q` is dense
            (a `transpose(1, 2)` view in gives one out). A query row that keeps no key gets 0.
    """
    if block_mask is None and csr is None:
        raise ValueError("give block_mask or csr")
    B, HQ, S, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
    nb = triton.cdiv(S, block_size) if S else 0
    _check_inputs(q, k, v, block_mask, block_size, nb)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)

    mask = None
    if block_mask is not None:
        mask = _causal_mask(block_mask, B, HQ, nb)
    if csr is None:
        csr = _lists_from_mask(mask)
    else:
        _check_lists("csr", csr, B, HQ, nb)
    if csc is not None:
        _check_lists("csc", csc, B, HQ, nb)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and csc is None and mask is None:
        raise ValueError("backward needs block_mask or csc")
    if mask is None:
        mask = torch.empty(0, dtype=torch.bool, device=q.device)
    csc = None if csc is None else tuple(csc)
    return BlockSparseAttnCSRFunction.apply(q, k, v, mask, tuple(csr), csc, sm_scale, block_size)
