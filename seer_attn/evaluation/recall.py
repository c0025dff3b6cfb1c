"""Selection diagnostics: how much of the true attention the kept blocks hold, per layer and head.

- *Attention recall* of a block mask for one query token: the share of its exact attention
  probability that falls on keys in kept blocks. A layer's recall (per head) averages it over query
  tokens. It is read off the layer's block mass map (`attn_with_pooling(..., pooling="mass")`:
  `mass[i, j]` = mean over the tokens of query block `i` of their probability summed over key block
  `j`): a block mask is constant over a block's tokens, so `sum_j mass[i, j] * mask[i, j]` is exactly
  the mean recall of block `i`'s tokens. Blocks are then weighted by their token counts.
- *Overlap* with `oracle_mass`: per query block, the share of the blocks `oracle_mass` keeps (top
  blocks of that same mass map, same sparsity settings, always-kept blocks included) that the
  selector keeps too, `|A and B| / |B|`, averaged over query tokens. 1.0 means the selector picks
  the oracle's blocks.

Both come from the forward that is being measured: with recording on, every layer keeps the mask
its sparse attention really used (`SeerAttentionStats.mask`, from the model's own selection code),
the mass map of its exact attention on its own q, k, v (one extra dense pass per layer, no effect on
the output) and the oracle's mask (`SeerAttentionStats.oracle_mask`). Recording is off by default
and costs nothing then.

From a notebook:

    from seer_attn.evaluation.recall import attention_recall
    rows = attention_recall(model, input_ids, methods=("seer", "oracle_mass", "pooled"), budgets=(0.5, 0.1))
    rows[0]["recall"], rows[0]["layers"][3]["recall"]  # mean; per head of layer 3
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "RECALL_METHODS",
    "block_recall",
    "block_overlap",
    "recording",
    "layer_diagnostics",
    "RecallMeter",
    "attention_recall",
]

RECALL_METHODS = ("seer", "oracle", "oracle_mass", "pooled", "static", "random")


def _row_weights(nb: int, seq_len: int | None, block_size: int, device) -> torch.Tensor:
    """Tokens per query block `[nb]`: `block_size`, and fewer in a partial last block."""
    w = torch.full((nb,), float(block_size), device=device)
    if seq_len is not None:
        w[-1] = seq_len - (nb - 1) * block_size
    return w


def block_recall(mask: torch.Tensor, mass: torch.Tensor, seq_len: int | None = None, block_size: int = 64) -> torch.Tensor:
    """Attention recall of a block mask, averaged over query tokens: `[B, H]`.

    Args:
        mask (torch.Tensor): bool `[B, H, nb, nb]`, the kept blocks.
        mass (torch.Tensor): `[B, H, nb, nb]` block mass map (rows sum to 1).
        seq_len (int, Optional): tokens in the sequence, to weight a partial last block by its real
            tokens. Default: every block full.
        block_size (int): tokens per block. Default: `64`.
    """
    if mask.shape != mass.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and mass {tuple(mass.shape)} must have the same shape")
    m = mass.float()
    per_row = (m * mask).sum(-1) / m.sum(-1).clamp_min(1e-30)  # [B, H, nb]
    w = _row_weights(mask.shape[-2], seq_len, block_size, mask.device)
    return (per_row * w).sum(-1) / w.sum()


def block_overlap(
    mask: torch.Tensor, reference: torch.Tensor, seq_len: int | None = None, block_size: int = 64
) -> torch.Tensor:
    """Share of `reference`'s blocks that `mask` keeps too, per query block, averaged over tokens: `[B, H]`.

    Query blocks where `reference` keeps nothing do not count (all-empty gives 1.0).
    """
    if mask.shape != reference.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and reference {tuple(reference.shape)} must have the same shape")
    ref = reference.sum(-1).float()  # [B, H, nb]
    per_row = (mask & reference).sum(-1).float() / ref.clamp_min(1)
    w = _row_weights(mask.shape[-2], seq_len, block_size, mask.device) * (ref > 0)
    return torch.where(w.sum(-1) > 0, (per_row * w).sum(-1) / w.sum(-1).clamp_min(1), torch.ones_like(ref[..., 0]))


def _attention_modules(model) -> list:
    """The model's attention layers in order (every module that can record masks)."""
    mods = [m for m in model.modules() if hasattr(m, "seer_record_masks")]
    if not mods:
        raise ValueError(f"{type(model).__name__} has no SeerAttention layers to record")
    return mods


@contextlib.contextmanager
def recording(model):
    """Inside, every sparse forward keeps each layer's mask, mass map and oracle mask in `seer_stats`."""
    mods = _attention_modules(model)
    before = [m.seer_record_masks for m in mods]
    for m in mods:
        m.seer_record_masks = True
    try:
        yield mods
    finally:
        for m, b in zip(mods, before):
            m.seer_record_masks = b


