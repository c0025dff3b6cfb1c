"""Causal block-sparse attention driven by per-row lists of kept key blocks (forward only).

This is the inference kernel: the gate ranks key blocks and each query block attends only to the
key blocks listed for it. The structure follows the Triton fused-attention tutorial: kept blocks
strictly below the diagonal are full and need no mask, the diagonal block (when kept) runs last
with the causal and length masks. Work is proportional to the number of kept blocks; a row with no
kept block gives output 0.

Index formats (see :func:`block_sparse_attn_topk`):

- fixed count: `block_index [B, Hq, nb, K]`, e.g. `torch.topk` indices as they are (score order,
  entries above the diagonal for early rows, `-1` padding and repeats are all accepted);
- variable count (threshold or adaptive selection): FlexAttention's `BlockMask` convention,
  `block_count [B, Hq, nb]` (its `kv_num_blocks`) plus `block_index [B, Hq, nb, Kmax]` (its
  `kv_indices`); row `i` keeps `block_index[..., i, :block_count[..., i]]`, in any order.
  :func:`kv_blocks_from_mask` builds it from a bool mask in one launch (ascending rows; its PyTorch
  twin is :func:`seer_attn.kernels.block_mask.mask_to_kv_blocks`).

Packed sequences (`cu_seqlens`, flash-attn's varlen layout `[total, H, D]`): the index tensors have one
batch entry per sequence and `nb` rows for the longest; each program reads its sequence's bounds and
the plan empties the rows past a sequence's end, so a padded batch runs in one launch.

A *plan* step turns either format into canonical lists in one small launch (per row: ascending,
unique, causal, with a count), so the attention kernels never see negatives, repeats or unsorted
rows; the pair kernels also get the merged list of their two rows (one more launch), and `lpt` an
order of the work items (an argsort). Attention kernels (`TOPK_FWD_CONFIG["kernel"]`):

- `"row"`: one program per query block (64 query rows, one warpgroup). `nj=2` handles two kept
  blocks per step (one `[BS, 2 * BS]` score tile).
- `"dual"`: one program per two consecutive query blocks, each with its own list and K/V stream,
  stepped in lockstep (the shorter list is padded with masked steps): two independent chains of
  matmuls and softmax for the scheduler to overlap, the way FlashAttention-3 ping-pongs two tiles.
- `"pair"`: one program per two consecutive query blocks (128 rows, the tile FlashAttention uses on
  Hopper), walking the union of the two rows' lists; a block that only one row keeps is masked out
  for the other row. That half-tile is wasted work: 0.47 of the tiles on random masks of density
  0.1, 0.29 on SmolLM2's oracle top-k masks (benchmarks/RESULTS.md), less at higher density.
- `"headpair"`: the same 128-row tile built from the same query block of two query heads that share
  a KV head (GQA), so each loaded K/V tile serves both heads; needs an even group size.
- `"legacy"`: the previous kernel (host sort, autotuned, duplicates masked in-kernel), for comparison.

Options: `tma` (load K/V through Hopper tensor descriptors; the plain loads are used where the GPU
or the strides do not allow it, and under the interpreter the descriptor path is emulated),
`persistent` (n programs per SM looping over the work items), `lpt` (1: items of each KV head's
group in descending kept-count order, groups one after another so their K/V stays in L2; 2: all
items in descending order; causal rows are unequal), `num_warps`, `num_stages`, `ws` (Triton's
warp specialisation of the inner loop). `benchmarks/sweep_topk.py` times the combinations worth
trying and prints the `TOPK_FWD_CONFIG` entry of the fastest.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import check_attn_inputs, dot_precision, is_interpreter, prune_configs, use_tma

__all__ = ["block_sparse_attn_topk", "kv_blocks_from_mask", "TOPK_FWD_CONFIG"]

# The launch used by default, per head_dim. Switch the library default here after a sweep
# (`python benchmarks/sweep_topk.py` prints the winning entry as a dict). Pair kernels need
# block_size <= 64; with larger blocks the same settings run on the "row" kernel.
# the winner of benchmarks/sweep_topk.py on an H200 (2026-11-22, benchmarks/RESULTS.md): one query
# block per program with tensor-descriptor (TMA) loads; where TMA is unavailable the plain loads run
TOPK_FWD_CONFIG = {
    64: dict(kernel="row", tma=True, num_warps=4, num_stages=3),
    128: dict(kernel="row", tma=True, num_warps=4, num_stages=3),
}
_CONFIG_DEFAULTS = dict(
    kernel="row", nj=1, num_warps=4, num_stages=3, tma=False, persistent=0, lpt=False, ws=False
)
_KERNELS = ("row", "dual", "pair", "headpair", "legacy")

# legacy kernel only: kept key blocks per inner step, by head_dim: 2 gives one [BS, 2 * BS] score
# tile instead of two [BS, BS]; on an H100 at 32k that was 5% faster for D=64 and 20% slower for
# D=128 (register pressure)
BLOCKS_PER_STEP = {64: 2, 128: 1}
_LOG2E = 1.4426950408889634
# sorts push invalid entries past every real block index with this key (a constexpr: compiled
# Triton refuses plain globals in kernels; the interpreter accepts them)
_BIG = tl.constexpr(2**30)


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


# ----------------------------------------------------------------------------------------------
# a bool mask -> the count format, one program per row
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["NQ", "NK", "KMAX"])
def _kv_blocks_kernel(
    mask, num, idx, stride_mb, stride_mh, stride_mr, H, NQ, NK, KMAX, CAUSAL: tl.constexpr, BLOCK_C: tl.constexpr
):
    # row i of (batch b, head h): its kept columns (CAUSAL: those <= i), ascending, at most KMAX, -1 after
    i = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b, i_h = i_bh // H, i_bh % H
    p_row = mask + i_b * stride_mb + i_h * stride_mh + i.to(tl.int64) * stride_mr
    p_out = idx + (i_bh * NQ + i) * KMAX
    hi = tl.minimum(i + 1, NK) if CAUSAL else NK
    n = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, hi, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        keep = tl.load(p_row + o_c, mask=o_c < hi, other=0) != 0
        slot = n + tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(p_out + slot, o_c, mask=keep & (slot < KMAX))
        n += tl.sum(keep.to(tl.int32))
    n = tl.minimum(n, KMAX)
    for c0 in range(0, KMAX, BLOCK_C):
        o_c = c0 + tl.arange(0, BLOCK_C)
        tl.store(p_out + o_c, tl.full([BLOCK_C], -1, tl.int32), mask=(o_c >= n) & (o_c < KMAX))
    tl.store(num + i_bh * NQ + i, n)


def kv_blocks_from_mask(
    mask: torch.Tensor, max_blocks: int | None = None, causal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask `[B, H, nb_q, nb_k]` -> `(block_count [B, H, nb_q] int32, block_index [B, H, nb_q, Kmax]
    int32)`: the variable-count input of :func:`block_sparse_attn_topk`, in one kernel launch.

    The same result as :func:`seer_attn.kernels.block_mask.mask_to_kv_blocks` (its PyTorch twin),
    which materialises several int64 `[B, H, nb_q, nb_k]` temporaries (its model-level cost was not
    isolated: benchmarks/RESULTS.md, "Padded batches"). The row compaction is the CSR list builder's
    (`_csr_lists_kernel`), writing each row into its own `Kmax` slots with a count instead of into
    one flat list. Size-1 batch or head dimensions are read with stride 0 (no copy).

    Args:
        mask (torch.Tensor): bool `[B, H, nb_q, nb_k]` (CUDA, or CPU under the interpreter).
        max_blocks (int, Optional): `Kmax`, the width of `block_index` (default `nb_k`); a row that
            keeps more keeps its `Kmax` lowest columns and its count says so.
        causal (bool): drop columns above the diagonal (`j > i`), so the rows are canonical for the
            TopK kernel (`canonical=True`) and the upper triangle is never read.
    """
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise TypeError(f"kv_blocks_from_mask: mask must be a 4-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    if mask.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"kv_blocks_from_mask: needs a CUDA mask (got {mask.device}); mask_to_kv_blocks is the CPU twin")
    B, H, nq, nk = mask.shape
    kmax = nk if max_blocks is None else int(max_blocks)
    if kmax < 1:
        raise ValueError(f"kv_blocks_from_mask: max_blocks must be >= 1, got {max_blocks}")
    m = mask.view(torch.uint8)
    if m.stride(3) != 1:
        m = m.contiguous()
    strides = tuple(0 if m.shape[d] == 1 else m.stride(d) for d in (0, 1)) + (m.stride(2),)
    num = torch.empty(B, H, nq, dtype=torch.int32, device=mask.device)
    idx = torch.empty(B, H, nq, kmax, dtype=torch.int32, device=mask.device)
    if num.numel():
        block_c = min(1024, triton.next_power_of_2(max(nk, kmax)))
        _kv_blocks_kernel[(nq, B * H)](m, num, idx, *strides, H, nq, nk, kmax, CAUSAL=causal, BLOCK_C=block_c)
    return num, idx


# ----------------------------------------------------------------------------------------------
# plan: canonical per-row lists, merged pair lists
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["NB", "K", "KOUT"])
def _canon_lists_kernel(idx, cnt, out_idx, out_num, NB, K, KOUT, HAS_COUNT: tl.constexpr, BK: tl.constexpr):
    # one program per (batch, head, query block) row: keep entries in [0, row], sort, drop repeats
    i_r = tl.program_id(0).to(tl.int64)
    i_m = i_r % NB
    o_t = tl.arange(0, BK)
    m_t = o_t < K
    if HAS_COUNT:
        m_t = m_t & (o_t < tl.load(cnt + i_r))
    b_x = tl.load(idx + i_r * K + o_t, mask=m_t, other=-1)
    # compared in the input's integer type before narrowing, so huge entries cannot wrap into range
    b_ok = m_t & (b_x >= 0) & (b_x <= i_m)
    b_s = tl.sort(tl.where(b_ok, b_x.to(tl.int32), _BIG))
    b_prev = tl.gather(b_s, tl.maximum(o_t - 1, 0), 0)
    b_keep = (b_s < _BIG) & ((o_t == 0) | (b_prev != b_s))
    b_s = tl.sort(tl.where(b_keep, b_s, _BIG))
    n = tl.sum(b_keep.to(tl.int32))
    tl.store(out_idx + i_r * KOUT + o_t, tl.where(o_t < n, b_s, -1), mask=o_t < KOUT)
    tl.store(out_num + i_r, n)


