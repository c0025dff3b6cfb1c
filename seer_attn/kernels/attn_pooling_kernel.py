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
2. one program per (``R`` query blocks, head) recomputes ``q k^T`` for every causal key block, ``C``
   key blocks per step, and reduces the probabilities ``exp2(s - lse)`` straight into its own rows of
   the ``[nb, nb]`` map. For the max map ``max_{r,c} exp2(s[r, c] - lse[r]) =
   exp2(max_r(max_c(s[r, c]) - lse[r]))``: each row's maximum is taken first (within a warp), so the
   pass needs no elementwise work beyond that maximum and one ``exp2`` per tile, and costs about half
   a forward's matrix work. ``R, C`` (tiles of up to 128 x 256) amortise the cross-warp reduction of
   each pooled value; the autotuner picks them.

Each program writes whole rows of the map, so there are no atomics; the row normalisation is one
``[B, H, nb, nb]`` division on the host.

Packed sequences (``cu_seqlens``, flash-attn's varlen layout ``[total, H, D]``): every sequence has its
own block grid from its first token and its own ``[nb, nb]`` corner of a ``[n_seq, H, nb_max, nb_max]``
map, exactly as if it were run alone.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import check_attn_inputs, dot_precision, is_interpreter, prune_configs, use_tma

__all__ = ["attn_with_pooling"]


@triton.jit
def _seq_bounds(cu_seqlens, i_b, T, VARLEN: tl.constexpr):
    # (first token, length) of sequence i_b: packed sequences read cu_seqlens, a batch has T each
    if VARLEN:
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        seqlen = (tl.load(cu_seqlens + i_b + 1) - bos).to(tl.int32)
    else:
        bos = tl.zeros([], dtype=tl.int64)
        seqlen = T
    return bos, seqlen


def len_bucket(seqlen: int) -> int:
    """Autotuning key for the (longest) sequence length: powers of two from 1024 to 131072, so a short
    first call does not choose the tiles of every later long one (and each bucket tunes once)."""
    return min(max(triton.next_power_of_2(int(seqlen)), 1024), 131072)


def _keep_fwd(conf: triton.Config) -> bool:
    # the band below the diagonal is walked in BN steps from a BM boundary
    return conf.kwargs["BM"] % conf.kwargs["BN"] == 0


def _prune_fwd(configs, named_args, **kwargs):
    # configs that cannot win, dropped before compiling (compiled for sm_90 with triton 3.6): K and V
    # stages beyond the 227 KB of shared memory a block may have do not launch, and 128-row tiles
    # on 4 warps spill registers at D=128
    D = kwargs.get("D", named_args.get("D"))
    keep = [
        c for c in configs
        if c.num_stages * c.kwargs["BN"] * D * 4 + c.kwargs["BM"] * D * 2 <= 227 * 1024
        and not (D >= 128 and c.kwargs["BM"] == 128 and c.num_warps == 4)
    ]
    return keep or configs[:1]


def _fwd_descriptor_shapes(nargs) -> None:
    # autotune pre-hook: the K/V tensor descriptors load [BN, D] tiles of the config being tried
    for name in ("desc_k", "desc_v"):
        desc = nargs[name]
        if hasattr(desc, "block_shape"):
            desc.block_shape = [1, 1, nargs["BN"], nargs["D"]]


@triton.autotune(
    configs=prune_configs(
        list(
            filter(
                _keep_fwd,
                [
                    triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s, pre_hook=_fwd_descriptor_shapes)
                    for bm in (64, 128)
                    for bn in (64, 128)
                    for w in (4, 8)
                    for s in (3, 4)
                ],
            )
        )
    ),
    key=["D", "IS_CAUSAL", "VARLEN", "LEN_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit(do_not_specialize=["T"])
def attn_pooling_fwd_kernel(
    q,
    k,
    v,
    o,
    lse,
    cu_seqlens,
    desc_k,
    desc_v,
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
    stride_lb,
    stride_lh,
    qk_scale,
    T,
    LEN_BUCKET,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    VARLEN: tl.constexpr,
    TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    # TMA: K and V tiles come through Hopper tensor descriptors (desc_k, desc_v over [B or 1, Hkv, S or
    # total, D]; rows past the tensor read as 0, rows of the next packed sequence are masked below)
    # heaviest (last) query tiles first
    i_m = (tl.num_programs(0) - 1 - tl.program_id(0)).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hkv = i_h // G
    bos, T = _seq_bounds(cu_seqlens, i_b, T, VARLEN)
    if i_m * BM >= T:
        # past the end of a shorter packed sequence
        return

    o_m = i_m * BM + tl.arange(0, BM)
    o_n = tl.arange(0, BN)
    o_d = tl.arange(0, D)
    m_m = o_m < T

    p_q = q + i_b * stride_qb + i_h * stride_qh + (bos + o_m[:, None]) * stride_qt + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    k_base = k + i_b * stride_kb + i_hkv * stride_kh + bos * stride_kt
    v_base = v + i_b * stride_vb + i_hkv * stride_vh + bos * stride_vt
    # the descriptors' batch coordinate: packed sequences share one [1, H, total, D] tensor
    i_bd = (0 * i_b if VARLEN else i_b).to(tl.int32)

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
        if TMA:
            b_k = tl.trans(desc_k.load([i_bd, i_hkv.to(tl.int32), (bos + i_n).to(tl.int32), 0]).reshape(BN, D))
        else:
            b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd)
        b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale
        b_mn = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_mn[:, None])
        b_alpha = tl.exp2(b_m - b_mn)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        if TMA:
            b_v = desc_v.load([i_bd, i_hkv.to(tl.int32), (bos + i_n).to(tl.int32), 0]).reshape(BN, D)
        else:
            b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_m = b_mn
    for i_n in range(lo_end, hi, BN):
        o_k = i_n + o_n
        m_k = o_k < T
        if TMA:
            b_k = tl.trans(desc_k.load([i_bd, i_hkv.to(tl.int32), (bos + i_n).to(tl.int32), 0]).reshape(BN, D))
        else:
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
        if TMA:
            # rows past this sequence hold the next one's values: their probabilities are exactly 0
            b_v = desc_v.load([i_bd, i_hkv.to(tl.int32), (bos + i_n).to(tl.int32), 0]).reshape(BN, D)
        else:
            b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd, mask=m_k[:, None], other=0.0)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
        b_m = b_mn

    b_o = b_acc / b_l[:, None]
    p_o = o + i_b * stride_ob + i_h * stride_oh + (bos + o_m[:, None]) * stride_ot + o_d[None, :] * stride_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])
    tl.store(lse + i_b * stride_lb + i_h * stride_lh + bos + o_m, b_m + tl.log2(b_l), mask=m_m)




