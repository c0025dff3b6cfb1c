"""One-run sweep of the CSR kernel's variants and of `attn_with_pooling` against SDPA-flash and Flex.

Usage (GPU, about 6 minutes on an H100, most of it compiling):
    PYTHONPATH=$PWD python benchmarks/sweep_csr.py                          # everything, JSON to benchmarks/results/
    PYTHONPATH=$PWD python benchmarks/sweep_csr.py --only csr flex          # sections: check, csr, pool, flex, sdpa
    PYTHONPATH=$PWD python benchmarks/sweep_csr.py --shapes llama8b --densities 0.1
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/sweep_csr.py --smoke   # CPU self-test of this script

What it does, per shape (llama8b: Hq 32 / Hkv 8 / D 128; smollm2: 9 / 3 / 64; B=1, bf16, causal, S=32k):
1. correctness first (S=1000, d 0.5): every CSR variant forward and backward, and attn_with_pooling
   with every pooling tile, against an fp32 reference (SDPA math with the token mask / the naive
   twin); a variant fails when its error exceeds 2x that of bf16 SDPA on the same inputs (+1e-3);
   failed variants are not timed;
2. times (median ms, `triton.testing.do_bench`): SDPA-flash fwd and fwd+bwd; per density, Flex128
   fwd+bwd (`torch.compile(flex_attention)`, a 128x128 BlockMask of the same nominal density, Flex's
   own tiles) and Flex64 fwd (our exact 64x64 mask, 64x64 tiles); CSR fwd and fwd+bwd per backward
   variant, mask in (lists built inside, as the model calls it) and with the lists prebuilt (as Flex's
   BlockMask is); attn_with_pooling as shipped (autotuned), its first pass alone, and its pooling
   pass per tile config.
Prints a table per shape, the fastest variants, the `_CONFIGS` / `POOL_LAUNCH` edits that make them the
defaults, and writes everything to JSON.

Masks: random blocks of the causal block triangle at the density, diagonal and first block kept (the
same recipe at 64 and 128 granularity); realised densities are reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import triton
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seer_attn.kernels import attn_pooling_kernel as pool_mod
from seer_attn.kernels import block_sparse_attn_csr as csr_mod
from seer_attn.kernels.block_mask import block_density, expand_block_mask
from seer_attn.kernels.naive import attn_with_pooling_naive

SHAPES = {"llama8b": (32, 8, 128), "smollm2": (9, 3, 64)}
T0 = time.time()
DEVICE = "cuda"
CHECK_S = 1000

# backward variants: (name, dq MODE, KEY_BLOCKS, BLOCK_M, num_warps, num_stages), per head_dim. Compiled
# for sm_90 with triton 3.6 on a CPU machine: at D=128 the 4-warp dK/dV variants spill registers
# (kept as references: 4 warps was the old default), the 8-warp ones do not (KB2: 64 bytes).
BWD_VARIANTS = {
    128: [
        ("atomic-kb1-w8", "atomic", 1, 64, 8, 2),
        ("atomic-kb1-w4", "atomic", 1, 64, 4, 2),
        ("atomic-kb1-bm32-w4", "atomic", 1, 32, 4, 2),
        ("atomic-kb2-w8", "atomic", 2, 64, 8, 2),
        ("separate-kb1-w8", "separate", 1, 64, 8, 2),
        ("separate-kb1-w4", "separate", 1, 64, 4, 2),
        ("separate-kb2-w8", "separate", 2, 64, 8, 2),
    ],
    64: [
        ("atomic-kb1-w4", "atomic", 1, 64, 4, 2),
        ("atomic-kb1-w8", "atomic", 1, 64, 8, 2),
        ("atomic-kb1-bm32-w4", "atomic", 1, 32, 4, 2),
        ("atomic-kb2-w8", "atomic", 2, 64, 8, 2),
        ("separate-kb1-w4", "separate", 1, 64, 4, 2),
        ("separate-kb2-w8", "separate", 2, 64, 8, 2),
    ],
}
# forward variants: (name, BLOCK_N, num_warps, num_stages)
FWD_VARIANTS = [("fwd-w4-s2", 64, 4, 2), ("fwd-w4-s3", 64, 4, 3), ("fwd-w8-s2", 64, 8, 2)]
DEFAULT_CONFIGS = copy.deepcopy(csr_mod._CONFIGS)


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.0f}s] {msg}", flush=True)


def bench(fn, grad_to_none=None) -> float:
    if DEVICE == "cpu":  # --smoke: run once, report wall time
        t = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t)
    return triton.testing.do_bench(fn, warmup=20, rep=80, grad_to_none=grad_to_none, return_mode="median")


def random_mask(H, nb, density, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    mask = torch.rand(1, H, nb, nb, generator=g, device=device) < density
    mask |= torch.eye(nb, dtype=torch.bool, device=device)
    mask[..., 0] = True
    return mask & torch.ones(nb, nb, dtype=torch.bool, device=device).tril()


def flex_block_mask(mask: torch.Tensor, S: int, block: int):
    """A bool block mask as a FlexAttention `BlockMask`: kept off-diagonal blocks full, the diagonal partial."""
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
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=causal, seq_lengths=(S, S))


def set_bwd_variant(D, mode, kb, bm, warps, stages):
    csr_mod._CONFIGS["dq"][D] = dict(DEFAULT_CONFIGS["dq"][D], MODE=mode)
    csr_mod._CONFIGS["dkdv"][D] = dict(KEY_BLOCKS=kb, BLOCK_M=bm, num_warps=warps, num_stages=stages)


def set_fwd_variant(D, block_n, warps, stages):
    csr_mod._CONFIGS["fwd"][D] = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)


def restore_configs():
    for name in csr_mod._CONFIGS:
        csr_mod._CONFIGS[name].update(copy.deepcopy(DEFAULT_CONFIGS[name]))


def inputs(HQ, HKV, S, D, grad=False, seed=0):
    torch.manual_seed(seed)
    dt = torch.float16 if DEVICE == "cpu" else torch.bfloat16
    q = torch.randn(1, HQ, S, D, dtype=dt, device=DEVICE, requires_grad=grad)
    k = torch.randn(1, HKV, S, D, dtype=dt, device=DEVICE, requires_grad=grad)
    v = torch.randn(1, HKV, S, D, dtype=dt, device=DEVICE, requires_grad=grad)
    return q, k, v


def fwd_bwd(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return [o.float(), q.grad.float(), k.grad.float(), v.grad.float()]


# ---------------------------------------------------------------- correctness


def check_shape(shape_name, results):
    HQ, HKV, D = SHAPES[shape_name]
    S = CHECK_S
    nb = math.ceil(S / 64)
    q, k, v = inputs(HQ, HKV, S, D, seed=1)
    do = torch.randn_like(q)
    mask = random_mask(HQ, nb, 0.5, DEVICE, seed=2)
    tok = expand_block_mask(mask, S)[0] & torch.ones(S, S, dtype=torch.bool, device=DEVICE).tril()  # [H, S, S]
    G = HQ // HKV

    def sdpa_masked(q, k, v):
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=tok)
        return torch.nan_to_num(out)

    ref = fwd_bwd(sdpa_masked, q.float(), k.float(), v.float(), do.float())
    base = fwd_bwd(sdpa_masked, q, k, v, do)
    bound = [2 * (b - r).abs().max().item() + 1e-3 for b, r in zip(base, ref)]
    ok = {}
    for name, *cfg in BWD_VARIANTS[D]:
        set_bwd_variant(D, *cfg)
        try:
            got = fwd_bwd(lambda q, k, v: csr_mod.block_sparse_attn_csr(q, k, v, mask), q, k, v, do)
            errs = [(g - r).abs().max().item() for g, r in zip(got, ref)]
            ok[name] = all(e <= b for e, b in zip(errs, bound)) and not any(g.isnan().any() for g in got)
            detail = " ".join(f"{n}={e:.1e}/{b:.1e}" for n, e, b in zip(("o", "dq", "dk", "dv"), errs, bound))
        except Exception as e:  # a variant that does not compile or run is reported, not fatal
            ok[name], detail = False, f"{type(e).__name__}: {str(e)[:160]}"
        log(f"check {shape_name} csr {name}: {'ok' if ok[name] else 'FAIL'} ({detail})")
    restore_configs()
    # attention with pooling, every pooling tile: o against the fp32 reference, the map against the twin
    ref_o, ref_p = attn_with_pooling_naive(q.float(), k.float(), v.float())
    dense_base = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float()
    o_bound = 2 * (dense_base - ref_o).abs().max().item() + 1e-3
    for conf in [None] + pool_mod.POOL_CONFIGS:
        label = "autotuned" if conf is None else pool_name(conf)
        pool_mod.POOL_LAUNCH = conf
        try:
            o, p = pool_mod.attn_with_pooling(q, k, v)
            eo, ep = (o.float() - ref_o).abs().max().item(), (p - ref_p).abs().max().item()
            ok[f"pool-{label}"] = eo <= o_bound and ep <= 1e-2 and not p.isnan().any()
            detail = f"o={eo:.1e}/{o_bound:.1e} pooled={ep:.1e}/1e-2"
        except Exception as e:
            ok[f"pool-{label}"], detail = False, f"{type(e).__name__}: {str(e)[:160]}"
        log(f"check {shape_name} pool {label}: {'ok' if ok[f'pool-{label}'] else 'FAIL'} ({detail})")
    pool_mod.POOL_LAUNCH = None
    results.setdefault(shape_name, {})["check"] = ok
    return ok


def pool_name(conf):
    return f"R{conf['R']}C{conf['C']}w{conf['num_warps']}s{conf['num_stages']}"


# ---------------------------------------------------------------- timing


def time_shape(shape_name, S, densities, sections, ok, results):
    HQ, HKV, D = SHAPES[shape_name]
    nb, nb128 = math.ceil(S / 64), math.ceil(S / 128)
    q, k, v = inputs(HQ, HKV, S, D, grad=True)
    do = torch.randn_like(q)
    grads = [q, k, v]
    res = results.setdefault(shape_name, {})
    res.update(S=S, HQ=HQ, HKV=HKV, D=D)
    t = res.setdefault("ms", {})

    def flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEVICE == "cuda" else SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    if "sdpa" in sections:
        with torch.no_grad():
            t["sdpa_flash_fwd"] = bench(lambda: flash(q, k, v))
        t["sdpa_flash_fwdbwd"] = bench(lambda: flash(q, k, v).backward(do), grad_to_none=grads)
        log(f"{shape_name} SDPA-flash fwd {t['sdpa_flash_fwd']:.3f} fwd+bwd {t['sdpa_flash_fwdbwd']:.3f}")

    if "pool" in sections:
        with torch.no_grad():
            pool_mod.POOL_LAUNCH = None
            t["pool_autotuned"] = bench(lambda: pool_mod.attn_with_pooling(q, k, v))
            log(f"{shape_name} attn_with_pooling (autotuned) {t['pool_autotuned']:.3f}")
            # the two passes alone: the flash forward (autotuned) and each pooling-tile config
            scale = 1.4426950408889634 / math.sqrt(D)
            prec = "tf32" if DEVICE == "cuda" else "ieee"
            _, lse = pool_mod._forward_lse(q, k, v, scale, True, None, 1, S, prec)

            def pass1():
                pool_mod._forward_lse(q, k, v, scale, True, None, 1, S, prec)

            t["pool_pass1"] = bench(pass1)
            best = pool_mod.attn_pooling_fwd_kernel.best_config
            res["pool_pass1_config"] = str(best)
            pooled = torch.empty(1, HQ, nb, nb, dtype=torch.float32, device=DEVICE)
            for conf in pool_mod.POOL_CONFIGS:
                label = pool_name(conf)
                if not ok.get(f"pool-{label}", True):
                    continue
                t[f"pool_pass2_{label}"] = bench(lambda: pool_mod._pool(
                    q, k, lse, pooled, lse, lambda x: x.stride(0), (HQ * S, S), scale, S, nb, HQ, HQ // HKV, D, 64,
                    True, False, False, prec, config=conf))
            tuned = pool_mod.attn_pooling_fwd_kernel_pool.best_config
            res["pool_pass2_autotuned_config"] = str(tuned)
            p2 = {k_: v_ for k_, v_ in t.items() if k_.startswith("pool_pass2_")}
            log(f"{shape_name} pool pass 1 {t['pool_pass1']:.3f} ({best}); pass 2: "
                + " ".join(f"{k_[11:]}={v_:.3f}" for k_, v_ in p2.items()))

    flex = None
    if "flex" in sections:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    for density in densities:
        dkey = f"d{density}"
        r = res.setdefault(dkey, {})
        mask = random_mask(HQ, nb, density, DEVICE, seed=S)
        r["density64"] = block_density(mask)
        if flex is not None:
            mask128 = random_mask(HQ, nb128, density, DEVICE, seed=S + 1)
            r["density128"] = block_density(mask128)
            bm128 = flex_block_mask(mask128, S, 128)
            bm64 = flex_block_mask(mask, S, 64)
            try:
                log(f"{shape_name} {dkey}: compiling Flex128 fwd+bwd")
                r["flex128_fwdbwd"] = bench(
                    lambda: flex(q, k, v, block_mask=bm128, enable_gqa=True).backward(do), grad_to_none=grads)
                with torch.no_grad():
                    log(f"{shape_name} {dkey}: compiling Flex64 fwd")
                    opts = {"BLOCK_M": 64, "BLOCK_N": 64}
                    r["flex64_fwd"] = bench(lambda: flex(q, k, v, block_mask=bm64, enable_gqa=True, kernel_options=opts))
                log(f"{shape_name} {dkey} (real {r['density64']:.3f} / 128: {r['density128']:.3f}): Flex128 fwd+bwd "
                    f"{r['flex128_fwdbwd']:.3f}, Flex64 fwd {r['flex64_fwd']:.3f}")
            except Exception as e:  # report and go on: the CSR numbers are the point
                log(f"{shape_name} {dkey}: Flex failed: {type(e).__name__}: {str(e)[:300]}")
        if "csr" not in sections:
            continue
        # list building alone (inside every CSR call below)
        with torch.no_grad():
            r["csr_lists_fwd"] = bench(lambda: csr_mod.build_csr_lists(mask, 1, HQ, nb))
            r["csr_lists_fwd_torch"] = bench(lambda: csr_mod._lists_from_mask(csr_mod._causal_mask(mask, 1, HQ, nb)))
            for kb in (1, 2):
                r[f"csc_lists_kb{kb}"] = bench(lambda: csr_mod.build_csc_lists(mask, 1, HQ, HKV, nb, kb))
                r[f"csc_lists_kb{kb}_torch"] = bench(
                    lambda: csr_mod._csc_lists(csr_mod._causal_mask(mask, 1, HQ, nb), HKV, kb))
        log(f"{shape_name} {dkey} lists (Triton / PyTorch twin): csr {r['csr_lists_fwd']:.3f} / "
            f"{r['csr_lists_fwd_torch']:.3f}, csc kb1 {r['csc_lists_kb1']:.3f} / {r['csc_lists_kb1_torch']:.3f}, "
            f"kb2 {r['csc_lists_kb2']:.3f} / {r['csc_lists_kb2_torch']:.3f}")
        for name, block_n, warps, stages in FWD_VARIANTS:
            set_fwd_variant(D, block_n, warps, stages)
            with torch.no_grad():
                r[f"csr_{name}"] = bench(lambda: csr_mod.block_sparse_attn_csr(q, k, v, mask))
        restore_configs()
        log(f"{shape_name} {dkey} CSR fwd: " + " ".join(f"{n}={r[f'csr_{n}']:.3f}" for n, *_ in FWD_VARIANTS))
        csr_lists = csr_mod.block_sparse_csr_lists(mask, 1, HQ, HKV, key_blocks=1)
        csc_pair = csr_mod.block_sparse_csr_lists(mask, 1, HQ, HKV, key_blocks=2)[1]
        for name, *cfg in BWD_VARIANTS[D]:
            if not ok.get(name, True):
                continue
            set_bwd_variant(D, *cfg)
            r[f"csr_fwdbwd_{name}"] = bench(
                lambda: csr_mod.block_sparse_attn_csr(q, k, v, mask).backward(do), grad_to_none=grads)
            # kernels alone, lists built beforehand (as Flex's BlockMask is)
            csc = csc_pair if cfg[1] == 2 else csr_lists[1]
            r[f"pre_fwdbwd_{name}"] = bench(
                lambda: csr_mod.block_sparse_attn_csr(q, k, v, None, csr=csr_lists[0], csc=csc).backward(do),
                grad_to_none=grads)
            log(f"{shape_name} {dkey} CSR fwd+bwd {name}: {r[f'csr_fwdbwd_{name}']:.3f} "
                f"(lists prebuilt: {r[f'pre_fwdbwd_{name}']:.3f})")
        restore_configs()


# ---------------------------------------------------------------- report


def report(results, densities):
    lines, suggestions = [], []
    for shape_name, res in results.items():
        if "D" not in res:
            continue
        D, t = res["D"], res["ms"]
        lines.append(f"\n## {shape_name} (Hq {res['HQ']} / Hkv {res['HKV']} / D {D}), S={res['S']}")
        if "sdpa_flash_fwd" in t:
            lines.append(f"SDPA-flash fwd {t['sdpa_flash_fwd']:.3f} ms, fwd+bwd {t['sdpa_flash_fwdbwd']:.3f} ms")
        if "pool_autotuned" in t:
            p2 = {k: v for k, v in t.items() if k.startswith("pool_pass2_")}
            best = min(p2, key=p2.get) if p2 else None
            ratio = t["pool_autotuned"] / t["sdpa_flash_fwd"] if "sdpa_flash_fwd" in t else float("nan")
            lines.append(f"attn_with_pooling {t['pool_autotuned']:.3f} ms = {ratio:.3f}x SDPA-flash fwd "
                         f"(pass 1 {t['pool_pass1']:.3f}, pass 2 fastest {best[11:] if best else '-'} "
                         f"{p2[best] if best else float('nan'):.3f}; autotuner picked {res.get('pool_pass2_autotuned_config')})")
            if best:
                conf = next(c for c in pool_mod.POOL_CONFIGS if pool_name(c) == best[11:])
                suggestions.append(f"# {shape_name}: pooling pass fastest = {conf} (autotuned by default; to pin: "
                                   f"seer_attn.kernels.attn_pooling_kernel.POOL_LAUNCH = {conf})")
        lines.append("| d (real 64 / 128) | Flex64 fwd | CSR fwd (best) | Flex128 fwd+bwd | "
                     "CSR fwd+bwd (best variant) | speedup vs Flex128 fwd+bwd | speedup vs flash fwd+bwd |")
        lines.append("|---|---|---|---|---|---|---|")
        totals, fwd_totals = {}, {}
        for density in densities:
            r = res.get(f"d{density}", {})
            fwd = {k[4:]: v for k, v in r.items() if k.startswith("csr_fwd-")}
            fb = {k[11:]: v for k, v in r.items() if k.startswith("csr_fwdbwd_")}
            for k_, v_ in fb.items():
                totals[k_] = totals.get(k_, 0.0) + v_ / max(r.get("flex128_fwdbwd", 1.0), 1e-9)
            for k_, v_ in fwd.items():
                fwd_totals[k_] = fwd_totals.get(k_, 0.0) + v_
            bf = min(fwd, key=fwd.get) if fwd else None
            bb = min(fb, key=fb.get) if fb else None
            f128 = r.get("flex128_fwdbwd", float("nan"))
            flash = t.get("sdpa_flash_fwdbwd", float("nan"))
            lines.append(
                f"| {density} ({r.get('density64', float('nan')):.3f} / {r.get('density128', float('nan')):.3f}) "
                f"| {r.get('flex64_fwd', float('nan')):.3f} "
                f"| {fwd.get(bf, float('nan')):.3f} ({bf}) | {f128:.3f} | {fb.get(bb, float('nan')):.3f} ({bb}) "
                f"| {f128 / fb[bb] if bb else float('nan'):.2f}x | {flash / fb[bb] if bb else float('nan'):.2f}x |")
            if fb:
                pre = {k[11:]: v for k, v in r.items() if k.startswith("pre_fwdbwd_")}
                lines.append("  all fwd+bwd (lists prebuilt): " + ", ".join(
                    f"{k_} {v_:.3f} ({pre.get(k_, float('nan')):.3f})" for k_, v_ in sorted(fb.items(), key=lambda x: x[1])))
        if fwd_totals:
            name = min(fwd_totals, key=fwd_totals.get)
            _, bn, w, st = next(v for v in FWD_VARIANTS if v[0] == name)
            suggestions.append(f"# {shape_name}: forward winner = {name}\n"
                               f"_CONFIGS['fwd'][{D}] = dict(BLOCK_N={bn}, num_warps={w}, num_stages={st})")
        if totals:
            win = min(totals, key=totals.get)
            _, mode, kb, bm, w, s = next(v for v in BWD_VARIANTS[D] if v[0] == win)
            suggestions.append(
                f"# {shape_name}: backward winner over the densities = {win}; in seer_attn/kernels/block_sparse_attn_csr.py set\n"
                f"_CONFIGS['dq'][{D}]['MODE'] = {mode!r}\n"
                f"_CONFIGS['dkdv'][{D}] = dict(KEY_BLOCKS={kb}, BLOCK_M={bm}, num_warps={w}, num_stages={s})")
    return "\n".join(lines), "\n".join(suggestions)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--seqlen", type=int, default=32768)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--only", nargs="+", default=["check", "csr", "pool", "flex", "sdpa"],
                        choices=["check", "csr", "pool", "flex", "sdpa"])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/sweep_csr_<gpu>.json)")
    parser.add_argument("--smoke", action="store_true", help="CPU self-test under TRITON_INTERPRET=1: tiny shapes, no Flex")
    args = parser.parse_args()
    if args.smoke:
        global DEVICE, CHECK_S
        DEVICE, CHECK_S = "cpu", 130
        SHAPES.update(llama8b=(4, 2, 128), smollm2=(3, 1, 64))
        args.seqlen = 200
        args.only = [s_ for s_ in args.only if s_ != "flex"]
        args.out = args.out or "/tmp/sweep_csr_smoke.json"
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-interpreter"
    log(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}")
    results = {"meta": {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "args": vars(args),
                        "date": time.strftime("%Y-%m-%d")}}
    for shape_name in args.shapes:
        ok = check_shape(shape_name, results) if "check" in args.only else {}
        time_shape(shape_name, args.seqlen, args.densities, set(args.only), ok, results)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the shape's tensors died with time_shape's frame
    table, suggestions = report(results, args.densities)
    print(table)
    print("\n# suggested defaults\n" + suggestions)
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"sweep_csr_{gpu.replace(' ', '_').replace('/', '_')}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {out}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
