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

Summaries (`q_summaries`, `k_summaries`, default 1): a block's true attention mass is the *average
over its 64 queries* of each query's softmax mass on the key block, which one averaged query cannot
express (an average of softmaxes is not the softmax of an average). With `n_q` query summaries the
gate pools Q over `n_q` sub-blocks of `block_size / n_q` tokens, lets each summary attend over all
causal key summaries, and averages the resulting block probabilities: a mixture of `n_q` softmaxes,
the same form as the target. `n_k` key summaries per block split K likewise; a block's probability
sums those of its key summaries (log-sum-exp of their logits). Each summary is rotated at its own
first-token position. With one summary on each side this is exactly the original gate.

Nothing here imports transformers: RoPE tables come in as arguments.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from seer_attn.kernels.block_mask import causal_block_mask

__all__ = ["AttnGate", "MultiHeadLinear", "parse_gate_type", "valid_gate_types", "pool_blocks", "apply_rope", "pooled_block_scores"]

POOL_TYPES = ("max", "min", "avg")
SUMMARY_COUNTS = (1, 2, 4, 8)
# masked logits inside the gate: finite, so that log-sum-exp over fully masked groups keeps finite gradients
_MASKED = -1e9


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
        q_summaries (int): query summaries per block (sub-blocks of `block_size / q_summaries`
            tokens, scores averaged as a mixture of softmaxes). Default: `1`.
        k_summaries (int): key summaries per block (block probability = sum over them). Default: `1`.

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
        q_summaries: int = 1,
        k_summaries: int = 1,
    ):
        super().__init__()
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        for name, n in (("q_summaries", q_summaries), ("k_summaries", k_summaries)):
            if n not in SUMMARY_COUNTS or block_size % n:
                raise ValueError(f"{name} must be one of {SUMMARY_COUNTS} and divide block_size={block_size}, got {n}")
        self.q_summaries, self.k_summaries = q_summaries, k_summaries
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

    @property
    def rope_stride(self) -> int:
        """Token distance between the RoPE table's positions: the finest summary's sub-block size."""
        return self.block_size // max(self.q_summaries, self.k_summaries)

    def pool(self, x: torch.Tensor, kinds: tuple[str, ...], summaries: int = 1) -> torch.Tensor:
        return torch.cat([pool_blocks(x, self.block_size // summaries, kind) for kind in kinds], dim=-1)

    @torch.no_grad()
    def init_from_pooled(self) -> None:
        """Make the gate compute the training-free `pooled` scores: avg-pooled Q . avg-pooled K.

        The projections become selectors of the `avg` part of each summary (identity there, zero on
        max/min), so training starts from the pooled-attention ranking instead of from noise. Needs
        `avg` among both pools and a gate width equal to `head_dim`.
        """
        if "avg" not in self.q_pools or "avg" not in self.k_pools or self.hidden_size != self.head_dim:
            raise ValueError(
                f"init_from_pooled needs 'avg' in both pools and hidden_size == head_dim; gate {self.gate_type!r} "
                f"has hidden_size {self.hidden_size}, head_dim {self.head_dim} (use seerattn_gate_init='random' for it)"
            )
        eye = torch.eye(self.head_dim)
        for lin, pools in ((self.mask_linear_q, self.q_pools), (self.mask_linear_k, self.k_pools)):
            if lin is None:
                continue
            w = torch.zeros_like(lin.weight)
            a = pools.index("avg") * self.head_dim
            w[:, a : a + self.head_dim, :] = eye.to(w)
            lin.weight.copy_(w)

    def pool_inputs(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool pre-RoPE `q` `[B, Hq, S, D]` and `k` `[B, Hkv, S, D]` into fp32 block summaries.

        Returns `[B, Hq, nq, D * len(q_pools)]` and `[B, Hkv, nk, D * len(k_pools)]`, with
        `nq = ceil(S / (block_size / q_summaries))` (`nb` for one summary) and `nk` likewise: everything
        the gate needs from the sequence (a training loop can keep these instead of q and k).
        """
        if q.dim() != 4 or k.dim() != 4:
            raise ValueError(f"gate expects [B, H, S, D] q and k; got {tuple(q.shape)} and {tuple(k.shape)}")
        if q.shape[1] != self.num_heads or k.shape[1] != self.num_kv_heads or q.shape[-1] != self.head_dim:
            raise ValueError(
                f"gate built for Hq={self.num_heads}, Hkv={self.num_kv_heads}, D={self.head_dim}; "
                f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
            )
        return self.pool(q, self.q_pools, self.q_summaries), self.pool(k, self.k_pools, self.k_summaries)

    def score(
        self, qb: torch.Tensor, kb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, output: str | None = None,
        real: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Scores from pooled summaries (see :meth:`forward` for `cos`, `sin`, `output` and the result).

        `real`: per batch element, how many of the query and key summaries are real (int tensors `[B]`),
        for batches of packed sequences of different lengths padded to one summary grid; by default
        every summary is (one sequence)."""
        output = output or ("probs" if self.training else "logits")
        if output not in ("probs", "logits"):
            raise ValueError(f"output must be 'probs' or 'logits', got {output!r}")
        nq, nk = qb.shape[2], kb.shape[2]
        nb = math.ceil(nq / self.q_summaries)
        rq = self.block_size // self.q_summaries // self.rope_stride  # table entries per query summary
        rk = self.block_size // self.k_summaries // self.rope_stride
        n_rope = (nq - 1) * rq + 1
        if cos.shape[-2] < n_rope or cos.shape[-1] != self.hidden_size:
            raise ValueError(
                f"RoPE tables must be [B, >= {n_rope}, {self.hidden_size}] (one entry per {self.rope_stride} tokens), "
                f"got {tuple(cos.shape)}"
            )
        if self.mask_linear_q is not None:
            qb = self.mask_linear_q(qb)
        kb = self.mask_linear_k(kb)
        # each summary is rotated at its own first token: every r-th entry of the table
        cos, sin = cos.float(), sin.float()
        qb = apply_rope(qb, cos[:, ::rq][:, :nq], sin[:, ::rq][:, :nq])
        kb = apply_rope(kb, cos[:, ::rk][:, :nk], sin[:, ::rk][:, :nk])
        if kb.shape[1] != self.num_heads:
            kb = kb.repeat_interleave(self.num_heads // kb.shape[1], dim=1)
        logits = torch.matmul(qb, kb.transpose(-1, -2)) / math.sqrt(self.hidden_size)
        causal = causal_block_mask(nb, nb, qb.device)
        if self.q_summaries == 1 and self.k_summaries == 1:
            logits = logits.masked_fill(~causal, float("-inf"))
            return torch.softmax(logits, dim=-1) if output == "probs" else logits
        return self._mixture(logits, nb, causal, output, real)

    def _mixture(self, logits: torch.Tensor, nb: int, causal: torch.Tensor, output: str, real=None) -> torch.Tensor:
        """`[B, H, nq, nk]` summary logits -> `[B, H, nb, nb]` block log-probabilities (or probabilities).

        Each query summary's softmax runs over the key summaries of the causal blocks of its block's
        row; a key block's probability sums its summaries'; a query block averages its real summaries.
        `real` (see :meth:`score`): per batch element, the real query and key summary counts.
        """
        B, H, nq, nk = logits.shape
        n_q, n_k = self.q_summaries, self.k_summaries
        dev = logits.device
        # pad to whole blocks: summaries past the sequence end are masked out as keys and as queries
        logits = F.pad(logits, (0, nb * n_k - nk, 0, nb * n_q - nq), value=_MASKED)
        q_block = torch.arange(nb * n_q, device=dev) // n_q
        k_block = torch.arange(nb * n_k, device=dev) // n_k
        if real is None:
            visible = causal[q_block][:, k_block] & (torch.arange(nb * n_k, device=dev) < nk)
            q_real = (torch.arange(nb * n_q, device=dev) < nq).view(nb, n_q)
        else:  # [B, 1, nb * n_q, nb * n_k] and [B, 1, nb, n_q, 1]: each sequence's own summaries
            nq_b, nk_b = real
            k_ok = torch.arange(nb * n_k, device=dev)[None] < nk_b.to(dev)[:, None]
            visible = (causal[q_block][:, k_block][None] & k_ok[:, None, :])[:, None]
            q_real = (torch.arange(nb * n_q, device=dev)[None] < nq_b.to(dev)[:, None]).view(B, 1, nb, n_q, 1)
        logp = torch.log_softmax(logits.masked_fill(~visible, _MASKED), dim=-1)
        logp = logp.view(B, H, nb * n_q, nb, n_k).logsumexp(-1)  # [B, H, nb * n_q, nb]
        if real is None:
            logp = logp.view(B, H, nb, n_q, nb).masked_fill(~q_real[:, :, None], _MASKED).logsumexp(3)
            logp = logp - q_real.sum(1).float().log()[:, None]  # mean over the block's real summaries
        else:
            logp = logp.view(B, H, nb, n_q, nb).masked_fill(~q_real, _MASKED).logsumexp(3)
            # rows past a sequence's end have no real summary: any finite value (they are never used)
            logp = logp - q_real.sum(3).clamp_min(1).float().log()
        logp = logp.masked_fill(~causal, float("-inf"))
        return logp.exp() if output == "probs" else logp

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
            cos, sin (torch.Tensor): RoPE tables of width `Dg` at every `rope_stride`-th position
                (`rope_stride == block_size` with one summary per side: each block's first token),
                `[B, ceil(S / rope_stride), Dg]`.
            output (str, Optional): `"probs"`: block-causal softmax of `q.k / sqrt(Dg)` (with several
                summaries, the mixture described in the module docstring); `"logits"`: scores whose
                row-softmax gives those probabilities (the scaled logits, or with several summaries the
                log-probabilities), `-inf` above the diagonal.
                Default: `"probs"` in training mode, `"logits"` in eval mode.

        Returns:
            `[B, Hq, nb, nb]` fp32.
        """
        from seer_attn.modules import fused_gate

        if fused_gate.use_fused(self, q):
            # CUDA and no autograd: the same result from the fused kernels (this method is their twin)
            return fused_gate.gate_logits(self, q, k, cos, sin, output or ("probs" if self.training else "logits"))
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
