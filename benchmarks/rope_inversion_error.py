"""How close would the gate's inputs be if recovered by inverting RoPE instead of captured?

The design choice behind `seer_attn.models.modeling_seer.SeerAttentionMixin` (capture the pre-RoPE
q/k in a shared attention forward) was checked with this script. It runs SmolLM2-135M (the embedded
real model) on real text and, in every layer, recovers the pre-RoPE q/k from the post-RoPE q/k that
the attention function receives, as a registered attention function alone would have to:

    q_pre ~= (q * cos - rotate_half(q) * sin) / a**2      (cos, sin include YaRN's factor a)

with cos/sin recomputed in fp32 (the best case for the inversion). It reports, per setting
(model dtype x rope type), over layers:

- the relative error ||recovered - captured|| / ||captured|| of q and k (median and max);
- the gate's logits on recovered vs captured inputs (max |diff| relative to the logits' std);
- the fraction of the blocks selected at nz_ratio 0.5 and 0.1 that change (fresh gates, N(0, 0.02)).

CPU is fine (a few minutes on 2 cores):

    python benchmarks/rope_inversion_error.py --length 1024 --out benchmarks/results/rope_inversion.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pydoc_data.topics
import torch
from tqdm import tqdm

import seer_attn.models.modeling_seer as modeling_seer
from seer_attn import AutoSeerForCausalLM, load_tokenizer
from seer_attn.kernels.block_mask import select_blocks
from seer_attn.models import apply_yarn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def invert_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, a: float) -> torch.Tensor:
    """`x` post-RoPE `[B, H, S, D]`, `cos`/`sin` fp32 `[B, S, D]` (scaled by `a`) -> pre-RoPE, fp32."""
    x, cos, sin = x.float(), cos[:, None], sin[:, None]
    return (x * cos - rotate_half(x) * sin) / (a * a)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def changed_fraction(s1: torch.Tensor, s2: torch.Tensor, nz: float) -> float:
    m1, m2 = select_blocks(s1, nz_ratio=nz), select_blocks(s2, nz_ratio=nz)
    return float((m1 != m2).sum() / (2 * m1.sum()))


def measure(model, ids: torch.Tensor, dtype: torch.dtype) -> dict:
    calls = []
    orig = modeling_seer.seer_attention

    def spy(q, k, v, q_pre, k_pre, gate, cos, sin, *args, **kwargs):
        calls.append((q, k, q_pre, k_pre, gate, cos, sin))
        return orig(q, k, v, q_pre, k_pre, gate, cos, sin, *args, **kwargs)

    modeling_seer.seer_attention = spy
    try:
        with torch.no_grad():
            model(ids, logits_to_keep=1)
    finally:
        modeling_seer.seer_attention = orig
    rotary = model.model.rotary_emb
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros((), dtype=torch.float32), pos)  # fp32 tables
    a = float(rotary.attention_scaling)
    rows = {"q_rel": [], "k_rel": [], "logit_rel": [], "changed_nz0.5": [], "changed_nz0.1": []}
    for q, k, q_pre, k_pre, gate, gcos, gsin in calls:
        q_hat, k_hat = invert_rope(q, cos, sin, a).to(dtype), invert_rope(k, cos, sin, a).to(dtype)
        rows["q_rel"].append(rel(q_hat, q_pre))
        rows["k_rel"].append(rel(k_hat, k_pre))
        with torch.no_grad():
            s1 = gate(q_pre, k_pre, gcos, gsin, output="logits")
            s2 = gate(q_hat, k_hat, gcos, gsin, output="logits")
        finite = torch.isfinite(s1)
        rows["logit_rel"].append(float((s1 - s2)[finite].abs().max() / s1[finite].std()))
        rows["changed_nz0.5"].append(changed_fraction(s1, s2, 0.5))
        rows["changed_nz0.1"].append(changed_fraction(s1, s2, 0.1))
    return {name: {"median": statistics.median(v), "max": max(v)} for name, v in rows.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--out", default="benchmarks/results/rope_inversion.json")
    args = p.parse_args()
    torch.manual_seed(0)
    tok = load_tokenizer(args.model)
    text = "\n".join(pydoc_data.topics.topics.values())
    ids = tok(text, return_tensors="pt").input_ids[:, : args.length]
    results = []
    settings = [(d, r) for r in ("default", "yarn x4") for d in (torch.float32, torch.bfloat16)]
    for dtype, rope in tqdm(settings, desc="settings"):
        config = AutoSeerForCausalLM.config_from(args.model, seerattn_mode="sparse", seerattn_nz_ratio=1.0, seerattn_min_sparse_length=0)
        if rope != "default":
            apply_yarn(config, 4.0)
        model = AutoSeerForCausalLM.from_pretrained(args.model, config=config, dtype=dtype).eval()
        results.append({"dtype": str(dtype).replace("torch.", ""), "rope": rope, "length": args.length, **measure(model, ids, dtype)})
    print("| dtype | rope | q rel. err (median / max) | k rel. err | gate logits max diff / std | blocks changed nz 0.5 | nz 0.1 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        f = lambda k: f"{r[k]['median']:.1e} / {r[k]['max']:.1e}"  # noqa: E731
        g = lambda k: f"{100 * r[k]['median']:.2f}% / {100 * r[k]['max']:.2f}%"  # noqa: E731
        print(f"| {r['dtype']} | {r['rope']} | {f('q_rel')} | {f('k_rel')} | {f('logit_rel')} | {g('changed_nz0.5')} | {g('changed_nz0.1')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "results": results}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
