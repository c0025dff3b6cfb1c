"""DecodeGate: for each decoding token, ranks the completed key blocks of the KV cache.

Prefill gates score (query block, key block) pairs. While decoding there is one new query at a time,
so this gate keeps the sequence-compressed keys and scores them against the *current token's*
query (method-spec §1.4, "SeerAttention-R"):

- keys: pre-RoPE K pooled per block (any of max / min / avg, concatenated in that order), a per-KV-head
  linear map to the gate width `Dg`, an optional RMSNorm, then RoPE at the block's first-token
  position (exactly as the prefill gate rotates its blocks);
- query: the pre-RoPE queries of the `G = Hq / Hkv` heads that share a KV head, merged into one gate
  query per KV head, either by a learned head-mixing projection (`"proj"`, upstream's default: the
  `G` head vectors are concatenated and mapped `G * D -> Dg`) or by their mean (`"avg"`, needs
  `Dg == D`); or kept apart (`"heads"`: one learned `D -> Dg` map per query head); the same optional
  RMSNorm, then RoPE at the token's own position;
- scores: one value per (KV head, completed key block), so a GQA group shares one set of blocks:
  the logit `q . k / sqrt(Dg)` of the group's query, or with `"heads"` the log-probability of the
  *mixture* of the `G` heads' softmaxes, `log(mean_h softmax_h(q_h . k / sqrt(Dg)))`, which has the
  form of the target itself (the group's attention mass per block, summed over its heads).

Only *completed* blocks are scored: a token's own block (the partial block being filled while
decoding) has no compressed key yet and is always attended by the sparse kernels, so block `j` is a
candidate for the token at sequence index `t` iff `j < t // block_size`.

Training scores every token of a sequence against the compressed blocks of that same sequence
(:meth:`DecodeGate.forward`). Decoding grows a :class:`CompressedKeyCache` one token at a time: a
block is compressed (and rotated at its start position) the moment its last token arrives, which
gives exactly what compressing the whole prefix at once gives.

Nothing here imports transformers: RoPE tables come in as arguments (or as a callable).
"""

from __future__ import annotations

import itertools
import math
from typing import Callable

import torch
import torch.nn as nn

from seer_attn.modules.attn_gate import POOL_TYPES, MultiHeadLinear, apply_rope, pool_blocks

__all__ = [
    "DecodeGate",
    "CompressedKeyCache",
    "StaticCompressedKeyCache",
    "static_state_update",
    "valid_decode_gate_types",
    "parse_decode_gate_type",
    "Q_POOLINGS",
]

Q_POOLINGS = ("proj", "avg", "heads")

# positions [B, n] -> (cos, sin) [B, n, Dg]
RopeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def valid_decode_gate_types() -> list[str]:
    """All decode gate names: `K<pools>` with pools a non-empty ordered subset of max, min, avg."""
    return ["K" + "".join(c) for r in range(1, len(POOL_TYPES) + 1) for c in itertools.combinations(POOL_TYPES, r)]


def parse_decode_gate_type(name: str) -> tuple[str, ...]:
    """`"Kmaxminavg"` -> `("max", "min", "avg")`; unknown names raise ValueError."""
    if name not in valid_decode_gate_types():
        raise ValueError(f"unknown decode gate type {name!r}; valid types are: {', '.join(valid_decode_gate_types())}")
    return tuple(p for p in POOL_TYPES if p in name[1:])


