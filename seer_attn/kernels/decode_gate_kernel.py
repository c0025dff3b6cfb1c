"""The decode gate's whole one-token step as one kernel per layer (inference, preallocated caches).

A graph-replayed decoding step of a small model is bound by how many kernels it runs, not by the
bytes it reads: SmolLM2 decoding at 32k context with the decode gate's PyTorch step (state update,
queries, scores, selection: ~10 kernels per layer even `torch.compile`d, ~60 eagerly) was slower than
dense decoding through the split-K kernel (benchmarks/RESULTS.md, session 11). Here one program per
(batch, KV head) does all of it:

1. writes the new token's pre-RoPE key into the partial block buffer and, when the token completes its
   block, pools the block (per summary: max / min / avg, as the decode gate's `k_pools`), projects the
   pools (`w_k`), RMS-normalises and rotates them at each summary's first position, and stores them
   in the block's slot of the compressed-key state (`StaticCompressedKeyCache.step` recompresses the
   partial block at every step instead; the two agree on every complete block, the only ones read);
2. builds the gate query of each of the `G` query heads of the KV head (`q_pooling="heads"`:
   projection, RMSNorm, RoPE at the token's position);
3. scores every complete block (slots before the token's own block) in one pass over the compressed
   keys, parking each head's logits in a scratch row while it accumulates the heads' softmax
   normalisers, then forms the mixture of the heads' softmaxes (the block probabilities, parked too);
4. selects the top `K` blocks (the K-th largest probability's int32 image found by a multi-way search,
   `TOPK_WAYS` thresholds counted per step; ties to the lowest block) or those above a threshold, and
   writes them ascending, `-1` after, with their count.

RoPE tables are computed in the kernel from the rotary module's `inv_freq` and attention scaling
(the rope types whose tables do not depend on the call's length: default, linear, YaRN, Llama-3).
The PyTorch twin is the decode gate's own step (`seer_attn.modules.decode._static_gate_step`:
`static_state_update` then `DecodeGate.queries` / `score` and `select_decode_blocks`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from seer_attn.kernels._triton import is_interpreter

__all__ = ["decode_gate_step"]

_POOLS = ("max", "min", "avg")

# thresholds tried per step of the top-k search (a power of 2): 16 narrow [lo, hi] ~17-fold per step,
# so the 2^30 range of probability images takes at most 8 steps (a bisection: up to 31)
TOPK_WAYS = 16


@triton.jit
def _rope_halves(x1, x2, pos, inv_freq, attn_scale, HALF: tl.constexpr):
    # rotate-half RoPE of rows x = [x1 | x2] ([R, HALF] each) at positions pos [R]
    o_j = tl.arange(0, HALF)
    fr = pos.to(tl.float32)[:, None] * tl.load(inv_freq + o_j)[None, :]
    c = tl.cos(fr) * attn_scale
    s = tl.sin(fr) * attn_scale
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _rms_halves(x1, x2, w, eps, DG: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr):
    if NORM:
        o_j = tl.arange(0, HALF)
        r = 1.0 / tl.sqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / DG + eps)
        x1 = x1 * r[:, None] * tl.load(w + o_j).to(tl.float32)[None, :]
        x2 = x2 * r[:, None] * tl.load(w + HALF + o_j).to(tl.float32)[None, :]
    return x1, x2


@triton.jit
def _project(feat, w, row0, D: tl.constexpr, DG: tl.constexpr, HALF: tl.constexpr):
    # feat [R, D] @ w[row0 : row0 + D, :] ([., DG] row-major) -> two halves [R, HALF]
    o_d = tl.arange(0, D)
    o_j = tl.arange(0, HALF)
    p_w = w + (row0 + o_d)[:, None] * DG + o_j[None, :]
    w1 = tl.load(p_w).to(tl.float32)
    w2 = tl.load(p_w + HALF).to(tl.float32)
    return tl.sum(feat[:, :, None] * w1[None, :, :], 1), tl.sum(feat[:, :, None] * w2[None, :, :], 1)


@triton.jit
def _block_logits(keys_bh, qg1, qg2, o_c, m_c, scale, stride_ks, KS: tl.constexpr, HALF: tl.constexpr):
    # [QP, CH] logits of the gate queries against blocks o_c (log-sum-exp over each block's KS summaries);
    # fp32 products as the twin's matmul (no tf32)
    o_j = tl.arange(0, HALF)
    m_run = tl.full([qg1.shape[0], o_c.shape[0]], -1e30, tl.float32)
    acc = tl.zeros([qg1.shape[0], o_c.shape[0]], tl.float32)
    for s in tl.static_range(KS):
        p_k = keys_bh + (o_c * KS + s)[:, None] * stride_ks + o_j[None, :]
        k1 = tl.load(p_k, mask=m_c[:, None], other=0.0)
        k2 = tl.load(p_k + HALF, mask=m_c[:, None], other=0.0)
        lg = tl.dot(qg1, tl.trans(k1), input_precision="ieee")
        lg = tl.dot(qg2, tl.trans(k2), acc=lg, input_precision="ieee") * scale
        m_new = tl.maximum(m_run, lg)
        acc = acc * tl.exp(m_run - m_new) + tl.exp(lg - m_new)
        m_run = m_new
    return tl.where(m_c[None, :], m_run + tl.log(acc), float("-inf"))


@triton.jit
def decode_gate_step_kernel(
    q, k_new, t_ptr, block, keys, w_k, w_q, qn_w, kn_w, inv_freq, logits, probs, idx, cnt,
    stride_qb, stride_qh, stride_nb, stride_nh, stride_bb, stride_bh, stride_bt, stride_kb, stride_kh, stride_ks,
    stride_ib, stride_ih, stride_lb, stride_lg, stride_pr,
    attn_scale, eps, score_scale, threshold, W,
    HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, QP: tl.constexpr, D: tl.constexpr, DG: tl.constexpr, HALF: tl.constexpr,
    BS: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr, NP: tl.constexpr, DC: tl.constexpr,
    P_MAX: tl.constexpr, P_MIN: tl.constexpr, P_AVG: tl.constexpr, QNORM: tl.constexpr, KNORM: tl.constexpr,
    SELECT: tl.constexpr, TOPK: tl.constexpr, NT: tl.constexpr, KEEP_SINK: tl.constexpr, KEEP_RECENT: tl.constexpr, NCP: tl.constexpr, WP: tl.constexpr, CH: tl.constexpr, CHP: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    i_b, i_h = pid // HKV, pid % HKV
    t = tl.load(t_ptr + i_b).to(tl.int64)
    off = t % BS
    blk = t // BS
    o_d = tl.arange(0, D)
    o_j = tl.arange(0, HALF)

    # 1. the state update: the new key into the partial block, the block's summaries recompressed;
    # DC channels at a time (the pools' projection is a [KS, DC, HALF] product: bounded registers)
    p_new = k_new + i_b * stride_nb + i_h * stride_nh
    p_blk = block + i_b * stride_bb + i_h * stride_bh
    tl.store(p_blk + off * stride_bt + o_d, tl.load(p_new + o_d))
    keys_bh = keys + i_b * stride_kb + i_h * stride_kh
    # the block's summaries are computed once, by the step that completes it: the selection reads complete
    # blocks only (a device-side branch; the PyTorch twin recompresses the partial block every step instead)
    if off == BS - 1:
        o_s = tl.arange(0, KS)
        tok = o_s[:, None, None] * STRIDE + tl.arange(0, STRIDE)[None, :, None]  # [KS, STRIDE, 1]: the whole block
        w_k_h = w_k + i_h * (NP * D * DG)
        a1 = tl.zeros([KS, HALF], tl.float32)
        a2 = tl.zeros([KS, HALF], tl.float32)
        for d0 in tl.static_range(0, D, DC):
            o_dc = d0 + tl.arange(0, DC)
            b_new = tl.load(p_new + o_dc)
            x = tl.load(p_blk + tok * stride_bt + o_dc[None, None, :])
            x = tl.where(tok == off, b_new[None, None, :], x)  # (the row stored above, without a barrier)
            if P_MAX >= 0:
                c1, c2 = _project(tl.max(x, 1).to(tl.float32), w_k_h, P_MAX * D + d0, DC, DG, HALF)
                a1, a2 = a1 + c1, a2 + c2
            if P_MIN >= 0:
                c1, c2 = _project(tl.min(x, 1).to(tl.float32), w_k_h, P_MIN * D + d0, DC, DG, HALF)
                a1, a2 = a1 + c1, a2 + c2
            if P_AVG >= 0:
                c1, c2 = _project(tl.sum(x.to(tl.float32), 1) / STRIDE, w_k_h, P_AVG * D + d0, DC, DG, HALF)
                a1, a2 = a1 + c1, a2 + c2
        a1, a2 = _rms_halves(a1, a2, kn_w, eps, DG, HALF, KNORM)
        a1, a2 = _rope_halves(a1, a2, blk * BS + o_s * STRIDE, inv_freq, attn_scale, HALF)
        p_out = keys_bh + (blk * KS + o_s)[:, None] * stride_ks + o_j[None, :]
        tl.store(p_out, a1)
        tl.store(p_out + HALF, a2)
    if SELECT:
        # 2. one gate query per query head of the group (rows of a QP-row tile: tl.dot wants >= 16)
        o_g = tl.arange(0, QP)
        qg1 = tl.zeros([QP, HALF], tl.float32)
        qg2 = tl.zeros([QP, HALF], tl.float32)
        for g in tl.static_range(G):
            i_hq = i_h * G + g
            b_q = tl.load(q + i_b * stride_qb + i_hq * stride_qh + o_d).to(tl.float32)
            r1, r2 = _project(b_q[None, :], w_q + i_hq * (D * DG), 0, D, DG, HALF)
            r1, r2 = _rms_halves(r1, r2, qn_w, eps, DG, HALF, QNORM)
            r1, r2 = _rope_halves(r1, r2, tl.zeros([1], tl.int64) + t, inv_freq, attn_scale, HALF)
            qg1 = tl.where(o_g[:, None] == g, r1, qg1)
            qg2 = tl.where(o_g[:, None] == g, r2, qg2)
        # 3. every candidate block's logits per head (parked in a scratch row) and the heads' softmax
        # normalisers (online), in one pass over the compressed keys; candidates: blocks before the token's own
        m_g = tl.full([QP], -1e30, tl.float32)
        z_g = tl.zeros([QP], tl.float32)
        p_lg = logits + pid * stride_lb + o_g[:, None] * stride_lg
        for c0 in range(0, blk, CH):
            o_c = c0 + tl.arange(0, CH)
            lg = _block_logits(keys_bh, qg1, qg2, o_c, o_c < blk, score_scale, stride_ks, KS, HALF)
            tl.store(p_lg + o_c[None, :], lg, mask=(o_g[:, None] < G) & (o_c[None, :] < blk))
            m_new = tl.maximum(m_g, tl.max(lg, 1))
            z_g = z_g * tl.exp(m_g - m_new) + tl.sum(tl.exp(lg - m_new[:, None]), 1)
            m_g = m_new
        tl.debug_barrier()  # the scratch rows are read back by other threads of this program
        # the mixture probability of every candidate: the mean of the heads' softmaxes
        o_h = tl.arange(0, GP)
        m_h = tl.sum(tl.where(o_g[None, :] == o_h[:, None], m_g[None, :], 0.0), 1)  # the first GP rows of m_g
        z_h = tl.sum(tl.where(o_g[None, :] == o_h[:, None], z_g[None, :], 0.0), 1)
        inv_z = tl.where(o_h < G, 1.0 / tl.maximum(z_h * G, 1e-30), 0.0)  # (z is 0 without candidates)
        p_row = probs + pid * stride_pr
        p_lh = logits + pid * stride_lb + o_h[:, None] * stride_lg
        for c0 in range(0, blk, CHP):
            o_c = c0 + tl.arange(0, CHP)
            m_c = o_c < blk
            lg = tl.load(p_lh + o_c[None, :], mask=(o_h[:, None] < G) & m_c[None, :], other=float("-inf"))
            tl.store(p_row + o_c, tl.sum(tl.exp(lg - m_h[:, None]) * inv_z[:, None], 0), mask=m_c)
        tl.debug_barrier()
        # 4. selection over the candidates, ascending, -1 after
        o_n = tl.arange(0, NCP)
        cand = o_n < blk
        pr = tl.load(p_row + o_n, mask=cand, other=0.0)
        # blocks kept whatever their score (the sink, the most recent complete ones): above every probability
        forced = cand & (((o_n == 0) & KEEP_SINK) | (o_n >= blk - KEEP_RECENT))
        if TOPK:
            pr = tl.where(forced, 1.5, pr)
            # the W-th largest image by a multi-way search: each step counts the keys at or above NT
            # thresholds spread over [lo, hi] at once (one [NT, NCP] reduction, where a bisection does one
            # per threshold: a reduction is a barrier, and 31 of them were most of the step's latency), and
            # stops once some threshold has exactly W keys at or above it ({img >= t} is then the top W)
            img = tl.where(cand, pr.to(tl.int32, bitcast=True), -1)  # non-negative floats order as their images
            o_t = tl.arange(0, NT).to(tl.int64)
            lo = tl.zeros([], tl.int64)
            hi = tl.full([], 1 << 30, tl.int64)  # above the images of 1.0 and of the forced blocks' 1.5
            while hi > lo:
                # thresholds lo < m_1 < ... <= hi (distinct once hi - lo >= NT; repeats are harmless)
                mid = lo + ((hi - lo) * (o_t + 1) + NT - 1) // NT
                n_ge = tl.sum((img[None, :] >= mid[:, None].to(tl.int32)).to(tl.int32), 1)
                ok = n_ge >= W
                exact = tl.max((n_ge == W).to(tl.int32), 0) > 0
                # lo: the largest threshold still holding W keys; hi: just below the smallest that does not
                lo = tl.maximum(lo, tl.max(tl.where(ok, mid, lo), 0))
                hi = tl.minimum(hi, tl.min(tl.where(ok, hi + 1, mid), 0) - 1)
                hi = tl.where(exact, lo, hi)
            lo = lo.to(tl.int32)
            gt = img > lo
            tie = cand & (img == lo)
            need = W - tl.sum(gt.to(tl.int32), 0)
            sel = gt | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= need))
        else:
            sel = cand & ((pr > threshold) | forced)
        pos = tl.cumsum(sel.to(tl.int32), 0) - 1
        p_idx = idx + i_b * stride_ib + i_h * stride_ih
        tl.store(p_idx + pos, o_n.to(tl.int32), mask=sel)
        n_sel = tl.sum(sel.to(tl.int32), 0)
        o_w = tl.arange(0, WP)
        tl.store(p_idx + o_w, tl.full([WP], -1, tl.int32), mask=(o_w >= n_sel) & (o_w < W))
        tl.store(cnt + pid, n_sel)


def decode_gate_step(
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    t: torch.Tensor,
    block: torch.Tensor,
    keys: torch.Tensor,
    w_k: torch.Tensor,
    w_q: torch.Tensor,
    q_norm: torch.Tensor | None,
    k_norm: torch.Tensor | None,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    k_pools: tuple[str, ...],
    k_summaries: int = 1,
    eps: float = 1e-6,
    token_budget: int = 2048,
    threshold: float | None = None,
    select: bool = True,
    keep_sink: bool = False,
    keep_recent: int = 0,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The decode gate's one-token step on a preallocated state, in place, then its block selection.

    Args:
        q_pre (torch.Tensor): pre-RoPE queries `[B, Hq, 1, D]` of the new token.
        k_pre (torch.Tensor): pre-RoPE keys `[B, Hkv, 1, D]` of the new token (`block`'s dtype).
        t (torch.Tensor): int `[B]` on the device, the token's position (its cache slot).
        block (torch.Tensor): `[B, Hkv, block_size, D]`, the partial block's keys (updated in place).
        keys (torch.Tensor): fp32 `[B, Hkv, slots, Dg]`, compressed keys, `k_summaries` slots per block
            (the token's block's slots are rewritten in place).
        w_k (torch.Tensor): `[Hkv, len(k_pools) * D, Dg]`, the key projection (`DecodeGate.k_linear`).
        w_q (torch.Tensor): `[Hq, D, Dg]`, the per-head query projection (`q_pooling="heads"`).
        q_norm, k_norm (torch.Tensor, Optional): `[Dg]` RMSNorm scales (None: no norm).
        inv_freq (torch.Tensor): fp32 `[Dg / 2]` and `attention_scaling`: the gate RoPE's tables are
            `cos(pos * inv_freq) * attention_scaling` (and sin), rotate-half.
        k_pools (tuple[str]): the key pools in weight order, from `("max", "min", "avg")`.
        token_budget (int): each token keeps `token_budget // block_size - 1` earlier blocks.
        threshold (float, Optional): keep the blocks whose mixture probability exceeds it instead.
        select (bool): False updates the state only (a step that decodes densely) and returns None.
        keep_sink, keep_recent: always keep block 0 / the `keep_recent` complete blocks before the token's
            own (inside the budget; with a threshold, on top of it), as `select_decode_blocks`.

    Returns:
        `(index int32 [B, Hkv, 1, W], count int32 [B, Hkv])`: each row's selected blocks ascending
        then `-1` (`W` the budget's block count, or every slot's block with a threshold), and how many.
    """
    B, Hq, n, D = q_pre.shape
    Hkv, bs, Dg = block.shape[1], block.shape[2], keys.shape[-1]
    ks = k_summaries
    if n != 1 or k_pre.shape != (B, Hkv, 1, D) or t.shape != (B,) or t.dtype.is_floating_point:
        raise ValueError(f"decode_gate_step: one token per sequence: q_pre {tuple(q_pre.shape)}, k_pre {tuple(k_pre.shape)}, t {tuple(t.shape)}")
    if any(p not in _POOLS for p in k_pools) or len(set(k_pools)) != len(k_pools):
        raise ValueError(f"decode_gate_step: key pools must be distinct ones of {_POOLS}, got {k_pools}")
    pow2 = lambda x: x > 0 and x & (x - 1) == 0  # noqa: E731
    if not (pow2(D) and pow2(Dg) and Dg >= 32 and pow2(bs) and ks in (1, 2, 4, 8) and bs % ks == 0):
        raise ValueError(f"decode_gate_step: D ({D}), Dg (>= 32: {Dg}) and block_size ({bs}) must be powers of 2, k_summaries 1/2/4/8")
    if Hq % Hkv or Hq // Hkv > 16:
        raise ValueError(f"decode_gate_step: GQA groups of at most 16 query heads, got Hq={Hq}, Hkv={Hkv}")
    if keys.dtype != torch.float32 or keys.shape[:2] != (B, Hkv) or keys.shape[2] % ks or keys.stride(-1) != 1:
        raise ValueError(f"decode_gate_step: keys must be fp32 [B, Hkv, slots, Dg] with unit last stride, got {tuple(keys.shape)}")
    if w_k.shape != (Hkv, len(k_pools) * D, Dg) or w_q.shape != (Hq, D, Dg) or not (w_k.is_contiguous() and w_q.is_contiguous()):
        raise ValueError(f"decode_gate_step: w_k must be [Hkv, P*D, Dg], w_q [Hq, D, Dg], contiguous; got {tuple(w_k.shape)}, {tuple(w_q.shape)}")
    if k_pre.dtype != block.dtype or q_pre.stride(-1) != 1 or k_pre.stride(-1) != 1 or block.stride(-1) != 1:
        raise ValueError("decode_gate_step: k_pre must have block's dtype; q_pre, k_pre, block a unit last stride")
    if not is_interpreter() and q_pre.device.type != "cuda":
        raise ValueError("decode_gate_step: CUDA tensors (or TRITON_INTERPRET=1)")
    G = Hq // Hkv
    nc = keys.shape[2] // ks
    ncp = triton.next_power_of_2(nc)
    width = nc if threshold is not None else max(0, min(token_budget // bs - 1, nc))
    dev = q_pre.device
    idx = torch.empty(B, Hkv, 1, max(width, 1), dtype=torch.int32, device=dev)[..., :width]
    cnt = torch.empty(B, Hkv, dtype=torch.int32, device=dev)
    # blocks per step of the scoring loop: its KS pairs of [CH, Dg / 2] key tiles are staged in shared memory
    # (compiled for sm_90: 141 KB at Dg 128, KS 1 with CH 128; CH shrinks as KS * Dg grows; tools/compile_sm90.py)
    # scratch: each row's per-head block logits, then its block probabilities
    logits = torch.empty(B * Hkv, G, nc, dtype=torch.float32, device=dev) if select else keys
    probs = torch.empty(B * Hkv, ncp, dtype=torch.float32, device=dev) if select else keys
    dummy = keys
    pools = {p: k_pools.index(p) if p in k_pools else -1 for p in _POOLS}
    decode_gate_step_kernel[(B * Hkv,)](
        q_pre, k_pre, t, block, keys, w_k, w_q, q_norm if q_norm is not None else dummy,
        k_norm if k_norm is not None else dummy, inv_freq, logits, probs, idx, cnt,
        q_pre.stride(0), q_pre.stride(1), k_pre.stride(0), k_pre.stride(1), *block.stride()[:3], *keys.stride()[:3],
        idx.stride(0), idx.stride(1), logits.stride(0), logits.stride(1), probs.stride(0),
        float(attention_scaling), float(eps), 1.0 / math.sqrt(Dg), float(threshold or 0.0), width,
        HKV=Hkv, G=G, GP=triton.next_power_of_2(G), QP=max(16, triton.next_power_of_2(G)), D=D, DG=Dg, HALF=Dg // 2, BS=bs, KS=ks, STRIDE=bs // ks,
        NP=len(k_pools), DC=max(16, min(D, 2048 // (ks * (Dg // 2)))), P_MAX=pools["max"], P_MIN=pools["min"], P_AVG=pools["avg"],
        QNORM=q_norm is not None, KNORM=k_norm is not None, SELECT=select, TOPK=threshold is None, NT=TOPK_WAYS,
        KEEP_SINK=bool(keep_sink), KEEP_RECENT=int(keep_recent),
        NCP=ncp, WP=triton.next_power_of_2(max(width, 1)), CH=max(16, min(128, 8192 // (ks * (Dg // 2)))), CHP=min(ncp, 1024), num_warps=4,
    )  # fmt: skip
    return (idx, cnt) if select else None
