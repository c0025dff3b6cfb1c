"""AttnGate: predicts which 64-token key blocks each 64-token query block needs.

The gate sees the layer's *pre-RoPE* queries and keys (detached: it never changes the base model),
pools them over non-overlapping blocks of the sequence, projects them with small per-head linear
layers, applies RoPE at each block's first-token position (with the model's own rope scaling, so a
YaRN- or llama3-scaled model gets a matching gate), and scores every causal (query block, key block)
pair. RoPE is applied *after* pooling because pooling rotated vectors would average away the phase
that encodes position.

Topology (upstream's default, kept): with a single Q pooling and gate width == head_dim, pooled Q
is used as is and the K projection has one matrix per *query* head (pooled K is repeated over the
GQA group first); otherwise both Q and K are projected, K per KV head, repeated after RoPE.

Nothing here imports transformers: RoPE tables come in as arguments.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn

from seer_attn.kernels.block_mask import causal_block_mask

__all__ = ["AttnGate", "MultiHeadLinear", "parse_gate_type", "valid_gate_types", "pool_blocks", "apply_rope", "pooled_block_scores"]

POOL_TYPES = ("max", "min", "avg")


def valid_gate_types() -> list[str]:
    """All gate names: `Q<pools>_K<pools>` with pools a non-empty ordered subset of max, min, avg."""
    combos = [
        "".join(c) for r in range(1, len(POOL_TYPES) + 1) for c in itertools.combinations(POOL_TYPES, r)
    ]
    return [f"Q{q}_K{k}" for q in combos for k in combos]


def parse_gate_type(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`"Qavg_Kmaxminavg"` -> `(("avg",), ("max", "min", "avg"))`; unknown names raise ValueError."""
    if name not in valid_gate_types():
        raise ValueError(f"unknown gate type {name!r}; valid gate types are: {', '.join(valid_gate_types())}")
    q, k = name[1:].split("_K")

    def split(s: str) -> tuple[str, ...]:
        return tuple(p for p in POOL_TYPES if p in s)

    return split(q), split(k)