@triton.jit(do_not_specialize=["NB", "KMAX", "UMAX", "HQ", "G", "NP"])
def _pair_lists_kernel(
    kv_idx, kv_num, u_idx, u_num, NB, KMAX, UMAX, HQ, G, NP, HEADS: tl.constexpr, BK: tl.constexpr
):
    # one program per pair of rows: merged ascending list, entry = block * 4 + (1: row A keeps it) + (2: row B)
    i_u = tl.program_id(0).to(tl.int64)
    if HEADS:
        # rows A, B: query block m of query heads h0, h0 + 1 (same KV head)
        i_m = i_u % NB
        i_rest = i_u // NB
        i_hp = i_rest % NP
        i_bhkv = i_rest // NP
        HKV = HQ // G
        i_h0 = (i_bhkv % HKV) * G + 2 * i_hp
        r_a = ((i_bhkv // HKV) * HQ + i_h0) * NB + i_m
        r_b = r_a + NB
        has_b = i_m >= 0
    else:
        # rows A, B: query blocks 2p and 2p + 1 of one head (B is missing at the end of an odd nb)
        i_p = i_u % NP
        r_a = (i_u // NP) * NB + 2 * i_p
        r_b = r_a + 1
        has_b = 2 * i_p + 1 < NB
    n_a = tl.load(kv_num + r_a)
    n_b = tl.load(kv_num + r_b, mask=has_b, other=0)
    # the first BK lanes read row A, the last BK row B
    o_t = tl.arange(0, 2 * BK)
    in_a = o_t < BK
    o_s = tl.where(in_a, o_t, o_t - BK)
    m_t = tl.where(in_a, o_s < n_a, o_s < n_b) & (o_s < KMAX)
    b_x = tl.load(kv_idx + tl.where(in_a, r_a, r_b) * KMAX + o_s, mask=m_t, other=0)
    b_c = tl.sort(tl.where(m_t, b_x * 4 + tl.where(in_a, 1, 2), _BIG))
    # a block both rows keep sits in two neighbouring entries (flags 1 then 2): merge them
    b_j = b_c >> 2
    o_next = tl.minimum(o_t + 1, 2 * BK - 1)
    b_jn = tl.gather(b_j, o_next, 0)
    b_fn = tl.gather(b_c & 3, o_next, 0)
    b_jp = tl.gather(b_j, tl.maximum(o_t - 1, 0), 0)
    b_valid = b_c < _BIG
    b_f = (b_c & 3) | tl.where((o_t + 1 < 2 * BK) & (b_jn == b_j), b_fn, 0)
    b_keep = b_valid & ((o_t == 0) | (b_jp != b_j))
    b_e = tl.sort(tl.where(b_keep, b_j * 4 + b_f, _BIG))
    n = tl.sum(b_keep.to(tl.int32))
    tl.store(u_idx + i_u * UMAX + o_t, tl.where(o_t < n, b_e, -1), mask=o_t < UMAX)
    tl.store(u_num + i_u, n)


# ----------------------------------------------------------------------------------------------
# attention kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_kt(k_base, desc_k, i_b, i_hkv, start, o_k, o_d, stride_kt, stride_kd, T, BN: tl.constexpr, D: tl.constexpr,
             TMA: tl.constexpr, MASKED: tl.constexpr):
    # K^T [D, BN] of keys o_k (with TMA: the BN keys from `start`, rows past T read as 0)
    if TMA:
        b_k = tl.trans(desc_k.load([i_b.to(tl.int32), i_hkv.to(tl.int32), start.to(tl.int32), 0]).reshape(BN, D))
    elif MASKED:
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd, mask=(o_k < T)[None, :], other=0.0)
    else:
        b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd)
    return b_k


