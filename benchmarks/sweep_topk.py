"""Time every TopK forward variant against FlexAttention in one run (GPU) and name the best per head_dim.

Usage (GPU, about 5-7 minutes on an H100; prints progress, then the tables):
    python benchmarks/sweep_topk.py
    python benchmarks/sweep_topk.py --full                  # more launch configs (adds ~1 min)
    python benchmarks/sweep_topk.py --variants 'row|pair'   # regex on variant names
    python benchmarks/sweep_topk.py --seqlens 32768 --budget-s 200

What it does:
1. checks every variant (``block_sparse_attn_topk(config=...)``) against the PyTorch twin on a small
   bf16 shape (S=1040, Hq 8 / Hkv 2, variable counts with empty/full/diagonal-only rows; the same
   compiled kernels as the timed shapes) and drops a variant that fails or does not compile,
   saying why;
2. per cell (S in 32k/128k, D 128 = Llama-8B 32/8 heads and D 64 = SmolLM2 9/3 heads, density
   0.1/0.5; most important cells first) times, on one random 64-block causal mask (diagonal and
   block 0 kept, rows of unequal length as the causal triangle gives):
   - each variant's attention kernel alone (lists planned outside the timed call) and the plan
     (list canonicalisation; pair merging) separately;
   - the current library default and the legacy kernel as full calls;
   - Flex64 (same mask, ``BLOCK_M = BLOCK_N = 64``) and Flex128 (random 128-block mask of the same
     nominal density, default options); cuDNN dense at 32k as the per-block throughput anchor;
   - the pair variants' wasted fraction (half-tiles computed for a row that does not keep the
     block) on that random mask and on a gate-like correlated mask (``correlated_block_mask``),
     and their time on the correlated mask next to the row kernel's;
   - with ``--gqa`` (default): a mask with one block set per GQA group (``seerattn_share_gqa_blocks``),
     where the two-head ``headpair`` tile wastes nothing: Flex64, the row kernel and ``headpair`` on it;
3. prints one table per head_dim and a summary: per variant, the geometric mean over the cells of
   Flex64 / (plan + kernel), Flex128 / (plan + kernel) and Flex64 / kernel; the best variant per
   head_dim (by the first), and the ``TOPK_FWD_CONFIG`` entry to paste into
   ``seer_attn/kernels/block_sparse_attn_topk.py``.

Timing: median of CUDA-event timings of back-to-back calls after one warm-up call (no L2 flush;
the same for every column), about ``--target-ms`` per measurement (at least 3 calls). A global
``--budget-s`` skips the remaining cells (tables are printed with what ran). JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time

import torch
import triton

from seer_attn.kernels import block_sparse_attn_topk as topk_mod
from seer_attn.kernels.block_mask import block_density, mask_to_kv_blocks
from seer_attn.kernels.naive import block_sparse_attn_topk_naive

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import SHAPES, correlated_block_mask, flex_block_mask, random_block_mask, topk_flops  # noqa: E402

BS = 64
T0 = time.time()
# --dry-run: tiny shapes on the CPU under TRITON_INTERPRET=1, to test this script without a GPU
DEV = "cuda"
CHECK_S = 1040


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


def variants(full: bool) -> dict[str, dict]:
    """name -> config for `block_sparse_attn_topk(config=...)`; `risky` ones only with --risky."""
    v = {
        "row_w4s3": dict(kernel="row", num_warps=4, num_stages=3),
        "row_w4s2": dict(kernel="row", num_warps=4, num_stages=2),
        "row_w8s3": dict(kernel="row", num_warps=8, num_stages=3),
        "row_nj2_w4s3": dict(kernel="row", nj=2, num_warps=4, num_stages=3),
        "row_pers2_lpt1_w4s3": dict(kernel="row", persistent=2, lpt=1, num_warps=4, num_stages=3),
        "row_pers2_lpt2_w4s3": dict(kernel="row", persistent=2, lpt=2, num_warps=4, num_stages=3),
        "row_tma_w4s3": dict(kernel="row", tma=True, num_warps=4, num_stages=3),
        "row_tma_pers2_lpt1_w4s3": dict(kernel="row", tma=True, persistent=2, lpt=1, num_warps=4, num_stages=3),
        "dual_w4s3": dict(kernel="dual", num_warps=4, num_stages=3),
        "dual_w4s2": dict(kernel="dual", num_warps=4, num_stages=2),
        "dual_tma_w4s3": dict(kernel="dual", tma=True, num_warps=4, num_stages=3),
        "dual_tma_pers1_lpt1_w4s3": dict(kernel="dual", tma=True, persistent=1, lpt=1, num_warps=4, num_stages=3),
        "pair_w8s3": dict(kernel="pair", num_warps=8, num_stages=3),
        "pair_w8s2": dict(kernel="pair", num_warps=8, num_stages=2),
        "pair_pers1_lpt1_w8s3": dict(kernel="pair", persistent=1, lpt=1, num_warps=8, num_stages=3),
        "pair_tma_w8s3": dict(kernel="pair", tma=True, num_warps=8, num_stages=3),
        "headpair_w8s3": dict(kernel="headpair", num_warps=8, num_stages=3),
        "row_ws_w4s3": dict(kernel="row", ws=True, num_warps=4, num_stages=3, risky=True),
        "pair_tma_ws_w8s3": dict(kernel="pair", tma=True, ws=True, num_warps=8, num_stages=3, risky=True),
    }
    if full:
        v.update({
            "row_w4s4": dict(kernel="row", num_warps=4, num_stages=4),
            "row_nj2_w8s3": dict(kernel="row", nj=2, num_warps=8, num_stages=3),
            "row_lpt1_w4s3": dict(kernel="row", lpt=1, num_warps=4, num_stages=3),
            "dual_w8s2": dict(kernel="dual", num_warps=8, num_stages=2),
            "pair_w4s3": dict(kernel="pair", num_warps=4, num_stages=3),
            "headpair_tma_w8s3": dict(kernel="headpair", tma=True, num_warps=8, num_stages=3),
        })
    return v


def cfg_of(c: dict) -> dict:
    return {k: val for k, val in c.items() if k != "risky"}


def timeit(fn, target_ms: float) -> float:
    """Median ms of back-to-back calls after one warm-up, about `target_ms` in total (3 to 100 calls)."""
    if DEV == "cpu":
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    fn()
    e.record()
    torch.cuda.synchronize()
    est = s.elapsed_time(e)
    n = int(min(100, max(3, target_ms / max(est, 1e-3))))
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    ts = sorted(a.elapsed_time(b) for a, b in ev)
    return ts[len(ts) // 2]


def check_variant(name: str, cfg: dict, D: int) -> str | None:
    """None if the variant matches the twin on a small bf16 shape, else why not."""
    torch.manual_seed(0)
    B, Hq, Hkv, S = 1, 8, 2, CHECK_S
    nb = math.ceil(S / BS)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float16
    q, k, v = (torch.randn(B, h, S, D, device=DEV, dtype=dt) for h in (Hq, Hkv, Hkv))
    rows = torch.arange(nb, device=DEV)
    mask = random_block_mask(B, Hq, nb, 0.3, DEV)
    kind = (rows[None, None, :] + torch.arange(Hq, device=DEV)[None, :, None]) % 5
    mask = torch.where((kind == 1)[..., None], torch.ones_like(mask), mask)
    mask = torch.where((kind == 2)[..., None], torch.eye(nb, dtype=torch.bool, device=DEV), mask)
    mask = torch.where((kind == 0)[..., None], torch.zeros_like(mask), mask).tril()
    num, idx = mask_to_kv_blocks(mask)
    try:
        out = topk_mod.block_sparse_attn_topk(q, k, v, idx, block_count=num, config=cfg)
        if DEV == "cuda":
            torch.cuda.synchronize()
    except Exception as ex:  # noqa: BLE001 - report any compile/launch failure and move on
        return f"{type(ex).__name__}: {str(ex).splitlines()[0][:200] if str(ex) else ''}"
    ref = block_sparse_attn_topk_naive(q.double(), k.double(), v.double(), idx, block_count=num)
    low = block_sparse_attn_topk_naive(q, k, v, idx, upcast=False, block_count=num)
    if out.isnan().any():
        return "NaN in output"
    err = (out.double() - ref).abs().max().item()
    bound = 2 * (low.double() - ref).abs().max().item() + 1e-3
    return None if err <= bound else f"max err {err:.3e} > bound {bound:.3e}"


def pair_waste(plan: dict) -> float:
    """Fraction of the pair kernel's half-tiles spent on a row that does not keep the block."""
    kept = plan["num"].sum().item()
    tiles = 2 * plan["u_num"].sum().item()
    return 1.0 - kept / max(1, tiles)


