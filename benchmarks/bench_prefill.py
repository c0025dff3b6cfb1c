"""End-to-end prefill latency (time to first token) of a Seer model (any family): dense SDPA vs SeerAttention.

Kernel speedups alone overstate what a user gets: this times the whole model forward (embeddings,
MLPs, gates, block selection, LM head on the last position), batch 1, on the GPU.

    python benchmarks/bench_prefill.py --model smollm2-135m --yarn-factor 4 --lengths 32768 \
        --nz-ratios 0.5,0.1 --out benchmarks/results/prefill.json
    python benchmarks/bench_prefill.py --suite        # issue 11: both model shapes, everything, ~6 min (H100)

`--model` may be a plain model of any supported family, a fine-tuned or gated checkpoint, or
`--config-json` a config (plain or Seer, any supported family, e.g. a Qwen2.5-7B `config.json`) whose
architecture is timed with random weights (timings do not depend on the weights; no model file is
needed; a config's context is stretched with YaRN when a length needs it). Medians of CUDA-event
timings; ratios are against the dense forward of the same run.

Extras (each a flag; `--suite` turns on all of them for `configs/smollm2_135m_llama_config.json` and
`configs/llama3_8b_4layer_config.json` at 32k and 128k):
- `--graphs`: dense and sparse (last nz_ratio) forwards also with `seerattn_cuda_graphs` (one graph
  replay per forward); `--twin`: the sparse forward with the PyTorch gate instead of the fused one;
- `--generate`: `generate(max_new_tokens=1)` time to first token (KV cache, padding mask path);
- `--train`: one training step (forward + backward, batch 1, gradient checkpointing, bf16 autocast
  over fp32 weights, as `seer_attn.training.finetune` runs it): dense vs sparse fine-tuning with the
  gate loss, and the cheaper ground truth (`--gt-variants`: a quarter of the layers per step;
  every 4th step) at the last nz_ratio; means over 4 steps (one full cycle of the schedules);
- `--crossover`: per layer, the sparse path (fused gate + selection + TopK kernel) vs dense SDPA from
  1k to 32k tokens; prints the crossover length per density and the `MEASURED_CROSSOVERS` entry for
  `seer_attn.modules.crossover` (`seerattn_min_sparse_length="auto"`);
- `--profile`: a torch.profiler summary of the sparse forward at the last nz_ratio (GPU time by
  kernel family, CPU vs GPU time, the top kernels).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from transformers import AutoConfig

from seer_attn import AutoSeerForCausalLM
from seer_attn.models import apply_yarn

SUITE_CONFIGS = ("configs/smollm2_135m_llama_config.json", "configs/llama3_8b_4layer_config.json")
T0 = time.time()
REPORT: list[str] = []  # the tables, also written to <out>.md


def report(text: str = "") -> None:
    print(text, flush=True)
    REPORT.append(text)
# "cpu" only for a smoke run of this script (TRITON_INTERPRET=1, tiny lengths); timings need CUDA
DEVICE = "cuda"


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn) -> float:
    """Milliseconds of `fn()` (CUDA events on the GPU)."""
    if DEVICE != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def log(msg: str) -> None:
    print(f"[bench_prefill {time.time() - T0:6.0f}s] {msg}", flush=True)


def _reps(length: int) -> tuple[int, int]:
    if DEVICE != "cuda":
        return (0, 1)
    return (1, 3) if length > 65536 else (2, 5)


def _bench(fn, graph: bool = False) -> float | None:
    if DEVICE != "cuda":
        return _timed(fn)
    import triton

    if not graph:
        return triton.testing.do_bench(fn, warmup=10, rep=40)
    try:  # one CUDA graph replay per call: the time without launch overhead
        return triton.testing.do_bench_cudagraph(fn, rep=40)
    except Exception as e:  # a path that cannot be captured: say so in the table, do not stop the sweep
        log(f"  (graph timing failed: {type(e).__name__}: {str(e)[:160]})")
        return None


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu smoke run"


def time_forward(model, ids, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of `model(ids, logits_to_keep=1, use_cache=False)` under no_grad."""
    with torch.no_grad():
        times = [_timed(lambda: model(ids, logits_to_keep=1, use_cache=False)) for _ in range(warmup + reps)]
    return statistics.median(times[warmup:])