# (R query blocks per program, C key blocks per step, warps, stages); the first is the interpreter's.
# Tiles stay within 128 query rows and 256 keys (the key tile is streamed through shared memory).
POOL_CONFIGS = [
    dict(R=1, C=1, num_warps=4, num_stages=3),
    dict(R=1, C=2, num_warps=4, num_stages=3),
    dict(R=1, C=4, num_warps=4, num_stages=2),
    dict(R=1, C=4, num_warps=8, num_stages=2),
    dict(R=2, C=1, num_warps=4, num_stages=3),
    dict(R=2, C=2, num_warps=8, num_stages=2),
    dict(R=2, C=2, num_warps=4, num_stages=2),
    dict(R=2, C=4, num_warps=8, num_stages=2),
]


def _pool_config(conf: dict) -> triton.Config:
    conf = dict(conf)
    return triton.Config({"R": conf.pop("R"), "C": conf.pop("C")}, **conf)


def _prune_pool(configs, named_args, **kwargs):
    # tiles of at most 128 query rows and 256 keys: small pooling blocks take more blocks per tile
    bs = kwargs.get("BS", named_args.get("BS"))
    keep = [c for c in configs if c.kwargs["R"] * bs <= 128 and c.kwargs["C"] * bs <= 256]
    return keep or configs[:1]


