"""Exact attention that also returns the block-pooled attention-probability map (forward only).

The gate is trained against ``pooled[i, j]``: the maximum (or the mass) of the softmax probabilities
``P[r, c]`` over the ``block x block`` tile (query block ``i``, key block ``j``), each block-row then
normalised to sum to 1. ``P`` itself is ``S x S`` and never materialised.

Upstream stored, for every query row and key block, the block maximum of the logits (a
``[B, H, S, nb]`` workspace, 4.3 GB per layer at 64k) because a probability needs the row's final
softmax statistics, which are only known once the row is finished. Here the work is split in two
passes instead, so extra memory stays ``O(B * H * (S + nb^2))``:

1. a flash forward (Triton tutorial structure: unmasked blocks below the diagonal band, the band
   with masks) writes ``o`` and the per-row log-sum-exp ``lse`` (log2 domain);
2. one program per (query block, head) recomputes ``q k^T`` for every causal key block and reduces
   the probabilities ``exp2(s - lse)`` straight into its own row of the ``[nb, nb]`` map. For the
   max map ``max_{r,c} exp2(s[r, c] - lse[r]) = exp2(max_{r,c}(s[r, c] - lse[r]))``, so the pass
   needs one ``exp2`` per tile and costs about half a forward's matrix work.

Each program writes whole rows of the map, so there are no atomics; the row normalisation is one
``[B, H, nb, nb]`` division on the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import check_attn_inputs, dot_precision, prune_configs

__all__ = ["attn_with_pooling"]


def _keep_fwd(conf: triton.Config) -> bool:
    # the band below the diagonal is walked in BN steps from a BM boundary
    return conf.kwargs["BM"] % conf.kwargs["BN"] == 0


@triton.autotune(
    configs=prune_configs(
        list(
            filter(
                _keep_fwd,
                [
                    triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
                    for bm in (64, 128)
                    for bn in (64, 128)
                    for w in (4, 8)
                    for s in (3, 4)
                ],
            )
        )
    ),
    key=["D", "IS_CAUSAL"],
)
@triton.jit
def attn_pooling_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
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
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    # heaviest (last) query tiles first
    i_m = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hkv = i_h // G

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_m = o_m < T

    p_q = q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qt + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    k_base = k + i_b * stride_kb + i_hkv * stride_kh
    v_base = v + i_b * stride_vb + i_hkv * stride_vh

    if IS_CAUSAL:
        lo_end = i_m * BM
        hi = tl.minimum((i_m + 1) * BM, T)
    else:
        lo_end = (T // BN) * BN
        hi = T

    b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BM], dtype=tl.float32)
    b_acc = tl.zeros([BM, D], dtype=tl.float32)
    for i_n in range(0, lo_end, BN):
        o_k = i_n + o_n
        # [D, BN]
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_m = b_mn
    for i_n in range(lo_end, hi, BN):
        o_k = i_n + o_n
        m_k = o_k < T
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd, mask=m_k[None, :], other=0.0)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale
        if IS_CAUSAL:
            b_s = tl.where((o_m[:, None] >= o_k[None, :]) & m_k[None, :], b_s, float("-inf"))
        else:
            b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd, mask=m_k[:, None], other=0.0)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_m = b_mn

    b_o = b_acc / b_l[:, None]
    p_o = o + i_b * stride_ob + i_h * stride_oh + o_m[:, None] * stride_ot + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])
    tl.store(lse + i_bh * T + o_m, b_m + tl.log2(b_l), mask=m_m)


@triton.autotune(
    configs=prune_configs([triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (3, 2, 4)]),
    key=["D", "BS", "IS_CAUSAL", "MASS"],
)
@triton.jit
def attn_pooling_fwd_kernel_pool(
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
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASS: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    i_m = (NB - 1 - tl.program_id(0)).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hkv = i_h // G

    o_m = i_m * BS + tl.arange(0, BS)
    o_n = tl.arange(0, BS)
    o_d = tl.arange(0, D)
    m_m = o_m < T

    p_q = q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qt + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    # padding rows get lse = +inf, so their probabilities are exactly 0
    b_lse = tl.load(lse + i_bh * T + o_m, mask=m_m, other=float("inf"))
    k_base = k + i_b * stride_kb + i_hkv * stride_kh
    p_pool = pooled + (i_bh * NB + i_m) * NB
    # the mass map averages over the block's real query rows
    inv_rows = 1.0 / tl.minimum(BS, T - i_m * BS).to(tl.float32)

    if IS_CAUSAL:
        n_full = i_m
        hi = i_m + 1
    else:
        n_full = T // BS
        hi = NB
    for i_n in range(0, n_full):
        o_k = i_n * BS + o_n
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd)
        # [BS, BS] log2-probabilities
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale - b_lse[:, None]
        if MASS:
            b_val = tl.sum(tl.exp2(b_s)) * inv_rows
        else:
            b_val = tl.exp2(tl.max(b_s))
        tl.store(p_pool + i_n, b_val)
    for i_n in range(n_full, hi):
        o_k = i_n * BS + o_n
        m_k = o_k < T
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd, mask=m_k[None, :], other=0.0)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale - b_lse[:, None]
        if IS_CAUSAL:
            b_s = tl.where((o_m[:, None] >= o_k[None, :]) & m_k[None, :], b_s, float("-inf"))
        else:
            b_s = tl.where(m_k[None, :], b_s, float("-inf"))
        if MASS:
            b_val = tl.sum(tl.exp2(b_s)) * inv_rows
        else:
            b_val = tl.exp2(tl.max(b_s))
        tl.store(p_pool + i_n, b_val)
    for i_n in range(hi, NB, BS):
        o_z = i_n + o_n
        tl.store(p_pool + o_z, tl.zeros([BS], dtype=tl.float32), mask=o_z < NB)


def attn_with_pooling(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = True,
    sm_scale: float | None = None,
    block_size: int = 64,
    pooling: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention plus the row-normalised block-pooled probability map (forward only).

    Args:
        q (torch.Tensor): `[B, Hq, S, D]`, float16/bfloat16 (float32 accepted for tests); may be a
            strided view, no copy is made.
        k, v (torch.Tensor): `[B, Hkv, S, D]`; `Hkv` divides `Hq` (query head `h` reads KV head
            `h // (Hq // Hkv)`). `D` in {64, 128}.
        is_causal (bool): causal masking. Default: `True`.
        sm_scale (float, Optional): logit scale. Default: `1 / sqrt(D)`.
        block_size (int): pooling tile edge, one of 16, 32, 64, 128. Default: `64`.
        pooling (str): `"max"`, the maximum probability inside each tile (upstream's target), or
            `"mass"`, the probability summed over the tile's key columns and averaged over its
            real query rows. Default: `"max"`.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]` in `q.dtype`, same memory layout as `q`.
        pooled (torch.Tensor): `[B, Hq, nb, nb]` float32, `nb = ceil(S / block_size)`; each
            block-row sums to 1, blocks above the diagonal are exactly 0 when causal, and a partial
            last block is pooled over the tokens it really has.
    """
    check_attn_inputs("attn_with_pooling", q, k, v, block_size)
    if pooling not in ("max", "mass"):
        raise ValueError(f"attn_with_pooling: pooling must be 'max' or 'mass', got {pooling!r}")
    B, Hq, S, D = q.shape
    G = Hq // k.shape[1]
    nb = math.ceil(S / block_size)
    qk_scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)) * 1.4426950408889634
    prec = dot_precision(q.dtype)

    o = torch.empty_like(q)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    attn_pooling_fwd_kernel[lambda meta: (triton.cdiv(S, meta["BM"]), B * Hq)](
        q,
        k,
        v,
        o,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        qk_scale,
        S,
        HQ=Hq,
        G=G,
        D=D,
        IS_CAUSAL=bool(is_causal),
        DOT_PREC=prec,
    )
    pooled = torch.empty(B, Hq, nb, nb, dtype=torch.float32, device=q.device)
    attn_pooling_fwd_kernel_pool[(nb, B * Hq)](
        q,
        k,
        lse,
        pooled,
        *q.stride(),
        *k.stride(),
        qk_scale,
        S,
        nb,
        HQ=Hq,
        G=G,
        D=D,
        BS=block_size,
        IS_CAUSAL=bool(is_causal),
        MASS=pooling == "mass",
        DOT_PREC=prec,
    )
    pooled /= pooled.sum(-1, keepdim=True)
    return o, pooled