def time_generate(model, ids, warmup: int = 1, reps: int = 3) -> float:
    """Median wall milliseconds of `generate(ids, max_new_tokens=1)`: time to first token with a KV cache."""
    times = []
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for _ in range(warmup + reps):
            _sync()
            t = time.perf_counter()
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)
            _sync()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[warmup:])


def time_train_step(model, ids, warmup: int = 1, reps: int = 4) -> float:
    """Mean milliseconds of forward + backward of `model(ids, labels=ids)` under bf16 autocast."""

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            out = model(ids, labels=ids, logits_to_keep=1, use_cache=False)
        out.loss.backward()

    times = [_timed(step) for _ in range(warmup + reps)]
    return statistics.mean(times[warmup:])


def build_model(args, config_json: str | None, max_length: int):
    if config_json:
        fields = json.loads(Path(config_json).read_text())
        config = AutoSeerForCausalLM.seer_config(AutoConfig.for_model(fields.pop("model_type"), **fields))
        name = f"{Path(config_json).stem} (random weights)"
    else:
        config = AutoSeerForCausalLM.config_from(args.model)
        name = args.model
    factor = args.yarn_factor
    if not factor and max_length > config.max_position_embeddings:
        factor = math.ceil(max_length / config.max_position_embeddings)
    if factor and factor > 1:
        apply_yarn(config, factor)
    if max_length > config.max_position_embeddings:
        raise SystemExit(f"length {max_length} exceeds max_position_embeddings {config.max_position_embeddings}")
    config.seerattn_min_sparse_length = 0
    if config_json:
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = AutoSeerForCausalLM.from_config(config)
        model = model.to(torch.bfloat16).eval()
    else:
        model = AutoSeerForCausalLM.from_pretrained(args.model, config=config, dtype=torch.bfloat16).to(DEVICE).eval()
    return model, name, factor