@triton.jit
def _load_v(v_base, desc_v, i_b, i_hkv, start, o_k, o_d, stride_vt, stride_vd, T, BN: tl.constexpr, D: tl.constexpr,
            TMA: tl.constexpr, MASKED: tl.constexpr):
    # V [BN, D] of keys o_k
    if TMA:
        b_v = desc_v.load([i_b.to(tl.int32), i_hkv.to(tl.int32), start.to(tl.int32), 0]).reshape(BN, D)
    elif MASKED:
        b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd, mask=(o_k < T)[:, None], other=0.0)
    else:
        b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd)
    return b_v


@triton.jit
def _softmax_step(b_s, qk_scale, b_m, b_l, b_acc, b_v, SAFE: tl.constexpr, DOT_PREC: tl.constexpr):
    # one online-softmax update with the unscaled [BM, BN] scores b_s (-inf where masked); the
    # running max is kept in scaled base-2 units, so scaling and subtracting it is one FMA.
    # SAFE: rows may be all -inf
    b_mn = tl.maximum(b_m, tl.max(b_s, 1) * qk_scale)
    if SAFE:
        b_mz = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    else:
        b_mz = b_mn
    b_p = tl.exp2(b_s * qk_scale - b_mz[:, None])
    b_alpha = tl.exp2(b_m - b_mz)
    b_l = b_l * b_alpha + tl.sum(b_p, 1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
    return b_mn, b_l, b_acc


@triton.jit
def _seq_bounds(cu_seqlens, i_b, T, VARLEN: tl.constexpr):
    # (first token, length, batch coordinate) of sequence i_b: packed sequences live in one [1, H, total, D]
    # view and read their bounds from cu_seqlens; a padded batch has T tokens in each of its B entries
    if VARLEN:
        bos = tl.load(cu_seqlens + i_b).to(tl.int64)
        T_s = (tl.load(cu_seqlens + i_b + 1) - bos).to(tl.int32)
        i_bd = 0 * i_b
    else:
        bos = 0 * i_b
        T_s = T + 0 * i_b.to(tl.int32)
        i_bd = i_b
    return bos, T_s, i_bd


@triton.jit(do_not_specialize=["T", "NB", "KMAX", "HQ", "G", "n_items"])
def block_sparse_attn_topk_fwd_row_kernel(
    q, k, v, o, kv_idx, kv_num, order, desc_k, desc_v, cu_seqlens,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    qk_scale, T, NB, KMAX, HQ, G, n_items,
    D: tl.constexpr, BS: tl.constexpr, NJ: tl.constexpr, TMA: tl.constexpr, LPT: tl.constexpr,
    WS: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # work item = (batch * Hq + head) * nb + query block; a grid of n_items programs runs the loop
    # once, a persistent grid strides over the items (packed: batch = sequence, nb its longest's blocks;
    # the plan emptied the rows past each sequence's end)
    for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
        if LPT:
            item = tl.load(order + w).to(tl.int64)
        else:
            # heaviest (last) query blocks of each head first
            item = (w // NB) * NB + (NB - 1 - w % NB)
            item = item.to(tl.int64)
        i_bh = item // NB
        i_m = item % NB
        i_b = i_bh // HQ
        i_h = i_bh % HQ
        i_hkv = i_h // G
        bos, T_s, i_bd = _seq_bounds(cu_seqlens, i_b, T, VARLEN)

        o_m = i_m * BS + tl.arange(0, BS)
        o_d = tl.arange(0, D)
        m_m = o_m < T_s
        p_q = q + i_bd * stride_qb + bos * stride_qt + i_h * stride_qh + o_m[:, None] * stride_qt + o_d[None, :] * stride_qd
        b_q = tl.load(p_q, mask=m_m[:, None], other=0.0)
        k_base = k + i_bd * stride_kb + bos * stride_kt + i_hkv * stride_kh
        v_base = v + i_bd * stride_vb + bos * stride_vt + i_hkv * stride_vh

        # canonical row: ascending, unique, <= i_m; the diagonal, if kept, is the last entry
        n = tl.load(kv_num + item)
        p_idx = kv_idx + item * KMAX
        has_diag = (n > 0) & (tl.load(p_idx + tl.maximum(n - 1, 0)) == i_m)
        n_lo = n - has_diag.to(tl.int32)

        b_m = tl.full([BS], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BS], dtype=tl.float32)
        b_acc = tl.zeros([BS, D], dtype=tl.float32)
        o_j = tl.arange(0, NJ * BS)
        for i_t in tl.range(0, n_lo, NJ, warp_specialize=WS):
            i_n = tl.load(p_idx + i_t).to(tl.int64)
            if NJ == 2:
                # an odd tail re-reads block i_n with a -inf bias
                i_n2 = tl.load(p_idx + i_t + 1, mask=i_t + 1 < n_lo, other=-1).to(tl.int64)
                o_k = tl.where(o_j < BS, i_n * BS + o_j, tl.where(i_n2 < 0, i_n, i_n2) * BS + o_j - BS)
                b_bias = tl.where((o_j >= BS) & (i_n2 < 0), float("-inf"), 0.0)
            else:
                o_k = i_n * BS + o_j
            b_k = _load_kt(k_base, desc_k, i_bd, i_hkv, bos + i_n * BS, o_k, o_d, stride_kt, stride_kd, T_s, NJ * BS, D,
                           TMA, False)
            b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC)
            if NJ == 2:
                b_s += b_bias[None, :]
            b_v = _load_v(v_base, desc_v, i_bd, i_hkv, bos + i_n * BS, o_k, o_d, stride_vt, stride_vd, T_s, NJ * BS, D,
                          TMA, False)
            b_m, b_l, b_acc = _softmax_step(b_s, qk_scale, b_m, b_l, b_acc, b_v, False, DOT_PREC)
        if has_diag:
            o_k = i_m * BS + tl.arange(0, BS)
            b_k = _load_kt(k_base, desc_k, i_bd, i_hkv, bos + i_m * BS, o_k, o_d, stride_kt, stride_kd, T_s, BS, D, TMA,
                           True)
            b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC)
            b_s = tl.where((o_m[:, None] >= o_k[None, :]) & (o_k < T_s)[None, :], b_s, float("-inf"))
            b_v = _load_v(v_base, desc_v, i_bd, i_hkv, bos + i_m * BS, o_k, o_d, stride_vt, stride_vd, T_s, BS, D, TMA,
                          True)
            b_m, b_l, b_acc = _softmax_step(b_s, qk_scale, b_m, b_l, b_acc, b_v, False, DOT_PREC)
        # a row with no kept block has b_l == 0 and b_acc == 0: its output is 0
        b_l = tl.where(b_l == 0.0, 1.0, b_l)
        b_o = b_acc / b_l[:, None]
        p_o = o + i_bd * stride_ob + bos * stride_ot + i_h * stride_oh + o_m[:, None] * stride_ot + o_d[None, :] * stride_od
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None])


