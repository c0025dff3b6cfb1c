"""Block-sparsity selection and block-mask formats.

A *block mask* is a bool tensor ``[B, H, nb_q, nb_k]``: entry ``[b, h, i, j]`` is True when query
block ``i`` of head ``h`` attends to key block ``j``. Causal masks live in the lower triangle
(``j <= i``); helpers here always clear the upper triangle.

Formats and converters:

- block mask (bool) <-> block indices ``[B, H, nb, K]`` int32/int64, ``-1`` padded (the TopK kernel's
  input; ``torch.topk`` indices are accepted as they are: negative or above-diagonal entries are
  ignored);
- block mask -> CSR ``(crow [B, H, nb + 1] int32, col [B, H, max_nnz] int32, -1 padded)``; the CSC
  form used by backward kernels is the CSR of the transposed mask.
- block mask <-> variable-count lists ``(kv_num_blocks [B, H, nb] int32, kv_indices [B, H, nb, Kmax]
  int32)``, FlexAttention's ``BlockMask`` convention: row ``i`` keeps ``kv_indices[..., i, :kv_num_blocks[..., i]]``.
  For selections that keep a different number of blocks per row (threshold, adaptive); built
  without a host sync, so ``Kmax`` is ``nb`` or a bound the caller knows.

Selection rules:

- :func:`nz_ratio_to_k`: upstream's per-row budget ``k = floor((1 - sqrt(1 - nz_ratio)) * nb)``,
  which makes the density over the causal triangle about ``nz_ratio`` (method-spec §3.1).
- :func:`select_blocks`: top-k, threshold, top-p or adaptive selection on gate scores, plus the
  always-keep rules.
- :func:`adaptive_block_mask`: one budget per layer (what per-row top-k would keep), spent on the
  highest block probabilities of *all* rows and heads, so rows and heads whose attention is spread out
  get more blocks and peaked ones give theirs up.
- :func:`block_density`: the *realised* density over the causal block triangle. Reports quote it.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

__all__ = [
    "nz_ratio_to_k",
    "causal_block_mask",
    "topk_block_index",
    "topk_block_mask",
    "threshold_block_mask",
    "top_p_block_mask",
    "adaptive_block_mask",
    "topk_budget",
    "SPARSITY_METHODS",
    "apply_keep_rules",
    "select_blocks",
    "indices_to_mask",
    "mask_to_indices",
    "mask_to_csr",
    "mask_to_kv_blocks",
    "kv_blocks_to_mask",
    "block_density",
    "expand_block_mask",
]


SPARSITY_METHODS = ("nz_ratio", "threshold", "top_p", "adaptive")


def nz_ratio_to_k(nz_ratio: float, nb: int) -> int:
    """Per-row block budget for a target causal density (upstream rule, clamped to at least 1).

    `k = int((1 - sqrt(1 - nz_ratio)) * nb)`; keeping `min(i + 1, k)` blocks in row `i` gives a
    density of about `2r - r^2` with `r = k / nb`, i.e. about `nz_ratio`.
    """
    if not (0.0 < nz_ratio <= 1.0):
        raise ValueError(f"nz_ratio must be in (0, 1], got {nz_ratio}")
    if nz_ratio == 1.0:
        return nb
    k = int((1.0 - math.sqrt(1.0 - nz_ratio)) * nb)
    return max(1, min(nb, k))


def causal_block_mask(nb_q: int, nb_k: int | None = None, device=None) -> torch.Tensor:
    """Bool `[nb_q, nb_k]`, True on and below the diagonal (query block i sees key blocks 0..i).

    Cached per shape and device (every layer asks for the same one): treat it as read-only.
    """
    nb_k = nb_q if nb_k is None else nb_k
    return _causal_block_mask(nb_q, nb_k, torch.device(device) if device is not None else torch.device("cpu"))


@functools.lru_cache(maxsize=64)
def _causal_block_mask(nb_q: int, nb_k: int, device: torch.device) -> torch.Tensor:
    return torch.ones(nb_q, nb_k, dtype=torch.bool, device=device).tril()


def topk_block_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices `[B, H, nb, k]` of the `k` highest-scoring causal key blocks of every row.

    Entries above the diagonal are ignored whatever their value. Rows with fewer than `k` causal
    blocks return some above-diagonal indices as well (consumers drop them: the TopK kernel and
    :func:`indices_to_mask` ignore them, :func:`topk_block_mask` masks them).
    """
    nb = scores.shape[-1]
    causal = causal_block_mask(scores.shape[-2], nb, scores.device)
    k = max(1, min(int(k), nb))
    # fp32 so that bf16 ties do not make the selection depend on the implementation
    return scores.float().masked_fill(~causal, float("-inf")).topk(k, dim=-1).indices