def run_cell(name: str, S: int, d: float, vs: dict, flex, args, default_cfg: dict) -> dict:
    Hq, Hkv, D = SHAPES[name]
    G = Hq // Hkv
    nb = math.ceil(S / BS)
    torch.manual_seed(0)
    dt = torch.bfloat16 if DEV == "cuda" else torch.float16
    q = torch.randn(1, Hq, S, D, device=DEV, dtype=dt)
    k = torch.randn(1, Hkv, S, D, device=DEV, dtype=dt)
    v = torch.randn(1, Hkv, S, D, device=DEV, dtype=dt)
    scale = 1.0 / math.sqrt(D)
    mask = random_block_mask(1, Hq, nb, d, DEV)
    kmax = int(mask.sum(-1).max())
    num, idx = mask_to_kv_blocks(mask, max_blocks=kmax)
    flops = topk_flops(mask, D)
    cell = {"shape": name, "S": S, "D": D, "density": d, "real_density": round(block_density(mask), 4), "ms": {}, "plan_ms": {}}
    tm = args.target_ms

    def put(key, fn):
        try:
            cell["ms"][key] = timeit(fn, tm)
        except Exception as ex:  # noqa: BLE001
            log(f"  {key}: failed: {type(ex).__name__}: {str(ex).splitlines()[0][:160] if str(ex) else ''}")

    if flex is not None:
        bm = flex_block_mask(mask, S)
        opts = {"BLOCK_M": 64, "BLOCK_N": 64}
        t = time.time()
        put("flex64", lambda: flex(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts))
        log(f"  flex64 {cell['ms'].get('flex64', float('nan')):.3f} ms ({time.time() - t:.0f}s incl. compile)")
        del bm
        mask128 = random_block_mask(1, Hq, math.ceil(S / 128), d, DEV)
        cell["real_density_128"] = round(block_density(mask128), 4)
        bm = flex_block_mask(mask128, S, 128)
        t = time.time()
        put("flex128", lambda: flex(q, k, v, block_mask=bm, enable_gqa=True))
        log(f"  flex128 {cell['ms'].get('flex128', float('nan')):.3f} ms ({time.time() - t:.0f}s incl. compile)")
        cell["flex128_tflops"] = topk_flops(mask128, D, 128) / cell["ms"]["flex128"] * 1e-9 if "flex128" in cell["ms"] else None
        del bm, mask128
    if S <= 32768 and args.cudnn and DEV == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        put("cudnn_dense", cudnn)

    # full calls: the library default and the legacy kernel, list handling included
    put("default_full", lambda: topk_mod.block_sparse_attn_topk(q, k, v, idx, block_count=num, config=default_cfg))
    put("legacy_full", lambda: topk_mod.block_sparse_attn_topk(q, k, v, idx, block_count=num, config={"kernel": "legacy"}))

    corr = {}
    for vname, c in vs.items():
        try:
            cfg = topk_mod.resolve_config(D, BS, cfg_of(c))
            if cfg["kernel"] == "headpair" and G % 2:
                continue
            plan = topk_mod.plan_topk_fwd(idx, num, nb, G, cfg)
            pkey = f"{cfg['kernel']}{'_lpt' if cfg['lpt'] else ''}"
            if pkey not in cell["plan_ms"]:
                cell["plan_ms"][pkey] = timeit(lambda: topk_mod.plan_topk_fwd(idx, num, nb, G, cfg), tm)
            cell.setdefault("plan_of", {})[vname] = pkey
            put(vname, lambda: topk_mod.launch_topk_fwd(q, k, v, plan, scale, BS, cfg))
            if cfg["kernel"] in ("pair", "headpair") and f"waste_{cfg['kernel']}" not in cell:
                cell[f"waste_{cfg['kernel']}"] = round(pair_waste(plan), 4)
                # same kernel on a gate-like mask, next to the row kernel on it
                if not corr:
                    cmask = correlated_block_mask(1, Hq, nb, d, DEV, group=G)
                    cell["real_density_corr"] = round(block_density(cmask), 4)
                    corr["num"], corr["idx"] = mask_to_kv_blocks(cmask, max_blocks=int(cmask.sum(-1).max()))
                    cnum, cidx = corr["num"], corr["idx"]
                    del cmask
                    rcfg = topk_mod.resolve_config(D, BS, {"kernel": "row"})
                    rplan = topk_mod.plan_topk_fwd(cidx, cnum, nb, G, rcfg)
                    put("corr:row_w4s3", lambda: topk_mod.launch_topk_fwd(q, k, v, rplan, scale, BS, rcfg))
                    del rplan
                cplan = topk_mod.plan_topk_fwd(corr["idx"], corr["num"], nb, G, cfg)
                cell[f"waste_{cfg['kernel']}_corr"] = round(pair_waste(cplan), 4)
                put(f"corr:{vname}", lambda: topk_mod.launch_topk_fwd(q, k, v, cplan, scale, BS, cfg))
                del cplan
            del plan
        except Exception as ex:  # noqa: BLE001 - a plan or kernel that fails here is reported, the rest goes on
            log(f"  {vname}: failed: {type(ex).__name__}: {str(ex).splitlines()[0][:160] if str(ex) else ''}")
    if G > 1 and args.gqa:
        # one block set per GQA group (seerattn_share_gqa_blocks): the heads of a group keep the same blocks,
        # so the two-head tile wastes nothing; Flex64 and the default row kernel on the same mask beside it
        gmask = random_block_mask(1, Hkv, nb, d, DEV).repeat_interleave(G, dim=1)
        cell["real_density_gqa"] = round(block_density(gmask), 4)
        gnum, gidx = mask_to_kv_blocks(gmask, max_blocks=int(gmask.sum(-1).max()))
        if flex is not None:
            gbm = flex_block_mask(gmask, S)
            put("gqa:flex64", lambda: flex(q, k, v, block_mask=gbm, enable_gqa=True, kernel_options={"BLOCK_M": 64, "BLOCK_N": 64}))
            del gbm
        for vname, c in (("gqa:row_tma_w4s3", dict(kernel="row", tma=True, num_warps=4, num_stages=3)),
                         ("gqa:headpair_tma_w8s3", dict(kernel="headpair", tma=True, num_warps=8, num_stages=3)),
                         ("gqa:headpair_w8s3", dict(kernel="headpair", num_warps=8, num_stages=3))):
            if c["kernel"] == "headpair" and G % 2:
                continue
            try:
                gcfg = topk_mod.resolve_config(D, BS, c)
                gplan = topk_mod.plan_topk_fwd(gidx, gnum, nb, G, gcfg)
                if c["kernel"] == "headpair":
                    cell["waste_headpair_gqa"] = round(pair_waste(gplan), 4)
                put(vname, lambda: topk_mod.launch_topk_fwd(q, k, v, gplan, scale, BS, gcfg))
                del gplan
            except Exception as ex:  # noqa: BLE001
                log(f"  {vname}: failed: {type(ex).__name__}: {str(ex).splitlines()[0][:160] if str(ex) else ''}")
        del gmask, gnum, gidx
    cell["tflops"] = {key: flops / ms * 1e-9 for key, ms in cell["ms"].items() if not key.startswith(("flex128", "corr:", "cudnn", "gqa:"))}
    # pair kernels on the tiles they compute (kept + wasted): their time on a mask with waste w is
    # about this time * (1 - w_random) / (1 - w)
    cell["tile_tflops"] = {
        key: t / (1.0 - cell[f"waste_{vs[key]['kernel']}"])
        for key, t in cell["tflops"].items()
        if key in vs and vs[key]["kernel"] in ("pair", "headpair") and f"waste_{vs[key]['kernel']}" in cell
    }
    cell["kept_blocks"] = int(mask.sum())
    return cell