def attempt(label: str, fn):
    """`fn()`, or None after logging its error: one failing variant must not end the suite."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - reported in the log and as a missing row
        log(f"{label} failed: {type(e).__name__}: {str(e)[:400]}")
        torch.cuda.empty_cache()
        return None


def prefill_rows(model, length: int, args) -> list[dict]:
    from seer_attn.modules import fused_gate

    ids = torch.randint(100, model.config.vocab_size - 1, (1, length), device=DEVICE)
    w, r = _reps(length)
    nzs = [float(x) for x in args.nz_ratios.split(",")]
    rows = []

    def add(method, nz, fn, density=None):
        ms = attempt(f"S={length} {method} nz={nz}", fn)
        if ms is None:
            return
        what = "generate" if method.startswith("generate") else "prefill"
        rows.append({"what": what, "S": length, "method": method, "nz_ratio": nz, "density": density, "ms": ms})
        log(f"S={length} {method} nz={nz}: {ms:.1f} ms")

    def graphs(fn):
        model.set_seerattn(seerattn_cuda_graphs=True)
        try:
            return fn()
        finally:
            model._cuda_graph = None
            model.set_seerattn(seerattn_cuda_graphs=False)

    def density():
        with torch.no_grad():
            return model(ids, logits_to_keep=1, use_cache=False).density

    model.set_seerattn(seerattn_mode="dense", seerattn_cuda_graphs=False)
    add("dense (SDPA)", 1.0, lambda: time_forward(model, ids, w, r), 1.0)
    if args.graphs:
        add("dense (SDPA) + graphs", 1.0, lambda: graphs(lambda: time_forward(model, ids, w, r)), 1.0)
    for nz in nzs:
        model.set_seerattn(seerattn_mode="sparse", seerattn_nz_ratio=nz, seerattn_kernel_implementation=args.kernel)
        add(f"seer ({args.kernel}, fused gate)", nz, lambda: time_forward(model, ids, w, r), attempt("density", density))
    nz = nzs[-1]
    if args.graphs:
        add(f"seer ({args.kernel}) + graphs", nz, lambda: graphs(lambda: time_forward(model, ids, w, r)))
    if args.twin:
        fused_gate.set_fused_gate(False)
        add(f"seer ({args.kernel}, PyTorch gate)", nz, lambda: time_forward(model, ids, w, r), attempt("density", density))
        fused_gate.set_fused_gate(True)
    if args.generate:
        model.set_seerattn(seerattn_mode="dense")
        add("generate TTFT, dense", 1.0, lambda: time_generate(model, ids, 1, max(2, r - 2)))
        model.set_seerattn(seerattn_mode="sparse", seerattn_nz_ratio=nz)
        add(f"generate TTFT, seer ({args.kernel})", nz, lambda: time_generate(model, ids, 1, max(2, r - 2)))
    if args.profile:
        model.set_seerattn(seerattn_mode="sparse", seerattn_nz_ratio=nz)
        attempt("profile", lambda: profile_summary(model, ids))
    torch.cuda.empty_cache()
    return rows


# CSR backward settings per head_dim (seer_attn.kernels.block_sparse_attn_csr._CONFIGS entries): the
# atomic-dQ pass that was the default through session 6, and benchmarks/sweep_csr.py's kernel-level winner
CSR_BWD_VARIANTS = {
    "atomic dQ": {
        "dq": {d: dict(MODE="atomic", BLOCK_N=64, num_warps=4, num_stages=3 if d == 64 else 2) for d in (64, 128)},
        "dkdv": {d: dict(KEY_BLOCKS=1, BLOCK_M=64, num_warps=4 if d == 64 else 8, num_stages=2) for d in (64, 128)},
    },
    "separate dQ, 4-warp dK/dV": {
        "dq": {d: dict(MODE="separate", BLOCK_N=64, num_warps=4, num_stages=3 if d == 64 else 2) for d in (64, 128)},
        "dkdv": {d: dict(KEY_BLOCKS=1, BLOCK_M=64, num_warps=4, num_stages=2) for d in (64, 128)},
    },
}


@contextlib.contextmanager
def csr_backward(cfg: dict):
    from seer_attn.kernels import block_sparse_attn_csr as csr

    saved = {k: dict(csr._CONFIGS[k]) for k in cfg}
    for k, per_d in cfg.items():
        csr._CONFIGS[k].update(per_d)
    try:
        yield
    finally:
        for k, per_d in saved.items():
            csr._CONFIGS[k].clear()
            csr._CONFIGS[k].update(per_d)


def train_rows(model, length: int, args) -> list[dict]:
    ids = torch.randint(100, model.config.vocab_size - 1, (1, length), device=DEVICE)
    model = model.float().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = []

    def add(method, nz, fn):
        ms = attempt(f"train S={length} {method} nz={nz}", fn)
        if ms is None:
            return
        rows.append({"what": "train step", "S": length, "method": method, "nz_ratio": nz, "density": None, "ms": ms})
        log(f"train S={length} {method} nz={nz}: {ms:.1f} ms")

    model.set_seerattn(seerattn_mode="dense")
    add("dense", 1.0, lambda: time_train_step(model, ids))
    nzs = [float(x) for x in args.nz_ratios.split(",")]
    for nz in nzs:
        model.set_seerattn(seerattn_mode="sparse", seerattn_nz_ratio=nz, seerattn_kernel_implementation="auto")
        if not args.csr_bwd_variants:
            add("seer (CSR + gate loss, every layer)", nz, lambda: time_train_step(model, ids))
            continue
        # the CSR backward's launch settings A/B/A/B in one process (same-kind runs spread by up to 15%)
        for rep in range(2):
            for name, cfg in CSR_BWD_VARIANTS.items():
                with csr_backward(cfg):
                    add(f"seer (CSR backward {name}, run {rep + 1})", nz, lambda: time_train_step(model, ids))
    if args.gt_variants:
        n = model.config.num_hidden_layers
        for every, per in ((1, max(1, n // 4)), (4, 0)):
            model.set_seerattn(seerattn_nz_ratio=nzs[-1], seerattn_gt_every_n_steps=every, seerattn_gt_layers_per_step=per)
            label = f"{per}/{n} layers per step" if per else f"every {every}th step"
            add(f"seer (CSR, ground truth: {label})", nzs[-1], lambda: time_train_step(model, ids))
        model.set_seerattn(seerattn_gt_every_n_steps=1, seerattn_gt_layers_per_step=0)
    model.gradient_checkpointing_disable()
    return rows


def profile_summary(model, ids, top: int = 8) -> None:
    """GPU time of one sparse forward grouped by kernel family, CPU vs GPU time, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        model(ids, logits_to_keep=1, use_cache=False)
        _sync()
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(ids, logits_to_keep=1, use_cache=False)
            _sync()
        wall = (time.perf_counter() - t) * 1e3
    families = {
        "gate (fused kernels)": ("gate_pool", "gate_score", "gate_select"),
        "sparse attention (TopK)": ("block_sparse_attn_topk",),
        "dense attention": ("flash", "fmha", "cudnn", "attention"),
        "matmul": ("gemm", "cutlass", "xmma", "nvjet", "sm90", "matmul"),
        "topk / sort": ("topk", "sort", "radix"),
    }
    rows = []
    for e in prof.key_averages():
        t_dev = getattr(e, "self_device_time_total", None)
        if t_dev is None:
            t_dev = getattr(e, "self_cuda_time_total", 0)
        if t_dev > 0 and e.device_type is not None and "cuda" in str(e.device_type).lower():
            rows.append((e.key, t_dev / 1e3, e.count))
    total = sum(r[1] for r in rows)
    by_family: dict[str, float] = {}
    for name, ms, _ in rows:
        fam = next((f for f, keys in families.items() if any(k in name.lower() for k in keys)), "elementwise / other")
        by_family[fam] = by_family.get(fam, 0.0) + ms
    report(f"\nprofile of the sparse forward ({model.config.num_hidden_layers} layers, S={ids.shape[1]}, "
           f"nz={model.config.seerattn_nz_ratio}): GPU kernel time {total:.1f} ms, profiled wall {wall:.1f} ms\n")  # fmt: skip
    report("| kernel family | GPU ms | share |\n|---|---|---|")
    for fam, ms in sorted(by_family.items(), key=lambda x: -x[1]):
        report(f"| {fam} | {ms:.2f} | {ms / max(total, 1e-9):.1%} |")
    report("\n| top kernels | GPU ms | calls |\n|---|---|---|")
    for name, ms, n in sorted(rows, key=lambda r: -r[1])[:top]:
        report(f"| {name[:70]} | {ms:.2f} | {n} |")


