"""Plain PyTorch twins of every attention op in :mod:`seer_attn.kernels`.

These functions *define* what the Triton kernels compute. They are written for clarity, not
speed, but they never materialise ``S x S`` for all heads at once: the query axis is processed
in chunks so that S = 8192 with 9 heads fits comfortably on a 24 GB CPU machine.

Packed sequences (the ``*_varlen_*`` twins, flash-attn's varlen convention): ``q`` is ``[total, Hq, D]``,
``k``, ``v`` are ``[total, Hkv, D]``, and int32 ``cu_seqlens [n_seq + 1]`` holds the cumulative lengths.
Every sequence has its own block grid, starting at its first token, and its own block map: maps are
``[n_seq, H, nb, nb]`` with ``nb = ceil(max_len / block_size)``, sequence ``s`` using the top-left
``[nb_s, nb_s]`` corner. Each varlen twin is, by definition, its batch twin run on every sequence alone.

Layout everywhere else: ``q`` is ``[B, Hq, S, D]``, ``k`` and ``v`` are ``[B, Hkv, S_k, D]`` with
``Hkv`` dividing ``Hq`` (query head ``h`` reads KV head ``h // (Hq // Hkv)``). Block maps are
``[B, Hq, nb_q, nb_k]`` with ``nb = ceil(S / block_size)``; a partial last block covers only the
tokens it really has.

``upcast=True`` (the default) computes in fp32 (fp64 stays fp64); ``upcast=False`` computes in
the input dtype, which is what tests use to measure "the error PyTorch itself makes in this dtype".
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attn_with_pooling_naive",
    "attn_with_pooling_varlen_naive",
    "block_sparse_attn_naive",
    "block_sparse_attn_topk_naive",
    "block_sparse_attn_topk_varlen_naive",
    "block_sparse_attn_varlen_naive",
    "attn_with_token_pooling_naive",
    "sparse_decode_attn_naive",
]

# query rows processed at once; a multiple of every supported block size
_CHUNK_ROWS = 1024


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [B, H, S, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, Hq, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if Hq % k.shape[1] != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({k.shape[1]})")


def _compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    if not upcast or x.dtype == torch.float64:
        return x.dtype
    return torch.float32


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # [B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]; head h of the result is KV head h // n_rep
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def _token_mask(rows: torch.Tensor, cols: torch.Tensor, is_causal: bool) -> torch.Tensor | None:
    # [C, S] bool, True = may attend
    if not is_causal:
        return None
    return cols[None, :] <= rows[:, None]


def attn_with_pooling_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = True,
    sm_scale: float | None = None,
    block_size: int = 64,
    pooling: str = "max",
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention plus the block-pooled attention-probability map (the gates' target).

    Args:
        q (torch.Tensor): `[B, Hq, S, D]`.
        k, v (torch.Tensor): `[B, Hkv, S, D]`; `Hkv` divides `Hq`.
        is_causal (bool): causal masking. Default: `True`.
        sm_scale (float, Optional): logit scale. Default: `1 / sqrt(D)`.
        block_size (int): pooling tile edge. Default: `64`.
        pooling (str): `"max"`: maximum probability inside each `block_size x block_size` tile
            (upstream SeerAttention's target). `"mass"`: probability summed over the tile's key
            columns, averaged over its query rows. Default: `"max"`.
        upcast (bool): compute in fp32 instead of the input dtype. Default: `True`.

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]` in `q.dtype`, the exact softmax attention output.
        pooled (torch.Tensor): `[B, Hq, nb, nb]` fp32 (fp64 for fp64 input), `nb = ceil(S / block_size)`.
            Each block-row sums to 1; with `is_causal` blocks above the diagonal are exactly 0 and,
            inside diagonal tiles, masked (future) entries are excluded. A partial last block is
            pooled over the tokens it really contains.
    """
    _check_qkv(q, k, v)
    if pooling not in ("max", "mass"):
        raise ValueError(f"pooling must be 'max' or 'mass', got {pooling!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"attn_with_pooling needs as many keys as queries; got S_q={q.shape[2]}, S_k={k.shape[2]}")
    B, Hq, S, D = q.shape
    n_rep = Hq // k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    dt = _compute_dtype(q, upcast)
    nb = math.ceil(S / block_size)
    pad = nb * block_size - S

    kf = _expand_kv(k, n_rep).to(dt)
    vf = _expand_kv(v, n_rep).to(dt)
    o = torch.empty_like(q)
    pooled = torch.zeros(B, Hq, nb, nb, dtype=torch.float64 if dt == torch.float64 else torch.float32, device=q.device)
    cols = torch.arange(S, device=q.device)
    chunk = max(block_size, (_CHUNK_ROWS // block_size) * block_size)
    for r0 in range(0, S, chunk):
        r1 = min(S, r0 + chunk)
        rows = torch.arange(r0, r1, device=q.device)
        logits = torch.matmul(q[:, :, r0:r1].to(dt), kf.transpose(-1, -2)) * scale  # [B, H, C, S]
        allowed = _token_mask(rows, cols, is_causal)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        o[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)

        # pool the probabilities: pad keys to whole blocks with zeros (probabilities are >= 0,
        # and a padded key has probability 0, so neither max nor sum changes)
        pf = torch.nn.functional.pad(p.to(pooled.dtype), (0, pad))
        C = r1 - r0
        pf = pf.view(B, Hq, C, nb, block_size)
        per_row = pf.amax(-1) if pooling == "max" else pf.sum(-1)  # [B, H, C, nb]
        b0 = r0 // block_size
        nrows = math.ceil(C / block_size)
        row_pad = nrows * block_size - C
        if pooling == "max":
            per_row = torch.nn.functional.pad(per_row, (0, 0, 0, row_pad))  # zero rows do not change a max
            tile = per_row.view(B, Hq, nrows, block_size, nb).amax(3)
        else:
            per_row = torch.nn.functional.pad(per_row, (0, 0, 0, row_pad))
            counts = torch.full((nrows,), block_size, dtype=per_row.dtype, device=q.device)
            counts[-1] = block_size - row_pad  # a partial last query block averages over its real rows
            tile = per_row.view(B, Hq, nrows, block_size, nb).sum(3) / counts[:, None]
        pooled[:, :, b0 : b0 + nrows] = tile
    pooled = pooled / pooled.sum(-1, keepdim=True)
    return o, pooled


def block_sparse_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    is_causal: bool = True,
    upcast: bool = True,
) -> torch.Tensor:
    """Attention restricted to the kept `(query block, key block)` pairs.

    Equal to dense attention in which every token pair whose blocks are not kept is masked out;
    with `is_causal` the usual causal mask applies as well (it only bites inside diagonal blocks).
    A query row with no kept key gets output 0 (never NaN).

    Args:
        q (torch.Tensor): `[B, Hq, S_q, D]`.
        k, v (torch.Tensor): `[B, Hkv, S_k, D]`.
        block_mask (torch.Tensor): bool `[B, Hq, nb_q, nb_k]` (broadcastable over B and H),
            True = keep. `nb = ceil(S / block_size)`.
        sm_scale (float, Optional): Default: `1 / sqrt(D)`.
        block_size (int): Default: `64`.
        is_causal (bool): Default: `True`.
        upcast (bool): compute in fp32. Default: `True`.

    Returns:
        o (torch.Tensor): `[B, Hq, S_q, D]` in `q.dtype`.
    """
    _check_qkv(q, k, v)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be torch.bool, got {block_mask.dtype}")
    nbq, nbk = math.ceil(Sq / block_size), math.ceil(Sk / block_size)
    if block_mask.dim() != 4 or block_mask.shape[-2:] != (nbq, nbk):
        raise ValueError(
            f"block_mask must be [B, Hq, {nbq}, {nbk}] for S_q={Sq}, S_k={Sk}, block_size={block_size}; "
            f"got {tuple(block_mask.shape)}"
        )
    if Sq != Sk:
        raise NotImplementedError("block_sparse_attn_naive supports S_q == S_k only (prefill)")
    n_rep = Hq // k.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    dt = _compute_dtype(q, upcast)
    block_mask = block_mask.expand(B, Hq, nbq, nbk)
    kf = _expand_kv(k, n_rep).to(dt)
    vf = _expand_kv(v, n_rep).to(dt)
    o = torch.empty_like(q)
    cols = torch.arange(Sk, device=q.device)
    chunk = max(block_size, (_CHUNK_ROWS // block_size) * block_size)
    for r0 in range(0, Sq, chunk):
        r1 = min(Sq, r0 + chunk)
        rows = torch.arange(r0, r1, device=q.device)
        logits = torch.matmul(q[:, :, r0:r1].to(dt), kf.transpose(-1, -2)) * scale
        # token-level mask from the block mask: [B, H, C, S_k]
        keep = block_mask[:, :, rows // block_size][..., cols // block_size]
        causal = _token_mask(rows, cols, is_causal)
        if causal is not None:
            keep = keep & causal
        logits = logits.masked_fill(~keep, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        p = torch.nan_to_num(p, nan=0.0)  # all-masked rows -> 0
        o[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)
    return o


def block_sparse_attn_topk_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    upcast: bool = True,
    block_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal block-sparse attention from per-row lists of kept key blocks.

    Args:
        q, k, v: as in :func:`block_sparse_attn_naive`.
        block_index (torch.Tensor): int `[B, Hq, nb, K]`, e.g. the indices from `torch.topk`.
            Order and duplicates do not matter; negative entries and entries above the diagonal
            (index > row) are ignored.
        block_count (torch.Tensor, Optional): int `[B, Hq, nb]`: row `i` keeps only
            `block_index[..., i, :block_count[..., i]]` (FlexAttention's `kv_num_blocks`).

    Returns:
        o (torch.Tensor): `[B, Hq, S, D]`.
    """
    from seer_attn.kernels.block_mask import indices_to_mask, kv_blocks_to_mask

    nb = math.ceil(k.shape[2] / block_size)
    if block_count is None:
        mask = indices_to_mask(block_index, nb)
    else:
        mask = kv_blocks_to_mask(block_count, block_index, nb)
    return block_sparse_attn_naive(q, k, v, mask, sm_scale=sm_scale, block_size=block_size, upcast=upcast)


def attn_with_token_pooling_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    pooling: str = "max",
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention plus, per query *token*, its attention pooled over each key block (decode gate target).

    Queries are the last `S_q` of the `S_k` positions (`S_q == S_k` for a whole sequence, fewer for
    decoding steps over a cache).

    Args:
        q (torch.Tensor): `[B, Hq, S_q, D]`.
        k, v (torch.Tensor): `[B, Hkv, S_k, D]`, `S_q <= S_k`; `Hkv` divides `Hq`.
        sm_scale (float, Optional): logit scale. Default: `1 / sqrt(D)`.
        block_size (int): key block length. Default: `64`.
        pooling (str): `"max"`: the largest probability of the token inside each key block, then the
            maximum over the `G` query heads of the KV head (upstream's decode target). `"mass"`: the
            probability summed over each key block, averaged over the `G` heads. Default: `"max"`.
        upcast (bool): compute in fp32 instead of the input dtype. Default: `True`.

    Returns:
        o (torch.Tensor): `[B, Hq, S_q, D]` in `q.dtype`.
        pooled (torch.Tensor): `[B, Hkv, S_q, nb]` fp32 (fp64 for fp64 input), `nb = ceil(S_k / block_size)`;
            each row sums to 1 and is 0 after the token's own block.
    """
    _check_qkv(q, k, v)
    if pooling not in ("max", "mass"):
        raise ValueError(f"pooling must be 'max' or 'mass', got {pooling!r}")
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    if Sq > Sk:
        raise ValueError(f"more queries ({Sq}) than keys ({Sk})")
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    dt = _compute_dtype(q, upcast)
    nb = math.ceil(Sk / block_size)
    pad = nb * block_size - Sk
    kf, vf = _expand_kv(k, G).to(dt), _expand_kv(v, G).to(dt)
    o = torch.empty_like(q)
    pooled = torch.zeros(B, Hkv, Sq, nb, dtype=torch.float64 if dt == torch.float64 else torch.float32, device=q.device)
    cols = torch.arange(Sk, device=q.device)
    for r0 in range(0, Sq, _CHUNK_ROWS):
        r1 = min(Sq, r0 + _CHUNK_ROWS)
        rows = torch.arange(r0, r1, device=q.device) + (Sk - Sq)
        logits = torch.matmul(q[:, :, r0:r1].to(dt), kf.transpose(-1, -2)) * scale
        p = torch.softmax(logits.masked_fill(~_token_mask(rows, cols, True), float("-inf")), dim=-1)
        o[:, :, r0:r1] = torch.matmul(p, vf).to(q.dtype)
        # a padded key has probability 0: neither a max nor a sum changes
        pf = torch.nn.functional.pad(p.to(pooled.dtype), (0, pad)).view(B, Hkv, G, r1 - r0, nb, block_size)
        pooled[:, :, r0:r1] = pf.amax(-1).amax(2) if pooling == "max" else pf.sum(-1).mean(2)
    return o, pooled / pooled.sum(-1, keepdim=True)


def sparse_decode_attn_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    upcast: bool = True,
    seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decoding attention over selected key blocks of a KV cache plus each token's own block.

    The `n` new tokens are the last `n` of the `L` cached positions: token `i` sits at `t = L - n + i`,
    its own (possibly partial) block `t // block_size` is always attended (causally, up to `t`), and
    of the earlier blocks only those listed in `block_index` are.

    Args:
        q (torch.Tensor): `[B, Hq, n, D]`.
        k, v (torch.Tensor): `[B, Hkv, L, D]`, `n <= L`; `Hkv` divides `Hq`.
        block_index (torch.Tensor): int `[B, Hkv, n, K]` (`K` may be 0), shared by the `G` query heads
            of each KV head. Entries that are negative or not below the token's own block are
            ignored; valid entries must not repeat (the Triton kernel would count a repeat twice).
        sm_scale (float, Optional): Default: `1 / sqrt(D)`.
        block_size (int): Default: `64`.
        upcast (bool): compute in fp32. Default: `True`.
        seqlens (torch.Tensor, Optional): int `[B]`, the filled length of each sequence's cache (a
            preallocated cache): sequence `b` is `k[b, :, :seqlens[b]]`, the slots after it unused.

    Returns:
        o (torch.Tensor): `[B, Hq, n, D]` in `q.dtype`.
    """
    if seqlens is not None:
        if seqlens.shape != (q.shape[0],):
            raise ValueError(f"seqlens must be [B] = [{q.shape[0]}], got {tuple(seqlens.shape)}")
        return torch.cat([
            sparse_decode_attn_naive(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], block_index[b : b + 1],
                                     sm_scale, block_size, upcast)
            for b, n in enumerate(seqlens.tolist())
        ])  # fmt: skip
    _check_qkv(q, k, v)
    B, Hq, n, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    if n > L:
        raise ValueError(f"more new tokens ({n}) than cached positions ({L})")
    if block_index.dim() != 4 or tuple(block_index.shape[:3]) != (B, Hkv, n):
        raise ValueError(f"block_index must be [B, Hkv, n, K] = [{B}, {Hkv}, {n}, K], got {tuple(block_index.shape)}")
    G = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    dt = _compute_dtype(q, upcast)
    nb = math.ceil(L / block_size)
    kf, vf = _expand_kv(k, G).to(dt), _expand_kv(v, G).to(dt)
    cols = torch.arange(L, device=q.device)
    o = torch.empty_like(q)
    for r0 in range(0, n, _CHUNK_ROWS):
        r1 = min(n, r0 + _CHUNK_ROWS)
        rows = torch.arange(r0, r1, device=q.device) + (L - n)
        own = rows // block_size
        idx = block_index[:, :, r0:r1].long()
        valid = (idx >= 0) & (idx < own[:, None])
        # block-level mask [B, Hkv, C, nb]: the listed earlier blocks plus the own block
        blocks = torch.zeros(B, Hkv, r1 - r0, nb + 1, dtype=torch.bool, device=q.device)
        blocks.scatter_(-1, torch.where(valid, idx, nb), True)
        blocks = blocks[..., :nb] | (torch.arange(nb, device=q.device) == own[:, None])
        keep = blocks[..., cols // block_size] & _token_mask(rows, cols, True)
        logits = torch.matmul(q[:, :, r0:r1].to(dt), kf.transpose(-1, -2)) * scale
        logits = logits.masked_fill(~_expand_kv(keep, G), float("-inf"))
        o[:, :, r0:r1] = torch.matmul(torch.softmax(logits, dim=-1), vf).to(q.dtype)
    return o


def _sequences(cu_seqlens: torch.Tensor, block_size: int) -> tuple[list[tuple[int, int]], int]:
    """`[(start, end)]` of every packed sequence and the block-map edge `ceil(max_len / block_size)`."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [n_seq + 1], got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu}")
    spans = list(zip(cu[:-1], cu[1:]))
    return spans, math.ceil(max(b - a for a, b in spans) / block_size)


def _one(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    # tokens [a, b) of a packed [total, H, D] tensor as a batch of one, [1, H, b - a, D]
    return x[a:b].transpose(0, 1).unsqueeze(0)


def attn_with_pooling_varlen_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    is_causal: bool = True,
    sm_scale: float | None = None,
    block_size: int = 64,
    pooling: str = "max",
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attn_with_pooling_naive` on every packed sequence alone.

    Args:
        q (torch.Tensor): `[total, Hq, D]`.
        k, v (torch.Tensor): `[total, Hkv, D]`.
        cu_seqlens (torch.Tensor): int `[n_seq + 1]`, cumulative sequence lengths.
        Others: as in :func:`attn_with_pooling_naive`.

    Returns:
        o (torch.Tensor): `[total, Hq, D]`.
        pooled (torch.Tensor): `[n_seq, Hq, nb, nb]`, `nb = ceil(max_len / block_size)`; sequence `s`
            fills its `[nb_s, nb_s]` corner (rows summing to 1), everything else is 0.
    """
    spans, nb = _sequences(cu_seqlens, block_size)
    outs, maps = [], []
    for a, b in spans:
        if b == a:
            outs.append(q[a:b])
            dt = torch.float64 if q.dtype == torch.float64 else torch.float32
            maps.append(torch.zeros(q.shape[1], nb, nb, dtype=dt, device=q.device))
            continue
        o, p = attn_with_pooling_naive(_one(q, a, b), _one(k, a, b), _one(v, a, b), is_causal, sm_scale, block_size,
                                       pooling, upcast)
        outs.append(o[0].transpose(0, 1))
        n = p.shape[-1]
        maps.append(torch.nn.functional.pad(p[0], (0, nb - n, 0, nb - n)))
    return torch.cat(outs), torch.stack(maps)


def block_sparse_attn_varlen_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    is_causal: bool = True,
    upcast: bool = True,
) -> torch.Tensor:
    """:func:`block_sparse_attn_naive` on every packed sequence alone (autograd flows through).

    Args:
        q (torch.Tensor): `[total, Hq, D]`.
        k, v (torch.Tensor): `[total, Hkv, D]`.
        block_mask (torch.Tensor): bool `[n_seq, Hq, nb, nb]` (broadcastable over both),
            `nb = ceil(max_len / block_size)`; sequence `s` reads `block_mask[s, :, :nb_s, :nb_s]`.
        cu_seqlens (torch.Tensor): int `[n_seq + 1]`, cumulative sequence lengths.
        Others: as in :func:`block_sparse_attn_naive`.

    Returns:
        o (torch.Tensor): `[total, Hq, D]`.
    """
    spans, nb = _sequences(cu_seqlens, block_size)
    if block_mask.dim() != 4 or block_mask.shape[-2:] != (nb, nb) or block_mask.shape[0] not in (1, len(spans)):
        raise ValueError(f"block_mask must be [{len(spans)}, Hq, {nb}, {nb}], got {tuple(block_mask.shape)}")
    outs = []
    for s, (a, b) in enumerate(spans):
        if b == a:
            outs.append(q[a:b])
            continue
        n = math.ceil((b - a) / block_size)
        m = block_mask[s if block_mask.shape[0] > 1 else 0][None, :, :n, :n]
        o = block_sparse_attn_naive(_one(q, a, b), _one(k, a, b), _one(v, a, b), m, sm_scale, block_size, is_causal,
                                    upcast)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def block_sparse_attn_topk_varlen_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sm_scale: float | None = None,
    block_size: int = 64,
    upcast: bool = True,
    block_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`block_sparse_attn_topk_naive` on every packed sequence alone.

    Args:
        q (torch.Tensor): `[total, Hq, D]`.
        k, v (torch.Tensor): `[total, Hkv, D]`.
        block_index (torch.Tensor): int `[n_seq, Hq, nb, K]`, `nb = ceil(max_len / block_size)`;
            sequence `s` reads the rows `block_index[s, :, :nb_s]` (entries >= nb_s are above every
            row's diagonal and ignored).
        cu_seqlens (torch.Tensor): int `[n_seq + 1]`, cumulative sequence lengths.
        block_count (torch.Tensor, Optional): int `[n_seq, Hq, nb]`, as in the padded twin.

    Returns:
        o (torch.Tensor): `[total, Hq, D]`.
    """
    from seer_attn.kernels.block_mask import indices_to_mask, kv_blocks_to_mask

    _, nb = _sequences(cu_seqlens, block_size)
    if block_count is None:
        mask = indices_to_mask(block_index, nb)
    else:
        mask = kv_blocks_to_mask(block_count, block_index, nb)
    return block_sparse_attn_varlen_naive(q, k, v, mask, cu_seqlens, sm_scale, block_size, upcast=upcast)