def topk_block_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the `k` highest-scoring causal key blocks of every query-block row.

    Args:
        scores (torch.Tensor): `[B, H, nb, nb]` gate scores (logits or probabilities); entries above
            the diagonal are ignored whatever their value.
        k (int): blocks per row; rows with fewer than `k` causal blocks keep all of them.

    Returns:
        bool `[B, H, nb, nb]`, lower-triangular.
    """
    idx = topk_block_index(scores, k)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True)
    return mask & causal_block_mask(scores.shape[-2], scores.shape[-1], scores.device)


def threshold_block_mask(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep causal blocks whose gate probability is strictly greater than `threshold`.

    Args:
        probs (torch.Tensor): `[B, H, nb, nb]` row-softmaxed gate output.
    """
    causal = causal_block_mask(probs.shape[-2], probs.shape[-1], probs.device)
    return (probs > threshold) & causal


def top_p_block_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep, per row, the fewest highest-probability causal blocks whose probabilities sum to `top_p`.

    Args:
        probs (torch.Tensor): `[B, H, nb, nb]` row-softmaxed gate output.
        top_p (float): in (0, 1]; the block that crosses `top_p` is kept.
    """
    causal = causal_block_mask(probs.shape[-2], probs.shape[-1], probs.device)
    p = probs.float().masked_fill(~causal, 0.0)
    sorted_p, order = p.sort(dim=-1, descending=True)
    # keep a block while the mass strictly before it is below top_p
    before = torch.nn.functional.pad(sorted_p.cumsum(-1)[..., :-1], (1, 0))
    keep_sorted = before < top_p
    mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return mask & causal


def topk_budget(nz_ratio: float, nb: int) -> int:
    """Blocks that per-row top-k at `nz_ratio` keeps in one `[nb, nb]` causal map: `sum_i min(i + 1, k)`."""
    k = nz_ratio_to_k(nz_ratio, nb)
    return k * (k + 1) // 2 + (nb - k) * k


def adaptive_block_mask(
    probs: torch.Tensor, nz_ratio: float, keep_sink: bool = False, keep_diagonal: bool = True, row_floor: float = 0.0
) -> torch.Tensor:
    """Spend one block budget per batch element over all heads and rows, on the highest probabilities.

    The budget is what per-row top-k at `nz_ratio` keeps (:func:`topk_budget` per head), so the
    realised density never exceeds top-k's; the always-kept blocks (diagonal, sink) count inside it.
    Choosing the largest row-normalised probabilities maximises the summed attention recall the gate
    predicts: a row whose attention sits in two blocks keeps about two, a diffuse row keeps many.

    Args:
        probs (torch.Tensor): `[B, H, nb, nb]` row-softmaxed gate output (any row-normalised scores).
        nz_ratio (float): requested density in (0, 1].
        row_floor (float): every row first keeps its `floor(row_floor * k)` most probable blocks
            (`k` the per-row top-k budget), inside the same total: 0 is fully global, 1 is top-k.

    Returns:
        bool `[B, H, nb, nb]`, lower-triangular.
    """
    B, H, nb, nb_k = probs.shape
    causal = causal_block_mask(nb, nb_k, probs.device)
    forced = torch.zeros(nb, nb_k, dtype=torch.bool, device=probs.device)
    if keep_diagonal:
        forced |= torch.eye(nb, nb_k, dtype=torch.bool, device=probs.device)
    if keep_sink:
        forced[:, 0] = True
    forced &= causal
    if nz_ratio >= 1.0:
        return causal.expand(B, H, nb, nb_k).clone()
    floor_k = int(row_floor * nz_ratio_to_k(nz_ratio, nb))
    if floor_k > 0:
        forced = forced | topk_block_mask(probs, floor_k)
    # forced blocks never exceed the budget except when the floor and the diagonal overlap little
    n_forced = int(forced.expand(B, H, nb, nb_k).sum(dim=(1, 2, 3)).max())
    budget = max(H * topk_budget(nz_ratio, nb), n_forced)
    # forced blocks first (+inf), then probabilities; non-causal entries can never be picked (-inf)
    s = probs.float().masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf")).reshape(B, -1)
    idx = s.topk(min(budget, s.shape[-1]), dim=-1).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True).view(B, H, nb, nb_k)
    return mask & causal


def apply_keep_rules(
    mask: torch.Tensor, keep_sink: bool = False, keep_diagonal: bool = True, dense_last_rows: int = 0
) -> torch.Tensor:
    """Force blocks that sparse attention should never drop.

    Args:
        mask (torch.Tensor): bool `[B, H, nb, nb]`.
        keep_sink (bool): keep key block 0 (the attention sink) in every row. Default: `False`.
        keep_diagonal (bool): keep each row's diagonal block, so every query sees its own recent
            tokens and no row is ever empty. Default: `True`.
        dense_last_rows (int): make the last `n` query-block rows dense. Default: `0`.
    """
    mask = mask.clone()
    nb_q, nb_k = mask.shape[-2:]
    if keep_sink:
        mask[..., 0] = True
    if keep_diagonal:
        mask |= torch.eye(nb_q, nb_k, dtype=torch.bool, device=mask.device)
    if dense_last_rows > 0:
        mask[..., max(0, nb_q - dense_last_rows) :, :] = True
    return mask & causal_block_mask(nb_q, nb_k, mask.device)


def select_blocks(
    scores: torch.Tensor,
    method: str = "nz_ratio",
    nz_ratio: float = 1.0,
    threshold: float = 0.0,
    keep_sink: bool = False,
    keep_diagonal: bool = True,
    dense_last_rows: int = 0,
    top_p: float = 1.0,
    adaptive_row_floor: float = 0.0,
) -> torch.Tensor:
    """Gate scores -> block mask.

    Args:
        scores (torch.Tensor): `[B, H, nb, nb]`. For `"nz_ratio"` any monotone score (logits); for
            `"threshold"`, `"top_p"` and `"adaptive"` row-softmaxed probabilities.
        method (str): one of :data:`SPARSITY_METHODS`: `"nz_ratio"` (per-row top-k,
            :func:`nz_ratio_to_k`), `"threshold"`, `"top_p"` (:func:`top_p_block_mask`) or
            `"adaptive"` (:func:`adaptive_block_mask`, budget from `nz_ratio`).

    Returns:
        bool `[B, H, nb, nb]`.
    """
    nb = scores.shape[-1]
    if method == "nz_ratio":
        if nz_ratio >= 1.0:
            mask = causal_block_mask(scores.shape[-2], nb, scores.device).expand(scores.shape).clone()
        else:
            mask = topk_block_mask(scores, nz_ratio_to_k(nz_ratio, nb))
    elif method == "threshold":
        mask = threshold_block_mask(scores, threshold)
    elif method == "top_p":
        mask = top_p_block_mask(scores, top_p)
    elif method == "adaptive":
        # the keep rules count inside the budget here (applied again below: a no-op but for dense rows)
        mask = adaptive_block_mask(scores, nz_ratio, keep_sink, keep_diagonal, adaptive_row_floor)
    else:
        raise ValueError(f"sparsity method must be one of {SPARSITY_METHODS}, got {method!r}")
    return apply_keep_rules(mask, keep_sink, keep_diagonal, dense_last_rows)


def indices_to_mask(block_index: torch.Tensor, nb_k: int) -> torch.Tensor:
    """Block indices `[B, H, nb_q, K]` -> bool mask `[B, H, nb_q, nb_k]`.

    Negative entries and entries above the diagonal (index > query-block row) are dropped.
    """
    if block_index.dtype.is_floating_point or block_index.dtype == torch.bool:
        raise TypeError(f"block_index must be an integer tensor, got {block_index.dtype}")
    nb_q = block_index.shape[-2]
    idx = block_index.long()
    rows = torch.arange(nb_q, device=idx.device)[:, None]
    valid = (idx >= 0) & (idx <= rows) & (idx < nb_k)
    # send invalid entries to an extra column that is cut off afterwards
    idx = torch.where(valid, idx, torch.full_like(idx, nb_k))
    mask = torch.zeros(*idx.shape[:-1], nb_k + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx, True)
    return mask[..., :nb_k]


def mask_to_indices(mask: torch.Tensor, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Bool mask `[B, H, nb_q, nb_k]` -> ascending kept block indices `[B, H, nb_q, K]`, `-1` padded.

    `K` is the largest number of kept blocks in any row (at least 1).
    """
    nb_k = mask.shape[-1]
    counts = mask.sum(-1)
    K = max(1, int(counts.max().item())) if mask.numel() else 1
    cols = torch.arange(nb_k, device=mask.device).expand(mask.shape)
    # kept columns first, in ascending order: sort on (not kept, column)
    key = torch.where(mask, cols, cols + nb_k)
    order = key.sort(dim=-1).values[..., :K]
    return torch.where(order < nb_k, order, torch.full_like(order, -1)).to(dtype)