@triton.jit
def _pool_block_row(
    b_q, b_lse, k_base, desc_k, kc_b, kc_h, kc_t, stride_kt, stride_kd, qk_scale, o_m, j, T,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASS: tl.constexpr, DOT_PREC: tl.constexpr,
    D: tl.constexpr, BS: tl.constexpr, TMA: tl.constexpr,
):
    """Per query row, the pooled value of key block `j`: `max_c (s - lse)` (log2), or `sum_c p` for mass.
    With TMA, `kc_b, kc_h, kc_t`: the descriptor's batch coordinate, KV head and the sequence's first token."""
    o_k = j * BS + tl.arange(0, BS)
    o_d = tl.arange(0, D)
    if TMA:
        b_k = tl.trans(desc_k.load([kc_b, kc_h, (kc_t + j * BS).to(tl.int32), 0]).reshape(BS, D))
        if MASKED:
            m_k = o_k < T
    elif MASKED:
        m_k = o_k < T
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd, mask=m_k[None, :], other=0.0)
    else:
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd)
    # [R * BS, BS] raw logits
    b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC)
    if MASKED:
        if IS_CAUSAL:
            b_s = tl.where((o_m[:, None] >= o_k[None, :]) & m_k[None, :], b_s, float("-inf"))
        else:
            b_s = tl.where(m_k[None, :], b_s, float("-inf"))
    if MASS:
        return tl.sum(tl.exp2(b_s * qk_scale - b_lse[:, None]), 1)
    else:
        # the row maximum is taken on raw logits: max_c(s * scale - lse) = max_c(s) * scale - lse
        return tl.max(b_s, 1) * qk_scale - b_lse


@triton.jit
def _pool_tile(
    b_q, b_lse, k_base, desc_k, kc_b, kc_h, kc_t, stride_kt, stride_kd, qk_scale, o_m, j0, T,
    MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASS: tl.constexpr, DOT_PREC: tl.constexpr,
    D: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, C: tl.constexpr, TMA: tl.constexpr,
):
    """Per query row, the pooled values of key blocks `j0 .. j0 + C - 1`: `[R * BS, C]`."""
    x0 = _pool_block_row(b_q, b_lse, k_base, desc_k, kc_b, kc_h, kc_t, stride_kt, stride_kd, qk_scale, o_m, j0, T,
                         MASKED, IS_CAUSAL, MASS, DOT_PREC, D, BS, TMA)
    if C == 1:
        b_x = x0[:, None]
    else:
        x1 = _pool_block_row(b_q, b_lse, k_base, desc_k, kc_b, kc_h, kc_t, stride_kt, stride_kd, qk_scale, o_m, j0 + 1, T,
                             MASKED, IS_CAUSAL, MASS, DOT_PREC, D, BS, TMA)
        if C == 2:
            b_x = tl.join(x0, x1)
        else:
            x2 = _pool_block_row(b_q, b_lse, k_base, desc_k, kc_b, kc_h, kc_t, stride_kt, stride_kd, qk_scale, o_m, j0 + 2, T,
                                 MASKED, IS_CAUSAL, MASS, DOT_PREC, D, BS, TMA)
            x3 = _pool_block_row(b_q, b_lse, k_base, desc_k, kc_b, kc_h, kc_t, stride_kt, stride_kd, qk_scale, o_m, j0 + 3, T,
                                 MASKED, IS_CAUSAL, MASS, DOT_PREC, D, BS, TMA)
            # join(join(x0, x2), join(x1, x3))[n, i, a] is x_{2i + a}: reshaped, column c holds x_c
            b_x = tl.reshape(tl.join(tl.join(x0, x2), tl.join(x1, x3)), [R * BS, 4])
    return b_x


@triton.jit
def _pool_store(
    b_x, p_pool, j0, T, i_0, NB,
    MASS: tl.constexpr, BS: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
):
    # [R * BS, C] per-row values -> one pooled value per (query block, key block), one reduction
    # across the tile's rows per query block
    o_c = j0 + tl.arange(0, C)
    o_g = tl.arange(0, R * BS) // BS
    for r in tl.static_range(R):
        if MASS:
            # the mass map averages over the block's real query rows
            n_rows = tl.maximum(tl.minimum(BS, T - (i_0 + r) * BS), 1).to(tl.float32)
            b_val = tl.sum(tl.where((o_g == r)[:, None], b_x, 0.0), 0) / n_rows
        else:
            b_val = tl.exp2(tl.max(tl.where((o_g == r)[:, None], b_x, float("-inf")), 0))
        # rows and columns past NB do not exist
        tl.store(p_pool + r * NB + o_c, b_val, mask=o_c < tl.where(i_0 + r < NB, NB, 0))