def fmt(x, nd=3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def tables(cells: list[dict]) -> str:
    out = []
    for D in sorted({c["D"] for c in cells}, reverse=True):
        cs = [c for c in cells if c["D"] == D]
        keys = []
        for c in cs:
            keys += [key for key in c["ms"] if key not in keys]
        head = [f"{c['S'] // 1024}k d{c['density']} ({c['real_density']:.3f})" for c in cs]
        out += [f"\n### D={D} ({cs[0]['shape']}): ms, then Flex64/variant and Flex128/variant (>1: variant faster)\n"]
        out += ["| variant | " + " | ".join(head) + " |", "|---|" + "---|" * len(cs)]
        for key in keys:
            cells_txt = []
            for c in cs:
                ms = c["ms"].get(key)
                if ms is None:
                    cells_txt.append("-")
                    continue
                f64, f128 = c["ms"].get("flex64"), c["ms"].get("flex128")
                rat = "" if key.startswith(("flex", "cudnn")) else f" {fmt(f64 / ms if f64 else None, 2)}/{fmt(f128 / ms if f128 else None, 2)}"
                cells_txt.append(f"{ms:.4g}{rat}")
            out.append(f"| {key} | " + " | ".join(cells_txt) + " |")
        out.append("| TFLOP/s per kept block, best kernel | " + " | ".join(
            fmt(max((t for key, t in c["tflops"].items() if key not in ("flex64",)), default=None), 0) for c in cs) + " |")
        out.append("| Flex64 / Flex128 TFLOP/s | " + " | ".join(
            f"{fmt(c['tflops'].get('flex64'), 0)} / {fmt(c.get('flex128_tflops'), 0)}" for c in cs) + " |")
        out.append("| plan ms (row / row_lpt / dual / pair / headpair) | " + " | ".join(
            " / ".join(fmt(c["plan_ms"].get(p)) for p in ("row", "row_lpt", "dual", "pair", "headpair")) for c in cs) + " |")
        out.append("| pair waste random / correlated (real d) | " + " | ".join(
            f"{fmt(c.get('waste_pair'))} / {fmt(c.get('waste_pair_corr'))} ({fmt(c.get('real_density_corr'))})" for c in cs) + " |")
        out.append("| headpair waste random / correlated | " + " | ".join(
            f"{fmt(c.get('waste_headpair'))} / {fmt(c.get('waste_headpair_corr'))}" for c in cs) + " |")
        out.append("| Flex128 mask real d | " + " | ".join(fmt(c.get("real_density_128")) for c in cs) + " |")
        if any("real_density_gqa" in c for c in cs):
            out.append("| gqa: (one block set per GQA group) mask real d, headpair waste | " + " | ".join(
                f"{fmt(c.get('real_density_gqa'))}, {fmt(c.get('waste_headpair_gqa'))}" for c in cs) + " |")
        out.append("| pair kernels, TFLOP/s on computed tiles (best) | " + " | ".join(
            fmt(max(c.get("tile_tflops", {}).values(), default=None), 0) for c in cs) + " |")
    return "\n".join(out)


def summary(cells: list[dict], vs: dict) -> tuple[str, dict]:
    """Per head_dim: variants ranked by the geometric mean over the cells of Flex64 / (plan + kernel)."""
    lines, best = [], {}

    def gmean(xs):
        return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")

    for D in sorted({c["D"] for c in cells}, reverse=True):
        cs = [c for c in cells if c["D"] == D]
        rank = []
        for key in vs:
            if not all(key in c["ms"] and "flex64" in c["ms"] for c in cs):
                continue
            tot = [c["ms"][key] + c["plan_ms"][c["plan_of"][key]] for c in cs]
            g64 = gmean([c["ms"]["flex64"] / t for c, t in zip(cs, tot)])
            g128 = gmean([c["ms"]["flex128"] / t for c, t in zip(cs, tot) if "flex128" in c["ms"]])
            a64 = gmean([c["ms"]["flex64"] / c["ms"][key] for c in cs])
            rank.append((g64, g128, a64, key))
        rank.sort(reverse=True)
        lines.append(f"\nD={D}, geometric mean over {len(cs)} cells: Flex64/(plan+kernel), Flex128/(plan+kernel), Flex64/kernel")
        for g64, g128, a64, key in rank:
            lines.append(f"  {key:26s} {g64:.2f} {g128:.2f} {a64:.2f}")
        for ref in ("default_full", "legacy_full"):
            if all(ref in c["ms"] and "flex64" in c["ms"] for c in cs):
                lines.append(f"  {ref + ' (full call)':26s} {gmean([c['ms']['flex64'] / c['ms'][ref] for c in cs]):.2f}")
        if rank:
            best[D] = cfg_of(vs[rank[0][3]])
            lines.append(f"  best: {rank[0][3]}")
    lines.append("\nTOPK_FWD_CONFIG = {")
    for D in sorted(best):
        lines.append(f"    {D}: dict({', '.join(f'{k}={v!r}' for k, v in best[D].items())}),")
    lines.append("}")
    return "\n".join(lines), best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="32768,131072")
    ap.add_argument("--densities", default="0.1,0.5")
    ap.add_argument("--shapes", default="llama8b,smollm2")
    ap.add_argument("--variants", default="", help="regex on variant names (default: all)")
    ap.add_argument("--full", action="store_true", help="more launch configs")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--risky", action="store_true",
                    help="also warp-specialised variants (Triton documents them for Blackwell; a compiler crash would end the run)")
    ap.add_argument("--cudnn", action=argparse.BooleanOptionalAction, default=True, help="cuDNN dense at 32k")
    ap.add_argument("--gqa", action=argparse.BooleanOptionalAction, default=True,
                    help="also time a mask with one block set per GQA group (gqa: rows)")
    ap.add_argument("--target-ms", type=float, default=250.0, help="time spent per measurement")
    ap.add_argument("--budget-s", type=float, default=360.0, help="start no new cell after this many seconds")
    ap.add_argument("--out", default="benchmarks/results/sweep_topk.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET=1, tiny shapes: tests the script")
    args = ap.parse_args()

    global DEV, CHECK_S
    if args.dry_run:
        DEV, CHECK_S = "cpu", 200
        SHAPES.update(llama8b=(8, 2, 128), smollm2=(6, 2, 64))
    torch._dynamo.config.cache_size_limit = 64
    gpu = torch.cuda.get_device_properties(0).name if DEV == "cuda" else "cpu (dry run)"
    log(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, TMA usable: "
        f"{topk_mod._use_tma(torch.empty(8, 64, device=DEV, dtype=torch.bfloat16))}")
    vs = variants(args.full)
    if args.variants:
        vs = {k: c for k, c in vs.items() if re.search(args.variants, k)}
    if not args.risky:
        vs = {k: c for k, c in vs.items() if not c.get("risky")}
    shapes = args.shapes.split(",")
    Ds = sorted({SHAPES[s][2] for s in shapes}, reverse=True)

    # 1. correctness (also compiles every kernel)
    ok = {D: {} for D in Ds}
    for vname, c in vs.items():
        for D in Ds:
            if c["kernel"] == "headpair" and all((SHAPES[n][0] // SHAPES[n][1]) % 2 for n in shapes if SHAPES[n][2] == D):
                continue
            t = time.time()
            why = check_variant(vname, cfg_of(c), D)
            log(f"check D={D} {vname:28s} {'ok' if why is None else 'SKIPPED: ' + why} ({time.time() - t:.1f}s)")
            if why is None:
                ok[D][vname] = c
    default = {D: topk_mod.resolve_config(D, BS) for D in Ds}
    log(f"library default now: {default}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__,
        "triton": triton.__version__, "command": " ".join(["python"] + sys.argv),
        "variants": {k: cfg_of(c) for k, c in vs.items()},
        "failed_checks": {D: sorted(set(vs) - set(ok[D])) for D in Ds},
    }

    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False) if DEV == "cuda" else flex_attention

    # 2. cells, most important first: 32k before 128k, D=128 and d 0.1 first
    order = []
    for S in map(int, args.seqlens.split(",")):
        for d in map(float, args.densities.split(",")):
            for name in shapes:
                order.append((S, d, name))
    order.sort(key=lambda x: (x[0], x[1] != 0.1, SHAPES[x[2]][2] != 128))
    cells = []
    for S, d, name in order:
        if time.time() - T0 > args.budget_s:
            log(f"budget spent: skipping {name} S={S} d={d}")
            continue
        D = SHAPES[name][2]
        log(f"cell {name} S={S} d={d} ({len(ok[D])} variants)")
        cells.append(run_cell(name, S, d, ok[D], flex, args, default[D]))
        c = cells[-1]
        top = sorted((ms, key) for key, ms in c["ms"].items() if not key.startswith(("flex", "cudnn", "corr:")))[:3]
        log(f"  done: Flex64 {fmt(c['ms'].get('flex64'))} Flex128 {fmt(c['ms'].get('flex128'))} ms; fastest: "
            + ", ".join(f"{key} {ms:.3f}" for ms, key in top))
        # saved after every cell, so a run cut short keeps what it measured
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "cells": cells}, f, indent=1)
        if DEV == "cuda":
            torch.cuda.empty_cache()

    text = tables(cells)
    summ, best = summary(cells, {k: c for D in Ds for k, c in ok[D].items()})
    print(text)
    print(summ, flush=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "cells": cells, "best": {str(D): c for D, c in best.items()}}, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(f"{meta['date']}, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}: `{meta['command']}`\n")
        f.write(text + "\n\n```\n" + summ + "\n```\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