@triton.jit(do_not_specialize=["T", "NB", "UMAX", "HQ", "G", "NP", "n_items"])
def block_sparse_attn_topk_fwd_pair_kernel(
    q, k, v, o, u_idx, u_num, order, desc_k, desc_v, cu_seqlens,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    qk_scale, T, NB, UMAX, HQ, G, NP, n_items,
    D: tl.constexpr, BS: tl.constexpr, HEADS: tl.constexpr, TMA: tl.constexpr, LPT: tl.constexpr,
    WS: tl.constexpr, VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # work item = one pair of 64-row slots (see _pair_lists_kernel); rows 0..BS-1 are slot A, BS.. slot B
    BM: tl.constexpr = 2 * BS
    for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
        if LPT:
            item = tl.load(order + w).to(tl.int64)
        elif HEADS:
            item = ((w // NB) * NB + (NB - 1 - w % NB)).to(tl.int64)
        else:
            item = ((w // NP) * NP + (NP - 1 - w % NP)).to(tl.int64)
        o_r = tl.arange(0, BM)
        in_b = o_r >= BS
        if HEADS:
            i_m0 = item % NB
            i_rest = item // NB
            i_bhkv = i_rest // NP
            HKV = HQ // G
            i_b = i_bhkv // HKV
            i_hkv = i_bhkv % HKV
            r_head = i_hkv * G + 2 * (i_rest % NP) + in_b.to(tl.int64)
            r_tok = i_m0 * BS + o_r % BS
        else:
            i_bh = item // NP
            i_m0 = 2 * (item % NP)
            i_b = i_bh // HQ
            i_h = i_bh % HQ
            i_hkv = i_h // G
            r_head = i_h + 0 * o_r
            r_tok = i_m0 * BS + o_r
        bos, T_s, i_bd = _seq_bounds(cu_seqlens, i_b, T, VARLEN)
        o_d = tl.arange(0, D)
        m_r = r_tok < T_s
        p_q = (q + i_bd * stride_qb + bos * stride_qt + r_head[:, None] * stride_qh + r_tok[:, None] * stride_qt
               + o_d[None, :] * stride_qd)
        b_q = tl.load(p_q, mask=m_r[:, None], other=0.0)
        k_base = k + i_bd * stride_kb + bos * stride_kt + i_hkv * stride_kh
        v_base = v + i_bd * stride_vb + bos * stride_vt + i_hkv * stride_vh

        # merged ascending list; entries >= i_m0 (at most two) touch the diagonal and need the causal mask
        n = tl.load(u_num + item)
        p_u = u_idx + item * UMAX
        e_1 = tl.load(p_u + tl.maximum(n - 1, 0))
        e_2 = tl.load(p_u + tl.maximum(n - 2, 0))
        n_tail = ((n > 0) & ((e_1 >> 2) >= i_m0)).to(tl.int32) + ((n > 1) & ((e_2 >> 2) >= i_m0)).to(tl.int32)

        b_m = tl.full([BM], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BM], dtype=tl.float32)
        b_acc = tl.zeros([BM, D], dtype=tl.float32)
        o_j = tl.arange(0, BS)
        for i_t in tl.range(0, n - n_tail, warp_specialize=WS):
            e = tl.load(p_u + i_t)
            # rows of the slot that does not keep this block get -inf logits
            b_bias = tl.where(tl.where(in_b, (e & 2) != 0, (e & 1) != 0), 0.0, float("-inf"))
            o_k = (e >> 2).to(tl.int64) * BS + o_j
            b_k = _load_kt(k_base, desc_k, i_bd, i_hkv, bos + (e >> 2) * BS, o_k, o_d, stride_kt, stride_kd, T_s, BS, D,
                           TMA, False)
            b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) + b_bias[:, None]
            b_v = _load_v(v_base, desc_v, i_bd, i_hkv, bos + (e >> 2) * BS, o_k, o_d, stride_vt, stride_vd, T_s, BS, D,
                          TMA, False)
            b_m, b_l, b_acc = _softmax_step(b_s, qk_scale, b_m, b_l, b_acc, b_v, True, DOT_PREC)
        for i_t in range(n - n_tail, n):
            e = tl.load(p_u + i_t)
            b_keep = tl.where(in_b, (e & 2) != 0, (e & 1) != 0)
            o_k = (e >> 2).to(tl.int64) * BS + o_j
            b_k = _load_kt(k_base, desc_k, i_bd, i_hkv, bos + (e >> 2) * BS, o_k, o_d, stride_kt, stride_kd, T_s, BS, D,
                           TMA, True)
            b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC)
            m_s = b_keep[:, None] & (r_tok[:, None] >= o_k[None, :]) & (o_k < T_s)[None, :]
            b_s = tl.where(m_s, b_s, float("-inf"))
            b_v = _load_v(v_base, desc_v, i_bd, i_hkv, bos + (e >> 2) * BS, o_k, o_d, stride_vt, stride_vd, T_s, BS, D,
                          TMA, True)
            b_m, b_l, b_acc = _softmax_step(b_s, qk_scale, b_m, b_l, b_acc, b_v, True, DOT_PREC)
        b_l = tl.where(b_l == 0.0, 1.0, b_l)
        b_o = b_acc / b_l[:, None]
        p_o = (o + i_bd * stride_ob + bos * stride_ot + r_head[:, None] * stride_oh + r_tok[:, None] * stride_ot
               + o_d[None, :] * stride_od)
        tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_r[:, None])


@triton.jit
def _dual_row(q, kv_idx, kv_num, i_b, i_h, i_row, i_m, has, o_d, stride_qb, stride_qh, stride_qt, stride_qd, T,
              BS: tl.constexpr):
    # (q: already offset to the sequence's first token; i_b: its batch coordinate)
    # one of the dual kernel's rows: Q tile, list pointer, blocks below the diagonal, diagonal kept
    o_m = i_m * BS + tl.arange(0, BS)
    # (a bool scalar & a bool vector is mistyped by the interpreter: compare with a limit instead)
    m_m = o_m < tl.where(has, T, 0)
    b_q = tl.load(q + i_b * stride_qb + i_h * stride_qh + o_m[:, None] * stride_qt + o_d[None, :] * stride_qd,
                  mask=m_m[:, None], other=0.0)
    n = tl.load(kv_num + i_row, mask=has, other=0)
    has_diag = (n > 0) & (tl.load(kv_idx + tl.maximum(n - 1, 0), mask=has, other=-1) == i_m)
    return b_q, o_m, m_m, n - has_diag.to(tl.int32), has_diag


@triton.jit
def _dual_step(b_q, b_m, b_l, b_acc, p_idx, n_lo, i_t, k_base, v_base, desc_k, desc_v, i_b, i_hkv, bos, o_j, o_d,
               stride_kt, stride_kd, stride_vt, stride_vd, T, qk_scale, BS: tl.constexpr, D: tl.constexpr,
               TMA: tl.constexpr, DOT_PREC: tl.constexpr):
    # block i_t of a row's list; past the row's end it re-reads a valid block with -inf logits
    # (a missing or empty row reads nothing and uses block 0)
    i_n = tl.load(p_idx + tl.minimum(i_t, tl.maximum(n_lo - 1, 0)), mask=n_lo > 0, other=0).to(tl.int64)
    o_k = i_n * BS + o_j
    b_k = _load_kt(k_base, desc_k, i_b, i_hkv, bos + i_n * BS, o_k, o_d, stride_kt, stride_kd, T, BS, D, TMA, False)
    b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) + tl.where(i_t < n_lo, 0.0, float("-inf"))
    b_v = _load_v(v_base, desc_v, i_b, i_hkv, bos + i_n * BS, o_k, o_d, stride_vt, stride_vd, T, BS, D, TMA, False)
    return _softmax_step(b_s, qk_scale, b_m, b_l, b_acc, b_v, True, DOT_PREC)