def pool_blocks(x: torch.Tensor, block_size: int, kind: str) -> torch.Tensor:
    """Pool `[B, H, S, D]` over non-overlapping blocks of the sequence axis -> `[B, H, nb, D]`.

    A partial last block is pooled over the tokens it really has.
    """
    B, H, S, D = x.shape
    nb = math.ceil(S / block_size)
    pad = nb * block_size - S
    # pooled summaries are fp32; reading x in its own dtype avoids an fp32 copy of all of q and k
    if kind == "avg":
        xp = nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        s = xp.reshape(B, H, nb, block_size, D).sum(3, dtype=torch.float32)
        counts = torch.full((nb, 1), float(block_size), dtype=torch.float32, device=x.device)
        counts[-1] = block_size - pad
        return s / counts
    fill = float("-inf") if kind == "max" else float("inf")
    xp = (nn.functional.pad(x, (0, 0, 0, pad), value=fill) if pad else x).reshape(B, H, nb, block_size, D)
    return (xp.amax(3) if kind == "max" else xp.amin(3)).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. `x` `[B, H, n, d]`, `cos`/`sin` `[B, n, d]` (already scaled, e.g. by YaRN)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class MultiHeadLinear(nn.Module):
    """One bias-free linear map per head: `[B, h, n, in] -> [B, H, n, out]`.

    If the input has fewer heads than `num_heads` (GQA), it is repeated over the group first.
    """

    def __init__(self, in_features: int, out_features: int, num_heads: int):
        super().__init__()
        self.in_features, self.out_features, self.num_heads = in_features, out_features, num_heads
        self.weight = nn.Parameter(torch.empty(num_heads, in_features, out_features))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.num_heads:
            x = x.repeat_interleave(self.num_heads // x.shape[1], dim=1)
        return torch.einsum("bhni,hio->bhno", x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, in={self.in_features}, out={self.out_features}"


class AttnGate(nn.Module):
    """Block-level attention predictor for one attention layer.

    Args:
        num_heads (int): query heads `Hq`.
        num_kv_heads (int): key/value heads `Hkv` (divides `Hq`).
        head_dim (int): `D`.
        gate_type (str): pooling recipe, e.g. `"Qavg_Kmaxminavg"` (see :func:`valid_gate_types`).
            Default: `"Qavg_Kmaxminavg"`.
        hidden_size (int, Optional): gate width `Dg`. Default: `head_dim`.
        block_size (int): tokens per block. Default: `64`.

    The gate computes in fp32 whatever the dtype of its inputs and weights (it is tiny, and its
    scores decide which blocks survive).
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        gate_type: str = "Qavg_Kmaxminavg",
        hidden_size: int | None = None,
        block_size: int = 64,
    ):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.q_pools, self.k_pools = parse_gate_type(gate_type)
        self.gate_type = gate_type
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.hidden_size = hidden_size or head_dim
        if self.hidden_size % 2:
            raise ValueError(f"gate hidden size must be even for RoPE, got {self.hidden_size}")
        self.block_size = block_size
        q_in, k_in = head_dim * len(self.q_pools), head_dim * len(self.k_pools)
        if len(self.q_pools) > 1 or self.hidden_size != head_dim:
            self.mask_linear_q = MultiHeadLinear(q_in, self.hidden_size, num_heads)
            self.mask_linear_k = MultiHeadLinear(k_in, self.hidden_size, num_kv_heads)
        else:
            self.mask_linear_q = None
            self.mask_linear_k = MultiHeadLinear(k_in, self.hidden_size, num_heads)

    def pool(self, x: torch.Tensor, kinds: tuple[str, ...]) -> torch.Tensor:
        return torch.cat([pool_blocks(x, self.block_size, kind) for kind in kinds], dim=-1)

    def pool_inputs(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool pre-RoPE `q` `[B, Hq, S, D]` and `k` `[B, Hkv, S, D]` into fp32 block summaries.

        Returns `[B, Hq, nb, D * len(q_pools)]` and `[B, Hkv, nb, D * len(k_pools)]`: everything the
        gate needs from the sequence (a training loop can keep these instead of q and k).
        """
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"gate expects [B, H, S, D] q and k; got {tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"gate built for Hq={self.num_heads}, Hkv={self.num_kv_heads}, D={self.head_dim}; "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        return self.pool(q, self.q_pools), self.pool(k, self.k_pools)

    def score(
        self, qb: torch.Tensor, kb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, output: str | None = None
    ) -> torch.Tensor:
        """Scores from pooled summaries (see :meth:`forward` for `cos`, `sin`, `output` and the result)."""
        output = output or ("probs" if self.training else "logits")
        if output not in ("probs", "logits"):
            raise ValueError(f"output must be 'probs' or 'logits', got {output!r}")
        nb = qb.shape[2]
        if cos.shape[-2] != nb or cos.shape[-1] != self.hidden_size:
            raise ValueError(f"RoPE tables must be [B, {nb}, {self.hidden_size}], got {tuple(cos.shape)}")
        if self.mask_linear_q is not None:
            qb = self.mask_linear_q(qb)
        kb = self.mask_linear_k(kb)
        qb = apply_rope(qb, cos.float(), sin.float())
        kb = apply_rope(kb, cos.float(), sin.float())
        if kb.shape[1] != self.num_heads:
            kb = kb.repeat_interleave(self.num_heads // kb.shape[1], dim=1)
        logits = torch.matmul(qb, kb.transpose(-1, -2)) / math.sqrt(self.hidden_size)
        logits = logits.masked_fill(~causal_block_mask(nb, nb, qb.device), float("-inf"))
        return torch.softmax(logits, dim=-1) if output == "probs" else logits

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        output: str | None = None,
    ) -> torch.Tensor:
        """Score every causal (query block, key block) pair.

        Args:
            q (torch.Tensor): pre-RoPE queries `[B, Hq, S, D]`.
            k (torch.Tensor): pre-RoPE keys `[B, Hkv, S, D]`.
            cos, sin (torch.Tensor): RoPE tables of width `Dg` at each block's first-token position,
                `[B, nb, Dg]`, `nb = ceil(S / block_size)`.
            output (str, Optional): `"probs"`: block-causal softmax of `q.k / sqrt(Dg)`;
                `"logits"`: those scaled logits with `-inf` above the diagonal.
                Default: `"probs"` in training mode, `"logits"` in eval mode.

        Returns:
            `[B, Hq, nb, nb]` fp32.
        """
        return self.score(*self.pool_inputs(q, k), cos, sin, output)


def pooled_block_scores(
    q_pre: torch.Tensor, k_pre: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_size: int = 64
) -> torch.Tensor:
    """The gate's scoring with no learned weights: the training-free `pooled` selector.

    Average-pool pre-RoPE queries and keys over non-overlapping blocks (:func:`pool_blocks`),
    rotate both with RoPE at each block's first-token position (:func:`apply_rope`, the gate's own
    tables), and score every causal pair by the scaled dot product:

        logits[b, h, i, j] = rope(avg q[b, h, block i], i) . rope(avg k[b, h // g, block j], j) / sqrt(D)

    with `g = Hq // Hkv`, and `-inf` above the diagonal (`j > i`). An `AttnGate` whose query side
    is the avg-pooled Q unchanged (`Qavg_*`, width `D`) and whose K projection passes the avg-pooled
    K through unchanged computes exactly these logits (its scale is `1 / sqrt(hidden_size)` and
    `hidden_size == D`): a gate initialised that way starts from this selector.

    Args:
        q_pre (torch.Tensor): pre-RoPE queries `[B, Hq, S, D]`.
        k_pre (torch.Tensor): pre-RoPE keys `[B, Hkv, S, D]`, `Hkv` divides `Hq`.
        cos, sin (torch.Tensor): RoPE tables of width `D` at each block's first-token position,
            `[B, nb, D]`, `nb = ceil(S / block_size)` (what `seer_attention` passes to the gate).
        block_size (int): tokens per block. Default: `64`.

    Returns:
        logits `[B, Hq, nb, nb]` fp32, `-inf` above the diagonal.
    """
    if q_pre.dim() != 4 or k_pre.dim() != 4 or q_pre.shape[-1] != k_pre.shape[-1]:
        raise ValueError(f"pooled scores need [B, H, S, D] q and k; got {tuple(q_pre.shape)} and {tuple(k_pre.shape)}")
    if q_pre.shape[1] % k_pre.shape[1] != 0:
        raise ValueError(f"query heads ({q_pre.shape[1]}) must be a multiple of key heads ({k_pre.shape[1]})")
    D = q_pre.shape[-1]
    qb, kb = pool_blocks(q_pre, block_size, "avg"), pool_blocks(k_pre, block_size, "avg")
    nb = qb.shape[2]
    if tuple(cos.shape[-2:]) != (nb, D) or cos.shape != sin.shape:
        raise ValueError(
            f"pooled scores need RoPE tables [B, {nb}, {D}] (width head_dim: a gate hidden size other than "
            f"head_dim gives tables of another width); got cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    qb = apply_rope(qb, cos.float(), sin.float())
    kb = apply_rope(kb, cos.float(), sin.float())
    if kb.shape[1] != qb.shape[1]:
        kb = kb.repeat_interleave(qb.shape[1] // kb.shape[1], dim=1)
    logits = torch.matmul(qb, kb.transpose(-1, -2)) / math.sqrt(D)
    return logits.masked_fill(~causal_block_mask(nb, nb, qb.device), float("-inf"))
