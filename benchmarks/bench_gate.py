"""The gate alone (pool + project + RoPE + score + block selection), per layer: twin vs fused vs compiled.

Usage (GPU):
    python benchmarks/bench_gate.py                                   # llama8b + smollm2, 8k/32k/128k
    python benchmarks/bench_gate.py --seqlens 32768 --compile-seqlens 32768 --out benchmarks/results/gate.json

Columns (median ms of `triton.testing.do_bench`, B=1, bf16 q/k in the HF `[B, S, H, D]` layout):
- `twin`: the PyTorch AttnGate (`score(pool_inputs(...))`) + `topk_block_index` + keep columns: the
  path before the fused gate (`seer_attn.modules.fused_gate.gate_block_index_twin`);
- `twin_graph`: the same replayed as one CUDA graph (what launch overhead costs it);
- `compiled`: `torch.compile` of the twin (default mode, static shapes; compile time not included;
  only at `--compile-seqlens`);
- `fused`: `gate_block_index` (4 launches: Q summaries, K summaries, block logits, selection) with
  the default `tf32x3` dots; `fused_graph` as one CUDA graph; `fused_ieee` / `fused_tf32` with other
  dot precisions; `sum`/`kg`/`score`/`select`: its launches timed alone;
- `fused_d0.5`: the same at density 0.5 (larger k); `fused_thr`: threshold selection (row softmax);
- `fused_<design>` / `fused_<design>_graph`: each `--designs` entry eagerly and replayed as one CUDA graph;
- `diff` / `real_diff`: blocks selected differently from the twin, and those not at a near tie
  (twin logit more than 1e-5 * max|logit| from the row's k-th value): random inputs, random gate.
Designs beyond the default are timed through the fused path when `--designs` lists them (`nq2`,
`nq4`, `nq8`: query summaries per block; `nq4nk2`: 4 query and 2 key summaries; `adaptive`,
`adaptive_floor`: the layer-wide budget, without / with a per-row floor of half the top-k budget;
`top_p`: per-row top-p 0.9; `default`: the library default, 4 / 2 summaries with adaptive selection and
its row floor; `default_tf32` / `default_bf16`: the same with single-pass tf32 products / bf16 operands; `default_shared`: the same with one
block set per GQA group).

Outputs a markdown table, the targets of issue 11, and JSON at `--out`.

`--mixture-sweep` times only the mixture-of-softmaxes scoring of the default design (4 query / 2
key summaries, `gate_mixture_scores`) over tiles (query x key summaries per step), warps, pipeline
stages and dot precisions, each checked against the default tile's output first:
    python benchmarks/bench_gate.py --mixture-sweep --seqlens 32768,131072 --out benchmarks/results/mixture_sweep.json

`--adaptive-bits 10,8,6,5` times the `adaptive` selection (with and without its row floor) per radix digit
width on the same scores, checks each kept set against the first width's, and times the whole default design
at each width (the digit width trades `tl.histogram`'s per-element cost against the number of passes):
    python benchmarks/bench_gate.py --adaptive-bits 10,8,6,5 --shapes llama8b,smollm2 --seqlens 32768,131072

`--profile DESIGN` lists where one design's time goes, kernel by kernel (torch.profiler):
    python benchmarks/bench_gate.py --profile default --shapes llama8b --seqlens 32768,131072 --out benchmarks/results/gate_profile.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import triton

from seer_attn.kernels.block_mask import indices_to_mask, nz_ratio_to_k, topk_budget
from seer_attn.kernels import gate_kernel
from seer_attn.kernels.gate_kernel import gate_mixture_scores, gate_scores, gate_select, gate_summaries
from seer_attn.modules import fused_gate
from seer_attn.modules.attn_gate import AttnGate
from seer_attn.modules.seer_attention import SeerAttentionSettings

SHAPES = {"llama8b": (32, 8, 128), "smollm2": (9, 3, 64)}
TARGETS = {("llama8b", 32768): 0.35, ("smollm2", 32768): 0.15, ("llama8b", 131072): 2.0}
BS = 64


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def attempt(fn):
    """`fn()`, or a short note of its error: one failing column must not end the run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the table
        print(f"[bench_gate] failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return f"failed: {type(e).__name__}"


def graphed(fn):
    """`fn` (no host syncs, static inputs) captured as a CUDA graph; returns a replay function."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def rope(B, n, dg, stride, device):
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None] * stride
    inv = 1.0 / (500000.0 ** (torch.arange(0, dg, 2, device=device, dtype=torch.float32) / dg))
    ang = torch.cat([pos * inv, pos * inv], -1)[None].expand(B, n, dg)
    return ang.cos(), ang.sin()


def run(name, S, args, device) -> dict:
    Hq, Hkv, D = SHAPES[name]
    nb = math.ceil(S / BS)
    torch.manual_seed(0)
    gate = AttnGate(Hq, Hkv, D).to(device, torch.bfloat16).eval()
    for p in gate.parameters():
        p.data.normal_(0, 0.05)
    q = torch.randn(1, S, Hq, D, device=device, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, S, Hkv, D, device=device, dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = rope(1, nb, gate.hidden_size, BS, device)
    st = SeerAttentionSettings(nz_ratio=args.nz, keep_diagonal=True)
    r = {"shape": name, "S": S, "nz": args.nz, "k": nz_ratio_to_k(args.nz, nb)}

    def twin():
        return fused_gate.gate_block_index_twin(gate, q, k, cos, sin, st)

    def fused(count=False):
        # count=True: (index, count) with no -1 padding, what the model's sparse path asks for
        return fused_gate.gate_block_index(gate, q, k, cos, sin, st, return_count=count)

    def fused_model():
        return fused(True)

    with torch.no_grad():
        r["twin"] = bench(twin)
        r["twin_graph"] = attempt(lambda: bench(graphed(twin)))
        if S in args.compile_seqlens:
            t0 = time.time()
            comp = torch.compile(twin, dynamic=False)
            if not isinstance(attempt(comp), str):
                r["compile_s"] = round(time.time() - t0, 1)
                r["compiled"] = attempt(lambda: bench(comp))
            else:
                r["compiled"] = "failed"
        r["fused"] = attempt(lambda: bench(fused_model))
        r["fused_graph"] = attempt(lambda: bench(graphed(fused_model)))
        old = fused_gate.GATE_PRECISION_OVERRIDE
        for prec in ("ieee", "tf32"):
            fused_gate.GATE_PRECISION_OVERRIDE = prec
            r[f"fused_{prec}"] = attempt(lambda: bench(fused_model))
        fused_gate.GATE_PRECISION_OVERRIDE = old
        st5 = SeerAttentionSettings(nz_ratio=0.5)
        r["fused_d0.5"] = attempt(lambda: bench(lambda: fused_gate.gate_block_index(gate, q, k, cos, sin, st5, return_count=True)))
        stt = SeerAttentionSettings(sparsity_method="threshold", threshold=5e-3)
        r["fused_thr"] = attempt(lambda: bench(lambda: fused_gate.gate_block_index(gate, q, k, cos, sin, stt, return_count=True)))
        # the launches alone
        wk = gate.mask_linear_k.weight.detach()
        r["sum"] = attempt(lambda: bench(lambda: gate_summaries(q, None, cos, sin, gate.q_pools, BS)))
        r["kg"] = attempt(lambda: bench(lambda: gate_summaries(k, wk, cos, sin, gate.k_pools, BS, Hq // Hkv)))
        parts = attempt(lambda: fused_gate.gate_summaries_fused(gate, q, k, cos, sin))
        if not isinstance(parts, str):
            r["score"] = attempt(lambda: bench(lambda: gate_scores(*parts)))
            s = gate_scores(*parts)
            r["select"] = attempt(lambda: bench(lambda: gate_select(s, "nz_ratio", r["k"], return_count=True)))
            del s
        for design in args.designs:
            call = design_call(design, Hq, Hkv, D, S, q, k, device)
            # eagerly, and replayed as one CUDA graph (as inside a graph-captured forward: seerattn_cuda_graphs)
            r[f"fused_{design}"] = call if isinstance(call, str) else attempt(lambda: bench(call))
            r[f"fused_{design}_graph"] = call if isinstance(call, str) else attempt(lambda: bench(graphed(call)))
        r["diff"], r["real_diff"] = "-", "-"
        if isinstance(r["fused"], float):
            r["diff"], r["real_diff"] = agreement(gate, q, k, cos, sin, twin, fused, nb, r["k"], Hq, device)
    return r


def agreement(gate, q, k, cos, sin, twin, fused, nb, k_blocks, Hq, device) -> tuple[int, int]:
    """Blocks selected differently by the fused path and the twin; those not at a near tie."""
    logits = gate.score(*gate.pool_inputs(q, k), cos, sin, output="logits")
    diff = indices_to_mask(fused().long(), nb) != indices_to_mask(twin().long(), nb)
    n = int(diff.sum())
    if not n:
        return 0, 0
    tri = torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
    kk = torch.clamp(torch.arange(nb, device=device) + 1, max=k_blocks)
    srt = logits.masked_fill(~tri, float("-inf")).sort(-1, descending=True).values
    kth = srt.gather(-1, (kk - 1).view(1, 1, nb, 1).expand(1, Hq, nb, 1))
    gap = (logits - kth).abs()[diff]
    return n, int((gap > 1e-5 * logits[logits.isfinite()].abs().max()).sum())


def design_call(design, Hq, Hkv, D, S, q, k, device):
    """A no-argument call of the fused gate + selection of `design`, or a note when the fused path does not cover it."""
    designs = {
        "nq2": ({"q_summaries": 2}, {}),
        "nq4": ({"q_summaries": 4}, {}),
        "nq8": ({"q_summaries": 8}, {}),
        "nq4nk2": ({"q_summaries": 4, "k_summaries": 2}, {}),
        "adaptive": ({}, {"sparsity_method": "adaptive"}),
        "adaptive_floor": ({}, {"sparsity_method": "adaptive", "adaptive_row_floor": 0.5}),
        "top_p": ({}, {"sparsity_method": "top_p", "top_p": 0.9}),
        # the library default recipe (4 query / 2 key summaries, adaptive with row floor 0.5)
        "default": ({"q_summaries": 4, "k_summaries": 2}, {"sparsity_method": "adaptive", "adaptive_row_floor": 0.5}),
        # the default with one tf32 pass per product (seerattn_gate_precision="tf32") instead of tf32x3
        "default_tf32": ({"q_summaries": 4, "k_summaries": 2},
                         {"sparsity_method": "adaptive", "adaptive_row_floor": 0.5, "gate_precision": "tf32"}),
        # the default with the products' operands rounded to bf16 (seerattn_gate_precision="bf16")
        "default_bf16": ({"q_summaries": 4, "k_summaries": 2},
                         {"sparsity_method": "adaptive", "adaptive_row_floor": 0.5, "gate_precision": "bf16"}),
        # the same with one block set per GQA group (seerattn_share_gqa_blocks): selection over Hkv heads
        "default_shared": ({"q_summaries": 4, "k_summaries": 2},
                           {"sparsity_method": "adaptive", "adaptive_row_floor": 0.5, "share_gqa_blocks": True}),
    }
    if design not in designs:
        raise SystemExit(f"unknown design {design!r}; known: {', '.join(designs)}")
    kw, sel = designs[design]
    st = SeerAttentionSettings(nz_ratio=0.1, **sel)
    gate = AttnGate(Hq, Hkv, D, **kw).to(device, torch.bfloat16).eval()
    reason = fused_gate.unsupported_reason(gate, st.sparsity_method)
    if reason is not None:
        return f"n/a ({reason})"
    n = math.ceil(S / gate.rope_stride)
    cos, sin = rope(1, n, gate.hidden_size, gate.rope_stride, device)
    return lambda: fused_gate.gate_block_index(gate, q, k, cos, sin, st, return_count=True)


def profile_design(args) -> None:
    """Where one design's time goes: every kernel of `--profile DESIGN` (torch.profiler, 20 calls after
    warm-up), per shape and length, as total device ms per call and launches per call."""
    from torch.profiler import ProfilerActivity, profile

    lines = [f"kernels of the fused gate, design {args.profile!r}, d={args.nz}, {torch.cuda.get_device_name()}, "
             f"torch {torch.__version__}, triton {triton.__version__}", ""]
    out = []
    for name in args.shapes.split(","):
        Hq, Hkv, D = SHAPES[name]
        for S in (int(x) for x in args.seqlens.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, S, Hq, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
            k = torch.randn(1, S, Hkv, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
            call = design_call(args.profile, Hq, Hkv, D, S, q, k, "cuda")
            if isinstance(call, str):
                lines.append(f"{name} S={S}: {call}")
                continue
            for _ in range(5):
                call()
            torch.cuda.synchronize()
            n = 20
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(n):
                    call()
                torch.cuda.synchronize()
            rows = []
            for e in prof.key_averages():
                t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
                if t > 0:
                    rows.append({"kernel": e.key[:70], "ms_per_call": t / 1e3 / n, "launches_per_call": e.count / n})
            rows.sort(key=lambda r: -r["ms_per_call"])
            total = sum(r["ms_per_call"] for r in rows)
            lines += [f"{name} S={S}: {total:.3f} ms of kernels per call", "", "| kernel | ms per call | share | launches per call |",
                      "|---|---|---|---|"]
            lines += [f"| `{r['kernel']}` | {r['ms_per_call']:.3f} | {r['ms_per_call'] / total:.0%} | {r['launches_per_call']:g} |"
                      for r in rows[:15]]
            lines.append("")
            out.append({"shape": name, "S": S, "total_ms": total, "kernels": rows})
            del q, k
            torch.cuda.empty_cache()
    print("\n".join(lines), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "design": args.profile}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": out}, indent=2))
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


def adaptive_bits_sweep(args) -> None:
    """`adaptive` selection per radix digit width: the selection alone on the default design's block
    log-probabilities (random bf16 q/k, random gate), with and without the row floor, next to per-row
    top-k on the same scores, then the whole default design. Kept sets are compared with the first width's."""
    widths = [int(x) for x in args.adaptive_bits.split(",")]
    default_bits = gate_kernel.ADAPTIVE_BITS
    rows, lines = [], [f"adaptive selection per radix digit width, d={args.nz}, {torch.cuda.get_device_name()}, "
                       f"torch {torch.__version__}, triton {triton.__version__} (median ms per layer)", "",
                       "| shape | S | bits | passes | adaptive, floor 0.5 | adaptive, no floor | top-k (same scores) | default design | blocks differing from the first width |",
                       "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in args.shapes.split(","):
        Hq, Hkv, D = SHAPES[name]
        for S in (int(x) for x in args.seqlens.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(1, S, Hq, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
            k = torch.randn(1, S, Hkv, D, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
            nb = math.ceil(S / BS)
            kk = nz_ratio_to_k(args.nz, nb)
            budget = Hq * topk_budget(args.nz, nb)
            # the default design's scores: 4 query / 2 key summaries, the mixture's block log-probabilities
            gate = AttnGate(Hq, Hkv, D, q_summaries=4, k_summaries=2).to("cuda", torch.bfloat16).eval()
            for prm in gate.parameters():
                prm.data.normal_(0, 0.05)
            cos, sin = rope(1, math.ceil(S / gate.rope_stride), gate.hidden_size, gate.rope_stride, "cuda")
            with torch.no_grad():
                scores = fused_gate._scores(gate, q, k, cos, sin, fill_upper=False)
            topk_ms = bench(lambda: gate_select(scores, "nz_ratio", kk, return_count=True))
            ref = None
            for bits in widths:
                gate_kernel.ADAPTIVE_BITS = bits
                sel = lambda fk: gate_select(scores, "adaptive", budget=budget, row_floor_k=fk, return_count=True)  # noqa: E731
                floor_ms, free_ms = bench(lambda: sel(kk // 2)), bench(lambda: sel(0))
                call = design_call("default", Hq, Hkv, D, S, q, k, "cuda")
                design_ms = call if isinstance(call, str) else bench(call)
                idx, cnt = sel(kk // 2)
                slot = torch.arange(idx.shape[-1], device="cuda")
                mask = torch.zeros(1, Hq, nb, nb + 1, device="cuda", dtype=torch.bool)
                mask.scatter_(-1, torch.where(slot < cnt[..., None], idx.long(), nb), True)
                diff = "-" if ref is None else int((mask[..., :nb] ^ ref).sum())
                ref = mask[..., :nb] if ref is None else ref
                row = {"shape": name, "S": S, "bits": bits, "passes": gate_kernel.adaptive_passes(bits), "adaptive_floor_ms": floor_ms,
                       "adaptive_ms": free_ms, "topk_ms": topk_ms, "default_design_ms": design_ms, "diff_blocks": diff}  # fmt: skip
                rows.append(row)
                lines.append(f"| {name} | {S} | {bits} | {row['passes']} | {floor_ms:.3f} | {free_ms:.3f} | {topk_ms:.3f} | "
                             f"{fmt(design_ms)} | {diff} |")
                print(f"[bench_gate] {json.dumps(row)}", flush=True)
            gate_kernel.ADAPTIVE_BITS = default_bits
            del q, k, scores, ref, mask
            torch.cuda.empty_cache()
    print("\n".join(lines), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "nz": args.nz}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


def mixture_sweep(args) -> None:
    """Time `gate_mixture_scores` (4 query / 2 key summaries) per tile, warps, stages and precision."""
    import itertools

    rows_out, t_start = [], time.time()
    cands = list(itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3), ("tf32x3", "tf32", "bf16")))
    for name in args.shapes.split(","):
        Hq, Hkv, D = SHAPES[name]
        for S in (int(x) for x in args.seqlens.split(",")):
            nb = math.ceil(S / BS)
            g = torch.Generator(device="cuda").manual_seed(0)
            qg = torch.randn(1, Hq, 4 * nb, D, device="cuda", generator=g)
            kg = torch.randn(1, Hkv, 2 * nb, D, device="cuda", generator=g)
            ref = gate_mixture_scores(qg, kg, 4, 2, nb, precision="tf32x3", tile=gate_kernel.MIXTURE_TILE_SMALL)
            # compare the causal triangle only: without fill_upper the rest of the output is never written
            tri = torch.ones(nb, nb, dtype=torch.bool, device="cuda").tril()
            fin = ref.isfinite() & tri
            for rows, cols, warps, stages, prec in cands:
                if time.time() - t_start > args.budget_s:
                    break
                tile = (rows, cols, warps, stages)
                rec = {"shape": name, "S": S, "rows": rows, "cols": cols, "warps": warps, "stages": stages, "precision": prec}
                try:
                    out = gate_mixture_scores(qg, kg, 4, 2, nb, precision=prec, tile=tile)
                    same_inf = bool(torch.equal(out.isfinite() & tri, fin))
                    rec["max_abs_diff"] = float((out[fin] - ref[fin]).abs().max()) if same_inf else float("inf")
                    rec["ms"] = bench(lambda: gate_mixture_scores(qg, kg, 4, 2, nb, precision=prec, tile=tile))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory / registers
                    rec["ms"] = f"failed: {type(e).__name__}"
                rows_out.append(rec)
                print(f"[mixture] {json.dumps(rec)}", flush=True)
            del qg, kg, ref
            torch.cuda.empty_cache()
    lines = [f"gate_mixture_scores (4/2 summaries), {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__}; 'small' = the tile {gate_kernel.MIXTURE_TILE_SMALL}", "",
             "| shape | S | small tile ms | best ms | best (rows, cols, warps, stages, precision) | max abs diff |", "|---|---|---|---|---|---|"]
    for name in args.shapes.split(","):
        for S in (int(x) for x in args.seqlens.split(",")):
            ok = [r for r in rows_out if r["shape"] == name and r["S"] == S and isinstance(r["ms"], float)]
            if not ok:
                continue
            d = next((r["ms"] for r in ok if (r["rows"], r["cols"], r["warps"], r["stages"]) == gate_kernel.MIXTURE_TILE_SMALL
                      and r["precision"] == "tf32x3"), float("nan"))
            b = min(ok, key=lambda r: r["ms"])
            lines.append(f"| {name} | {S} | {d:.3f} | {b['ms']:.3f} | {b['rows']}, {b['cols']}, {b['warps']}, {b['stages']}, "
                         f"{b['precision']} | {b['max_abs_diff']:.2e} |")
    print("\n".join(lines), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=2))
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


def fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama8b,smollm2")
    p.add_argument("--seqlens", default="8192,32768,131072")
    p.add_argument("--compile-seqlens", default="32768", help="lengths at which torch.compile is timed ('' = none)")
    p.add_argument("--nz", type=float, default=0.1)
    p.add_argument("--designs", default="default,nq4,nq4nk2,adaptive,top_p", help="other fused designs to time ('' = none)")
    p.add_argument("--out", default="benchmarks/results/bench_gate.json")
    p.add_argument("--mixture-sweep", action="store_true", help="only sweep the mixture scoring kernel's launch settings")
    p.add_argument("--budget-s", type=float, default=240.0, help="--mixture-sweep: stop starting new candidates after this")
    p.add_argument("--profile", default=None, metavar="DESIGN",
                   help="only profile this design's kernels (e.g. default): where its time goes, per kernel")
    p.add_argument("--adaptive-bits", default=None, metavar="BITS",
                   help="only time the adaptive selection per radix digit width, e.g. 10,8,6,5 (first = reference)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gate.py needs a CUDA GPU")
    if args.mixture_sweep:
        return mixture_sweep(args)
    if args.profile:
        return profile_design(args)
    if args.adaptive_bits:
        return adaptive_bits_sweep(args)
    args.compile_seqlens = {int(x) for x in args.compile_seqlens.split(",") if x}
    args.designs = [d for d in args.designs.split(",") if d]
    rows = []
    for name in args.shapes.split(","):
        for S in (int(x) for x in args.seqlens.split(",")):
            t0 = time.time()
            rows.append(run(name, S, args, "cuda"))
            row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}
            print(f"[bench_gate] {name} S={S} done in {time.time() - t0:.0f}s: {json.dumps(row)}", flush=True)
            torch.cuda.empty_cache()
    cols = ["twin", "twin_graph", "compiled", "fused", "fused_graph", "fused_ieee", "fused_tf32", "fused_d0.5", "fused_thr",
            "sum", "kg", "score", "select"] + [c for d in args.designs for c in (f"fused_{d}", f"fused_{d}_graph")] \
        + ["diff", "real_diff"]  # fmt: skip
    lines = [f"gate + selection per layer, d={args.nz}, {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton.__version__} (ms)", "",
             "| shape | S | " + " | ".join(cols) + " | twin/fused |", "|" + "---|" * (len(cols) + 3)]  # fmt: skip
    for r in rows:
        sp = r["twin"] / r["fused"] if isinstance(r["fused"], float) else float("nan")
        lines.append(f"| {r['shape']} | {r['S']} | " + " | ".join(fmt(r.get(c, "-")) for c in cols) + f" | {sp:.1f}x |")
    lines += ["", "Issue 11 targets (gate + selection per layer):"]
    for (name, S), target in TARGETS.items():
        r = next((r for r in rows if r["shape"] == name and r["S"] == S), None)
        if r is not None and isinstance(r["fused"], float):
            verdict = "met" if r["fused"] <= target else "missed"
            graph = fmt(r["fused_graph"])
            lines.append(f"  {name} S={S}: fused {r['fused']:.3f} ms (graph {graph}), target <= {target} ms: {verdict}")
        for d in (d for d in args.designs if d.startswith("default") and r is not None):
            t, tg = r.get(f"fused_{d}"), r.get(f"fused_{d}_graph")
            if isinstance(t, float):
                best = min(x for x in (t, tg) if isinstance(x, float))
                lines.append(f"  {name} S={S}: design {d} {t:.3f} ms (graph {fmt(tg)}), target <= {target} ms: "
                             f"{'met' if best <= target else 'missed'}")
    print("\n" + "\n".join(lines), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