@triton.jit
def _dual_diag(b_q, b_m, b_l, b_acc, o_m, i_m, k_base, v_base, desc_k, desc_v, i_b, i_hkv, bos, o_d,
               stride_kt, stride_kd, stride_vt, stride_vd, T, qk_scale, BS: tl.constexpr, D: tl.constexpr,
               TMA: tl.constexpr, DOT_PREC: tl.constexpr):
    o_k = i_m * BS + tl.arange(0, BS)
    b_k = _load_kt(k_base, desc_k, i_b, i_hkv, bos + i_m * BS, o_k, o_d, stride_kt, stride_kd, T, BS, D, TMA, True)
    b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC)
    b_s = tl.where((o_m[:, None] >= o_k[None, :]) & (o_k < T)[None, :], b_s, float("-inf"))
    b_v = _load_v(v_base, desc_v, i_b, i_hkv, bos + i_m * BS, o_k, o_d, stride_vt, stride_vd, T, BS, D, TMA, True)
    return _softmax_step(b_s, qk_scale, b_m, b_l, b_acc, b_v, True, DOT_PREC)


@triton.jit(do_not_specialize=["T", "NB", "KMAX", "HQ", "G", "NP", "n_items"])
def block_sparse_attn_topk_fwd_dual_kernel(
    q, k, v, o, kv_idx, kv_num, order, desc_k, desc_v, cu_seqlens,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    qk_scale, T, NB, KMAX, HQ, G, NP, n_items,
    D: tl.constexpr, BS: tl.constexpr, TMA: tl.constexpr, LPT: tl.constexpr, WS: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # work item = (batch * Hq + head) * NP + p: query blocks 2p and 2p + 1, each with its own list and
    # K/V stream, stepped in lockstep so one row's softmax can overlap the other row's matmuls
    for w in range(tl.program_id(0), n_items, tl.num_programs(0)):
        if LPT:
            item = tl.load(order + w).to(tl.int64)
        else:
            item = ((w // NP) * NP + (NP - 1 - w % NP)).to(tl.int64)
        i_bh = item // NP
        i_ma = 2 * (item % NP)
        i_b = i_bh // HQ
        i_h = i_bh % HQ
        i_hkv = i_h // G
        bos, T_s, i_bd = _seq_bounds(cu_seqlens, i_b, T, VARLEN)
        o_d = tl.arange(0, D)
        o_j = tl.arange(0, BS)
        q_seq = q + bos * stride_qt
        k_base = k + i_bd * stride_kb + bos * stride_kt + i_hkv * stride_kh
        v_base = v + i_bd * stride_vb + bos * stride_vt + i_hkv * stride_vh
        r_a = i_bh * NB + i_ma
        p_a = kv_idx + r_a * KMAX
        p_b = p_a + KMAX
        b_qa, o_ma, m_ma, n_a, diag_a = _dual_row(q_seq, p_a, kv_num, i_bd, i_h, r_a, i_ma, i_ma >= 0, o_d,
                                                  stride_qb, stride_qh, stride_qt, stride_qd, T_s, BS)
        b_qb, o_mb, m_mb, n_b, diag_b = _dual_row(q_seq, p_b, kv_num, i_bd, i_h, r_a + 1, i_ma + 1, i_ma + 1 < NB, o_d,
                                                  stride_qb, stride_qh, stride_qt, stride_qd, T_s, BS)
        b_ma = tl.full([BS], float("-inf"), dtype=tl.float32)
        b_la = tl.zeros([BS], dtype=tl.float32)
        b_acca = tl.zeros([BS, D], dtype=tl.float32)
        b_mb = tl.full([BS], float("-inf"), dtype=tl.float32)
        b_lb = tl.zeros([BS], dtype=tl.float32)
        b_accb = tl.zeros([BS, D], dtype=tl.float32)
        for i_t in tl.range(0, tl.maximum(n_a, n_b), warp_specialize=WS):
            b_ma, b_la, b_acca = _dual_step(b_qa, b_ma, b_la, b_acca, p_a, n_a, i_t, k_base, v_base, desc_k, desc_v,
                                            i_bd, i_hkv, bos, o_j, o_d, stride_kt, stride_kd, stride_vt, stride_vd, T_s,
                                            qk_scale, BS, D, TMA, DOT_PREC)
            b_mb, b_lb, b_accb = _dual_step(b_qb, b_mb, b_lb, b_accb, p_b, n_b, i_t, k_base, v_base, desc_k, desc_v,
                                            i_bd, i_hkv, bos, o_j, o_d, stride_kt, stride_kd, stride_vt, stride_vd, T_s,
                                            qk_scale, BS, D, TMA, DOT_PREC)
        if diag_a:
            b_ma, b_la, b_acca = _dual_diag(b_qa, b_ma, b_la, b_acca, o_ma, i_ma, k_base, v_base, desc_k, desc_v,
                                            i_bd, i_hkv, bos, o_d, stride_kt, stride_kd, stride_vt, stride_vd, T_s,
                                            qk_scale, BS, D, TMA, DOT_PREC)
        if diag_b:
            b_mb, b_lb, b_accb = _dual_diag(b_qb, b_mb, b_lb, b_accb, o_mb, i_ma + 1, k_base, v_base, desc_k, desc_v,
                                            i_bd, i_hkv, bos, o_d, stride_kt, stride_kd, stride_vt, stride_vd, T_s,
                                            qk_scale, BS, D, TMA, DOT_PREC)
        p_o = o + i_bd * stride_ob + bos * stride_ot + i_h * stride_oh + o_d[None, :] * stride_od
        b_la = tl.where(b_la == 0.0, 1.0, b_la)
        tl.store(p_o + o_ma[:, None] * stride_ot, (b_acca / b_la[:, None]).to(o.dtype.element_ty), mask=m_ma[:, None])
        b_lb = tl.where(b_lb == 0.0, 1.0, b_lb)
        tl.store(p_o + o_mb[:, None] * stride_ot, (b_accb / b_lb[:, None]).to(o.dtype.element_ty), mask=m_mb[:, None])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------


def resolve_config(head_dim: int, block_size: int = 64, config: dict | None = None) -> dict:
    """Launch settings: `config` (or `TOPK_FWD_CONFIG[head_dim]`), missing keys from the defaults, validated."""
    cfg = dict(_CONFIG_DEFAULTS)
    if config is None:
        config = TOPK_FWD_CONFIG.get(head_dim, {})
    if config:
        unknown = set(config) - set(_CONFIG_DEFAULTS)
        if unknown:
            raise ValueError(f"block_sparse_attn_topk: unknown config keys {sorted(unknown)}; known: {sorted(_CONFIG_DEFAULTS)}")
        cfg.update(config)
    if cfg["kernel"] not in _KERNELS:
        raise ValueError(f"block_sparse_attn_topk: config kernel must be one of {_KERNELS}, got {cfg['kernel']!r}")
    if cfg["nj"] not in (1, 2) or (cfg["nj"] == 2 and cfg["kernel"] not in ("row", "legacy")):
        raise ValueError(f"block_sparse_attn_topk: nj=2 is a 'row' kernel option, got {cfg}")
    if cfg["tma"] and cfg["nj"] != 1:
        raise ValueError("block_sparse_attn_topk: tma loads contiguous 1-block tiles; use nj=1")
    if cfg["lpt"] not in (0, 1, 2, False, True):
        raise ValueError(f"block_sparse_attn_topk: lpt must be 0, 1 (per KV group) or 2 (global), got {cfg['lpt']!r}")
    if cfg["kernel"] in ("pair", "headpair") and block_size > 64:
        # a 2 x 128-row tile does not fit in registers: same computation on the one-row kernel
        cfg["kernel"] = "row"
    return cfg


def _num_sms(device: torch.device) -> int:
    # the interpreter pretends to have 2 SMs, so tests exercise the persistent loop
    return 2 if is_interpreter() else _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _cuda_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _use_tma(*ts: torch.Tensor) -> bool:
    return use_tma(*ts)


def _canonical_lists(block_index: torch.Tensor, block_count: torch.Tensor | None, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Any accepted index format -> `(num [B, H, nb] int32, idx [B, H, nb, K] int32)`: ascending, unique, causal rows."""
    B, H, _, K = block_index.shape
    idx = block_index.contiguous()
    cnt = block_count.contiguous() if block_count is not None else idx
    out_idx = torch.empty(B, H, nb, K, dtype=torch.int32, device=idx.device)
    out_num = torch.empty(B, H, nb, dtype=torch.int32, device=idx.device)
    # (at least 2: a one-element tl.sort is a degenerate network)
    BK = max(2, triton.next_power_of_2(K))
    _canon_lists_kernel[(B * H * nb,)](
        idx, cnt, out_idx, out_num, nb, K, K, HAS_COUNT=block_count is not None, BK=BK,
        num_warps=1 if BK <= 256 else 4,
    )
    return out_num, out_idx


def _pair_lists(num: torch.Tensor, idx: torch.Tensor, heads: bool, G: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Canonical row lists -> merged lists of row pairs `(u_num [n_items], u_idx [n_items, UMAX], NP)`."""
    B, H, nb, K = idx.shape
    NP = G // 2 if heads else (nb + 1) // 2
    n_items = B * (H // G) * NP * nb if heads else B * H * NP
    umax = min(2 * K, nb)
    u_idx = torch.empty(n_items, umax, dtype=torch.int32, device=idx.device)
    u_num = torch.empty(n_items, dtype=torch.int32, device=idx.device)
    # (at least 2: a one-element tl.sort is a degenerate network)
    BK = max(2, triton.next_power_of_2(K))
    _pair_lists_kernel[(n_items,)](
        idx, num, u_idx, u_num, nb, K, umax, H, G, NP, HEADS=heads, BK=BK, num_warps=1 if BK <= 128 else 4
    )
    return u_num, u_idx, NP


def plan_topk_fwd(
    block_index: torch.Tensor, block_count: torch.Tensor | None, nb: int, G: int, cfg: dict, canonical: bool = False,
    nb_seq: torch.Tensor | None = None,
) -> dict:
    """Everything the attention kernel reads besides q/k/v (a few small launches, no host sync).

    `nb_seq` (packed sequences): int `[n_seq]` blocks of each sequence; the rows past a sequence's
    last block are emptied here, so no kernel reads keys beyond its sequence.

    Returns a dict with `num`/`idx` (canonical row lists), for pair kernels `u_num`/`u_idx`/`NP`
    (merged lists, one entry per work item), `order` (the work items in launch order, when
    `cfg["lpt"]`) and `n_items`. Benchmarks build it once to time the attention kernel alone.
    """
    plan = {}
    if canonical:
        # already canonical (e.g. from gate_select): read as they are
        plan["num"], plan["idx"] = block_count.to(torch.int32).contiguous(), block_index.to(torch.int32).contiguous()
    else:
        plan["num"], plan["idx"] = _canonical_lists(block_index, block_count, nb)
    if nb_seq is not None:
        live = torch.arange(nb, device=nb_seq.device) < nb_seq[:, None]
        plan["num"] = plan["num"] * live[:, None, :].to(torch.int32)
    B, H = block_index.shape[:2]
    counts = plan["num"].view(-1)
    if cfg["kernel"] in ("pair", "headpair"):
        plan["u_num"], plan["u_idx"], plan["NP"] = _pair_lists(plan["num"], plan["idx"], cfg["kernel"] == "headpair", G)
        counts = plan["u_num"]
    elif cfg["kernel"] == "dual":
        # an item's work is its longer row (the rows run in lockstep)
        plan["NP"] = (nb + 1) // 2
        pad = torch.nn.functional.pad(plan["num"], (0, 2 * plan["NP"] - nb))
        counts = pad.view(B, H, plan["NP"], 2).amax(-1).view(-1)
    plan["n_items"] = counts.numel()
    plan["order"] = counts
    if cfg["lpt"] == 2:
        plan["order"] = counts.argsort(descending=True, stable=True).to(torch.int32)
    elif cfg["lpt"]:
        # items are numbered KV group by KV group: sort inside each group only
        per_group = plan["n_items"] // (B * (H // G))
        group = torch.arange(plan["n_items"], device=counts.device) // per_group
        key = group * (nb + 1) + (nb - counts.long())
        plan["order"] = key.argsort(stable=True).to(torch.int32)
    return plan


def launch_topk_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: dict, scale: float, block_size: int, cfg: dict,
    cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
) -> torch.Tensor:
    """Run the attention kernel of `cfg` on a plan from :func:`plan_topk_fwd`; returns `o` like `q`.

    Packed sequences: `q, k, v` are `[1, H, total, D]` views of `[total, H, D]` tensors, with
    `cu_seqlens` and `max_seqlen` (the plan then has one batch entry per sequence)."""
    D = q.shape[-1]
    Hq = q.shape[1]
    G = Hq // k.shape[1]
    S = q.shape[2] if cu_seqlens is None else max_seqlen
    nb = math.ceil(S / block_size)
    o = torch.empty_like(q)
    tma = cfg["tma"] and _use_tma(k, v)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        desc_k = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, block_size, D])
        desc_v = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, block_size, D])
    else:
        desc_k, desc_v = k, v
    n_items = plan["n_items"]
    grid = n_items
    if cfg["persistent"]:
        grid = min(n_items, cfg["persistent"] * _num_sms(q.device))
    common = dict(D=D, BS=block_size, TMA=tma, LPT=bool(cfg["lpt"]), WS=bool(cfg["ws"]), VARLEN=cu_seqlens is not None,
                  DOT_PREC=dot_precision(q.dtype))
    strides = (*q.stride(), *k.stride(), *v.stride(), *o.stride())
    cu = cu_seqlens if cu_seqlens is not None else plan["num"]  # (any pointer: not read without VARLEN)
    launch = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if cfg["kernel"] == "row":
        block_sparse_attn_topk_fwd_row_kernel[(grid,)](
            q, k, v, o, plan["idx"], plan["num"], plan["order"], desc_k, desc_v, cu, *strides,
            scale * _LOG2E, S, nb, plan["idx"].shape[-1], Hq, G, n_items, NJ=cfg["nj"], **common, **launch,
        )
    elif cfg["kernel"] == "dual":
        block_sparse_attn_topk_fwd_dual_kernel[(grid,)](
            q, k, v, o, plan["idx"], plan["num"], plan["order"], desc_k, desc_v, cu, *strides,
            scale * _LOG2E, S, nb, plan["idx"].shape[-1], Hq, G, plan["NP"], n_items, **common, **launch,
        )
    else:
        block_sparse_attn_topk_fwd_pair_kernel[(grid,)](
            q, k, v, o, plan["u_idx"], plan["u_num"], plan["order"], desc_k, desc_v, cu, *strides,
            scale * _LOG2E, S, nb, plan["u_idx"].shape[-1], Hq, G, plan["NP"], n_items,
            HEADS=cfg["kernel"] == "headpair", **common, **launch,
        )
    return o


