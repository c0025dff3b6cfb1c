"""Time the attention kernels against SDPA (flash, cuDNN) and FlexAttention on one GPU.

Usage (GPU):
    python benchmarks/bench_attention.py                          # S 8k/32k/128k, Llama + SmolLM2, d 1/.5/.3/.1
    python benchmarks/sweep_topk.py                               # every TopK kernel variant vs Flex (see there)
    python benchmarks/bench_attention.py --seqlens 32768 --shapes llama8b --skip csr_fwd,csr_fwdbwd
    python benchmarks/bench_attention.py --crossover-only         # short-input crossover only

Why each column is what it is:
- masks are random blocks of the causal block triangle at the requested density with the
  diagonal and the first block always kept (as in docs/GPU.md's anchors); the realised density
  (``block_density``) is what the tables quote;
- "topk" is :func:`block_sparse_attn_topk` (library default variant) on the mask's variable-count
  lists (``mask_to_kv_blocks``, built outside the timed call with ``Kmax`` = the largest row, as a
  caller that knows its budget would), the in-call list canonicalisation included; "csr_*" is
  :func:`block_sparse_attn_csr` from the bool mask, list building included;
- "flex" (Flex64) is ``torch.compile(flex_attention)`` with the same mask as a 64x64 ``BlockMask``
  (off-diagonal kept blocks "full", the diagonal "partial" with a causal ``mask_mod``), which needs
  ``kernel_options={"BLOCK_M": 64, "BLOCK_N": 64}`` and is forward only at that block size;
- "flex128" is FlexAttention at its native 128x128 blocks and default kernel options, on a random
  128-block mask of the same nominal density (its realised density is reported separately), forward
  and (up to ``--max-bwd-seq``) forward+backward;
- "TFLOP/s" columns count only the matmul FLOPs of kept blocks (diagonal blocks half), so they
  compare per-kept-block throughput across kernels and densities;
- "gate" is the gate's own cost at that length: ``AttnGate`` (pool + linear + RoPE + scores; on CUDA
  under no_grad that is the fused Triton gate since issue 11, `SEER_ATTN_FUSED_GATE=0` for the
  PyTorch one) and ``torch.topk`` with the per-row budget of the density (`bench_gate.py` times
  the fused gate + selection on its own);
- medians of ``triton.testing.do_bench``; inputs are built outside the timed call; ratios are
  against SDPA-flash of the same run.

Outputs: a markdown table and JSON under ``--out``, and a figure (speedup over SDPA-flash vs
density, one line per kernel) at ``--fig``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention

from seer_attn.kernels.attn_pooling_kernel import attn_with_pooling
from seer_attn.kernels.block_mask import block_density, mask_to_kv_blocks, nz_ratio_to_k
from seer_attn.kernels.block_sparse_attn_topk import block_sparse_attn_topk

SHAPES = {"llama8b": (32, 8, 128), "smollm2": (9, 3, 64)}
COLUMNS = ("topk", "csr_fwd", "csr_fwdbwd", "pool", "flash", "cudnn", "flex", "flex128", "gate")
BS = 64


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def random_block_mask(B: int, H: int, nb: int, density: float, device) -> torch.Tensor:
    """Bool `[B, H, nb, nb]`: random causal blocks at `density` of the triangle, diagonal and block 0 kept."""
    causal = torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
    tri = nb * (nb + 1) / 2
    forced = 2 * nb - 1
    p = 1.0 if density >= 1.0 else max(0.0, (density * tri - forced) / max(1.0, tri - forced))
    mask = torch.rand(B, H, nb, nb, device=device) < p
    mask |= torch.eye(nb, dtype=torch.bool, device=device)
    mask[..., 0] = True
    return mask & causal


def correlated_block_mask(
    B: int, H: int, nb: int, density: float, device, rho: float = 0.9, group: int = 1
) -> torch.Tensor:
    """Bool `[B, H, nb, nb]` like a trained gate's: neighbouring rows keep mostly the same blocks.

    Scores are `sqrt(rho) * u[h, j] + sqrt(1 - rho) * noise[h, i, j]` with a per-head column
    importance `u` (half of it shared by the `group` heads of a KV group); every row keeps its top
    `nz_ratio_to_k(density, nb)` causal blocks, plus the diagonal and block 0.
    """
    u_kv = torch.randn(B, H // group, 1, 1, nb, device=device).expand(B, H // group, group, 1, nb).reshape(B, H, 1, nb)
    u = (u_kv + torch.randn(B, H, 1, nb, device=device)) / math.sqrt(2.0)
    scores = math.sqrt(rho) * u + math.sqrt(1.0 - rho) * torch.randn(B, H, nb, nb, device=device)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
    k = nz_ratio_to_k(density, nb)
    idx = scores.masked_fill(~causal, float("-inf")).topk(k, dim=-1).indices
    mask = torch.zeros(B, H, nb, nb, dtype=torch.bool, device=device).scatter_(-1, idx, True)
    mask |= torch.eye(nb, dtype=torch.bool, device=device)
    mask[..., 0] = True
    return mask & causal


def flex_block_mask(mask: torch.Tensor, S: int, block_size: int = BS):
    """Same mask as a FlexAttention `BlockMask`: kept off-diagonal blocks full, the diagonal partial."""
    from torch.nn.attention.flex_attention import BlockMask

    nb = mask.shape[-1]
    eye = torch.eye(nb, dtype=torch.bool, device=mask.device)

    def lists(m):
        cols = torch.arange(nb, device=m.device, dtype=torch.int32).expand(m.shape)
        order = torch.where(m, cols, cols + nb).sort(-1).values
        return m.sum(-1, dtype=torch.int32), torch.where(order < nb, order, 0).to(torch.int32).contiguous()

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    num, idx = lists(mask & eye)
    full_num, full_idx = lists(mask & ~eye)
    return BlockMask.from_kv_blocks(
        num, idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=causal, seq_lengths=(S, S)
    )


def topk_flops(mask: torch.Tensor, D: int, block_size: int = BS) -> float:
    """Matmul FLOPs of the kept blocks (diagonal blocks count half)."""
    nb = mask.shape[-1]
    diag = mask.diagonal(dim1=-2, dim2=-1).sum().item()
    return 4.0 * D * block_size * block_size * (mask.sum().item() - diag + 0.5 * diag) if nb else 0.0


def dense_causal_flops(B: int, H: int, S: int, D: int) -> float:
    """Matmul FLOPs of causal attention (half the square)."""
    return 4.0 * D * B * H * S * S / 2


def make_gate(Hq: int, Hkv: int, D: int, S: int, device):
    """Gate forward + top-k at a given per-row budget, or None when `seer_attn.modules.attn_gate` is missing."""
    try:
        from seer_attn.modules.attn_gate import AttnGate
    except ImportError:
        return None
    gate = AttnGate(Hq, Hkv, D).to(device).eval()
    nb = math.ceil(S / BS)
    dg = gate.hidden_size
    pos = torch.arange(nb, device=device, dtype=torch.float32)[:, None] * BS
    inv = 1.0 / (500000.0 ** (torch.arange(0, dg, 2, device=device, dtype=torch.float32) / dg))
    ang = torch.cat([pos * inv, pos * inv], -1)[None]
    cos, sin = ang.cos(), ang.sin()

    def run(q, k, topk):
        with torch.no_grad():
            scores = gate(q, k, cos, sin, output="logits")
            return scores.topk(topk, dim=-1).indices

    return run


def run_shape(name: str, S: int, densities, columns, max_bwd_seq: int, device) -> list[dict]:
    Hq, Hkv, D = SHAPES[name]
    B = 1
    nb = math.ceil(S / BS)
    torch.manual_seed(0)
    q = torch.randn(B, Hq, S, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=torch.bfloat16)
    dense = {}
    # SDPA-flash is the reference of every ratio, so it always runs
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        dense["flash"] = bench(lambda: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    if "cudnn" in columns:
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                dense["cudnn"] = bench(lambda: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        except RuntimeError as e:
            print(f"cudnn failed: {e}", file=sys.stderr)
    if "pool" in columns:
        dense["pool"] = bench(lambda: attn_with_pooling(q, k, v))
    do_bwd = "csr_fwdbwd" in columns and S <= max_bwd_seq
    if do_bwd:
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        do = torch.randn_like(q)

        def flash_fb():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True).backward(do)

        dense["flash_fwdbwd"] = bench(flash_fb)

    csr = None
    if "csr_fwd" in columns or "csr_fwdbwd" in columns:
        try:
            from seer_attn.kernels.block_sparse_attn_csr import block_sparse_attn_csr as csr
        except ImportError as e:
            print(f"csr columns skipped: {e}", file=sys.stderr)
    flex = None
    if "flex" in columns or "flex128" in columns:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    gate = make_gate(Hq, Hkv, D, S, device) if "gate" in columns else None

    rows = []
    for d in densities:
        mask = random_block_mask(B, Hq, nb, d, device)
        real = block_density(mask)
        r = {"shape": name, "S": S, "density": d, "real_density": round(real, 4), **dense}
        flops = topk_flops(mask, D)
        if "topk" in columns:
            num, idx = mask_to_kv_blocks(mask, max_blocks=int(mask.sum(-1).max()))
            r["topk"] = bench(lambda: block_sparse_attn_topk(q, k, v, idx, block_count=num))
            r["topk_tflops"] = flops / r["topk"] * 1e-9
            del num, idx
        if csr is not None and "csr_fwd" in columns:
            r["csr_fwd"] = bench(lambda: csr(q, k, v, mask))
        if csr is not None and do_bwd:

            def csr_fb():
                csr(qg, kg, vg, mask).backward(do)

            r["csr_fwdbwd"] = bench(csr_fb)
        if flex is not None and "flex" in columns:
            bm = flex_block_mask(mask, S)
            opts = {"BLOCK_M": 64, "BLOCK_N": 64}
            r["flex"] = bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts))
            r["flex_tflops"] = flops / r["flex"] * 1e-9
            del bm
        if flex is not None and "flex128" in columns:
            mask128 = random_block_mask(B, Hq, math.ceil(S / 128), d, device)
            r["real_density_128"] = round(block_density(mask128), 4)
            bm = flex_block_mask(mask128, S, 128)
            r["flex128"] = bench(lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
            r["flex128_tflops"] = topk_flops(mask128, D, 128) / r["flex128"] * 1e-9
            if do_bwd:

                def flex128_fb():
                    flex(qg, kg, vg, block_mask=bm, enable_gqa=True).backward(do)

                r["flex128_fwdbwd"] = bench(flex128_fb)
            del bm, mask128
        if gate is not None:
            budget = nz_ratio_to_k(d, nb)
            r["gate"] = bench(lambda: gate(q, k, budget))
        for c in ("topk", "csr_fwd", "pool", "cudnn", "flex", "flex128"):
            if c in r:
                r[f"{c}_speedup"] = r["flash"] / r[c]
        for c in ("topk", "csr_fwd"):
            for ref in ("flex", "flex128", "cudnn"):
                if c in r and ref in r:
                    r[f"{c}_vs_{ref}"] = r[ref] / r[c]
        if "cudnn" in r:
            r["cudnn_tflops"] = dense_causal_flops(B, Hq, S, D) / r["cudnn"] * 1e-9
        if "csr_fwdbwd" in r:
            r["csr_fwdbwd_speedup"] = r["flash_fwdbwd"] / r["csr_fwdbwd"]
            if "flex128_fwdbwd" in r:
                r["csr_fwdbwd_vs_flex128"] = r["flex128_fwdbwd"] / r["csr_fwdbwd"]
        if "gate" in r:
            r["gate_frac"] = r["gate"] / r["flash"]
        rows.append(r)
        print(json.dumps({key: (round(val, 4) if isinstance(val, float) else val) for key, val in r.items()}), flush=True)
        del mask
    return rows


def crossover(device, densities=(0.5, 0.1), seqlens=(512, 1024, 2048, 4096, 8192, 16384)) -> list[dict]:
    """Model sparse path (gate + top-k + TopK kernel) vs SDPA dense at short lengths."""
    out = []
    for name, (Hq, Hkv, D) in SHAPES.items():
        for S in seqlens:
            nb = math.ceil(S / BS)
            q = torch.randn(1, Hq, S, D, device=device, dtype=torch.bfloat16)
            k = torch.randn(1, Hkv, S, D, device=device, dtype=torch.bfloat16)
            v = torch.randn(1, Hkv, S, D, device=device, dtype=torch.bfloat16)
            r = {"shape": name, "S": S}
            r["sdpa"] = bench(lambda: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                r["flash"] = bench(lambda: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
            gate = make_gate(Hq, Hkv, D, S, device)
            for d in densities:
                budget = nz_ratio_to_k(d, nb)
                if gate is not None:

                    def sparse():
                        return block_sparse_attn_topk(q, k, v, gate(q, k, budget))

                else:
                    idx = torch.rand(1, Hq, nb, nb, device=device).topk(budget, dim=-1).indices

                    def sparse():
                        return block_sparse_attn_topk(q, k, v, idx)

                r[f"sparse_d{d}"] = bench(sparse)
            out.append(r)
            print(json.dumps({key: (round(val, 4) if isinstance(val, float) else val) for key, val in r.items()}), flush=True)
    return out


def crossover_lengths(rows: list[dict], densities=(0.5, 0.1)) -> dict:
    """Per shape and density: the smallest tested S from which sparse beats SDPA at every longer S."""
    res = {}
    for name in SHAPES:
        rs = sorted((r for r in rows if r["shape"] == name), key=lambda r: r["S"])
        for d in densities:
            best = None
            for r in reversed(rs):
                if r[f"sparse_d{d}"] < min(r["sdpa"], r["flash"]):
                    best = r["S"]
                else:
                    break
            res[f"{name}_d{d}"] = best
    return res


def to_markdown(rows: list[dict], xrows: list[dict], xlen: dict, header: str) -> str:
    cols = [
        ("shape", "shape"), ("S", "S"), ("density", "d"), ("real_density", "real d"), ("real_density_128", "real d128"),
        ("topk", "TopK fwd"), ("csr_fwd", "CSR fwd"), ("csr_fwdbwd", "CSR fwd+bwd"), ("pool", "attn_with_pooling"),
        ("flash", "SDPA flash"), ("flash_fwdbwd", "flash fwd+bwd"), ("cudnn", "SDPA cuDNN"), ("flex", "Flex64 fwd"),
        ("flex128", "Flex128 fwd"), ("flex128_fwdbwd", "Flex128 fwd+bwd"), ("gate", "gate"),
        ("topk_speedup", "TopK/flash x"), ("topk_vs_flex", "TopK vs Flex64 x"), ("topk_vs_flex128", "TopK vs Flex128 x"),
        ("csr_fwd_vs_flex128", "CSR fwd vs Flex128 x"), ("flex_speedup", "Flex64/flash x"),
        ("flex128_speedup", "Flex128/flash x"), ("cudnn_speedup", "cuDNN/flash x"),
        ("csr_fwdbwd_speedup", "CSR fb/flash fb x"), ("csr_fwdbwd_vs_flex128", "CSR fb vs Flex128 fb x"),
        ("topk_tflops", "TopK TFLOP/s"), ("flex_tflops", "Flex64 TFLOP/s"), ("flex128_tflops", "Flex128 TFLOP/s"),
        ("cudnn_tflops", "cuDNN TFLOP/s"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = [header, ""]
    if rows:
        lines += ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            val = r.get(key, "-")
            cells.append(f"{val:.3f}" if isinstance(val, float) else str(val))
        lines.append("| " + " | ".join(cells) + " |")
    if xrows:
        lines += ["", "Short-input crossover (gate + top-k + TopK kernel vs SDPA dense, ms):", ""]
        keys = [k for k in xrows[0] if k not in ("shape", "S")]
        lines += ["| shape | S | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
        for r in xrows:
            lines.append(f"| {r['shape']} | {r['S']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
        lines += ["", "Crossover (smallest tested S from which sparse is faster at every longer tested S): " + json.dumps(xlen)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in rows})
    seqlens = sorted({r["S"] for r in rows})
    fig, axes = plt.subplots(len(shapes), len(seqlens), figsize=(4.2 * len(seqlens), 3.4 * len(shapes)), squeeze=False)
    for ax, (name, S) in zip(axes.flat, [(n, S) for n in shapes for S in seqlens]):
        rs = sorted((r for r in rows if r["shape"] == name and r["S"] == S), key=lambda r: r["real_density"])
        for key, label in (("topk", "TopK fwd"), ("csr_fwd", "CSR fwd"), ("flex", "Flex64 fwd"), ("flex128", "Flex128 fwd"),
                           ("cudnn", "SDPA cuDNN"),
                           ("pool", "attn_with_pooling"), ("csr_fwdbwd", "CSR fwd+bwd (vs flash fwd+bwd)")):
            pts = [(r["real_density"], r[f"{key}_speedup"]) for r in rs if f"{key}_speedup" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("realised density")
        ax.set_ylabel("speedup over SDPA flash")
        ax.set_yscale("log")
        ax.set_title(f"{name}, S={S // 1024}k")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="llama8b,smollm2")
    ap.add_argument("--seqlens", default="8192,32768,131072")
    ap.add_argument("--densities", default="1.0,0.5,0.3,0.1")
    ap.add_argument("--only", default="", help=f"comma list of columns to run, from {','.join(COLUMNS)}")
    ap.add_argument("--skip", default="", help="comma list of columns to leave out")
    ap.add_argument("--max-bwd-seq", type=int, default=32768, help="longest S for fwd+bwd columns (memory, time)")
    ap.add_argument("--crossover", action="store_true", help="also measure the short-input crossover")
    ap.add_argument("--crossover-only", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--fig", default="figures/bench_attention.png")
    args = ap.parse_args()

    columns = set(args.only.split(",")) if args.only else set(COLUMNS)
    columns -= set(filter(None, args.skip.split(",")))
    device = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 64
    rows = []
    if not args.crossover_only:
        for name in args.shapes.split(","):
            for S in map(int, args.seqlens.split(",")):
                rows += run_shape(name, S, [float(d) for d in args.densities.split(",")], columns, args.max_bwd_seq, device)
                torch.cuda.empty_cache()
    xrows = crossover(device) if (args.crossover or args.crossover_only) else []
    xlen = crossover_lengths(xrows) if xrows else {}

    props = torch.cuda.get_device_properties(0)
    meta = {
        "date": datetime.date.today().isoformat(),
        "gpu": props.name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join(["python"] + sys.argv),
        "columns": sorted(columns),
    }
    header = f"{meta['date']}, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}: `{meta['command']}` (ms, medians)"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows, "crossover_rows": xrows, "crossover": xlen}, f, indent=1)
    md = to_markdown(rows, xrows, xlen, header)
    with open(os.path.join(args.out, "bench_attention.md"), "w") as f:
        f.write(md)
    if rows:
        plot(rows, args.fig)
    print(md)


if __name__ == "__main__":
    main()