def crossover_rows(config, args) -> tuple[list[dict], dict]:
    """Per layer: fused gate + selection + TopK vs dense SDPA at growing lengths; crossover per density."""
    from seer_attn.modules.attn_gate import AttnGate
    from seer_attn.modules.seer_attention import SeerAttentionSettings, dense_attention, seer_attention

    Hq, Hkv = config.num_attention_heads, config.num_key_value_heads
    D = config.head_dim or config.hidden_size // Hq
    # the model's own gate design and sparsity method (the library defaults unless the config sets them)
    gate = AttnGate(
        Hq, Hkv, D, gate_type=config.seerattn_gate_type, hidden_size=config.seerattn_gate_hidden_size,
        block_size=config.seerattn_gate_block_size, q_summaries=config.seerattn_gate_q_summaries,
        k_summaries=config.seerattn_gate_k_summaries,
    ).to(DEVICE, torch.bfloat16).eval()
    Dg, stride = gate.hidden_size, gate.rope_stride
    scale = D**-0.5
    nzs = [float(x) for x in args.nz_ratios.split(",")]
    rows = []
    for S in (int(x) for x in args.crossover_lengths.split(",")):
        q = torch.randn(1, S, Hq, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        k = torch.randn(1, S, Hkv, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        v = torch.randn(1, S, Hkv, D, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        # RoPE tables at every summary start (the gate reads every r-th entry for its summaries)
        pos = torch.arange(math.ceil(S / stride), device=DEVICE, dtype=torch.float32)[:, None] * stride
        inv = 1.0 / (10000.0 ** (torch.arange(0, Dg, 2, device=DEVICE, dtype=torch.float32) / Dg))
        ang = torch.cat([pos * inv] * 2, -1)[None]
        cos, sin = ang.cos(), ang.sin()
        r = {"S": S}
        with torch.no_grad():
            r["dense"] = _bench(lambda: dense_attention(q, k, v, scale))
            if args.crossover_graphs:
                r["dense_graph"] = _bench(lambda: dense_attention(q, k, v, scale), graph=True)
            for nz in nzs:
                st = SeerAttentionSettings(mode="sparse", nz_ratio=nz, kernel="TopK",
                                           sparsity_method=config.seerattn_sparsity_method,
                                           adaptive_row_floor=config.seerattn_adaptive_row_floor)  # fmt: skip
                fn = lambda: seer_attention(q, k, v, q, k, gate, cos, sin, scale, st)  # noqa: E731
                r[f"sparse_d{nz}"] = _bench(fn)
                if args.crossover_graphs:
                    r[f"sparse_d{nz}_graph"] = _bench(fn, graph=True)
        rows.append(r)
        log("crossover " + json.dumps({key: round(val, 4) if isinstance(val, float) else val for key, val in r.items()}))
    cross = {}
    for suffix in ("", "_graph") if args.crossover_graphs else ("",):
        for nz in nzs:
            best = None  # the shortest length from which sparse stays faster at every longer length measured
            for r in reversed(rows):
                sp, de = r.get(f"sparse_d{nz}{suffix}"), r.get(f"dense{suffix}")
                if sp is not None and de is not None and sp < de:
                    best = r["S"]
                else:
                    break
            cross[nz if not suffix else f"{nz}_graph"] = best
    return rows, cross


def print_rows(title: str, rows: list[dict]) -> None:
    report(f"\n{title}\n")
    report("| what | S | method | nz_ratio | realised density | ms | speedup vs dense |")
    report("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((x for x in rows if x["what"] == r["what"] and x["S"] == r["S"] and x["nz_ratio"] == 1.0), None)
        dens = "-" if r["density"] is None else f"{r['density']:.3f}"
        sp = f"{base['ms'] / r['ms']:.2f}x" if base else "-"
        report(f"| {r['what']} | {r['S']} | {r['method']} | {r['nz_ratio']} | {dens} | {r['ms']:.1f} | {sp} |")


def run_model(args, config_json, lengths) -> dict:
    model, name, factor = build_model(args, config_json, max(lengths))
    cfg = model.config
    log(f"{name}: {cfg.num_hidden_layers} layers, Hq {cfg.num_attention_heads}, Hkv {cfg.num_key_value_heads}, yarn {factor}")
    out = {"model": name, "yarn_factor": factor, "rows": []}
    for length in lengths:
        out["rows"] += prefill_rows(model, length, args)
    crossed = attempt("crossover", lambda: crossover_rows(cfg, args)) if args.crossover else None
    if crossed is not None:
        rows, cross = crossed
        out["crossover_rows"], out["crossover"] = rows, cross
        D = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
        key = (cfg.num_attention_heads, cfg.num_key_value_heads, D, cfg.hidden_size)
        report(f"\ncrossover per layer (fused gate + TopK vs dense SDPA), {name}: {cross}")
        cols = [c for c in rows[0] if c != "S"]
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        report("| S | " + " | ".join(f"{c} ms" for c in cols) + " |")
        report("|---|" + "---|" * len(cols))
        for r in rows:
            report(f"| {r['S']} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |")
        eager = {nz: s for nz, s in cross.items() if not str(nz).endswith("_graph")}
        report(f"MEASURED_CROSSOVERS entry: {key}: {{{', '.join(f'{nz}: {s}' for nz, s in eager.items() if s)}}},")
    if args.train:
        train_len = min(lengths) if args.train_length is None else args.train_length
        rows = train_rows(model, train_len, args)
        out["rows"] += rows
    print_rows(f"{name}, {_gpu_name()}, torch {torch.__version__}", out["rows"])
    del model
    torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--yarn-factor", type=float, default=None, help="apply YaRN to a plain model first")
    p.add_argument("--lengths", "--length", default="32768", help="comma-separated prefill lengths")
    p.add_argument("--nz-ratios", default="0.5,0.1")
    p.add_argument("--kernel", default="TopK", help="seerattn_kernel_implementation for the sparse runs")
    p.add_argument("--config-json", default=None, help="time these architectures (comma-separated config.json files) with random weights")
    p.add_argument("--graphs", action="store_true", help="also time with seerattn_cuda_graphs")
    p.add_argument("--twin", action="store_true", help="also time the sparse forward with the PyTorch gate")
    p.add_argument("--generate", action="store_true", help="also time generate() to the first token")
    p.add_argument("--train", action="store_true", help="also time a fine-tuning step (fwd + bwd)")
    p.add_argument("--train-length", type=int, default=None, help="train-step length (default: the shortest --lengths)")
    p.add_argument("--train-models", default=None, help="with --suite: only these config stems train (default: smollm2)")
    p.add_argument("--gt-variants", action="store_true", help="with --train: also the cheaper ground truth")
    p.add_argument("--csr-bwd-variants", action="store_true",
                   help="with --train: time the CSR backward's settings (CSR_BWD_VARIANTS) A/B/A/B")
    p.add_argument("--crossover", action="store_true", help="also search the per-layer crossover length")
    p.add_argument("--crossover-lengths", default="1024,2048,4096,8192,12288,16384,24576,32768")
    p.add_argument("--crossover-graphs", action="store_true",
                   help="with --crossover: also time both sides as CUDA graph replays (the crossover without launch overhead)")
    p.add_argument("--profile", action="store_true", help="profile summary of the sparse forward at the last nz_ratio")
    p.add_argument("--suite", action="store_true", help="issue 11: both configs at 32k and 128k, every extra")
    p.add_argument("--out", default="benchmarks/results/prefill.json")
    p.add_argument("--smoke-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke_cpu:
        # exercise every code path on CPU (TRITON_INTERPRET=1, tiny config and lengths); numbers mean nothing
        global DEVICE
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("bench_prefill.py needs a CUDA GPU")
    lengths = [int(x) for x in args.lengths.split(",")]
    configs = args.config_json.split(",") if args.config_json else [None]
    if args.suite:
        configs, lengths = list(SUITE_CONFIGS), [32768, 131072]
        args.graphs = args.twin = args.generate = args.train = args.gt_variants = args.crossover = args.profile = True
        args.crossover_graphs = True
        args.train_models = args.train_models or "smollm2_135m_llama_config"
    results = []
    for cfg in configs:
        train = args.train
        if args.train_models is not None and cfg is not None:
            args.train = train and Path(cfg).stem in args.train_models.split(",")
        results.append(run_model(args, cfg, lengths))
        args.train = train
        _write(args, lengths, results)  # after every model: a run cut short keeps what it measured
    log(f"done; JSON at {args.out}, tables at {Path(args.out).with_suffix('.md')}")


def _write(args, lengths, results) -> None:
    meta = {"gpu": _gpu_name(), "torch": torch.__version__, "lengths": lengths, "wall_s": round(time.time() - T0)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    Path(args.out).with_suffix(".md").write_text(f"{meta}\n" + "\n".join(REPORT) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