def _legacy_topk_fwd(q, k, v, block_index, scale, block_size):
    B, Hq, S, D = q.shape
    nb = math.ceil(S / block_size)
    # ascending rows let the kernel find its valid range and see repeats side by side
    index = block_index.sort(dim=-1).values.contiguous()
    o = torch.empty_like(q)
    block_sparse_attn_topk_fwd_kernel[(nb, B * Hq)](
        q, k, v, o, index, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        scale * _LOG2E, S, nb, index.shape[-1],
        HQ=Hq, G=Hq // k.shape[1], D=D, BS=block_size, BK=triton.next_power_of_2(index.shape[-1]),
        NJ=BLOCKS_PER_STEP[D], DOT_PREC=dot_precision(q.dtype),
    )
    return o


def _check_index(q: torch.Tensor, block_index, block_count, nb: int, block_size: int, B: int) -> None:
    # (q: [B, Hq, S, D], or the [1, Hq, total, D] view of packed sequences with B of them)
    Hq = q.shape[1]
    for name, t in (("block_index", block_index), ("block_count", block_count)):
        if t is None and name == "block_count":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            got = getattr(t, "dtype", type(t))
            raise TypeError(f"block_sparse_attn_topk: {name} must be an integer tensor, got {got}")
        if t.device != q.device:
            raise ValueError(f"block_sparse_attn_topk: {name} on {t.device}, q on {q.device}")
    if block_index.dim() != 4 or tuple(block_index.shape[:3]) != (B, Hq, nb) or block_index.shape[3] == 0:
        raise ValueError(
            f"block_sparse_attn_topk: block_index must be [B, Hq, nb, K] = [{B}, {Hq}, {nb}, K>0] "
            f"(nb = ceil(S / block_size) with block_size={block_size}); got {tuple(block_index.shape)}"
        )
    if block_count is not None and tuple(block_count.shape) != (B, Hq, nb):
        raise ValueError(
            f"block_sparse_attn_topk: block_count must be [B, Hq, nb] = [{B}, {Hq}, {nb}], got {tuple(block_count.shape)}"
        )


