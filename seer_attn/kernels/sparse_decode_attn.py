"""Block-sparse decoding attention over a KV cache, split-K (flash-decoding style), forward only.

Each new token attends to the key blocks its decode gate selected plus its own (possibly partial)
block, which is always kept; `sparse_decode_attn_naive` defines the result. A decoding step has one
query per sequence, far too little work for one program per (batch, head) to fill a GPU at batch 1,
so the work list of a token (its selected blocks, then its own block) is split over `NS` programs:

1. one program per (split, batch, KV head, token) runs an online softmax over its share of the list
   for all `G` query heads of the KV head at once (the `G` query rows form one `[BG, D]` tile, so
   K/V are read once per group and never repeated), and writes its partial max, sum and output;
2. one program per (batch, query head, token) merges the `NS` partials (a log-sum-exp combine).

With one split the first kernel writes the output itself. Entries of `block_index` that are
negative or not below the token's own block are skipped without reading K/V, so a `-1`-padded list
(e.g. from a threshold) costs only its valid blocks. Blocks may come in any order; they must not
repeat. Work is proportional to the number of kept blocks.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import dot_precision, is_interpreter, prune_configs

__all__ = ["sparse_decode_attn"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.autotune(
    configs=prune_configs([triton.Config({}, num_warps=w, num_stages=s) for w, s in ((4, 2), (2, 2), (4, 3), (8, 2))]),
    key=["D", "BS", "BG", "SPLIT"],
)
@triton.jit
def sparse_decode_attn_fwd_kernel(
    q,
    k,
    v,
    block_index,
    seqlens,
    o,
    ws_acc,
    ws_m,
    ws_l,
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
    stride_ib,
    stride_ih,
    stride_it,
    stride_ik,
    qk_scale,
    L,
    N,
    K,
    BPS,
    NS,
    HKV: tl.constexpr,
    G: tl.constexpr,
    BG: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
    HAS_SEQLENS: tl.constexpr,
):
    # rows on the first grid axis: B * Hkv * n exceeds the second axis' 65,535 when whole documents are
    # scored in decode mode (layer-budget calibration)
    i_bhn = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    i_t = i_bhn % N
    i_bh = i_bhn // N
    i_b, i_hkv = i_bh // HKV, i_bh % HKV
    # the token's position in the cache and its own block (a preallocated cache: this sequence's
    # filled length, read on the device; slots past it are never read)
    if HAS_SEQLENS:
        t = tl.load(seqlens + i_b).to(tl.int64) - N + i_t
    else:
        t = L - N + i_t
    own = t // BS

    o_g = tl.arange(0, BG)
    m_g = o_g < G
    o_d = tl.arange(0, D)
    o_n = tl.arange(0, BS)
    # [BG, D]: the group's query heads (rows past G are zero and never stored)
    p_q = q + i_b * stride_qb + (i_hkv * G + o_g[:, None]) * stride_qh + i_t * stride_qt + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_g[:, None], other=0.0)
    k_base = k + i_b * stride_kb + i_hkv * stride_kh
    v_base = v + i_b * stride_vb + i_hkv * stride_vh
    p_idx = block_index + i_b * stride_ib + i_hkv * stride_ih + i_t * stride_it

    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, D], dtype=tl.float32)
    # work list: entries 0..K-1 are the listed blocks, entry K is the own block
    e_lo = i_s * BPS
    e_hi = tl.minimum(e_lo + BPS, K + 1)
    for e in range(e_lo, e_hi):
        i_n = tl.load(p_idx + e * stride_ik, mask=e < K, other=-1).to(tl.int64)
        i_n = tl.where(e < K, i_n, own)
        if ((i_n >= 0) & (i_n < own)) | (e == K):
            o_k = i_n * BS + o_n
            # only the own block has keys after t
            m_k = o_k <= t
            # [D, BS]
            b_k = tl.load(k_base + o_k[None, :] * stride_kt + o_d[:, None] * stride_kd, mask=m_k[None, :], other=0.0)
            b_s = tl.dot(b_q, b_k, input_precision=DOT_PREC) * qk_scale
            b_s = tl.where(m_k[None, :], b_s, float("-inf"))
            b_mn = tl.maximum(b_m, tl.max(b_s, 1))
            b_p = tl.exp2(b_s - b_mn[:, None])
            b_alpha = tl.exp2(b_m - b_mn)
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            # [BS, D]
            b_v = tl.load(v_base + o_k[:, None] * stride_vt + o_d[None, :] * stride_vd, mask=m_k[:, None], other=0.0)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PREC)
            b_m = b_mn
    if SPLIT:
        # partials [B * HKV * N, NS, G(, D)]; an empty split writes m = -inf, l = 0, acc = 0
        o_w = (i_bhn * NS + i_s) * G + o_g
        tl.store(ws_m + o_w, b_m, mask=m_g)
        tl.store(ws_l + o_w, b_l, mask=m_g)
        tl.store(ws_acc + o_w[:, None] * D + o_d[None, :], b_acc, mask=m_g[:, None])
    else:
        p_o = o + i_b * stride_ob + (i_hkv * G + o_g[:, None]) * stride_oh + i_t * stride_ot + o_d[None, :] * stride_od
        tl.store(p_o, (b_acc / b_l[:, None]).to(o.dtype.element_ty), mask=m_g[:, None])


@triton.jit
def sparse_decode_attn_fwd_kernel_combine(
    ws_acc,
    ws_m,
    ws_l,
    o,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    N,
    NS,
    HKV: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BNS: tl.constexpr,
):
    i_bhng = tl.program_id(0).to(tl.int64)
    i_g = i_bhng % G
    i_bhn = i_bhng // G
    i_t = i_bhn % N
    i_bh = i_bhn // N
    i_b, i_hkv = i_bh // HKV, i_bh % HKV

    o_s = tl.arange(0, BNS)
    m_s = o_s < NS
    o_d = tl.arange(0, D)
    o_w = (i_bhn * NS + o_s) * G + i_g
    b_m = tl.load(ws_m + o_w, mask=m_s, other=float("-inf"))
    b_l = tl.load(ws_l + o_w, mask=m_s, other=0.0)
    # [BNS, D]
    b_acc = tl.load(ws_acc + o_w[:, None] * D + o_d[None, :], mask=m_s[:, None], other=0.0)
    # the split holding the own block is never empty, so the max is finite
    b_w = tl.exp2(b_m - tl.max(b_m, 0))
    b_o = tl.sum(b_w[:, None] * b_acc, 0) / tl.sum(b_w * b_l, 0)
    p_o = o + i_b * stride_ob + (i_hkv * G + i_g) * stride_oh + i_t * stride_ot + o_d * stride_od
    tl.store(p_o, b_o.to(o.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits_for(work: int, rows: int, device: torch.device) -> int:
    """Splits per (batch, KV head, token) so that about two programs run per SM (at most one block each)."""
    return max(1, min(work, math.ceil(2 * _num_sms(device) / rows)))


def _check_inputs(q, k, v, block_index, block_size) -> None:
    name = "sparse_decode_attn"
    for t_name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: {t_name} must be a 4-D tensor [B, H, S, D], got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: {t_name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, n, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"{name}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if Hq % Hkv:
        raise ValueError(f"{name}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if D not in (64, 128):
        raise ValueError(f"{name}: head_dim must be 64 or 128, got {D}")
    if n == 0 or n > L:
        raise ValueError(f"{name}: need 1 <= new tokens <= cached positions, got {n} new tokens and {L} positions")
    if block_size not in (16, 32, 64, 128):
        raise ValueError(f"{name}: block_size must be 16, 32, 64 or 128, got {block_size}")
    if not isinstance(block_index, torch.Tensor) or block_index.dtype.is_floating_point or block_index.dtype == torch.bool:
        got = getattr(block_index, "dtype", type(block_index))
        raise TypeError(f"{name}: block_index must be an integer tensor, got {got}")
    if block_index.dim() != 4 or tuple(block_index.shape[:3]) != (B, Hkv, n):
        raise ValueError(f"{name}: block_index must be [B, Hkv, n, K] = [{B}, {Hkv}, {n}, K], got {tuple(block_index.shape)}")
    if not (q.device == k.device == v.device == block_index.device):
        raise ValueError(f"{name}: q, k, v, block_index must be on one device")
    if q.device.type != "cuda" and not is_interpreter():
        raise ValueError(f"{name}: needs CUDA tensors (got {q.device}); use seer_attn.kernels.naive on CPU")


def sparse_decode_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    num_splits: int | None = None,
    seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoding attention of new tokens over their selected key blocks plus their own block.

    Args:
        q (torch.Tensor): `[B, Hq, n, D]`, the new tokens' post-RoPE queries (any strides); token `i`
            sits at cache position `L - n + i`.
        k, v (torch.Tensor): `[B, Hkv, L, D]`, the KV cache including the new tokens (any strides,
            e.g. a view into a preallocated cache); `Hkv` divides `Hq`, `D` in {64, 128}.
        block_index (torch.Tensor): int `[B, Hkv, n, K]` (`K` may be 0): earlier key blocks each token
            attends to, shared by the `G` query heads of each KV head. Negative entries and entries
            not below the token's own block are skipped; valid entries must not repeat.
        sm_scale (float, Optional): logit scale. Default: `1 / sqrt(D)`.
        block_size (int): one of 16, 32, 64, 128. Default: `64`.
        num_splits (int, Optional): programs sharing one token's work list (`K + 1` blocks).
            Default: enough for about two programs per SM.
        seqlens (torch.Tensor, Optional): int `[B]` on the device, the filled length of each
            sequence's cache (a preallocated cache, e.g. transformers' `StaticCache`): token `i` sits
            at `seqlens[b] - n + i` and slots from `seqlens[b]` on are never read, with no host sync
            (CUDA-graph safe). `n <= seqlens[b] <= L` is the caller's promise. Default: `L` for all.

    Returns:
        o (torch.Tensor): `[B, Hq, n, D]` in `q.dtype`, same memory layout as `q`.
    """
    _check_inputs(q, k, v, block_index, block_size)
    B, Hq, n, D = q.shape
    if seqlens is not None:
        if not isinstance(seqlens, torch.Tensor) or seqlens.shape != (B,) or seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"sparse_decode_attn: seqlens must be an int32/int64 tensor [B] = [{B}], got {getattr(seqlens, 'shape', seqlens)}")
        if seqlens.device != q.device:
            raise ValueError("sparse_decode_attn: seqlens must be on the device of q")
    Hkv, L = k.shape[1], k.shape[2]
    G = Hq // Hkv
    K = block_index.shape[3]
    work = K + 1
    rows = B * Hkv * n
    ns = num_splits_for(work, rows, q.device) if num_splits is None else max(1, min(int(num_splits), work))
    bps = math.ceil(work / ns)
    ns = math.ceil(work / bps)
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)) * 1.4426950408889634
    split = ns > 1
    o = torch.empty_like(q)
    if split:
        ws_acc = torch.empty(rows, ns, G, D, dtype=torch.float32, device=q.device)
        ws_m = torch.empty(rows, ns, G, dtype=torch.float32, device=q.device)
        ws_l = torch.empty(rows, ns, G, dtype=torch.float32, device=q.device)
    else:
        ws_acc = ws_m = ws_l = o  # unused
    sparse_decode_attn_fwd_kernel[(rows, ns)](
        q, k, v, block_index, seqlens if seqlens is not None else block_index, o, ws_acc, ws_m, ws_l,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *block_index.stride(),
        scale, L, n, K, bps, ns,
        HKV=Hkv, G=G, BG=max(16, triton.next_power_of_2(G)), D=D, BS=block_size, SPLIT=split,
        DOT_PREC=dot_precision(q.dtype), HAS_SEQLENS=seqlens is not None,
    )
    if split:
        sparse_decode_attn_fwd_kernel_combine[(rows * G,)](
            ws_acc, ws_m, ws_l, o, *o.stride(), n, ns, HKV=Hkv, G=G, D=D, BNS=triton.next_power_of_2(ns),
        )
    return o
