"""Decode-stage sparsity on the GPU: per-step decode attention latency, and `generate()` tokens/s.

1. Attention of one new token per sequence over a KV cache of `L` tokens, per layer, for the
   Llama-3-8B shape (Hq 32, Hkv 8, D 128) and the SmolLM2 shape (Hq 9, Hkv 3, D 64):

   - `sdpa`: `F.scaled_dot_product_attention` over the full cache (the `G` query heads of a KV
     head folded into the query axis, so GQA needs no repeated K/V);
   - `flex`: compiled FlexAttention over the full cache (`enable_gqa=True`; its decoding kernel);
   - `seer`: the whole decode step of `seer_attn.modules.decode.sparse_decode_step`, gate included
     (gate query, scores against the compressed keys, top-k at the token budget, block-sparse split-K
     kernel, statistics); the per-token append to the compressed-key cache is not included (one small
     copy per step, one compression per 64 steps);
   - `seercomp`: the same with `seerattn_compile_decode_gate` (the gate's query, scores and selection
     as one `torch.compile`d graph);
   - `kernel`: `sparse_decode_attn` alone on a fixed random selection of the same size.

   Each is timed eagerly (`triton.testing.do_bench`, median) and, except flex, inside a CUDA graph
   (`do_bench_cudagraph`): eager per-step timings at batch 1 are dominated by kernel launches.
   Ratios are `sdpa / x` at the same timing mode.

2. With `--generate`: end-to-end decode tokens/s of `generate()` (DynamicCache, eager) for SmolLM2
   with YaRN x4 at `--gen-context`, dense vs sparse decoding, eager and with the compiled decode gate
   (untrained decode gates: timings do not
   depend on the weights), prefill excluded (a 1-token generate is subtracted).
3. With `--graphed`: the same model decoding greedily through `seer_attn.models.cuda_graphs.GraphedDecoder`
   (a `StaticCache`, every one-token step one CUDA graph replay), dense vs sparse decoding; dense twice:
   masked SDPA over every slot (as transformers with a StaticCache) and the split-K decoding kernel
   with every filled block (`dense_splitk`, flash-decoding over the filled slots only); sparse twice:
   the decode gate's step as one Triton kernel per layer (`seer_attn.kernels.decode_gate_kernel`, the
   default on CUDA) and its PyTorch twin under `seerattn_compile_decode_gate` (state update, queries,
   scores and selection as one compiled function; `sparse_compiled`). Only the
   replayed steps are timed (prefill and capture excluded). `--gen-config` times random weights of a
   config.json instead of the SmolLM2 GGUF (the decode rate does not depend on the weights).
4. With `--gate-step`: the one-kernel decode-gate step (`decode_gate_step`) alone, per launch, 30 launches
   (one per layer of SmolLM2) replayed as one CUDA graph, at a token that does not complete its block (1 step
   in 64 also compresses the completed block): the state update only (a dense step), threshold
   selection, and top-k selection with the multi-way threshold search (`TOPK_WAYS` thresholds per step) and
   with 2 thresholds per step (about the bisection it replaced): where the gate step's latency goes.

    python benchmarks/bench_decode.py --out benchmarks/results/bench_decode.json --generate

About 3 minutes on an H100 with the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from seer_attn.kernels import decode_gate_kernel as dgk
from seer_attn.kernels.sparse_decode_attn import sparse_decode_attn
from seer_attn.modules.decode import DecodeSettings, sparse_decode_step
from seer_attn.modules.decode_gate import CompressedKeyCache, DecodeGate

SHAPES = {"llama8b": (32, 8, 128), "smollm2": (9, 3, 64)}
GATE_STEP_DEVICE = "cuda"  # (a CPU smoke test of --gate-step sets "cpu" under TRITON_INTERPRET=1)
BS = 64


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def bench(fn, graph: bool) -> float | None:
    try:
        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as e:  # report the failure in the table rather than aborting the sweep
        print(f"  ({'graph' if graph else 'eager'} timing failed: {type(e).__name__}: {str(e)[:120]})", flush=True)
        return None


def rope_fn(dim: int, theta: float = 500000.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device="cuda", dtype=torch.float32) / dim)

    def tables(pos: torch.Tensor):
        f = pos[..., None].float() * inv
        emb = torch.cat([f, f], -1)
        return emb.cos(), emb.sin()

    return tables


def attention_rows(args, flex) -> list[dict]:
    rows = []
    for name in args.shapes.split(","):
        Hq, Hkv, D = SHAPES[name]
        G = Hq // Hkv
        gate = DecodeGate(Hq, Hkv, D, "Kmaxminavg", block_size=BS).cuda()
        for L in _ints(args.contexts):
            for B in _ints(args.batches):
                torch.cuda.empty_cache()
                q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
                q_pre = torch.randn_like(q)
                k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16)
                v = torch.randn_like(k)
                scale = 1 / math.sqrt(D)
                state = CompressedKeyCache()
                state.keys = torch.randn(B, Hkv, L // BS, D, device="cuda")
                pos = torch.full((1, 1), L - 1, device="cuda", dtype=torch.long)
                s = DecodeSettings(token_budget=args.budget, kernel="TopK", block_size=BS)
                s_c = DecodeSettings(token_budget=args.budget, kernel="TopK", block_size=BS, compile_gate=True)
                rope = rope_fn(D)
                nsel = min(args.budget // BS - 1, L // BS)
                idx = torch.rand(B, Hkv, 1, L // BS, device="cuda").topk(nsel, dim=-1).indices

                fns = {
                    "sdpa": lambda: F.scaled_dot_product_attention(q.view(B, Hkv, G, D), k, v, scale=scale),
                    "seer": lambda: sparse_decode_step(gate, s, q, k, v, q_pre, None, pos, scale, rope, state)[0],
                    # seerattn_compile_decode_gate: the gate's query, scores and selection as one compiled graph
                    "seercomp": lambda: sparse_decode_step(gate, s_c, q, k, v, q_pre, None, pos, scale, rope, state)[0],
                    "kernel": lambda: sparse_decode_attn(q, k, v, idx, scale, BS),
                }
                if flex is not None:
                    fns["flex"] = lambda: flex(q, k, v, scale=scale, enable_gqa=True)
                r = {"shape": name, "context": L, "batch": B, "budget": args.budget}
                for m, fn in fns.items():
                    r[f"{m}_ms"] = bench(fn, graph=False)
                    if m != "flex":
                        r[f"{m}_graph_ms"] = bench(fn, graph=True)
                if flex is not None and r["flex_ms"] is None:
                    print("  FlexAttention failed: skipped from here on", flush=True)
                    flex = None
                for m in ("seer", "seercomp", "kernel", "flex"):
                    for mode in ("", "_graph"):
                        a, b = r.get(f"sdpa{mode}_ms"), r.get(f"{m}{mode}_ms")
                        if a and b:
                            r[f"{m}{mode}_speedup"] = a / b
                rows.append(r)
                print(json.dumps({k: round(x, 4) if isinstance(x, float) else x for k, x in r.items()}), flush=True)
                del q, q_pre, k, v, state, idx, fns
    return rows


def _gen_model(args):
    from transformers import AutoConfig

    from seer_attn import AutoSeerForCausalLM, SeerLlamaForCausalLM
    from seer_attn.models import apply_yarn

    fields = dict(
        seerattn_decode_gate_type="Kmaxminavg", seerattn_decode_min_context=0, seerattn_decode_token_budget=args.budget,
        seerattn_min_sparse_length=1 << 30,
    )
    if args.gen_config:
        raw = json.loads(Path(args.gen_config).read_text())
        config = AutoSeerForCausalLM.seer_config(AutoConfig.for_model(raw.pop("model_type"), **raw))
        for k, v in fields.items():
            setattr(config, k, v)
        apply_yarn(config, 4)
        model = AutoSeerForCausalLM.from_config(config).to(torch.bfloat16)
        name = f"{Path(args.gen_config).stem} yarn x4 (random weights)"
    else:
        config = SeerLlamaForCausalLM.config_from("smollm2-135m", **fields)
        apply_yarn(config, 4)
        model = SeerLlamaForCausalLM.from_pretrained("smollm2-135m", config=config, dtype=torch.bfloat16)
        name = "smollm2-135m yarn x4"
    return model.cuda().eval(), name


def generate_rows(args) -> list[dict]:
    model, name = _gen_model(args)
    config = model.config
    rows = []
    for B in _ints(args.gen_batches):
        ids = torch.randint(100, config.vocab_size - 1, (B, args.gen_context), device="cuda")

        def run(n: int) -> float:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        r = {"model": name, "context": args.gen_context, "batch": B, "budget": args.budget}
        for mode in ("dense", "sparse", "sparse_compiled"):
            model.set_seerattn(seerattn_mode=mode.split("_")[0], seerattn_compile_decode_gate=mode == "sparse_compiled")
            run(2)  # warm-up (autotuning, allocator)
            t = run(1 + args.gen_tokens) - run(1)
            r[f"{mode}_tokens_per_s"] = B * args.gen_tokens / t
        r["speedup"] = r["sparse_tokens_per_s"] / r["dense_tokens_per_s"]
        r["speedup_compiled"] = r["sparse_compiled_tokens_per_s"] / r["dense_tokens_per_s"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def graphed_rows(args) -> list[dict]:
    import seer_attn.modules.decode as decode_module
    from seer_attn.models.cuda_graphs import GraphedDecoder

    model, name = _gen_model(args)
    n = args.gen_tokens
    rows = []
    for L, B in [(L, B) for L in _ints(args.gen_contexts or str(args.gen_context)) for B in _ints(args.gen_batches)]:
        ids = torch.randint(100, model.config.vocab_size - 1, (B, L), device="cuda")
        r = {"model": name, "context": L, "batch": B, "budget": args.budget, "tokens": n}
        # sparse: the gate step as one kernel per layer (decode_gate_kernel); sparse_compiled: its PyTorch twin,
        # torch.compile'd (the fused kernel off)
        for mode in ("dense", "dense_splitk", "sparse", "sparse_compiled"):
            model.set_seerattn(seerattn_mode=mode.split("_")[0], seerattn_compile_decode_gate=mode == "sparse_compiled")
            decode_module.set_fused_decode_gate(mode != "sparse_compiled")
            decode_module.DENSE_SLOTS_KERNEL = "splitk" if mode == "dense_splitk" else "sdpa"
            dec = GraphedDecoder(model, max_cache_len=L + n + 8)
            dec.prefill(ids)
            dec.step()  # capture (and its warm-up runs)
            dec.prefill(ids)  # the same buffers and graph, a fresh context
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                dec.step()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            r[f"{mode}_tokens_per_s"] = B * n / dt
            r[f"{mode}_ms_per_step"] = 1e3 * dt / n
            r[f"{mode}_tokens"] = dec.out[:, L : L + 8].tolist()
            del dec
            torch.cuda.empty_cache()
        decode_module.DENSE_SLOTS_KERNEL = "auto"
        decode_module.set_fused_decode_gate(True)
        r["speedup"] = r["sparse_tokens_per_s"] / r["dense_tokens_per_s"]
        r["speedup_vs_splitk"] = r["sparse_tokens_per_s"] / r["dense_splitk_tokens_per_s"]
        r["speedup_compiled"] = r["sparse_compiled_tokens_per_s"] / r["dense_tokens_per_s"]
        r["speedup_compiled_vs_splitk"] = r["sparse_compiled_tokens_per_s"] / r["dense_splitk_tokens_per_s"]
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("_tokens")}), flush=True)
    return rows


def gate_step_rows(args) -> list[dict]:
    """The decode gate's one-kernel step alone, per launch (30 launches per graph replay)."""
    rows, dev = [], GATE_STEP_DEVICE
    for shape in args.shapes.split(","):
        hq, hkv, d = SHAPES[shape]
        dg = d
        for ctx in _ints(args.contexts):
            for b in _ints(args.batches):
                slots = (ctx + 1024) // BS + 1
                t = torch.full((b,), ctx, dtype=torch.long, device=dev)
                keys = torch.randn(b, hkv, slots, dg, device=dev)
                block = torch.randn(b, hkv, BS, d, device=dev, dtype=torch.bfloat16)
                q = torch.randn(b, hq, 1, d, device=dev, dtype=torch.bfloat16)
                k = torch.randn(b, hkv, 1, d, device=dev, dtype=torch.bfloat16)
                w_k = torch.randn(hkv, 3 * d, dg, device=dev) / math.sqrt(3 * d)
                w_q = torch.randn(hq, d, dg, device=dev) / math.sqrt(d)
                nw = torch.ones(dg, device=dev)
                inv = 1.0 / 10000.0 ** (torch.arange(0, dg, 2, device=dev, dtype=torch.float32) / dg)

                def step(select=True, threshold=None):
                    return lambda: [dgk.decode_gate_step(q, k, t, block, keys, w_k, w_q, nw, nw, inv, 1.0, ("max", "min", "avg"),
                                                         token_budget=args.budget, threshold=threshold, select=select)
                                    for _ in range(30)]  # fmt: skip

                r = {"shape": shape, "context": ctx, "batch": b, "budget": args.budget}
                ways = dgk.TOPK_WAYS
                try:
                    for name, fn in (("state_only", step(False)), ("threshold", step(True, 1e-3)), ("topk", step())):
                        ms = bench(fn, graph=True)
                        r[f"{name}_us"] = None if ms is None else ms / 30 * 1e3
                    dgk.TOPK_WAYS = 2
                    ms = bench(step(), graph=True)
                    r["topk_2way_us"] = None if ms is None else ms / 30 * 1e3
                finally:
                    dgk.TOPK_WAYS = ways
                rows.append(r)
                print(json.dumps(r), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama8b,smollm2")
    p.add_argument("--contexts", default="8192,32768,131072")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--budget", type=int, default=4096, help="token budget of the sparse step (own block included)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compilation takes a while)")
    p.add_argument("--generate", action="store_true", help="also time generate() for SmolLM2")
    p.add_argument("--gen-context", type=int, default=32768)
    p.add_argument("--gen-batches", default="1,8")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--gen-contexts", default=None, help="--graphed: several contexts (comma-separated; the crossover)")
    p.add_argument("--graphed", action="store_true", help="time GraphedDecoder (StaticCache + CUDA graphs), dense vs sparse")
    p.add_argument("--gen-config", default=None, help="config.json for --generate / --graphed with random weights")
    p.add_argument("--skip-attention", action="store_true", help="only the generation parts")
    p.add_argument("--gate-step", action="store_true", help="time the one-kernel decode-gate step alone (see 4.)")
    p.add_argument("--out", default="benchmarks/results/bench_decode.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU")

    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        torch._dynamo.config.cache_size_limit = 64
        flex = torch.compile(flex_attention, dynamic=True)
    t0 = time.perf_counter()
    rows = [] if args.skip_attention else attention_rows(args, flex)
    gen = generate_rows(args) if args.generate else []
    graphed = graphed_rows(args) if args.graphed else []
    gate_step = gate_step_rows(args) if args.gate_step else []
    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "budget": args.budget, "seconds": round(time.perf_counter() - t0, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "attention": rows, "generate": gen, "graphed": graphed, "gate_step": gate_step}, indent=2))

    fmt = lambda x: "" if x is None else f"{x:.3f}"  # noqa: E731
    ratio = lambda x: "" if x is None else f"{x:.2f}x"  # noqa: E731
    print(f"\ndecode attention per layer and step, budget {args.budget}, {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}")
    print("| shape | L | B | sdpa ms | flex ms | seer ms | seer vs sdpa | kernel vs sdpa | flex vs sdpa "
          "| graph: sdpa ms | seer ms | seer vs sdpa |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['context']} | {r['batch']} | {fmt(r.get('sdpa_ms'))} | {fmt(r.get('flex_ms'))} "
              f"| {fmt(r.get('seer_ms'))} | {ratio(r.get('seer_speedup'))} | {ratio(r.get('kernel_speedup'))} "
              f"| {ratio(r.get('flex_speedup'))} | {fmt(r.get('sdpa_graph_ms'))} | {fmt(r.get('seer_graph_ms'))} "
              f"| {ratio(r.get('seer_graph_speedup'))} |")
    for r in gen:
        print(f"generate {r['model']} L={r['context']} B={r['batch']}: dense {r['dense_tokens_per_s']:.1f} tok/s, "
              f"sparse {r['sparse_tokens_per_s']:.1f} tok/s ({r['speedup']:.2f}x)")
    for r in graphed:
        print(f"graphed {r['model']} L={r['context']} B={r['batch']}: dense {r['dense_tokens_per_s']:.1f} tok/s "
              f"({r['dense_ms_per_step']:.2f} ms/step), sparse {r['sparse_tokens_per_s']:.1f} tok/s "
              f"({r['sparse_ms_per_step']:.2f} ms/step, gate step fused): {r['speedup']:.2f}x; dense through the split-K kernel "
              f"{r['dense_splitk_tokens_per_s']:.1f} tok/s: {r['speedup_vs_splitk']:.2f}x; sparse with the compiled PyTorch gate step "
              f"{r['sparse_compiled_tokens_per_s']:.1f} tok/s: {r['speedup_compiled']:.2f}x / {r['speedup_compiled_vs_splitk']:.2f}x")
    if gate_step:
        print(f"\ndecode gate step alone, us per launch (graph of 30), budget {args.budget}, top-k ways {dgk.TOPK_WAYS}")
        print("| shape | L | B | state only | threshold | top-k | top-k, 2 ways |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in gate_step:
            print(f"| {r['shape']} | {r['context']} | {r['batch']} | {fmt(r['state_only_us'])} | {fmt(r['threshold_us'])} "
                  f"| {fmt(r['topk_us'])} | {fmt(r['topk_2way_us'])} |")
    print(f"({meta['seconds']} s)")


if __name__ == "__main__":
    main()