def mask_to_csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask `[B, H, nb_q, nb_k]` -> per-(batch, head) CSR.

    Returns:
        crow (torch.Tensor): int32 `[B, H, nb_q + 1]`, row `i`'s columns are `col[..., crow[i]:crow[i+1]]`.
        col (torch.Tensor): int32 `[B, H, max_nnz]` ascending within a row, `-1` padded.

    For the CSC form (key block -> query blocks) call it on `mask.transpose(-1, -2)`.
    """
    B, H, nb_q, nb_k = mask.shape
    counts = mask.sum(-1, dtype=torch.int32)
    crow = torch.zeros(B, H, nb_q + 1, dtype=torch.int32, device=mask.device)
    crow[..., 1:] = counts.cumsum(-1)
    nnz = crow[..., -1]
    max_nnz = max(1, int(nnz.max().item())) if mask.numel() else 1
    flat = mask.reshape(B * H, nb_q * nb_k)
    cols = torch.arange(nb_q * nb_k, device=mask.device).expand_as(flat)
    key = torch.where(flat, cols, cols + nb_q * nb_k)
    order = key.sort(dim=-1).values[:, :max_nnz]
    col = torch.where(order < nb_q * nb_k, order % nb_k, torch.full_like(order, -1)).to(torch.int32)
    return crow, col.view(B, H, max_nnz)


def mask_to_kv_blocks(mask: torch.Tensor, max_blocks: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool mask `[B, H, nb_q, nb_k]` -> `(kv_num_blocks, kv_indices)`, without a host sync.

    Args:
        mask (torch.Tensor): bool `[B, H, nb_q, nb_k]`.
        max_blocks (int, Optional): `Kmax`, the width of `kv_indices`. Default: `nb_k` (always enough).
            A smaller bound saves memory; a row with more kept blocks keeps only its `max_blocks`
            lowest columns (and its count says so), so pass a bound that holds, e.g. the top-k
            budget plus the forced blocks.

    Returns:
        kv_num_blocks (torch.Tensor): int32 `[B, H, nb_q]`, kept blocks per row (at most `Kmax`).
        kv_indices (torch.Tensor): int32 `[B, H, nb_q, Kmax]`; the first `kv_num_blocks` entries of
            a row are its kept columns in ascending order, the rest are `-1`.
    """
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise TypeError(f"mask_to_kv_blocks: mask must be a 4-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    nb_k = mask.shape[-1]
    kmax = nb_k if max_blocks is None else int(max_blocks)
    if kmax < 1:
        raise ValueError(f"mask_to_kv_blocks: max_blocks must be >= 1, got {max_blocks}")
    # compaction by prefix sum: kept column c goes to slot (number of kept columns before c); the
    # rest go to a spare slot Kmax that is cut off (int16 halves the memory of the [.., nb_k] temporaries)
    cdt = torch.int16 if nb_k < 2**15 else torch.int32
    pos = mask.cumsum(-1, dtype=cdt) - 1
    pos = torch.where(mask & (pos < kmax), pos, torch.full_like(pos, kmax)).long()
    cols = torch.arange(nb_k, device=mask.device, dtype=torch.int32).expand(mask.shape)
    idx = torch.full((*mask.shape[:-1], kmax + 1), -1, dtype=torch.int32, device=mask.device)
    idx.scatter_(-1, pos, cols)
    num = mask.sum(-1, dtype=torch.int32).clamp_max(kmax)
    idx = idx[..., :kmax]
    # the spare slot took arbitrary columns; clear everything past the count
    idx = torch.where(torch.arange(kmax, device=mask.device) < num[..., None], idx, -1)
    return num, idx


def kv_blocks_to_mask(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, nb_k: int) -> torch.Tensor:
    """`(kv_num_blocks [B, H, nb_q], kv_indices [B, H, nb_q, Kmax])` -> bool mask `[B, H, nb_q, nb_k]`.

    Entries past a row's count are ignored; within it, the rules of :func:`indices_to_mask` apply
    (negative and above-diagonal entries dropped, repeats count once).
    """
    if kv_num_blocks.shape != kv_indices.shape[:-1]:
        raise ValueError(
            f"kv_num_blocks {tuple(kv_num_blocks.shape)} must be kv_indices {tuple(kv_indices.shape)} without its last dim"
        )
    live = torch.arange(kv_indices.shape[-1], device=kv_indices.device) < kv_num_blocks[..., None]
    return indices_to_mask(torch.where(live, kv_indices.long(), -1), nb_k)


def block_density(mask: torch.Tensor, causal: bool = True) -> float:
    """Realised density: kept blocks / available blocks, averaged over everything in `mask`.

    With `causal`, available blocks are the `nb_q * (nb_q + 1) / 2` of the lower triangle and kept
    blocks above the diagonal are not counted.
    """
    nb_q, nb_k = mask.shape[-2:]
    if causal:
        tri = causal_block_mask(nb_q, nb_k, mask.device)
        kept = (mask & tri).sum().item()
        avail = tri.sum().item() * (mask.numel() // (nb_q * nb_k))
    else:
        kept, avail = mask.sum().item(), mask.numel()
    return kept / max(1, avail)


def expand_block_mask(mask: torch.Tensor, S_q: int, S_k: int | None = None, block_size: int = 64) -> torch.Tensor:
    """Block mask `[..., nb_q, nb_k]` -> token mask `[..., S_q, S_k]` (memory `S_q x S_k`: tests only)."""
    S_k = S_q if S_k is None else S_k
    if S_q * S_k > 2**28:
        warnings.warn(f"expand_block_mask materialises a {S_q}x{S_k} mask per head", stacklevel=2)
    rows = torch.arange(S_q, device=mask.device) // block_size
    cols = torch.arange(S_k, device=mask.device) // block_size
    return mask[..., rows, :][..., cols]