def block_sparse_attn_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    block_count: torch.Tensor | None = None,
    config: dict | None = None,
    canonical: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
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
        block_count (torch.Tensor, Optional): int `[B, Hq, nb]`, the variable-count format
            (FlexAttention's `kv_num_blocks`, with `block_index` as its `kv_indices`): row `i`
            keeps only `block_index[..., i, :block_count[..., i]]`; entries past the count are
            never read as blocks. Default: `None` (every entry of a row counts).
        config (dict, Optional): kernel variant and launch settings in place of `TOPK_FWD_CONFIG[D]`
            (keys it leaves out take the defaults; for benchmarks). Every variant computes the same
            function.
        canonical (bool): the caller promises that every row `block_index[..., i, :block_count[..., i]]`
            is already ascending, without repeats and within `[0, i]` (as `gate_select` writes
            it); the list-preparation launch is skipped and the lists are read as they are. Needs
            `block_count`. Default: `False` (any order, repeats and out-of-range entries accepted).
        cu_seqlens (torch.Tensor, Optional): packed sequences, flash-attn's varlen layout: int32
            `[n_seq + 1]` cumulative lengths, with `q [total, Hq, D]`, `k, v [total, Hkv, D]`,
            `block_index [n_seq, Hq, nb, K]` (and `block_count [n_seq, Hq, nb]`) where
            `nb = ceil(max_seqlen / block_size)`. Sequence `s` attends within itself only and reads
            the rows `block_index[s, :, :nb_s]` of its own `nb_s` blocks (entries past them are
            ignored). One launch for the whole batch. Default: `None` (`[B, H, S, D]` inputs).
        max_seqlen (int, Optional): longest packed sequence; read from `cu_seqlens` (one host sync)
            when not given.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]` (packed: `[total, Hq, D]`) in `q.dtype`, same memory
            layout as `q`. Rows whose block keeps nothing are 0.
    """
    name = "block_sparse_attn_topk"
    packed = cu_seqlens is not None
    if packed:
        from seer_attn.kernels.block_sparse_attn_csr import _check_varlen, resolve_max_seqlen, varlen_block_counts

        q4, k4, v4 = _check_varlen(name, q, k, v, cu_seqlens, block_size)
        max_seqlen = resolve_max_seqlen(cu_seqlens, max_seqlen, q.shape[0])
        B, Hq, S, D = cu_seqlens.numel() - 1, q4.shape[1], max_seqlen, q4.shape[3]
        nb_seq = varlen_block_counts(cu_seqlens, block_size)
    else:
        check_attn_inputs(name, q, k, v, block_size)
        q4, k4, v4 = q, k, v
        B, Hq, S, D = q.shape
        nb_seq = None
    nb = math.ceil(S / block_size)
    _check_index(q4, block_index, block_count, nb, block_size, B)
    cfg = resolve_config(D, block_size, config)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    if not scale > 0:
        # masked logits are -inf before scaling
        raise ValueError(f"block_sparse_attn_topk: sm_scale must be > 0, got {sm_scale}")
    G = Hq // k4.shape[1]
    if cfg["kernel"] == "legacy":
        if packed:
            raise ValueError("block_sparse_attn_topk: the 'legacy' kernel has no cu_seqlens (packed) path")
        if block_count is not None:
            live = torch.arange(block_index.shape[-1], device=q.device) < block_count[..., None]
            block_index = torch.where(live, block_index, -1)
        return _legacy_topk_fwd(q, k, v, block_index, scale, block_size)
    if cfg["kernel"] == "headpair" and G % 2:
        raise ValueError(f"block_sparse_attn_topk: the 'headpair' kernel needs an even GQA group, got Hq/Hkv = {G}")
    if canonical and block_count is None:
        raise ValueError("block_sparse_attn_topk: canonical=True needs block_count (the length of each row's list)")
    plan = plan_topk_fwd(block_index, block_count, nb, G, cfg, canonical=canonical, nb_seq=nb_seq)
    o = launch_topk_fwd(q4, k4, v4, plan, scale, block_size, cfg, cu_seqlens, max_seqlen)
    return o.transpose(1, 2).squeeze(0) if packed else o