class DecodeGate(nn.Module):
    """Per-token block scorer for one attention layer (decode-stage sparsity).

    Args:
        num_heads (int): query heads `Hq`.
        num_kv_heads (int): key/value heads `Hkv` (divides `Hq`).
        head_dim (int): `D`.
        gate_type (str): key pooling recipe, e.g. `"Kmaxminavg"` (see :func:`valid_decode_gate_types`).
            Default: `"Kmaxminavg"`.
        hidden_size (int, Optional): gate width `Dg` (even, for RoPE). Default: `head_dim`.
        block_size (int): tokens per key block. Default: `64`.
        q_pooling (str): how the `G` query heads of a group are scored: `"proj"` (one gate query from a
            learned `G * D -> Dg` map per KV head), `"avg"` (their mean; needs `Dg == D`) or `"heads"`
            (a learned `D -> Dg` map per query head, scores combined as a mixture of softmaxes).
            Default: `"proj"`.
        use_norm (bool): RMSNorm (learned per-channel scale) on gate queries and keys. Default: `True`.
        k_summaries (int): compressed keys per block, each pooling `block_size / k_summaries` tokens and
            rotated at its first token; a block's score is the log-sum-exp of its summaries' (its
            probability the sum of theirs, as the target sums its tokens' attention). Default: `1`.

    Computes in fp32 whatever the dtype of its inputs and weights.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        gate_type: str = "Kmaxminavg",
        hidden_size: int | None = None,
        block_size: int = 64,
        q_pooling: str = "proj",
        use_norm: bool = True,
        k_summaries: int = 1,
    ):
        super().__init__()
        if k_summaries not in (1, 2, 4, 8) or block_size % k_summaries or block_size // k_summaries < 2:
            raise ValueError(f"k_summaries must be 1, 2, 4 or 8 and leave >= 2 tokens per summary, got {k_summaries}")
        self.k_summaries = k_summaries
        self.key_stride = block_size // k_summaries  # tokens per compressed key
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if q_pooling not in Q_POOLINGS:
            raise ValueError(f"q_pooling must be one of {Q_POOLINGS}, got {q_pooling!r}")
        self.k_pools = parse_decode_gate_type(gate_type)
        self.gate_type, self.q_pooling, self.block_size = gate_type, q_pooling, block_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.hidden_size = hidden_size or head_dim
        if self.hidden_size % 2:
            raise ValueError(f"gate hidden size must be even for RoPE, got {self.hidden_size}")
        if q_pooling == "avg" and self.hidden_size != head_dim:
            raise ValueError(f"q_pooling='avg' needs hidden_size == head_dim ({head_dim}), got {self.hidden_size}")
        self.k_linear = MultiHeadLinear(head_dim * len(self.k_pools), self.hidden_size, num_kv_heads)
        if q_pooling == "proj":
            self.q_linear = MultiHeadLinear(self.group * head_dim, self.hidden_size, num_kv_heads)
        elif q_pooling == "heads":
            self.q_linear = MultiHeadLinear(head_dim, self.hidden_size, num_heads)
        else:
            self.q_linear = None
        self.q_norm = nn.RMSNorm(self.hidden_size, eps=1e-6) if use_norm else None
        self.k_norm = nn.RMSNorm(self.hidden_size, eps=1e-6) if use_norm else None

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Linear maps N(0, std), norm scales 1."""
        for lin in (self.k_linear, self.q_linear):
            if lin is not None:
                lin.reset_parameters(std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    @torch.no_grad()
    def init_from_pooled(self) -> None:
        """Start from the training-free scores: the query (or, with `"proj"`, the mean of the group's
        queries) against the avg-pooled keys; needs `avg` among the key pools and `Dg == D`."""
        if "avg" not in self.k_pools or self.hidden_size != self.head_dim:
            raise ValueError(
                f"init_from_pooled needs 'avg' in the key pools and hidden_size == head_dim; decode gate "
                f"{self.gate_type!r} has hidden_size {self.hidden_size}, head_dim {self.head_dim} (use seerattn_decode_gate_init='random' for it)"
            )
        D = self.head_dim
        eye = torch.eye(D)
        w = torch.zeros_like(self.k_linear.weight)
        a = self.k_pools.index("avg") * D
        w[:, a : a + D, :] = eye.to(w)
        self.k_linear.weight.copy_(w)
        if self.q_pooling == "heads":
            self.q_linear.weight.copy_(eye.to(self.q_linear.weight).expand_as(self.q_linear.weight))
        elif self.q_pooling == "proj":
            self.q_linear.weight.copy_((eye / self.group).repeat(self.group, 1).to(self.q_linear.weight).expand_as(self.q_linear.weight))
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()

    def _norm(self, norm: nn.RMSNorm | None, x: torch.Tensor) -> torch.Tensor:
        if norm is None:
            return x
        # fp32 whatever the dtype the model cast the gate to
        return nn.functional.rms_norm(x, (x.shape[-1],), norm.weight.float(), norm.eps)

    def compress_keys(
        self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Compressed, rotated keys of complete blocks (`k_summaries` per block, in token order).

        Args:
            k (torch.Tensor): pre-RoPE keys `[B, Hkv, nb * block_size, D]` (whole blocks only).
            cos, sin (torch.Tensor): RoPE tables `[B, nb * k_summaries, Dg]` at each summary's
                first-token position (every `key_stride`-th token).
            valid (torch.Tensor, Optional): bool `[B, nb * block_size]`: pool only these tokens (a
                partial block being filled, in place in a preallocated buffer); a summary without any
                valid token pools to 0. All valid gives exactly the result without it.

        Returns:
            `[B, Hkv, nb * k_summaries, Dg]` fp32.
        """
        if k.dim() != 4 or k.shape[1] != self.num_kv_heads or k.shape[-1] != self.head_dim:
            raise ValueError(f"decode gate built for Hkv={self.num_kv_heads}, D={self.head_dim}; got k {tuple(k.shape)}")
        if k.shape[2] % self.block_size:
            raise ValueError(f"compress_keys takes whole blocks of {self.block_size} tokens, got {k.shape[2]} tokens")
        if valid is None:
            kb = torch.cat([pool_blocks(k, self.key_stride, kind) for kind in self.k_pools], dim=-1)
        else:
            kb = self._masked_pools(k, valid)
        kb = self._norm(self.k_norm, self.k_linear(kb))
        if cos.shape[-2] != kb.shape[2] or cos.shape[-1] != self.hidden_size:
            raise ValueError(f"key RoPE tables must be [B, {kb.shape[2]}, {self.hidden_size}], got {tuple(cos.shape)}")
        return apply_rope(kb, cos.float(), sin.float())

    def _masked_pools(self, k: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # pool_blocks over the valid tokens only, with the same reductions (so all-valid is bitwise equal)
        B, H, S, D = k.shape
        m = valid[:, None, :, None]
        count = valid.reshape(B, S // self.key_stride, self.key_stride).sum(-1)  # [B, summaries]
        empty = (count == 0)[:, None, :, None]
        pools = []
        for kind in self.k_pools:
            if kind == "avg":
                s = k.masked_fill(~m, 0).reshape(B, H, -1, self.key_stride, D).sum(3, dtype=torch.float32)
                pooled = s / count.clamp_min(1)[:, None, :, None].float()
            else:
                fill = float("-inf") if kind == "max" else float("inf")
                x = k.masked_fill(~m, fill).reshape(B, H, -1, self.key_stride, D)
                pooled = (x.amax(3) if kind == "max" else x.amin(3)).float()
            pools.append(pooled.masked_fill(empty, 0.0))
        return torch.cat(pools, dim=-1)

    def queries(self, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One gate query per (KV head, token), or per (query head, token) with `"heads"`.

        Args:
            q (torch.Tensor): pre-RoPE queries `[B, Hq, n, D]`.
            cos, sin (torch.Tensor): RoPE tables `[B, n, Dg]` at each token's own position.

        Returns:
            `[B, Hkv, n, Dg]` fp32 (`[B, Hkv, G, n, Dg]` with `"heads"`).
        """
        if q.dim() != 4 or q.shape[1] != self.num_heads or q.shape[-1] != self.head_dim:
            raise ValueError(f"decode gate built for Hq={self.num_heads}, D={self.head_dim}; got q {tuple(q.shape)}")
        B, _, n, D = q.shape
        if cos.shape[-2] != n or cos.shape[-1] != self.hidden_size:
            raise ValueError(f"query RoPE tables must be [B, {n}, {self.hidden_size}], got {tuple(cos.shape)}")
        if self.q_pooling == "heads":
            x = apply_rope(self._norm(self.q_norm, self.q_linear(q.float())), cos.float(), sin.float())
            return x.view(B, self.num_kv_heads, self.group, n, self.hidden_size)
        grouped = q.float().view(B, self.num_kv_heads, self.group, n, D)
        if self.q_linear is not None:
            # [B, Hkv, n, G * D]: the group's head vectors side by side
            x = self.q_linear(grouped.permute(0, 1, 3, 2, 4).reshape(B, self.num_kv_heads, n, self.group * D))
        else:
            x = grouped.mean(2)
        x = self._norm(self.q_norm, x)
        return apply_rope(x, cos.float(), sin.float())

    def score(self, qg: torch.Tensor, kc: torch.Tensor, rows: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Scaled logits of gate queries against compressed keys, `-inf` where a block is no candidate.

        With `"heads"` queries (`[B, Hkv, G, n, Dg]`), the block log-probabilities of the mixture of
        the `G` heads' softmaxes instead (same shape, same `-inf`, rows already normalised).

        Args:
            qg (torch.Tensor): `[B, Hkv, n, Dg]` (or `[B, Hkv, G, n, Dg]`) from :meth:`queries`.
            kc (torch.Tensor): `[B, Hkv, nc * k_summaries, Dg]` from :meth:`compress_keys` (blocks `0 .. nc-1`).
            rows (torch.Tensor): int `[n]`, sequence index of each query token; block `j` is a
                candidate for row `t` iff `j < t // block_size`.
            width (int, Optional): output width (>= nc; extra columns are `-inf`). Default: `nc`.

        Returns:
            `[B, Hkv, n, width]` fp32.
        """
        mixture = qg.dim() == 5
        kt = kc.transpose(-1, -2)
        logits = torch.matmul(qg, kt[:, :, None] if mixture else kt) / math.sqrt(self.hidden_size)
        if kc.shape[2] % self.k_summaries:
            raise ValueError(f"compressed keys {kc.shape[2]} are not whole blocks of {self.k_summaries} summaries")
        if self.k_summaries > 1:
            # a block's score: the log-sum-exp of its summaries' logits (its softmax mass is their sum)
            logits = logits.unflatten(-1, (-1, self.k_summaries)).logsumexp(-1)
        nc = logits.shape[-1]
        width = nc if width is None else width
        if width > nc:
            logits = nn.functional.pad(logits, (0, width - nc), value=float("-inf"))
        cols = torch.arange(width, device=logits.device)
        candidate = cols[None, :] < (rows.to(logits.device)[:, None] // self.block_size)
        if not mixture:
            return logits.masked_fill(~candidate, float("-inf"))
        # finite stand-ins for the non-candidates until the end, so that rows with no candidate and
        # the backward of logsumexp never see -inf - -inf
        logp = torch.log_softmax(logits.masked_fill(~candidate, -1e30), dim=-1)
        mix = torch.logsumexp(logp, dim=2) - math.log(self.group)
        return mix.masked_fill(~candidate, float("-inf"))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_cos: torch.Tensor,
        q_sin: torch.Tensor,
        k_cos: torch.Tensor,
        k_sin: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Training form: score tokens of a sequence against all of its completed blocks.

        Args:
            q (torch.Tensor): pre-RoPE queries of the scored tokens `[B, Hq, n, D]` (e.g. the second
                half of the sequence).
            k (torch.Tensor): pre-RoPE keys of the whole sequence `[B, Hkv, S, D]`.
            q_cos, q_sin (torch.Tensor): `[B, n, Dg]` at the scored tokens' positions.
            k_cos, k_sin (torch.Tensor): `[B, (S // block_size) * k_summaries, Dg]` at the compressed
                keys' first tokens (every `key_stride`-th token of the complete blocks).
            rows (torch.Tensor): int `[n]`, sequence index of each scored token.

        Returns:
            logits `[B, Hkv, n, ceil(S / block_size)]` fp32, `-inf` for blocks that are not candidates
            (the token's own block and later ones).
        """
        S = k.shape[2]
        full = (S // self.block_size) * self.block_size
        kc = self.compress_keys(k[:, :, :full], k_cos, k_sin)
        return self.score(self.queries(q, q_cos, q_sin), kc, rows, width=math.ceil(S / self.block_size))


class CompressedKeyCache:
    """One layer's decode-gate state while generating: compressed keys of the completed blocks.

    Holds `keys` `[B, Hkv, nc * k_summaries, Dg]` (fp32, compressed and rotated at each summary's first position)
    and the pre-RoPE keys of the partial block being filled (`pending`, fewer than `block_size`
    tokens) with their positions. A block is compressed when its last token arrives, by
    :meth:`DecodeGate.compress_keys` on exactly the tokens and start position prefill would use, so
    the cache equals compressing the whole prefix at once. A one-token step is one small copy into a
    preallocated block buffer (plus the compression, once per block).
    """

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self._buf: torch.Tensor | None = None  # [B, Hkv, block_size, D] pre-RoPE keys of the partial block
        self._pos: torch.Tensor | None = None  # [B, block_size] their positions
        self._fill = 0
        self._per_block = 1  # compressed keys per block (the gate's k_summaries)
        self.num_tokens = 0

    @property
    def num_blocks(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2] // self._per_block

    @property
    def pending(self) -> torch.Tensor | None:
        """Pre-RoPE keys of the partial block, `[B, Hkv, p, D]` (`p < block_size`)."""
        return None if self._buf is None else self._buf[:, :, : self._fill]

    @torch.no_grad()
    def append(self, gate: DecodeGate, k: torch.Tensor, positions: torch.Tensor, rope: RopeFn) -> None:
        """Add new tokens' keys; compress every block they complete.

        Args:
            gate (DecodeGate): the layer's decode gate.
            k (torch.Tensor): pre-RoPE keys of the new tokens `[B, Hkv, n, D]`.
            positions (torch.Tensor): int `[B or 1, n]` position ids of the new tokens.
            rope: `positions [B, m] -> (cos, sin) [B, m, Dg]`, the gate's RoPE tables.
        """
        B, H, n, D = k.shape
        bs = gate.block_size
        self._per_block = gate.k_summaries
        if self._buf is None:
            self._buf = k.new_empty(B, H, bs, D)
            self._pos = torch.empty(B, bs, dtype=torch.long, device=k.device)
        elif self._buf.shape[0] != B:
            raise ValueError(f"decode gate cache holds batch {self._buf.shape[0]}, got keys for batch {B}")
        positions = positions.to(k.device).expand(B, n)
        if self._fill + n < bs:
            self._buf[:, :, self._fill : self._fill + n] = k
            self._pos[:, self._fill : self._fill + n] = positions
            self._fill += n
        else:
            # the partial block, then the new tokens: compress every whole block among them
            buf = torch.cat([self._buf[:, :, : self._fill], k.to(self._buf.dtype)], dim=2)
            pos = torch.cat([self._pos[:, : self._fill], positions], dim=1)
            full = (buf.shape[2] // bs) * bs
            new = gate.compress_keys(buf[:, :, :full], *rope(pos[:, 0 : full : gate.key_stride]))
            self.keys = new if self.keys is None else torch.cat([self.keys, new], dim=2)
            self._fill = buf.shape[2] - full
            self._buf[:, :, : self._fill] = buf[:, :, full:]
            self._pos[:, : self._fill] = pos[:, full:]
        self.num_tokens += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select / reorder batch rows (beam search), as the KV cache does."""
        for name in ("keys", "_buf", "_pos"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))


class StaticCompressedKeyCache:
    """The decode-gate state for a preallocated KV cache (`StaticCache`), safe to replay as a CUDA graph.

    :class:`CompressedKeyCache` grows its tensors and counts tokens on the host; a captured decoding
    step can do neither (a replay runs no Python). Here every tensor is allocated once for the cache's
    capacity and a one-token step (:meth:`step`) is a fixed sequence of kernels steered by the token's
    position on the device:

    - `keys` `[B, Hkv, ceil(capacity / block_size) * k_summaries, Dg]` fp32: slot `j` holds block `j`'s
      compressed keys once the block is complete (the selection only ever reads complete blocks);
    - `block` `[B, Hkv, block_size, D]`: the pre-RoPE keys of the block being filled, at their offsets.

    Every step writes its key into `block` and recompresses the partial block into its slot, masked to
    the tokens it has; the step that completes a block therefore leaves exactly what compressing the
    whole block gives (one block of pooling and one small matmul per layer and step, instead of work
    once per block behind a host-side branch). Positions must be the cache slots (an unpadded batch
    filled from slot 0), which is how a `StaticCache` fills.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.block: torch.Tensor | None = None

    def _allocate(self, gate: DecodeGate, k: torch.Tensor) -> None:
        B, H, _, D = k.shape
        slots = math.ceil(self.capacity / gate.block_size) * gate.k_summaries
        self.keys = torch.zeros(B, H, slots, gate.hidden_size, dtype=torch.float32, device=k.device)
        self.block = k.new_zeros(B, H, gate.block_size, D)

    @torch.no_grad()
    def append(self, gate: DecodeGate, k: torch.Tensor, positions: torch.Tensor, rope: RopeFn) -> None:
        """Add `n` new tokens' keys (prefill, or a multi-token step; one host sync for the start).

        Args:
            gate (DecodeGate): the layer's decode gate.
            k (torch.Tensor): pre-RoPE keys `[B, Hkv, n, D]`.
            positions (torch.Tensor): int `[B or 1, n]`, consecutive, equal over the batch (the slots).
            rope: `positions [B, m] -> (cos, sin) [B, m, Dg]`.
        """
        B, H, n, D = k.shape
        if self.keys is None:
            self._allocate(gate, k)
        if n == 1:
            self.step(gate, k, positions.reshape(-1)[-1:].expand(B), rope)
            return
        bs, ks = gate.block_size, gate.k_summaries
        p0 = int(positions.reshape(-1)[0])
        if p0 + n > self.capacity:
            raise ValueError(f"tokens up to position {p0 + n - 1} do not fit a cache of {self.capacity} slots")
        b0 = p0 // bs
        seq = torch.cat([self.block[:, :, : p0 - b0 * bs], k.to(self.block.dtype)], dim=2)  # from block b0's start
        full = seq.shape[2] // bs
        if full:
            starts = torch.arange(b0 * bs, (b0 + full) * bs, gate.key_stride, device=k.device)
            self.keys[:, :, b0 * ks : (b0 + full) * ks] = gate.compress_keys(seq[:, :, : full * bs], *rope(starts.expand(B, -1)))
        rest = seq.shape[2] - full * bs
        self.block[:, :, :rest] = seq[:, :, full * bs :]

    @torch.no_grad()
    def step(self, gate: DecodeGate, k: torch.Tensor, t: torch.Tensor, rope: RopeFn) -> None:
        """One token per sequence, no host sync (CUDA-graph safe).

        Args:
            gate (DecodeGate): the layer's decode gate.
            k (torch.Tensor): pre-RoPE keys `[B, Hkv, 1, D]`.
            t (torch.Tensor): int `[B]` on the device, each token's position (its cache slot).
            rope: `positions [B, m] -> (cos, sin) [B, m, Dg]`.
        """
        if self.keys is None:
            self._allocate(gate, k)
        cos, sin = rope(self.summary_starts(gate, t))
        static_state_update(gate, self.keys, self.block, k, t, cos, sin)

    @staticmethod
    def summary_starts(gate: DecodeGate, t: torch.Tensor) -> torch.Tensor:
        """int `[B, k_summaries]`: first positions of the summaries of the block holding position `t` `[B]`."""
        sub = torch.arange(gate.k_summaries, device=t.device) * gate.key_stride
        return (t // gate.block_size * gate.block_size)[:, None] + sub

    def reorder(self, index: torch.Tensor) -> None:
        """Select / reorder batch rows (beam search), in place (the buffers keep their addresses)."""
        for t in (self.keys, self.block):
            if t is not None:
                t.copy_(t.index_select(0, index.to(t.device)))


def static_state_update(
    gate: DecodeGate, keys: torch.Tensor, block: torch.Tensor, k: torch.Tensor, t: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """:meth:`StaticCompressedKeyCache.step` as a function of tensors (in place on `keys` and `block`; compilable).

    Args:
        keys (torch.Tensor): the state's `[B, Hkv, slots, Dg]`; block: its `[B, Hkv, block_size, D]`.
        k (torch.Tensor): pre-RoPE keys of the new tokens `[B, Hkv, 1, D]`; t: int `[B]` their positions.
        cos, sin (torch.Tensor): `[B, k_summaries, Dg]` at :meth:`StaticCompressedKeyCache.summary_starts`.
    """
    B, H, _, D = k.shape
    bs, ks = gate.block_size, gate.k_summaries
    offset = t % bs
    block.scatter_(2, offset.view(B, 1, 1, 1).expand(B, H, 1, D), k.to(block.dtype))
    valid = torch.arange(bs, device=k.device)[None, :] <= offset[:, None]
    new = gate.compress_keys(block, cos, sin, valid=valid)  # [B, H, ks, Dg]
    slot = (t // bs)[:, None] * ks + torch.arange(ks, device=k.device)
    keys.scatter_(2, slot.view(B, 1, ks, 1).expand(B, H, ks, gate.hidden_size), new)
