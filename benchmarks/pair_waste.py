"""Wasted work of the 128-row TopK tiles ("pair" and "headpair" kernels) on real attention (CPU).

A pair tile computes every block that either of its two gate rows keeps, for both rows; the half
for the row that does not keep it is wasted. How much depends on how similar neighbouring rows'
(or GQA sibling heads') selections are. Random masks are the worst case; this measures an oracle
gate instead: SmolLM2-135M (the embedded model, eager attention) reads a PG19 book, every layer's
attention probabilities are max-pooled into 64x64 blocks, and every row keeps its top
`nz_ratio_to_k(d, nb)` causal blocks plus the diagonal (what a trained gate imitates).

Usage: python benchmarks/pair_waste.py [--length 4096] [--densities 0.1,0.5]
Prints per density: waste of row pairs and head pairs over all layers and heads (and the
range over layers), next to random and correlated synthetic masks of the same density.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import correlated_block_mask, random_block_mask  # noqa: E402

from seer_attn.kernels.block_mask import block_density, nz_ratio_to_k  # noqa: E402

BS = 64


def waste_rows(mask: torch.Tensor) -> float:
    """Pairs (2p, 2p+1) of query blocks: 1 - kept / (2 * union)."""
    if mask.shape[-2] % 2:
        mask = torch.cat([mask, torch.zeros_like(mask[..., :1, :])], -2)
    a, b = mask[..., 0::2, :], mask[..., 1::2, :]
    return 1.0 - (a.sum() + b.sum()).item() / (2 * (a | b).sum().item())


def waste_heads(mask: torch.Tensor, group: int) -> float:
    """Pairs (2p, 2p+1) of query heads inside a KV group (needs an even group)."""
    B, H, nb, _ = mask.shape
    a, b = mask.view(B, H // 2, 2, nb, nb).unbind(2)
    return 1.0 - (a.sum() + b.sum()).item() / (2 * (a | b).sum().item())


def oracle_masks(length: int, densities, device="cpu") -> dict[float, list[torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    from seer_attn import load_tokenizer
    from seer_attn.models.loading import resolve_model_source

    src = resolve_model_source("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(src.path, attn_implementation="eager", **src.hf_kwargs()).eval()
    tok = load_tokenizer("smollm2-135m")
    # ../shared beside the repository (override with SEER_SHARED)
    shared = os.environ.get("SEER_SHARED", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
    path = os.path.join(shared, "data", "pg19-mini", "test.jsonl")
    with open(path, encoding="utf-8") as f:
        text = json.loads(f.readline())["text"]
    ids = tok(text[: length * 8], return_tensors="pt").input_ids[:, :length]
    nb = math.ceil(ids.shape[1] / BS)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    out = {d: [] for d in densities}

    def hook(_mod, _inp, outp):
        w = outp[1]  # [B, H, S, S] probabilities
        S = w.shape[-1]
        pad = nb * BS - S
        w = torch.nn.functional.pad(w.float(), (0, pad, 0, pad))
        pooled = w.view(*w.shape[:2], nb, BS, nb, BS).amax(dim=(3, 5))
        for d in densities:
            idx = pooled.masked_fill(~causal, -1.0).topk(nz_ratio_to_k(d, nb), dim=-1).indices
            m = torch.zeros_like(pooled, dtype=torch.bool).scatter_(-1, idx, True)
            out[d].append((m | torch.eye(nb, dtype=torch.bool)) & causal)

    hooks = [layer.self_attn.register_forward_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return out, model.config.num_attention_heads // model.config.num_key_value_heads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--densities", default="0.1,0.5")
    args = ap.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    masks, group = oracle_masks(args.length, densities)
    nb = masks[densities[0]][0].shape[-1]
    print(f"SmolLM2-135M oracle top-k masks, {args.length} tokens of PG19, nb={nb}, {len(masks[densities[0]])} layers")
    print("| mask | d (real) | row-pair waste (layer range) | head-pair waste |")
    print("|---|---|---|---|")
    for d in densities:
        ms = masks[d]
        rows = [waste_rows(m) for m in ms]
        allm = torch.cat(ms, 1)
        # SmolLM2 groups 3 heads per KV head: pair heads 0-1 of each group
        hp = torch.cat([m.view(1, -1, group, nb, nb)[:, :, :2].reshape(1, -1, nb, nb) for m in ms], 1)
        print(f"| oracle | {d} ({block_density(allm):.3f}) | {waste_rows(allm):.3f} ({min(rows):.3f}-{max(rows):.3f}) | {waste_heads(hp, 2):.3f} |")
        torch.manual_seed(0)
        r = random_block_mask(1, 32, nb, d, "cpu")
        c = correlated_block_mask(1, 32, nb, d, "cpu", group=4)
        print(f"| random | {d} ({block_density(r):.3f}) | {waste_rows(r):.3f} | {waste_heads(r, 4):.3f} |")
        print(f"| correlated (rho 0.9) | {d} ({block_density(c):.3f}) | {waste_rows(c):.3f} | {waste_heads(c, 4):.3f} |")


if __name__ == "__main__":
    main()