@torch.no_grad()
def layer_diagnostics(model, seq_len: int | None = None, release: bool = True) -> list[dict] | None:
    """Per-layer recall, overlap and density of the model's last (recorded) forward.

    Returns one dict per layer, `{"layer", "density", "recall": [H], "overlap": [H]}` (heads
    averaged over the batch), or None when the last forward recorded nothing (dense mode).
    With `release`, the recorded maps are dropped from the layers afterwards.
    """
    out = []
    block_size = model.config.seerattn_gate_block_size
    for i, m in enumerate(_attention_modules(model)):
        s = m.seer_stats
        if s is None or s.mask is None:
            return None
        nb = s.mask.shape[-1]
        causal = torch.ones(nb, nb, dtype=torch.bool, device=s.mask.device).tril()
        out.append({
            "layer": i,
            "density": float((s.mask & causal).sum()) / (causal.sum().item() * s.mask.shape[0] * s.mask.shape[1]),
            "recall": block_recall(s.mask, s.mass, seq_len, block_size).mean(0).tolist(),
            "overlap": block_overlap(s.mask, s.oracle_mask, seq_len, block_size).mean(0).tolist(),
        })
        if release:
            s.mask = s.mass = s.oracle_mask = None
    return out


class RecallMeter:
    """Averages `layer_diagnostics` over forwards (documents): `update(model, seq_len)` after each."""

    def __init__(self):
        self.recall, self.overlap, self.density = [], [], []

    def update(self, model, seq_len: int | None = None) -> None:
        layers = layer_diagnostics(model, seq_len)
        if layers is None:
            raise RuntimeError("the last forward recorded no masks: is the model in sparse mode inside `recording`?")
        self.recall.append(torch.tensor([x["recall"] for x in layers]))
        self.overlap.append(torch.tensor([x["overlap"] for x in layers]))
        self.density.append(torch.tensor([x["density"] for x in layers]))

    def result(self) -> dict:
        """`{"recall", "overlap"}` means over forwards, layers and heads, and `"layers"`: per layer, per head."""
        if not self.recall:
            raise RuntimeError("RecallMeter has no forwards to average")
        recall, overlap = torch.stack(self.recall).mean(0), torch.stack(self.overlap).mean(0)  # [L, H]
        density = torch.stack(self.density).mean(0)
        layers = [
            {"layer": i, "density": round(float(density[i]), 6), "recall": [round(x, 6) for x in recall[i].tolist()],
             "overlap": [round(x, 6) for x in overlap[i].tolist()]}
            for i in range(recall.shape[0])
        ]
        return {"recall": float(recall.mean()), "overlap": float(overlap.mean()), "layers": layers}


_SETTINGS = ("seerattn_mode", "seerattn_selector", "seerattn_sparsity_method", "seerattn_nz_ratio", "seerattn_threshold",
             "seerattn_min_sparse_length")


@torch.no_grad()
def attention_recall(
    model,
    input_ids: torch.Tensor,
    methods=("seer", "oracle_mass", "oracle", "pooled", "static", "random"),
    budgets=(0.5, 0.3, 0.1),
    sparsity_method: str = "nz_ratio",
    seed: int = 0,
) -> list[dict]:
    """Recall and overlap of each selector at each budget on `input_ids` (the model's settings are restored).

    Args:
        model: a `SeerLlamaForCausalLM` (any model whose attention layers record masks).
        input_ids (torch.Tensor): `[B, S]` or `[S]`, unpadded (start with the document-start token,
            as evaluation does).
        methods: from `RECALL_METHODS` (`seer` is the trained gate).
        budgets: `nz_ratio` values, or thresholds with `sparsity_method="threshold"`.
        sparsity_method (str): `"nz_ratio"`, `"adaptive"` (both take `nz_ratio` budgets) or `"threshold"`.
        seed (int): reset before every forward (the `random` selector).

    Returns:
        one dict per (method, budget): `{"method", "sparsity_method", "target", "density", "recall",
        "overlap", "layers": [{"layer", "density", "recall": [H], "overlap": [H]}]}`; `density` is
        the realised density over the causal block triangle, all layers and heads.
    """
    unknown = sorted(set(methods) - set(RECALL_METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {RECALL_METHODS}")
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    ids = ids.to(next(model.parameters()).device)
    if sparsity_method not in ("nz_ratio", "adaptive", "threshold"):
        raise ValueError(f"attention_recall: sparsity_method must be nz_ratio, adaptive or threshold, got {sparsity_method!r}")
    target_field = "seerattn_threshold" if sparsity_method == "threshold" else "seerattn_nz_ratio"
    saved = {k: getattr(model.config, k) for k in _SETTINGS}
    was_training = model.training
    model.eval()
    rows = []
    try:
        with recording(model):
            for budget in budgets:
                for method in methods:
                    model.set_seerattn(
                        seerattn_mode="sparse", seerattn_selector="gate" if method == "seer" else method,
                        seerattn_sparsity_method=sparsity_method, seerattn_min_sparse_length=0, **{target_field: budget},
                    )
                    torch.manual_seed(seed)
                    model(input_ids=ids, logits_to_keep=1, use_cache=False)
                    meter = RecallMeter()
                    meter.update(model, ids.shape[1])
                    res = meter.result()
                    density = sum(x["density"] for x in res["layers"]) / len(res["layers"])
                    rows.append({"method": method, "sparsity_method": sparsity_method, "target": budget,
                                 "density": round(density, 6), **res})
    finally:
        model.set_seerattn(**saved)
        model.train(was_training)
    return rows