@triton.autotune(
    configs=prune_configs([_pool_config(c) for c in POOL_CONFIGS]),
    key=["D", "BS", "IS_CAUSAL", "MASS", "VARLEN", "LEN_BUCKET"],
    prune_configs_by={"early_config_prune": _prune_pool},
)
@triton.jit(do_not_specialize=["T"])
def attn_pooling_fwd_kernel_pool(
    q,
    k,
    lse,
    pooled,
    cu_seqlens,
    desc_k,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_lb,
    stride_lh,
    qk_scale,
    T,
    NB,
    LEN_BUCKET,
    HQ: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASS: tl.constexpr,
    VARLEN: tl.constexpr,
    TMA: tl.constexpr,
    DOT_PREC: tl.constexpr,
    R: tl.constexpr,
    C: tl.constexpr,
):
    # program: query blocks i0 .. i0 + R - 1 of one (sequence, head); heaviest first
    i_0 = ((tl.num_programs(0) - 1 - tl.program_id(0)) * R).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // HQ, i_bh % HQ
    i_hkv = i_h // G
    bos, T = _seq_bounds(cu_seqlens, i_b, T, VARLEN)
    nb = tl.cdiv(T, BS)

    o_m = i_0 * BS + tl.arange(0, R * BS)
    o_d = tl.arange(0, D)
    m_m = o_m < T
    p_q = q + i_b * stride_qb + i_h * stride_qh + (bos + o_m[:, None]) * stride_qt + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
    # rows past the end get lse = +inf, so their probabilities are exactly 0
    b_lse = tl.load(lse + i_b * stride_lb + i_h * stride_lh + bos + o_m, mask=m_m, other=float("inf"))
    k_base = k + i_b * stride_kb + i_hkv * stride_kh + bos * stride_kt
    # TMA descriptor coordinates (batch, KV head, sequence start): packed sequences share one [1, H, total, D]
    kc_b, kc_h, kc_t = (0 * i_b if VARLEN else i_b).to(tl.int32), i_hkv.to(tl.int32), bos.to(tl.int32)
    # this program's rows of the map; rows and columns past NB do not exist
    o_r = i_0 + tl.arange(0, R)
    p_row = pooled + (i_bh * NB + i_0) * NB
    p_pool = pooled + (i_bh * NB + o_r[:, None]) * NB
    m_r = (o_r < NB)[:, None]

    if IS_CAUSAL:
        # key blocks below the program's first query block need no mask
        n_full = tl.minimum(i_0, nb) // C * C
        hi = tl.minimum(i_0 + R, nb)
    else:
        n_full = (T // BS) // C * C
        hi = nb
    # a program wholly past its sequence's end (packed) only writes zeros
    n_full = tl.where(i_0 < nb, n_full, 0)
    hi = tl.where(i_0 < nb, hi, 0)
    for j0 in range(0, n_full, C):
        b_x = _pool_tile(b_q, b_lse, k_base, desc_k, kc_b, kc_h, kc_t, stride_kt, stride_kd, qk_scale, o_m, j0, T,
                         False, IS_CAUSAL, MASS, DOT_PREC, D, BS, R, C, TMA)
        _pool_store(b_x, p_row, j0, T, i_0, NB, MASS, BS, R, C)
    for j0 in range(n_full, hi, C):
        b_x = _pool_tile(b_q, b_lse, k_base, desc_k, kc_b, kc_h, kc_t, stride_kt, stride_kd, qk_scale, o_m, j0, T,
                         True, IS_CAUSAL, MASS, DOT_PREC, D, BS, R, C, TMA)
        _pool_store(b_x, p_row, j0, T, i_0, NB, MASS, BS, R, C)
    # everything else in these rows (above the diagonal, past the sequence) is exactly 0
    z0 = tl.maximum(n_full, tl.cdiv(hi, C) * C)
    for j0 in range(z0, NB, BS):
        o_z = j0 + tl.arange(0, BS)
        tl.store(p_pool + o_z[None, :], tl.zeros([R, BS], dtype=tl.float32), mask=m_r & (o_z < NB)[None, :])


def attn_with_pooling(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = True,
    sm_scale: float | None = None,
    block_size: int = 64,
    pooling: str = "max",
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention plus the row-normalised block-pooled probability map (forward only).

    Args:
        q (torch.Tensor): `[B, Hq, S, D]`, float16/bfloat16 (float32 accepted for tests); may be a
            strided view, no copy is made. Packed (with `cu_seqlens`): `[total, Hq, D]`.
        k, v (torch.Tensor): `[B, Hkv, S, D]` (packed: `[total, Hkv, D]`); `Hkv` divides `Hq` (query
            head `h` reads KV head `h // (Hq // Hkv)`). `D` in {64, 128}.
        is_causal (bool): causal masking. Default: `True`.
        sm_scale (float, Optional): logit scale. Default: `1 / sqrt(D)`.
        block_size (int): pooling tile edge, one of 16, 32, 64, 128. Default: `64`.
        pooling (str): `"max"`, the maximum probability inside each tile (upstream's target), or
            `"mass"`, the probability summed over the tile's key columns and averaged over its
            real query rows. Default: `"max"`.
        cu_seqlens (torch.Tensor, Optional): int32 `[n_seq + 1]` cumulative lengths of packed
            sequences (flash-attn's varlen convention); each sequence attends within itself only and
            has its own block grid starting at its first token. Default: not packed.
        max_seqlen (int, Optional): longest packed sequence; read from `cu_seqlens` (one host sync)
            when not given.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]` (packed: `[total, Hq, D]`) in `q.dtype`, same memory layout
            as `q`.
        pooled (torch.Tensor): `[B, Hq, nb, nb]` float32, `nb = ceil(S / block_size)`; each
            block-row sums to 1, blocks above the diagonal are exactly 0 when causal, and a partial
            last block is pooled over the tokens it really has. Packed: `[n_seq, Hq, nb, nb]` with
            `nb = ceil(max_seqlen / block_size)`, sequence `s` in its `[nb_s, nb_s]` corner and
            exact zeros elsewhere (rows past a sequence's end sum to 0).
    """
    name = "attn_with_pooling"
    if pooling not in ("max", "mass"):
        raise ValueError(f"{name}: pooling must be 'max' or 'mass', got {pooling!r}")
    packed = cu_seqlens is not None
    if packed:
        from seer_attn.kernels.block_sparse_attn_csr import _check_varlen, resolve_max_seqlen

        q4, k4, v4 = _check_varlen(name, q, k, v, cu_seqlens, block_size)
        max_seqlen = resolve_max_seqlen(cu_seqlens, max_seqlen, q.shape[0])
        B, Hq, S, D = cu_seqlens.numel() - 1, q4.shape[1], max_seqlen, q4.shape[3]
        T = q4.shape[2]
    else:
        check_attn_inputs(name, q, k, v, block_size)
        q4, k4, v4 = q, k, v
        B, Hq, S, D = q.shape
        T = S
    G = Hq // k4.shape[1]
    nb = math.ceil(S / block_size)
    qk_scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)) * 1.4426950408889634
    prec = dot_precision(q.dtype)
    o, lse = _forward_lse(q4, k4, v4, qk_scale, bool(is_causal), cu_seqlens if packed else None, B, S, prec)
    # packed: tensors are [1, H, total, D] views whose "batch" index is the sequence (stride 0),
    # lse is [Hq, total]
    sb = (lambda t: 0) if packed else (lambda t: t.stride(0))
    lse_strides = (0, T) if packed else (Hq * S, S)
    cu = cu_seqlens if packed else lse
    pooled = torch.empty(B, Hq, nb, nb, dtype=torch.float32, device=q.device)
    _pool(q4, k4, lse, pooled, cu, sb, lse_strides, qk_scale, T, nb, Hq, G, D, block_size, bool(is_causal),
          pooling == "mass", packed, prec)
    total = pooled.sum(-1, keepdim=True)
    # rows that do not exist (past a packed sequence's end) stay 0
    pooled /= torch.where(total > 0, total, 1.0) if packed else total
    return (o[0].transpose(0, 1) if packed else o), pooled


# the first pass loads K/V through Hopper tensor descriptors (TMA) where they apply (`use_tma`): the
# TopK kernel went from FA2's rate to 400-460 TFLOP/s with them. False: plain loads everywhere (benchmarks)
FWD_TMA = True


def _forward_lse(q, k, v, qk_scale, is_causal, cu_seqlens, B, S, prec):
    """First pass on `[B, H, S, D]` views (packed: `[1, H, total, D]` with `cu_seqlens`, `B` sequences
    of at most `S` tokens): `o` in `q`'s layout and the base-2 logsumexp `[B, Hq, S]` (packed `[Hq, total]`)."""
    Hq, T = q.shape[1], q.shape[2]
    packed = cu_seqlens is not None
    sb = (lambda t: 0) if packed else (lambda t: t.stride(0))
    lse = torch.empty(Hq, T, dtype=torch.float32, device=q.device) if packed else torch.empty(
        B, Hq, S, dtype=torch.float32, device=q.device)
    o = torch.empty_like(q)
    tma = FWD_TMA and use_tma(k, v)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        # block shapes are set per autotune config (_fwd_descriptor_shapes)
        desc_k = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, 64, k.shape[3]])
        desc_v = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, 64, v.shape[3]])
    else:
        desc_k, desc_v = k, v
    attn_pooling_fwd_kernel[lambda meta: (triton.cdiv(S, meta["BM"]), B * Hq)](
        q, k, v, o, lse, cu_seqlens if packed else lse, desc_k, desc_v,
        sb(q), *q.stride()[1:],
        sb(k), *k.stride()[1:],
        sb(v), *v.stride()[1:],
        sb(o), *o.stride()[1:],
        *((0, T) if packed else (Hq * S, S)),
        qk_scale,
        T,
        len_bucket(S),
        HQ=Hq,
        G=Hq // k.shape[1],
        D=q.shape[3],
        IS_CAUSAL=is_causal,
        VARLEN=packed,
        TMA=tma,
        DOT_PREC=prec,
    )
    return o, lse


def attn_forward_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = True, sm_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass of :func:`attn_with_pooling` alone (for other ground-truth passes built on it).

    Args: `q [B, Hq, S, D]`, `k, v [B, Hkv, S, D]`, as in :func:`attn_with_pooling`.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]`, same memory layout as `q`.
        lse (torch.Tensor): `[B, Hq, S]` fp32, each row's logsumexp of `sm_scale * log2(e) * q.k`
            in base 2 (so `exp2(s * sm_scale * log2(e) - lse)` are the row's probabilities).
    """
    check_attn_inputs("attn_forward_lse", q, k, v, 64)
    B, Hq, S, D = q.shape
    qk_scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)) * 1.4426950408889634
    return _forward_lse(q, k, v, qk_scale, bool(is_causal), None, B, S, dot_precision(q.dtype))


# launch options of the pooling pass: None = autotune over POOL_CONFIGS, or one of them (sweeps)
POOL_LAUNCH: dict | None = None


def _pool(q, k, lse, pooled, cu, sb, lse_strides, qk_scale, T, nb, Hq, G, D, block_size, is_causal, mass, packed,
          prec, config: dict | None = None) -> None:
    config = config if config is not None else POOL_LAUNCH
    tma = FWD_TMA and use_tma(k)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc_k = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, block_size, D])
    else:
        desc_k = k
    args = (q, k, lse, pooled, cu, desc_k, sb(q), *q.stride()[1:], sb(k), *k.stride()[1:], *lse_strides, qk_scale, T,
            nb, len_bucket(nb * block_size))
    meta = dict(HQ=Hq, G=G, D=D, BS=block_size, IS_CAUSAL=is_causal, MASS=mass, VARLEN=packed, TMA=tma, DOT_PREC=prec)
    if config is None:
        attn_pooling_fwd_kernel_pool[lambda m: (triton.cdiv(nb, m["R"]), pooled.shape[0] * Hq)](*args, **meta)
        return
    config = dict(config)
    if config["R"] * block_size > 128 or config["C"] * block_size > 256:
        raise ValueError(f"pooling tile {config} too large for block_size {block_size}")
    if is_interpreter():
        config = {"R": config["R"], "C": config["C"]}
    grid = (triton.cdiv(nb, config["R"]), pooled.shape[0] * Hq)
    attn_pooling_fwd_kernel_pool.fn[grid](*args, **meta, **config)
