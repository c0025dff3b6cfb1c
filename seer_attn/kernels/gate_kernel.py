"""The AttnGate's inference path in Triton: summaries, block scores, block selection.

The PyTorch gate (`seer_attn.modules.attn_gate.AttnGate`, then `topk_block_index` / `select_blocks`)
is the twin and defines the meaning; it runs dozens of small fp32 launches and copies of
``[B, H, S, D]``. Here:

1. ``gate_pool_fwd_kernel`` (launched once for Q, once for K): reads each pre-RoPE block (or
   sub-block, with several summaries per block) once in its own dtype, keeps the max / min / sum
   pools in fp32 registers, applies the per-head projection (a ``[BN, D] x [D, Dg]`` product per pool
   for ``BN`` blocks at once, so the weights are read once per ``BN`` blocks) and RoPE at the
   summary's first-token position, and writes the fp32 summary ``[B, H, n, Dg]``. RoPE works on the
   two halves of the vector, so pools, projection and rotation are done half by half.
2. Block scores, ``[B, Hq, nb, nb]`` fp32 (the only ``nb^2`` buffer; the twin holds the same), lower
   triangle only: ``gate_score_fwd_kernel`` writes the logits ``q . k / sqrt(Dg)`` tile by tile (one
   summary per side); ``gate_mixture_fwd_kernel`` writes block log-probabilities of the mixture of
   softmaxes (several summaries: softmax statistics per query summary in a first pass over the key
   summaries, then log-sum-exp over each block's summaries in a second).
3. Selection, a few query-block rows per program with the whole causal row in registers:
   ``gate_select_fwd_kernel`` does top-k (the k-th largest score found *exactly* by bisection on the
   order-preserving int32 image of the fp32 scores, at most 32 steps, no sort; ties to the lowest
   block indices), threshold (row softmax in registers) and top-p (bisection on the kept mass);
   ``gate_adaptive_fwd_kernel`` / ``gate_adaptive_find_kernel`` find the layer-wide threshold of
   `adaptive` exactly by a radix select over histograms of the probabilities' int32 images (five 6-bit passes)
   (ties at the threshold are ranked with an atomic counter: exactly the budget, in arbitrary order).
   Kept indices are written *canonical*: each kept block once (keep rules included), ascending from
   column 0, with the count per row, which ``block_sparse_attn_topk(..., canonical=True)`` reads with
   no list-preparation launch (that launch sorted rows as wide as ``nb`` for ``adaptive``: at 128k it
   cost more than the attention). ``adaptive`` computes the probabilities once and parks their int32
   images in the index buffer for the later passes.

No host syncs anywhere (every size follows from the shapes), so the path can be CUDA-graphed.

Exactness against the twin: the pools, projections and RoPE are the same fp32 operations in another
summation order, and the dots use ``tf32x3`` on the GPU (about fp32 accuracy; ``ieee`` is one
argument away), so scores agree to ~1e-6 relative. The selection is exact on the scores it is given,
so kept sets differ from the twin's only where two scores of a row (or, for threshold / top-p /
adaptive, a probability and the cut) are within that rounding of each other.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import is_interpreter, prune_configs

__all__ = ["gate_summaries", "gate_scores", "gate_mixture_scores", "gate_select", "fused_gate_index", "GATE_DOT_PRECISION"]

# dot input precision of the gate's products on the GPU: tf32x3 is ~fp32 accurate (the twin is fp32)
# at tensor-core speed; "tf32" (one pass) and "bf16" (operands rounded to bf16) are faster and rank
# near-ties differently, "ieee" is exact fp32 FMA
GATE_DOT_PRECISION = "tf32x3"

_POOL_ORDER = ("max", "min", "avg")

# gate_mixture_fwd_kernel's tile per gate width: query summaries (rows) and key summaries (columns) per
# step, warps, pipeline stages. Chosen by `benchmarks/bench_gate.py --mixture-sweep` on an H100 (tf32x3,
# 4/2 summaries): width 128 (Llama-8B shape) 0.60 -> 0.44 ms at 32k and 7.8 -> 5.1 ms at 128k; width 64
# (SmolLM2) within 10% of the best either way. The wide tile needs 224 KiB of shared memory: GPUs with
# less run the small one (same result).
MIXTURE_TILE_SMALL = (32, 64, 4, 2)
MIXTURE_TILE = {64: MIXTURE_TILE_SMALL, 128: (128, 64, 8, 2)}


GATE_PRECISIONS = ("tf32x3", "tf32", "bf16", "ieee")


def _dot_prec(precision: str | None) -> str:
    precision = precision or GATE_DOT_PRECISION
    if precision not in GATE_PRECISIONS:
        raise ValueError(f"gate dot precision must be one of {GATE_PRECISIONS}, got {precision!r}")
    if not is_interpreter():
        return precision
    # the interpreter multiplies in numpy fp32 whatever tf32 mode is asked, and its bf16 dot returns
    # garbage (triton 3.x): bf16 is emulated there by rounding the operands, multiplying in fp32 (exact
    # for bf16 values). Its fp32 -> bf16 cast truncates where the GPU rounds to nearest.
    return "bf16_emul" if precision == "bf16" else "ieee"


@triton.jit
def _gdot(a, b, DOT_PREC: tl.constexpr):
    # fp32 operands, fp32 accumulation; "bf16" rounds the operands first (one tensor-core pass at
    # twice tf32's rate, scores off by ~|s| * 2^-9)
    if DOT_PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT_PREC == "bf16_emul":
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _project_half(
    b_lo, b_hi, w_base, row0, stride_wi, stride_wo, o_i, o_g, H2: tl.constexpr, DG2: tl.constexpr, DOT_PREC: tl.constexpr
):
    # the pool's two halves [BN, D/2] times the weight rows row0 .. row0 + D of one head: both output halves
    p_w = w_base + (row0 + o_i[:, None]) * stride_wi + o_g[None, :] * stride_wo
    b_w_ll = tl.load(p_w).to(tl.float32)
    b_w_lh = tl.load(p_w + DG2 * stride_wo).to(tl.float32)
    b_w_hl = tl.load(p_w + H2 * stride_wi).to(tl.float32)
    b_w_hh = tl.load(p_w + H2 * stride_wi + DG2 * stride_wo).to(tl.float32)
    y_lo = _gdot(b_lo, b_w_ll, DOT_PREC) + _gdot(b_hi, b_w_hl, DOT_PREC)
    y_hi = _gdot(b_lo, b_w_lh, DOT_PREC) + _gdot(b_hi, b_w_hh, DOT_PREC)
    return y_lo, y_hi


@triton.autotune(
    configs=prune_configs(
        [
            # [BN, TC, D / 2] loads and six [BN, D / 2] pools stay in registers
            triton.Config({"BN": bn, "TC": tc}, num_warps=w)
            for bn, tc, w in ((16, 4, 4), (16, 8, 8), (32, 4, 8), (16, 2, 4))
        ]
    ),
    key=["D", "DG", "BS", "POOL_MAX", "POOL_MIN", "POOL_AVG", "PROJ", "G_OUT"],
)
@triton.jit
def gate_pool_fwd_kernel(
    x,
    w,
    cos,
    sin,
    out,
    stride_xb,
    stride_xh,
    stride_xt,
    stride_xd,
    stride_wh,
    stride_wi,
    stride_wo,
    stride_cb,
    stride_cn,
    stride_cd,
    stride_sb,
    stride_sn,
    stride_sd,
    stride_ob,
    stride_oh,
    stride_on,
    stride_od,
    T,
    NB,
    H_IN: tl.constexpr,
    D: tl.constexpr,
    DG: tl.constexpr,
    BS: tl.constexpr,
    POOL_MAX: tl.constexpr,
    POOL_MIN: tl.constexpr,
    POOL_AVG: tl.constexpr,
    PROJ: tl.constexpr,
    G_OUT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BN: tl.constexpr,
    TC: tl.constexpr,
):
    i_c = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H_IN, i_bh % H_IN
    H2: tl.constexpr = D // 2
    DG2: tl.constexpr = DG // 2

    # [BN] block ids, [TC] token offsets inside a step, [H2] half-vector lanes
    o_n = i_c * BN + tl.arange(0, BN)
    o_t = tl.arange(0, TC)
    o_i = tl.arange(0, H2)
    m_n = o_n < NB
    x_base = x + i_b * stride_xb + i_h * stride_xh

    b_max_lo = tl.full([BN, H2], float("-inf"), dtype=tl.float32)
    b_max_hi = tl.full([BN, H2], float("-inf"), dtype=tl.float32)
    b_min_lo = tl.full([BN, H2], float("inf"), dtype=tl.float32)
    b_min_hi = tl.full([BN, H2], float("inf"), dtype=tl.float32)
    b_sum_lo = tl.zeros([BN, H2], dtype=tl.float32)
    b_sum_hi = tl.zeros([BN, H2], dtype=tl.float32)
    for t0 in range(0, BS, TC):
        # [BN, TC] token positions of this step in each of the BN blocks
        o_tok = o_n[:, None] * BS + t0 + o_t[None, :]
        # (a step of TC tokens may be longer than a small block)
        m_tok = ((o_tok < T) & (t0 + o_t < BS)[None, :])[:, :, None]
        p_x = x_base + o_tok[:, :, None] * stride_xt + o_i[None, None, :] * stride_xd
        # [BN, TC, H2]
        b_lo = tl.load(p_x, mask=m_tok, other=0.0).to(tl.float32)
        b_hi = tl.load(p_x + H2 * stride_xd, mask=m_tok, other=0.0).to(tl.float32)
        if POOL_MAX:
            b_max_lo = tl.maximum(b_max_lo, tl.max(tl.where(m_tok, b_lo, float("-inf")), 1))
            b_max_hi = tl.maximum(b_max_hi, tl.max(tl.where(m_tok, b_hi, float("-inf")), 1))
        if POOL_MIN:
            b_min_lo = tl.minimum(b_min_lo, tl.min(tl.where(m_tok, b_lo, float("inf")), 1))
            b_min_hi = tl.minimum(b_min_hi, tl.min(tl.where(m_tok, b_hi, float("inf")), 1))
        if POOL_AVG:
            b_sum_lo += tl.sum(b_lo, 1)
            b_sum_hi += tl.sum(b_hi, 1)
    # blocks past the end pool nothing: keep them finite (they are not stored)
    m_pool = m_n[:, None]
    b_max_lo = tl.where(m_pool, b_max_lo, 0.0)
    b_max_hi = tl.where(m_pool, b_max_hi, 0.0)
    b_min_lo = tl.where(m_pool, b_min_lo, 0.0)
    b_min_hi = tl.where(m_pool, b_min_hi, 0.0)
    # a partial last block averages over the tokens it has
    b_cnt = tl.maximum(tl.minimum(T - o_n * BS, BS), 1).to(tl.float32)
    b_avg_lo = b_sum_lo / b_cnt[:, None]
    b_avg_hi = b_sum_hi / b_cnt[:, None]

    # RoPE tables at each block's first token, the two halves of [BN, DG]
    o_g = tl.arange(0, DG2)
    m_c = m_n[:, None]
    p_c = cos + i_b * stride_cb + o_n[:, None] * stride_cn + o_g[None, :] * stride_cd
    p_s = sin + i_b * stride_sb + o_n[:, None] * stride_sn + o_g[None, :] * stride_sd
    b_cos_lo = tl.load(p_c, mask=m_c, other=0.0).to(tl.float32)
    b_cos_hi = tl.load(p_c + DG2 * stride_cd, mask=m_c, other=0.0).to(tl.float32)
    b_sin_lo = tl.load(p_s, mask=m_c, other=0.0).to(tl.float32)
    b_sin_hi = tl.load(p_s + DG2 * stride_sd, mask=m_c, other=0.0).to(tl.float32)

    # not software-pipelined: prefetching the next head's weight tiles (up to 12 [D/2, Dg/2]) took
    # 244 KB of shared memory at D = 128 on an H100 (limit 227 KB); nothing else in the kernel changes
    for g in tl.range(G_OUT, num_stages=1):
        i_ho = i_h * G_OUT + g
        if PROJ:
            # weight rows: the pools in the fixed order max, min, avg, D rows each
            w_base = w + i_ho * stride_wh
            y_lo = tl.zeros([BN, DG2], dtype=tl.float32)
            y_hi = tl.zeros([BN, DG2], dtype=tl.float32)
            if POOL_MAX:
                a_lo, a_hi = _project_half(b_max_lo, b_max_hi, w_base, 0, stride_wi, stride_wo, o_i, o_g, H2, DG2, DOT_PREC)
                y_lo += a_lo
                y_hi += a_hi
            if POOL_MIN:
                a_lo, a_hi = _project_half(
                    b_min_lo, b_min_hi, w_base, POOL_MAX * D, stride_wi, stride_wo, o_i, o_g, H2, DG2, DOT_PREC
                )
                y_lo += a_lo
                y_hi += a_hi
            if POOL_AVG:
                a_lo, a_hi = _project_half(
                    b_avg_lo, b_avg_hi, w_base, (POOL_MAX + POOL_MIN) * D, stride_wi, stride_wo, o_i, o_g, H2, DG2, DOT_PREC
                )
                y_lo += a_lo
                y_hi += a_hi
        else:
            # a single pool used as is (D == DG)
            if POOL_MAX:
                y_lo, y_hi = b_max_lo, b_max_hi
            elif POOL_MIN:
                y_lo, y_hi = b_min_lo, b_min_hi
            else:
                y_lo, y_hi = b_avg_lo, b_avg_hi
        # rotate-half RoPE: [x1, x2] -> [x1 cos1 - x2 sin1, x2 cos2 + x1 sin2]
        r_lo = y_lo * b_cos_lo - y_hi * b_sin_lo
        r_hi = y_hi * b_cos_hi + y_lo * b_sin_hi
        p_o = out + i_b * stride_ob + i_ho * stride_oh + o_n[:, None] * stride_on + o_g[None, :] * stride_od
        tl.store(p_o, r_lo, mask=m_c)
        tl.store(p_o + DG2 * stride_od, r_hi, mask=m_c)


@triton.autotune(
    configs=prune_configs([triton.Config({"BM": 64, "BN": 64}, num_warps=w) for w in (4, 8)]),
    key=["DG", "FILL"],
)
@triton.jit
def gate_score_fwd_kernel(
    qg,
    kg,
    s,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_sb,
    stride_sh,
    stride_sm,
    stride_sn,
    scale,
    NB,
    HQ: tl.constexpr,
    G_K: tl.constexpr,
    DG: tl.constexpr,
    FILL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_n = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_st = (o_m[:, None] < NB) & (o_n[None, :] < NB)
    p_s = s + i_b * stride_sb + i_h * stride_sh + o_m[:, None] * stride_sm + o_n[None, :] * stride_sn
    if i_n * BN <= i_m * BM + BM - 1:
        o_d = tl.arange(0, DG)
        p_q = qg + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qn + o_d[None, :] * stride_qd
        p_k = kg + i_b * stride_kb + (i_h // G_K) * stride_kh + o_n[:, None] * stride_kn + o_d[None, :] * stride_kd
        # [BM, DG], [BN, DG]
        b_q = tl.load(p_q, mask=(o_m < NB)[:, None], other=0.0)
        b_k = tl.load(p_k, mask=(o_n < NB)[:, None], other=0.0)
        b_s = _gdot(b_q, tl.trans(b_k), DOT_PREC) * scale
        b_s = tl.where(o_n[None, :] <= o_m[:, None], b_s, float("-inf"))
        tl.store(p_s, b_s, mask=m_st)
    elif FILL:
        tl.store(p_s, tl.full([BM, BN], float("-inf"), dtype=tl.float32), mask=m_st)


@triton.jit
def gate_mixture_fwd_kernel(
    qg,
    kg,
    s,
    stride_qb,
    stride_qh,
    stride_qn,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_sb,
    stride_sh,
    stride_sm,
    stride_sn,
    scale,
    NB,
    N_Q,
    N_K,
    HQ: tl.constexpr,
    G_K: tl.constexpr,
    DG: tl.constexpr,
    NQ: tl.constexpr,
    NK: tl.constexpr,
    BMB: tl.constexpr,
    BNB: tl.constexpr,
    FILL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # rows: the NQ query summaries of BMB blocks; columns: the NK key summaries of BNB blocks
    BMQ: tl.constexpr = BMB * NQ
    BNK: tl.constexpr = BNB * NK
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_r = i_m * BMQ + tl.arange(0, BMQ)
    o_d = tl.arange(0, DG)
    m_r = o_r < N_Q
    p_q = qg + i_b * stride_qb + i_h * stride_qh + o_r[:, None] * stride_qn + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)
    k_base = kg + i_b * stride_kb + (i_h // G_K) * stride_kh
    o_c = tl.arange(0, BNK)
    # key summaries up to the end of this row tile's last block are causal for some row
    n_cols = tl.minimum(N_K, (i_m + 1) * BMB * NK)

    # pass 1: every query summary's softmax statistics over its causal key summaries
    b_m = tl.full([BMQ], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BMQ], dtype=tl.float32)
    for c0 in range(0, n_cols, BNK):
        o_k = c0 + o_c
        b_k = tl.load(k_base + o_k[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=(o_k < N_K)[:, None], other=0.0)
        b_s = _gdot(b_q, tl.trans(b_k), DOT_PREC) * scale
        m_v = ((o_k[None, :] // NK) <= (o_r[:, None] // NQ)) & (o_k < N_K)[None, :] & m_r[:, None]
        b_s = tl.where(m_v, b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_mn_safe = tl.where(b_mn == float("-inf"), 0.0, b_mn)
        b_l = b_l * tl.exp(b_m - b_mn_safe) + tl.sum(tl.exp(b_s - b_mn_safe[:, None]), 1)
        b_m = b_mn
    b_lse = tl.where(m_r, b_m + tl.log(tl.where(m_r, b_l, 1.0)), 0.0)

    # pass 2: block log-probabilities, log of (mean over the block's real query summaries of
    # the summed probabilities of the key block's summaries), in the log domain
    o_i = i_m * BMB + tl.arange(0, BMB)
    n_real = tl.maximum(tl.minimum(N_Q - o_i * NQ, NQ), 1).to(tl.float32)
    p_s = s + i_b * stride_sb + i_h * stride_sh + o_i[:, None] * stride_sm
    for c0 in range(0, n_cols, BNK):
        o_k = c0 + o_c
        b_k = tl.load(k_base + o_k[:, None] * stride_kn + o_d[None, :] * stride_kd, mask=(o_k < N_K)[:, None], other=0.0)
        b_s = _gdot(b_q, tl.trans(b_k), DOT_PREC) * scale
        m_v = ((o_k[None, :] // NK) <= (o_r[:, None] // NQ)) & (o_k < N_K)[None, :] & m_r[:, None]
        b_v = tl.where(m_v, b_s - b_lse[:, None], float("-inf"))
        # [BMB, NQ, BNB, NK] -> [BMB, BNB]
        b_v = tl.reshape(b_v, [BMB, NQ, BNB, NK])
        b_mx = tl.max(tl.max(b_v, 3), 1)
        b_mx_safe = tl.where(b_mx == float("-inf"), 0.0, b_mx)
        b_e = tl.exp(b_v - b_mx_safe[:, None, :, None])
        b_sum = tl.sum(tl.sum(b_e, 3), 1)
        # a pair with no visible summary (above the diagonal) has probability 0: -inf
        b_lp = tl.where(b_sum > 0, tl.log(tl.where(b_sum > 0, b_sum, 1.0)), float("-inf")) + b_mx_safe
        b_lp = b_lp - tl.log(n_real)[:, None]
        o_j = c0 // NK + tl.arange(0, BNB)
        b_lp = tl.where(o_j[None, :] <= o_i[:, None], b_lp, float("-inf"))
        tl.store(p_s + o_j[None, :] * stride_sn, b_lp, mask=(o_i < NB)[:, None] & (o_j < NB)[None, :])
    if FILL:
        for j0 in range((n_cols + NK - 1) // NK, NB, BNB):
            o_j = j0 + tl.arange(0, BNB)
            b_fill = tl.full([BMB, BNB], float("-inf"), dtype=tl.float32)
            tl.store(p_s + o_j[None, :] * stride_sn, b_fill, mask=(o_i < NB)[:, None] & (o_j < NB)[None, :])


@triton.jit
def _sortable_key(b_s):
    # fp32 -> int32 with the same order (negative floats have their magnitude bits flipped)
    b_i = b_s.to(tl.int32, bitcast=True)
    return tl.where(b_i >= 0, b_i, b_i ^ 0x7FFFFFFF)


@triton.jit
def _load_rows(s, i_b, i_h, o_r, o_j, stride_sb, stride_sh, stride_sm, stride_sn, NB):
    # [R, NBP] causal scores of rows o_r (-inf elsewhere), the row mask and the causal mask
    m_r = o_r < NB
    m_v = (o_j[None, :] <= o_r[:, None]) & m_r[:, None]
    p_s = s + i_b * stride_sb + i_h * stride_sh + o_r[:, None] * stride_sm + o_j[None, :] * stride_sn
    return tl.load(p_s, mask=m_v, other=float("-inf")), m_r, m_v


@triton.jit
def _row_probs(b_s, m_r, m_v):
    b_mx = tl.where(m_r, tl.max(b_s, 1), 0.0)
    b_e = tl.where(m_v, tl.exp(b_s - b_mx[:, None]), 0.0)
    return b_e / tl.maximum(tl.sum(b_e, 1), 1e-30)[:, None]


@triton.jit
def _topk_rows(b_key, m_r, m_v, o_r, K_SEL):
    # exact per-row top-k of integer keys (int64, or int32 when hi - lo + 1 cannot overflow): a t with #{key >= t} >= kk, by bisection; ties at the k-th
    # value go to the lowest block indices. A row stops as soon as some t has exactly kk keys at or
    # above it (then {key >= t} is the top-k, whatever t is in the gap below the k-th key): with
    # distinct keys that is well before the 31 steps a full bisection of an int32 range takes
    kk = tl.minimum(tl.where(m_r, o_r + 1, 0), K_SEL)
    lo = tl.where(m_r, tl.min(tl.where(m_v, b_key, 0x7FFFFFFF), 1), 0)
    hi = tl.where(m_r, tl.max(tl.where(m_v, b_key, -0x7FFFFFFF - 1), 1), 0)
    while tl.max(hi - lo) > 0:
        mid = lo + (hi - lo + 1) // 2
        n_ge = tl.sum((m_v & (b_key >= mid[:, None])).to(tl.int32), 1)
        ok = n_ge >= kk
        lo = tl.where(ok, mid, lo)
        hi = tl.where(n_ge == kk, mid, tl.where(ok, hi, mid - 1))
    b_gt = m_v & (b_key > lo[:, None])
    b_eq = m_v & (b_key == lo[:, None])
    need = kk - tl.sum(b_gt.to(tl.int32), 1)
    return b_gt | (b_eq & (tl.cumsum(b_eq.to(tl.int32), 1) <= need[:, None]))


@triton.jit
def _write_rows(p_row, p_cnt, b_sel, o_r, o_j, m_r, m_v, W, stride_iw, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr,
                PAD: tl.constexpr, R: tl.constexpr, NBP: tl.constexpr, WP: tl.constexpr):  # fmt: skip
    # canonical rows, as block_sparse_attn_topk(canonical=True) reads them: the kept blocks (keep rules
    # included, each block once) ascending from column 0, then -1 (PAD) or whatever was there; the
    # count per row goes to p_cnt
    if KEEP_SINK:
        b_sel = b_sel | (m_v & (o_j[None, :] == 0))
    if KEEP_DIAG:
        b_sel = b_sel | (m_v & (o_j[None, :] == o_r[:, None]))
    b_sel = b_sel & m_v
    b_one = b_sel.to(tl.int32)
    slot = tl.cumsum(b_one, 1) - 1
    n = tl.sum(b_one, 1)
    b_col = tl.broadcast_to(o_j[None, :], (R, NBP)).to(tl.int32)
    tl.store(p_row[:, None] + slot * stride_iw, b_col, mask=b_sel)
    if PAD:
        o_w = tl.arange(0, WP)
        m_pad = m_r[:, None] & (o_w[None, :] >= n[:, None]) & (o_w[None, :] < W)
        tl.store(p_row[:, None] + o_w[None, :] * stride_iw, tl.full([R, WP], -1, dtype=tl.int32), mask=m_pad)
    tl.store(p_cnt + o_r, n, mask=m_r)


@triton.autotune(configs=prune_configs([triton.Config({}, num_warps=w) for w in (4, 8)]), key=["NBP", "R", "METHOD"])
@triton.jit
def gate_select_fwd_kernel(
    s,
    idx,
    cnt,
    stride_sb,
    stride_sh,
    stride_sm,
    stride_sn,
    stride_ib,
    stride_ih,
    stride_im,
    stride_iw,
    NB,
    W,
    K_SEL,
    threshold,
    DENSE_FROM,
    HQ: tl.constexpr,
    METHOD: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    KEEP_DIAG: tl.constexpr,
    PAD: tl.constexpr,
    NBP: tl.constexpr,
    WP: tl.constexpr,
    R: tl.constexpr,
):
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    # [R] rows, [NBP] columns
    o_r = i_m * R + tl.arange(0, R)
    o_j = tl.arange(0, NBP)
    b_s, m_r, m_v = _load_rows(s, i_b, i_h, o_r, o_j, stride_sb, stride_sh, stride_sm, stride_sn, NB)

    if METHOD == 0:
        # exact top-k on the order-preserving int32 image of the scores
        b_sel = _topk_rows(_sortable_key(b_s).to(tl.int64), m_r, m_v, o_r, K_SEL)
    elif METHOD == 1:
        b_sel = m_v & (_row_probs(b_s, m_r, m_v) > threshold)
    else:
        # top-p: the fewest most probable blocks whose mass reaches `threshold` (the crossing one kept):
        # the largest key t with mass(key >= t) >= top_p, by bisection; ties at t in index order
        b_p = _row_probs(b_s, m_r, m_v)
        b_key = _sortable_key(b_p).to(tl.int64)
        lo = tl.where(m_r, tl.min(tl.where(m_v, b_key, 0x7FFFFFFF), 1), 0)
        hi = tl.where(m_r, tl.max(tl.where(m_v, b_key, 0), 1), 0)
        while tl.max(hi - lo) > 0:
            mid = lo + (hi - lo + 1) // 2
            ok = tl.sum(tl.where(m_v & (b_key >= mid[:, None]), b_p, 0.0), 1) >= threshold
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        b_gt = m_v & (b_key > lo[:, None])
        b_eq = m_v & (b_key == lo[:, None])
        mass_gt = tl.sum(tl.where(b_gt, b_p, 0.0), 1)
        p_t = tl.max(tl.where(b_eq, b_p, 0.0), 1)
        rank = tl.cumsum(b_eq.to(tl.int32), 1) - 1
        b_sel = b_gt | (b_eq & (mass_gt[:, None] + rank.to(tl.float32) * p_t[:, None] < threshold))
    b_sel = b_sel | (m_v & (o_r >= DENSE_FROM)[:, None])
    p_row = idx + i_b * stride_ib + i_h * stride_ih + o_r * stride_im
    _write_rows(p_row, cnt + i_bh * NB, b_sel, o_r, o_j, m_r, m_v, W, stride_iw, KEEP_SINK, KEEP_DIAG, PAD, R, NBP, WP)


# adaptive selection: radix select of one threshold per batch element over all heads and rows, one
# digit of ADAPTIVE_BITS bits of the probability's int32 image per pass (probabilities are in [0, 1],
# so their images are below 2^30: ceil(30 / bits) passes determine them exactly). The digit width is
# a cost trade: `tl.histogram` builds each warp's histogram from one ballot per digit bit and, per
# bin a lane owns, a mask and a popcount, so its cost per element grows with the bin count (~360
# operations per element for 1024 bins, ~20 for 64), while each pass also reads every probability
# image once. 6 is a prediction from that count, not yet a measurement: `benchmarks/bench_gate.py
# --adaptive-bits 10,8,6,5` times the widths on the same scores (benchmarks/RESULTS.md once run).
ADAPTIVE_BITS = 6
_IMAGE_BITS = 30


def adaptive_passes(bits: int) -> int:
    """Radix passes of `bits` bits that cover a probability's 30-bit int32 image."""
    return -(-_IMAGE_BITS // bits)


# while the threshold is searched, each row of the index buffer holds the int32 images of the row's
# probabilities (forced blocks as _FORCED, above every image); the last pass overwrites it with the index
_FORCED: tl.constexpr = tl.constexpr(0x7FFFFFFF)


@triton.jit
def gate_adaptive_fwd_kernel(
    s,
    idx,
    cnt,
    hist,
    state,
    counter,
    fcount,
    stride_sb,
    stride_sh,
    stride_sm,
    stride_sn,
    stride_ib,
    stride_ih,
    stride_im,
    stride_iw,
    NB,
    DENSE_FROM,
    FLOOR_K,
    HQ: tl.constexpr,
    PHASE: tl.constexpr,
    FIRST: tl.constexpr,
    HAS_FLOOR: tl.constexpr,
    SHIFT: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    KEEP_DIAG: tl.constexpr,
    PAD: tl.constexpr,
    NBP: tl.constexpr,
    R: tl.constexpr,
    NBINS: tl.constexpr,
    BITS: tl.constexpr,
):
    # PHASE 0: histogram of the next digit of the non-forced probabilities that match the digits found
    # so far (FIRST: compute the probabilities and forced blocks once, and park their images in idx);
    # PHASE 1: keep forced blocks, probabilities above the threshold, and the first `need` ties
    i_m = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    o_r = i_m * R + tl.arange(0, R)
    o_j = tl.arange(0, NBP)
    p_row = idx + i_b * stride_ib + i_h * stride_ih + o_r * stride_im
    p_key = p_row[:, None] + o_j[None, :] * stride_iw
    if FIRST:
        b_s, m_r, m_v = _load_rows(s, i_b, i_h, o_r, o_j, stride_sb, stride_sh, stride_sm, stride_sn, NB)
        b_key = _sortable_key(_row_probs(b_s, m_r, m_v))
        # forced blocks (+inf in the twin): the keep rules and each row's floor of most probable blocks
        b_forced = m_v & (o_j[None, :] < 0)
        if KEEP_DIAG:
            b_forced = b_forced | (m_v & (o_j[None, :] == o_r[:, None]))
        if KEEP_SINK:
            b_forced = b_forced | (m_v & (o_j[None, :] == 0))
        if HAS_FLOOR:
            # probabilities' images lie in [0, 2^30): the bisection's hi - lo + 1 fits int32, whose
            # compares and sums cost half of int64's (the top-k selection of raw scores needs int64)
            b_forced = b_forced | _topk_rows(b_key, m_r, m_v, o_r, FLOOR_K)
        tl.atomic_add(fcount + i_b, tl.sum(tl.sum(b_forced.to(tl.int32), 1), 0))
        b_key = tl.where(b_forced, _FORCED, b_key)
        tl.store(p_key, b_key, mask=m_v)
    else:
        m_r = o_r < NB
        m_v = (o_j[None, :] <= o_r[:, None]) & m_r[:, None]
        b_key = tl.load(p_key, mask=m_v, other=0)
        b_forced = m_v & (b_key == _FORCED)
    m_free = m_v & ~b_forced
    prefix = tl.load(state + i_b * 2)
    if PHASE == 0:
        if FIRST:
            m_h = m_free  # no digit found yet (and SHIFT + BITS may reach 32: a shift past the width is undefined)
        else:
            m_h = m_free & ((b_key >> (SHIFT + BITS)) == (prefix >> (SHIFT + BITS)))
        b_digit = tl.where(m_h, (b_key >> SHIFT) & (NBINS - 1), 0)
        b_h = tl.histogram(tl.reshape(b_digit, [R * NBP]), NBINS)
        # elements outside the histogram were counted in bin 0
        o_bin = tl.arange(0, NBINS)
        b_h = b_h - tl.where(o_bin == 0, tl.sum(tl.sum((~m_h).to(tl.int32), 1), 0), 0)
        tl.atomic_add(hist + i_b * NBINS + o_bin, b_h, mask=b_h != 0)
    else:
        need = tl.load(state + i_b * 2 + 1)
        b_gt = m_free & (b_key > prefix)
        b_eq = m_free & (b_key == prefix)
        # ties at the threshold: a global rank (block order within a program, programs in atomic order)
        n_row = tl.sum(b_eq.to(tl.int32), 1)
        first = tl.atomic_add(counter + i_b, tl.sum(n_row, 0))
        rank = first + tl.cumsum(n_row, 0)[:, None] - n_row[:, None] + tl.cumsum(b_eq.to(tl.int32), 1) - 1
        b_sel = b_forced | b_gt | (b_eq & (rank < need)) | (m_v & (o_r >= DENSE_FROM)[:, None])
        # (every store below depends on row reductions of the loaded keys: the row is read before it is overwritten)
        _write_rows(p_row, cnt + i_bh * NB, b_sel, o_r, o_j, m_r, m_v, NB, stride_iw, 0, 0, PAD, R, NBP, NBP)


@triton.jit
def gate_adaptive_find_kernel(
    hist, state, fcount, budget, B, SHIFT: tl.constexpr, NBINS: tl.constexpr, FIRST: tl.constexpr, BP: tl.constexpr
):
    # the digit d* of the need-th largest remaining probability: #{digit >= d*} >= need > #{digit > d*}
    i_b = tl.program_id(0).to(tl.int64)
    o_bin = tl.arange(0, NBINS)
    b_h = tl.load(hist + i_b * NBINS + o_bin)
    prefix = tl.load(state + i_b * 2)
    if FIRST:
        # the budget counts the forced blocks and is at least the largest forced count of the batch
        o_b = tl.arange(0, BP)
        f_max = tl.max(tl.load(fcount + o_b, mask=o_b < B, other=0), 0)
        need = tl.maximum(budget, f_max) - tl.load(fcount + i_b)
    else:
        need = tl.load(state + i_b * 2 + 1)
    c_ge = tl.sum(b_h, 0) - tl.cumsum(b_h, 0) + b_h
    d = tl.maximum(tl.sum((c_ge >= need).to(tl.int32), 0) - 1, 0)
    c_gt = tl.sum(tl.where(o_bin == d, c_ge - b_h, 0), 0)
    tl.store(state + i_b * 2, prefix | (d << SHIFT))
    tl.store(state + i_b * 2 + 1, need - c_gt)


def _check_summaries_inputs(x, weight, cos, sin, pools, block_size, g_out):
    if x.dim() != 4:
        raise ValueError(f"gate_summaries: x must be [B, H, S, D], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"gate_summaries: x must be float16, bfloat16 or float32, got {x.dtype}")
    if not pools or any(p not in _POOL_ORDER for p in pools) or tuple(p for p in _POOL_ORDER if p in pools) != tuple(pools):
        raise ValueError(f"gate_summaries: pools must be a non-empty ordered subset of {_POOL_ORDER}, got {pools}")
    B, H, S, D = x.shape
    if D < 32 or D & (D - 1):
        raise ValueError(f"gate_summaries: head_dim must be a power of two >= 32, got {D}")
    if block_size not in (2, 4, 8, 16, 32, 64, 128):
        raise ValueError(
            f"gate_summaries: block_size (tokens per summary) must be a power of two in [2, 128], got {block_size}"
        )
    dg = cos.shape[-1]
    if dg < 32 or dg & (dg - 1):
        raise ValueError(f"gate_summaries: gate width must be a power of two >= 32, got {dg}")
    nb = math.ceil(S / block_size)
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] != B or cos.shape[1] != nb:
        raise ValueError(
            f"gate_summaries: cos/sin must be [B, nb, Dg] = [{B}, {nb}, Dg], got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if weight is None:
        if len(pools) != 1 or dg != D or g_out != 1:
            raise ValueError("gate_summaries: without a weight the summary is a single pool of width D (one output per head)")
    elif tuple(weight.shape) != (H * g_out, len(pools) * D, dg):
        raise ValueError(
            f"gate_summaries: weight must be [H * g_out, len(pools) * D, Dg] = [{H * g_out}, {len(pools) * D}, {dg}], "
            f"got {tuple(weight.shape)}"
        )
    for name, t in (("weight", weight), ("cos", cos), ("sin", sin)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gate_summaries: {name} on {t.device}, x on {x.device}")


def gate_summaries(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pools: tuple[str, ...],
    block_size: int = 64,
    g_out: int = 1,
    precision: str | None = None,
) -> torch.Tensor:
    """Pool, project and rotate one side of the gate: `[B, H, S, D]` -> fp32 `[B, H * g_out, nb, Dg]`.

    Args:
        x (torch.Tensor): pre-RoPE queries or keys `[B, H, S, D]`, any strides, fp16/bf16/fp32.
        weight (torch.Tensor, Optional): per-output-head projection `[H * g_out, len(pools) * D, Dg]`
            (`MultiHeadLinear.weight`); None uses the single pool as is (then `Dg == D`).
        cos, sin (torch.Tensor): RoPE tables `[B, nb, Dg]` at each block's first-token position.
        pools (tuple[str, ...]): ordered subset of `("max", "min", "avg")`, concatenated in that order.
        block_size (int): tokens pooled per summary (a gate block, or a sub-block with several
            summaries per block). Default: `64`.
        g_out (int): outputs per input head; output head `h * g_out + g` uses `weight[h * g_out + g]`
            (the default gate's K side: pooled KV head `h` projected for each query head of its group).
        precision (str, Optional): `tl.dot` input precision. Default: :data:`GATE_DOT_PRECISION`.
    """
    _check_summaries_inputs(x, weight, cos, sin, pools, block_size, g_out)
    B, H, S, D = x.shape
    nb, dg = math.ceil(S / block_size), cos.shape[-1]
    out = torch.empty(B, H * g_out, nb, dg, device=x.device, dtype=torch.float32)
    w = weight if weight is not None else out  # unused pointer when there is no projection
    w_strides = weight.stride() if weight is not None else (0, 0, 0)
    grid = lambda meta: (triton.cdiv(nb, meta["BN"]), B * H)  # noqa: E731
    gate_pool_fwd_kernel[grid](
        x, w, cos, sin, out,
        *x.stride(), *w_strides, *cos.stride(), *sin.stride(), *out.stride(),
        S, nb,
        H_IN=H, D=D, DG=dg, BS=block_size,
        POOL_MAX=int("max" in pools), POOL_MIN=int("min" in pools), POOL_AVG=int("avg" in pools),
        PROJ=weight is not None, G_OUT=g_out, DOT_PREC=_dot_prec(precision),
    )  # fmt: skip
    return out


def gate_scores(
    qg: torch.Tensor, kg: torch.Tensor, fill_upper: bool = False, precision: str | None = None
) -> torch.Tensor:
    """Scaled causal block logits `qg . kg / sqrt(Dg)`: fp32 `[B, Hq, nb, nb]`.

    Args:
        qg (torch.Tensor): fp32 `[B, Hq, nb, Dg]` (from :func:`gate_summaries`).
        kg (torch.Tensor): fp32 `[B, Hk, nb, Dg]`, `Hk` divides `Hq` (query head `h` reads `h // (Hq // Hk)`).
        fill_upper (bool): write `-inf` above the diagonal (as `AttnGate` returns logits); otherwise
            tiles wholly above it are left unwritten (the selection never reads them). Default: `False`.
    """
    if qg.dim() != 4 or kg.dim() != 4 or qg.dtype != torch.float32 or kg.dtype != torch.float32:
        raise ValueError(
            f"gate_scores: fp32 [B, H, nb, Dg] summaries expected, "
            f"got {qg.dtype} {tuple(qg.shape)}, {kg.dtype} {tuple(kg.shape)}"
        )
    B, Hq, nb, dg = qg.shape
    if kg.shape[0] != B or kg.shape[2:] != qg.shape[2:] or Hq % kg.shape[1]:
        raise ValueError(f"gate_scores: qg {tuple(qg.shape)} and kg {tuple(kg.shape)} do not match")
    s = torch.empty(B, Hq, nb, nb, device=qg.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(nb, meta["BM"]), triton.cdiv(nb, meta["BN"]), B * Hq)  # noqa: E731
    gate_score_fwd_kernel[grid](
        qg, kg, s, *qg.stride(), *kg.stride(), *s.stride(), 1.0 / math.sqrt(dg), nb,
        HQ=Hq, G_K=Hq // kg.shape[1], DG=dg, FILL=fill_upper, DOT_PREC=_dot_prec(precision),
    )  # fmt: skip
    return s


def gate_mixture_scores(
    qg: torch.Tensor, kg: torch.Tensor, n_q: int, n_k: int, nb: int, fill_upper: bool = False, precision: str | None = None,
    tile: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Block log-probabilities of a gate with several summaries per block: fp32 `[B, Hq, nb, nb]`.

    Query summary `a` (of block `i`) takes a softmax of `qg[a] . kg[c] / sqrt(Dg)` over every key
    summary `c` of the causal blocks `j <= i`; block `(i, j)` gets the mean over `i`'s real summaries
    of the summed probabilities of `j`'s summaries (`AttnGate` with `q_summaries` / `k_summaries`).
    Two passes over the key summaries per row tile (statistics, then log-probabilities), all in
    the log domain, so no probability underflows to 0 where the twin keeps it finite.

    Args:
        qg (torch.Tensor): fp32 `[B, Hq, nq, Dg]`, summary `a` belongs to block `a // n_q`.
        kg (torch.Tensor): fp32 `[B, Hk, nk, Dg]`, summary `c` belongs to block `c // n_k`.
        tile: `(query summaries, key summaries, num_warps, num_stages)` per program (default
            `MIXTURE_TILE[Dg]`; `benchmarks/bench_gate.py --mixture-sweep` times the candidates).
    """
    if qg.dim() != 4 or kg.dim() != 4 or qg.dtype != torch.float32 or kg.dtype != torch.float32:
        raise ValueError("gate_mixture_scores: fp32 [B, H, n, Dg] summaries expected")
    B, Hq, nq, dg = qg.shape
    nk = kg.shape[2]
    if n_q not in (1, 2, 4, 8) or n_k not in (1, 2, 4, 8):
        raise ValueError(f"gate_mixture_scores: summaries per block must be 1, 2, 4 or 8, got {n_q}, {n_k}")
    if math.ceil(nq / n_q) != nb or math.ceil(nk / n_k) != nb or kg.shape[0] != B or kg.shape[3] != dg or Hq % kg.shape[1]:
        raise ValueError(
            f"gate_mixture_scores: qg {tuple(qg.shape)}, kg {tuple(kg.shape)} do not make {nb} blocks of {n_q}, {n_k}"
        )
    s = torch.empty(B, Hq, nb, nb, device=qg.device, dtype=torch.float32)
    if tile is None:
        tile = MIXTURE_TILE_SMALL if is_interpreter() else MIXTURE_TILE.get(dg, MIXTURE_TILE_SMALL)

    def launch(tile):
        rows, cols, warps, stages = tile
        bmb, bnb = max(1, rows // n_q), max(1, cols // n_k)
        gate_mixture_fwd_kernel[(triton.cdiv(nb, bmb), B * Hq)](
            qg, kg, s, *qg.stride(), *kg.stride(), *s.stride(), 1.0 / math.sqrt(dg), nb, nq, nk,
            HQ=Hq, G_K=Hq // kg.shape[1], DG=dg, NQ=n_q, NK=n_k, BMB=bmb, BNB=bnb, FILL=fill_upper,
            DOT_PREC=_dot_prec(precision), num_warps=warps, num_stages=stages,
        )  # fmt: skip

    try:
        launch(tile)
    except triton.runtime.errors.OutOfResources:
        if tile == MIXTURE_TILE_SMALL:
            raise
        # a GPU with less shared memory than an H100: the small tile computes the same scores
        MIXTURE_TILE[dg] = MIXTURE_TILE_SMALL
        launch(MIXTURE_TILE_SMALL)
    return s


def gate_select(
    scores: torch.Tensor,
    method: str = "nz_ratio",
    k: int = 1,
    threshold: float = 0.0,
    keep_sink: bool = False,
    keep_diagonal: bool = True,
    dense_last_rows: int = 0,
    top_p: float = 1.0,
    budget: int = 0,
    row_floor_k: int = 0,
    return_count: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block scores -> kept key blocks per query block, int32 `[B, H, nb, W]`: canonical rows.

    Args:
        scores (torch.Tensor): fp32 `[B, H, nb, nb]` logits (or log-probabilities); only the causal
            lower triangle is read. Probabilities are their row softmax.
        method (str): `"nz_ratio"`: the `k` best causal blocks of each row (all of them in rows with
            fewer), exact, ties to the lowest index; `"threshold"`: probability `> threshold`;
            `"top_p"`: per row the fewest most probable blocks whose probabilities sum to `top_p`
            (the crossing block kept, ties in block order); `"adaptive"`: per batch element, the
            `budget` most probable blocks over all heads and rows with the forced blocks first (the
            keep rules' and each row's `row_floor_k` most probable ones; `budget` counts them and
            is raised to the largest forced count of the batch), found by an exact radix select
            (histogram passes, no sort, no host sync); ties at the threshold are taken in an
            arbitrary order (as `torch.topk`).
        keep_sink, keep_diagonal (bool): also keep block 0 / the diagonal block (on top of the
            `k` for top-k, threshold and top-p; adaptive counts them inside the budget).
        dense_last_rows (int): the last n rows keep every causal block.
        return_count (bool): also return the count of kept blocks per row, int32 `[B, H, nb]`; the
            entries past a row's count are then left unwritten (not `-1`). This is the pair
            `block_sparse_attn_topk(..., block_count=count, canonical=True)` takes with no list
            preparation.

    Returns:
        `W = min(k + keep rules, nb)` for top-k without dense rows, else `nb`.
        Every row is canonical: its kept blocks, each once, ascending from column 0, then `-1`.
    """
    if scores.dim() != 4 or scores.dtype != torch.float32 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"gate_select: scores must be fp32 [B, H, nb, nb], got {scores.dtype} {tuple(scores.shape)}")
    methods = ("nz_ratio", "threshold", "top_p", "adaptive")
    if method not in methods:
        raise ValueError(f"gate_select: method must be one of {methods}, got {method!r}")
    B, H, nb, _ = scores.shape
    nbp = triton.next_power_of_2(nb)
    # about 4k scores per program in registers
    R = max(1, min(16, 4096 // nbp))
    dense_from = nb - dense_last_rows if dense_last_rows > 0 else nb
    grid = (triton.cdiv(nb, R), B * H)
    count = torch.empty(B, H, nb, device=scores.device, dtype=torch.int32)
    if method == "adaptive":
        idx = _adaptive_select(scores, count, budget, row_floor_k, keep_sink, keep_diagonal, dense_from, nbp, R, grid,
                               not return_count)  # fmt: skip
        return (idx, count) if return_count else idx
    k = max(1, min(int(k), nb))
    width = k if (method == "nz_ratio" and dense_last_rows == 0) else nb
    W = min(width + int(keep_sink) + int(keep_diagonal), nb)
    idx = torch.empty(B, H, nb, W, device=scores.device, dtype=torch.int32)
    gate_select_fwd_kernel[grid](
        scores, idx, count, *scores.stride(), *idx.stride(),
        nb, W, k, float(top_p if method == "top_p" else threshold), dense_from,
        HQ=H, METHOD=methods.index(method), KEEP_SINK=int(keep_sink), KEEP_DIAG=int(keep_diagonal),
        PAD=not return_count, NBP=nbp, WP=triton.next_power_of_2(W), R=R,
    )  # fmt: skip
    return (idx, count) if return_count else idx


def _adaptive_select(scores, count, budget, floor_k, keep_sink, keep_diagonal, dense_from, nbp, R, grid, pad) -> torch.Tensor:
    B, H, nb, _ = scores.shape
    bits = ADAPTIVE_BITS  # read at call time: the benchmark sweeps it
    if not 1 <= bits <= 10:
        raise ValueError(f"gate_kernel.ADAPTIVE_BITS must be in 1..10 (histogram bins 2..1024), got {bits}")
    passes = adaptive_passes(bits)
    nbins = 1 << bits
    dev = scores.device
    hist = torch.zeros(passes, B, nbins, device=dev, dtype=torch.int32)
    # per batch element: [threshold digits found so far, blocks still to pick]
    state = torch.zeros(B, 2, device=dev, dtype=torch.int32)
    counter = torch.zeros(B, device=dev, dtype=torch.int32)
    fcount = torch.zeros(B, device=dev, dtype=torch.int32)
    idx = torch.empty(B, H, nb, nb, device=dev, dtype=torch.int32)
    common = dict(HQ=H, HAS_FLOOR=floor_k > 0, KEEP_SINK=int(keep_sink), KEEP_DIAG=int(keep_diagonal), PAD=pad, NBP=nbp,
                  R=R, NBINS=nbins, BITS=bits)  # fmt: skip
    args = (scores, idx, count, None, state, counter, fcount, *scores.stride(), *idx.stride(), nb, dense_from, max(floor_k, 1))
    # the first pass computes the probabilities and parks their images in idx; the others read them
    for p in range(passes):
        shift = bits * (passes - 1 - p)
        gate_adaptive_fwd_kernel[grid](*args[:3], hist[p], *args[4:], PHASE=0, SHIFT=shift, FIRST=p == 0, num_warps=4, **common)
        gate_adaptive_find_kernel[(B,)](
            hist[p], state, fcount, int(budget), B, SHIFT=shift, NBINS=nbins, FIRST=p == 0, BP=triton.next_power_of_2(B)
        )
    gate_adaptive_fwd_kernel[grid](*args[:3], hist[0], *args[4:], PHASE=1, SHIFT=0, FIRST=False, num_warps=4, **common)
    return idx


def fused_gate_index(
    q: torch.Tensor,
    k: torch.Tensor,
    w_q: torch.Tensor | None,
    w_k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_pools: tuple[str, ...],
    k_pools: tuple[str, ...],
    block_size: int = 64,
    method: str = "nz_ratio",
    k_blocks: int = 1,
    threshold: float = 0.0,
    keep_sink: bool = False,
    keep_diagonal: bool = True,
    dense_last_rows: int = 0,
    precision: str | None = None,
    return_count: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The whole gate at inference: pre-RoPE `q` `[B, Hq, S, D]`, `k` `[B, Hkv, S, D]` -> block index.

    `w_q` None (the default gate: one Q pool, `Dg == D`): `w_k` is `[Hq, len(k_pools) * D, Dg]`, one
    K projection per query head. Otherwise `w_q` `[Hq, ., Dg]` and `w_k` `[Hkv, ., Dg]`. Selection
    arguments as :func:`gate_select`; returns its int32 `[B, Hq, nb, W]` index. Four launches.
    """
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"fused_gate_index: query heads ({Hq}) must be a multiple of key heads ({Hkv})")
    qg = gate_summaries(q, w_q, cos, sin, q_pools, block_size, 1, precision)
    g_out = Hq // Hkv if w_q is None else 1
    kg = gate_summaries(k, w_k, cos, sin, k_pools, block_size, g_out, precision)
    scores = gate_scores(qg, kg, precision=precision)
    return gate_select(scores, method, k_blocks, threshold, keep_sink, keep_diagonal, dense_last_rows, return_count=return_count)
